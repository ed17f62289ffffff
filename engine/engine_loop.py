"""A thread that owns an engine: every engine call happens on it.

Workers receive requests on other threads (Ray's event loop, transfer threads). They never touch
the engine directly: they `submit` a command, or `call` a function for its result, which the loop
runs before its next step. When there is nothing to step, the loop sleeps until a command
arrives, so an idle worker burns no CPU.

Lifecycle of the loop:

    created ──start()──> running: commands, then a step while there is work, repeatedly
    running ──stop()───> stopped
    running ──a step or a command raises──> dead: `error` set, the owner's `on_error`
                                            hook runs on the engine thread (fail every
                                            request), the thread ends
Once stopped or dead, every pending and future `call()` fails at once with `EngineDeadError`
and submitted commands are dropped: no caller waits for its own timeout. `health()` answers from
any thread without going through the engine thread, so it also answers while a step hangs.

Test hooks (tests and chaos runs only): `inject_step_failure()` makes the next iteration raise
`InjectedStepFailure` as a crashing step would; `inject_step_hang(seconds)` makes it sleep inside
the step, so `health().step_running_s` grows as in a wedged step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported on the engine thread only, when it needs a CUDA device
    import torch

log = logging.getLogger(__name__)
MAX_ERROR_CHARS = 200  # of the error text health() reports
IDLE_TICK_S = 1.0  # an idle loop still runs its after-iteration hook this often


class EngineDeadError(RuntimeError):
    """The engine thread no longer runs (a step raised, or it was stopped): nothing it was asked
    to do will happen."""


class InjectedStepFailure(RuntimeError):
    """What a step armed with `EngineLoop.inject_step_failure` raises (tests only)."""


@dataclass(frozen=True, slots=True)
class LoopHealth:
    """A snapshot of an engine loop, taken without the engine thread."""

    alive: bool  # the thread runs and nothing it ran has raised
    error: str = ""  # "ExceptionType: first line of its message" of what killed it; "" if none
    step_running_s: float = 0.0  # how long the current step (with the commands before it) has
    #                               run; 0.0 while the loop sleeps
    steps: int = 0  # steps begun since start


@dataclass(slots=True)
class _Command:
    run: Callable[[], None]
    future: Future | None  # a `call()`'s future, failed if the loop dies before running it


class EngineLoop:
    """Runs `step()` while `has_work()` and runs submitted commands between steps."""

    def __init__(self, step: Callable[[], None], has_work: Callable[[], bool], name: str,
                 after_iteration: Callable[[], None] | None = None,
                 device: torch.device | None = None,
                 on_error: Callable[[BaseException], None] | None = None) -> None:
        self.name = name
        self._step = step
        self._device = device  # CUDA's current device is per thread: the loop's is the engine's
        self._has_work = has_work
        self._after_iteration = after_iteration  # e.g. publish metrics; after commands and step
        self._on_error = on_error  # engine thread, once, after a crash: fail the owner's requests
        self._commands: deque[_Command] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._closed = False  # no command will run any more
        self._fault: Callable[[], None] | None = None  # armed by an inject_* test hook
        self._fail_at_step: int | None = None  # inject_step_failure(after_steps): raise then
        self._unhang = threading.Event()  # ends an injected hang early (stop)
        self._step_started_s: float | None = None
        self._num_steps = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None  # set if a step crashed: the worker is dead

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._unhang.set()
        self._thread.join(timeout_s)

    # ---- any thread -------------------------------------------------------------------------
    def submit(self, command: Callable[[], None]) -> bool:
        """Run `command` on the engine thread before the next step. False if the loop no longer
        runs (the command is dropped). An exception from `command` kills the loop."""
        return self._enqueue(_Command(command, None))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn` on the engine thread; its result or exception lands in the returned future,
        or `EngineDeadError` if the loop stops or dies first."""
        future: Future = Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, who raises it
                future.set_exception(exc)

        self._enqueue(_Command(command, future))
        return future

    def health(self) -> LoopHealth:
        """Safe from any thread; never waits for the engine thread."""
        started = self._step_started_s
        return LoopHealth(alive=self._thread.is_alive() and not self._closed and self.error is None,
                          error=describe_error(self.error),
                          step_running_s=0.0 if started is None else time.monotonic() - started,
                          steps=self._num_steps)

    def inject_step_failure(self, after_steps: int = 0) -> None:
        """Test hook: the next iteration raises `InjectedStepFailure` inside its step; with
        `after_steps`, the step after that many more steps does."""
        if after_steps > 0:
            self._fail_at_step = self._num_steps + after_steps
        else:
            self._arm(self._raise_injected)

    def inject_step_hang(self, seconds: float) -> None:
        """Test hook: the next iteration sleeps `seconds` inside its step (ended early by stop)."""
        self._arm(lambda: self._unhang.wait(seconds))

    def _raise_injected(self) -> None:
        raise InjectedStepFailure(f"step failure injected into {self.name}")

    def _arm(self, fault: Callable[[], None]) -> None:
        with self._wakeup:
            self._fault = fault
            self._wakeup.notify()

    def _enqueue(self, command: _Command) -> bool:
        with self._wakeup:
            dead = self._closed or (self._thread.ident is not None and not self._thread.is_alive())
            if not dead:
                self._commands.append(command)
                self._wakeup.notify()
                return True
        if command.future is not None:
            command.future.set_exception(self.dead_error())
        return False

    def dead_error(self) -> EngineDeadError:
        """The error callers get once the loop no longer runs (it names the loop and the crash)."""
        if self.error is not None:
            return EngineDeadError(f"engine loop {self.name} is dead: its step raised "
                                   f"{describe_error(self.error)}")
        return EngineDeadError(f"engine loop {self.name} is not running (stopped)")

    # ---- engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self._device is not None and self._device.type == "cuda":
                import torch

                torch.cuda.set_device(self._device)  # Triton launches on the current device
            while (commands := self._next_commands()) is not None:
                self._iterate(commands)
                self._after()
        except Exception as exc:  # a crash must never leave the instance silently wedged
            log.exception("engine loop %s failed", self.name)
            self._die(exc)
        finally:
            self._close()

    def _next_commands(self) -> list[_Command] | None:
        """Wait for something to do, at most IDLE_TICK_S (so that the after-iteration hook
        runs at least that often, even idle); None once the loop is stopping."""
        with self._wakeup:
            if (not self._stopping and not self._commands and self._fault is None
                    and not self._has_work()):
                self._wakeup.wait(timeout=IDLE_TICK_S)
            if self._stopping:
                return None
            commands = list(self._commands)
            self._commands.clear()
            return commands

    def _iterate(self, commands: list[_Command]) -> None:
        """Run the commands, then a step if there is work; timed for `health()` (a command
        stuck inside the engine counts as a stuck step)."""
        self._step_started_s = time.monotonic()
        try:
            for command in commands:
                command.run()
            with self._wakeup:
                fault, self._fault = self._fault, None
            if fault is not None:
                fault()
            if self._has_work():
                self._num_steps += 1
                if self._fail_at_step is not None and self._num_steps > self._fail_at_step:
                    self._fail_at_step = None
                    self._raise_injected()
                self._step()
        finally:
            self._step_started_s = None

    def _after(self) -> None:
        if self._after_iteration is not None:
            try:
                self._after_iteration()
            except Exception:  # observability must never stop the engine
                log.exception("after-iteration hook failed")

    def _die(self, exc: Exception) -> None:
        self.error = exc
        self._close()  # callers fail at once, before the owner cleans up
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:  # best effort: the instance is dead either way
                log.exception("on_error hook of %s failed", self.name)

    def _close(self) -> None:
        """No command runs from now on: fail the futures of those still queued."""
        with self._wakeup:
            self._closed = True
            pending = list(self._commands)
            self._commands.clear()
        for command in pending:
            if command.future is not None:
                command.future.set_exception(self.dead_error())


