"""A thread that owns an engine: every engine call happens on it.

Workers receive requests on other threads (Ray's event loop, transfer threads). They never touch
the engine directly: they `submit` a command, which the loop runs before its next step. When
there is nothing to step, the loop sleeps until a command arrives, so an idle worker burns no CPU.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

log = logging.getLogger(__name__)


class EngineLoop:
    """Runs `step()` while `has_work()` and runs submitted commands between steps."""

    def __init__(self, step: Callable[[], None], has_work: Callable[[], bool], name: str,
                 after_iteration: Callable[[], None] | None = None,
                 device: torch.device | None = None) -> None:
        self._step = step
        self._device = device  # CUDA's current device is per thread: the loop's must be the engine's
        self._has_work = has_work
        self._after_iteration = after_iteration  # e.g. publish metrics; after commands and step
        self._commands: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None  # set if a step crashed: the worker is unhealthy

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout_s)

    def submit(self, command: Callable[[], None]) -> None:
        """Run `command` on the engine thread before the next step."""
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread; its result or exception lands in the returned future."""
        future: Future = Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

        self.submit(command)
        return future

    def _run(self) -> None:
        if self._device is not None and self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # Triton launches on the current device
        while True:
            with self._wakeup:
                while not self._stopping and not self._commands and not self._has_work():
                    self._wakeup.wait(timeout=1.0)
                if self._stopping:
                    return
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                command()
            if self._has_work():
                try:
                    self._step()
                except Exception as exc:  # a step crash must not kill the thread silently
                    log.exception("engine step failed")
                    self.error = exc
                    self._on_step_error(exc)
            if self._after_iteration is not None:
                try:
                    self._after_iteration()
                except Exception:  # observability must never stop the engine
                    log.exception("after-iteration hook failed")

    def _on_step_error(self, exc: Exception) -> None:
        """Hook for the owner (e.g. fail every request); default: stop stepping."""
        with self._wakeup:
            self._stopping = True
