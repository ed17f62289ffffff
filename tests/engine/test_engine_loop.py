"""The engine thread's lifecycle without a model: commands, crashes that fail every caller at
once, health answered while a step hangs, the test hooks that make a step fail or hang."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from engine.engine_loop import EngineDeadError, EngineLoop, InjectedStepFailure, LoopHealth

pytestmark = pytest.mark.timeout(60)


class FakeEngine:
    """Steps while `work` is positive; a step raises when `crash` is set."""

    def __init__(self) -> None:
        self.work = 0
        self.crash: Exception | None = None
        self.errors: list[BaseException] = []

    def step(self) -> None:
        if self.crash is not None:
            raise self.crash
        self.work -= 1

    def has_work(self) -> bool:
        return self.work > 0


@pytest.fixture
def engine_and_loop():
    engine = FakeEngine()
    loop = EngineLoop(engine.step, engine.has_work, "test-loop", on_error=engine.errors.append)
    loop.start()
    yield engine, loop
    loop.stop()


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def test_call_runs_on_the_engine_thread_and_health_counts_steps(engine_and_loop):
    engine, loop = engine_and_loop
    assert loop.call(lambda: threading.current_thread().name).result(1) == "test-loop"
    engine.work = 3
    loop.submit(lambda: None)  # wakes the loop
    wait_until(lambda: loop.health().steps == 3)
    health = loop.health()
    assert health == LoopHealth(alive=True, error="", step_running_s=0.0, steps=3)
    assert pickle.loads(pickle.dumps(health)) == health  # travels through Ray as is


def test_a_call_that_raises_hands_its_exception_to_the_caller(engine_and_loop):
    _, loop = engine_and_loop
    with pytest.raises(ZeroDivisionError):
        loop.call(lambda: 1 / 0).result(1)
    assert loop.health().alive


def test_after_a_crashing_step_every_call_fails_at_once(engine_and_loop):
    engine, loop = engine_and_loop
    engine.crash = RuntimeError("size of tensor a (256) must match\nsecond line")
    engine.work = 1
    loop.submit(lambda: None)
    wait_until(lambda: not loop.health().alive)
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="test-loop.*RuntimeError") as caught:
        loop.call(lambda: "late").result(timeout=2)
    assert time.monotonic() - started < 0.5
    assert "second line" not in str(caught.value)
    health = loop.health()
    assert health.error == "RuntimeError: size of tensor a (256) must match"
    assert engine.errors == [engine.crash]  # the owner's hook ran once
    assert not loop.submit(lambda: None)


def test_commands_queued_when_the_step_crashes_fail_with_engine_dead():
    engine = FakeEngine()
    engine.crash, engine.work = ValueError("boom"), 1
    in_step = threading.Event()
    release = threading.Event()

    def step() -> None:
        in_step.set()
        release.wait(5)
        engine.step()

    loop = EngineLoop(step, engine.has_work, "crash-loop")
    loop.start()
    assert in_step.wait(5)
    pending = loop.call(lambda: "queued during the step")
    release.set()
    with pytest.raises(EngineDeadError, match="crash-loop.*ValueError: boom"):
        pending.result(timeout=2)
    loop.stop()


def test_a_crashing_command_kills_the_loop_visibly(engine_and_loop):
    _, loop = engine_and_loop
    loop.submit(lambda: [][1])
    wait_until(lambda: not loop.health().alive)
    assert loop.health().error.startswith("IndexError")
    with pytest.raises(EngineDeadError):
        loop.call(lambda: None).result(1)


def test_calls_fail_once_the_loop_is_stopped(engine_and_loop):
    _, loop = engine_and_loop
    loop.stop()
    with pytest.raises(EngineDeadError, match="test-loop is not running"):
        loop.call(lambda: None).result(timeout=1)
    assert not loop.health().alive and loop.health().error == ""


def test_injected_failure_kills_an_idle_loop(engine_and_loop):
    engine, loop = engine_and_loop
    loop.inject_step_failure()
    wait_until(lambda: not loop.health().alive)
    assert loop.health().error == "InjectedStepFailure: step failure injected into test-loop"
    assert isinstance(engine.errors[0], InjectedStepFailure)


def test_health_answers_while_a_step_hangs(engine_and_loop):
    _, loop = engine_and_loop
    loop.inject_step_hang(30.0)
    wait_until(lambda: loop.health().step_running_s > 0.2)
    assert loop.health().alive  # wedged, not dead: the supervisor's watchdog decides
    pending = loop.call(lambda: "after the hang")
    loop.stop()  # ends the hang early
    with pytest.raises(EngineDeadError):
        pending.result(timeout=2)
    assert loop.health().step_running_s == 0.0


def test_a_short_hang_then_the_loop_goes_on(engine_and_loop):
    _, loop = engine_and_loop
    loop.inject_step_hang(0.2)
    wait_until(lambda: loop.health().step_running_s > 0.05)
    assert loop.call(lambda: "ok").result(timeout=5) == "ok"
    assert loop.health().alive
