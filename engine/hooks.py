"""Interfaces the engine core calls out through; workers implement them (never the reverse).

`KVHandoff` is the prefill side's hand-off: a step that completes prompts first lets the hook
begin their transfers (it may return a per-layer listener that streams each layer's KV as soon
as it is written), and after the step the core hands each such request over: the request leaves
the scheduler with its first token recorded, and its blocks stay allocated — held by the
transfer — until the hook calls `EngineCore.release_blocks` (acknowledged, failed or timed out).
While a hand-off hook is installed, steps do not overlap (no asynchronous scheduling): the
hand-off needs each step's sampled token before the next step is planned.
"""

from __future__ import annotations

from typing import Protocol

from engine.executor.base import LayerListener
from engine.outputs import RequestOutput
from engine.request import Request


class KVHandoff(Protocol):
    def begin(self, requests: list[Request]) -> LayerListener | None:
        """Before the step that completes `requests`' prompts (their blocks are allocated)."""
        ...

    def handed_off(self, request: Request, output: RequestOutput, step_s: float) -> None:
        """After that step: `request` left the core with its first token in `output`; its
        blocks are the hook's until it calls `release_blocks`."""
        ...