def describe_error(exc: BaseException | None) -> str:
    """A short, single-line description: the exception type and its message's first line."""
    if exc is None:
        return ""
    lines = str(exc).splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text[:MAX_ERROR_CHARS]


class LoopControls:
    """health() and the test hooks of an object that owns an EngineLoop as `self.loop` (the
    prefill and decode workers), answered without the engine thread."""

    loop: EngineLoop

    def health(self) -> LoopHealth:
        """The engine thread's health, answered without it (any thread, even while it hangs)."""
        return self.loop.health()

    def inject_step_failure(self, after_steps: int = 0) -> None:
        """Test hook: the next engine iteration (or the one after `after_steps` more steps)
        raises, as a crashing step would."""
        self.loop.inject_step_failure(after_steps)

    def inject_step_hang(self, seconds: float) -> None:
        """Test hook: the next engine iteration hangs for `seconds`."""
        self.loop.inject_step_hang(seconds)


class ActorLoopControls:
    """The same on a Ray actor whose `self.worker` is a LoopControls: answered on the actor's
    event loop directly (no thread hop), so a wedged engine thread cannot delay it."""

    worker: LoopControls

    async def health(self) -> LoopHealth:
        return self.worker.health()

    async def inject_step_failure(self, after_steps: int = 0) -> None:
        self.worker.inject_step_failure(after_steps)

    async def inject_step_hang(self, seconds: float) -> None:
        self.worker.inject_step_hang(seconds)

