"""What an engine core asks of an executor.

An executor owns the model weights, the KV cache tensor(s) and every device buffer of an
instance; the core owns every decision. `launch(plan)` starts a step and returns at once with a
`StepHandle`; `handle.wait()` is the step's only host sync and returns its `StepResult`. At most
two steps are launched and unread at any time (asynchronous scheduling reads step N after it
launched N+1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from engine.plan import StepPlan, StepResult

LayerListener = Callable[[int], None]  # called after layer i wrote its KV (e.g. to stream it)


class StepHandle(Protocol):
    """A launched step."""

    def wait(self) -> StepResult:
        """Block until the step's sampled ids are on the host."""
        ...


class Executor(Protocol):
    """Runs step plans on the instance's rank(s)."""

    num_blocks: int  # KV blocks per rank (the minimum over ranks)
    device: torch.device

    def launch(self, plan: StepPlan, layer_listener: LayerListener | None = None) -> StepHandle:
        ...

    def shutdown(self) -> None:
        ...
