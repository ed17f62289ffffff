"""Spawned worker processes that run test steps one at a time, each with its own state.

A step is a plain module-level function `step(state: dict, **kwargs)`; the worker runs it and
reports ("ok", result) or (exception type name, message). Every wait is bounded, so a hung
worker fails the test instead of hanging it.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import pytest

STEP_TIMEOUT_S = 20.0


def _worker_main(seed: int, inbox: mp.Queue, outbox: mp.Queue) -> None:
    state: dict[str, Any] = {"seed": seed}
    while (item := inbox.get()) is not None:
        step, kwargs = item
        started = time.monotonic()
        try:
            outbox.put(("ok", step(state, **kwargs), time.monotonic() - started))
        except Exception as exc:  # reported to the test, which asserts on the type
            detail = f"{exc}\n{traceback.format_exc()}"
            outbox.put((type(exc).__name__, detail, time.monotonic() - started))


@dataclass
class Outcome:
    kind: str  # "ok" or the exception type's name
    value: Any
    elapsed_s: float


class Worker:
    """A spawned process that runs steps one at a time."""

    def __init__(self, context: Any, seed: int) -> None:
        self.seed = seed
        self.inbox, self.outbox = context.Queue(), context.Queue()
        self.process = context.Process(target=_worker_main, args=(seed, self.inbox, self.outbox),
                                       daemon=True)
        self.process.start()

    def submit(self, step: Callable[..., Any], **kwargs: Any) -> None:
        self.inbox.put((step, kwargs))

    def outcome(self, timeout_s: float = STEP_TIMEOUT_S) -> Outcome:
        try:
            return Outcome(*self.outbox.get(timeout=timeout_s))
        except queue.Empty:
            pytest.fail(f"worker {self.process.pid} gave no answer within {timeout_s}s (hang?)")

    def run(self, step: Callable[..., Any], **kwargs: Any) -> Any:
        self.submit(step, **kwargs)
        outcome = self.outcome()
        assert outcome.kind == "ok", outcome.value
        return outcome.value

    def stop(self) -> None:
        if self.process.is_alive():
            self.inbox.put(None)
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def together(*calls: tuple[Worker, Callable[..., Any], dict]) -> list[Outcome]:
    """Run one step on each worker at the same time; wait for all of them."""
    for worker, step, kwargs in calls:
        worker.submit(step, **kwargs)
    return [worker.outcome() for worker, _, _ in calls]


def all_ok(outcomes: list[Outcome]) -> list[Any]:
    for outcome in outcomes:
        assert outcome.kind == "ok", outcome.value
    return [outcome.value for outcome in outcomes]
