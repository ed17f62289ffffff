"""Executors run an engine core's step plans: one rank in process, or a group of rank processes."""

from engine.executor.base import Executor, LayerListener, StepHandle
from engine.executor.local import LocalExecutor

__all__ = ["Executor", "LayerListener", "LocalExecutor", "StepHandle"]
