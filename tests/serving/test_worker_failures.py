"""A prefill or decode worker whose engine thread dies or hangs, Ray-free: every stream and
every pending call ends at once with a typed error, health tells, blocks go back."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from decode_worker.worker import INSTANCE_FAILED, DecodeWorker
from engine.engine_loop import EngineDeadError
from engine.sampling_params import SamplingParams
from prefill_worker.worker import PrefillWorker
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from tests.helpers import build_engine
from tests.serving.test_decode_worker import land, reserve_request

pytestmark = pytest.mark.timeout(120)
LONG = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def decode(default_loaded):
    outputs: queue.Queue = queue.Queue()
    worker = DecodeWorker(build_engine(default_loaded, num_blocks=64, max_num_seqs=2),
                          "decode-f", emit=outputs.put)
    worker.outputs = outputs
    yield worker
    worker.stop()


@pytest.fixture
def prefill(default_loaded):
    worker = PrefillWorker(build_engine(default_loaded, num_blocks=64), "prefill-f")
    yield worker
    worker.stop()


def errors_by_request(outputs: queue.Queue, count: int) -> dict[str, str]:
    errors: dict[str, str] = {}
    while len(errors) < count:
        for delta in outputs.get(timeout=10).deltas:
            if delta.error:
                errors[delta.request_id] = delta.error
    return errors


def test_decode_step_crash_ends_every_stream_and_frees_blocks(decode):
    for i in range(5):  # 2 running, 2 queued, 1 reserved without its KV
        assert decode.reserve(reserve_request(f"d{i}", [1, 2, 3, 4], LONG)).accepted
        if i < 4:
            land(decode, f"d{i}", None, 5)
    wait_for(lambda: decode.stats().state.num_running_requests == 2)
    decode.inject_step_failure()
    started = time.monotonic()
    errors = errors_by_request(decode.outputs, 5)
    assert time.monotonic() - started < 5
    assert errors == {f"d{i}": INSTANCE_FAILED for i in range(5)}  # no internal text
    health = decode.health()
    assert not health.alive and health.error.startswith("InjectedStepFailure")
    started = time.monotonic()
    with pytest.raises(EngineDeadError, match="decode-f.*InjectedStepFailure"):
        decode.reserve(reserve_request("late", [1, 2, 3], LONG))
    assert time.monotonic() - started < 1
    kv = decode.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks and kv.is_idle()


def test_decode_health_answers_while_a_step_hangs(decode):
    decode.inject_step_hang(60.0)
    wait_for(lambda: decode.health().step_running_s > 0.3)
    started = time.monotonic()
    health = decode.health()
    assert time.monotonic() - started < 0.1
    assert health.alive and health.error == ""
    failed: list[BaseException] = []

    def ask_stats() -> None:  # waits behind the hang, then fails once the loop is stopped
        try:
            decode.stats()
        except EngineDeadError as exc:
            failed.append(exc)

    caller = threading.Thread(target=ask_stats)
    caller.start()
    decode.stop()  # ends the hang
    caller.join(5)
    assert len(failed) == 1 and "not running" in str(failed[0])


def prefill_task(request_id: str) -> worker_pb2.PrefillTask:
    return worker_pb2.PrefillTask(
        protocol_version=PROTOCOL_VERSION, request_id=request_id, prompt_token_ids=[1, 2, 3, 4],
        sampling=sampling_to_proto(LONG), seed=7, decode_instance_id="nowhere")


def test_prefill_step_crash_fails_pending_prompts_at_once(prefill):
    failures: queue.Queue = queue.Queue()
    prefill.inject_step_hang(0.5)  # holds the engine thread while prompts queue up
    wait_for(lambda: prefill.health().step_running_s > 0)
    for i in range(3):
        prefill.submit(prefill_task(f"p{i}"), on_result=lambda r: failures.put(("result", r)),
                       on_error=lambda exc: failures.put(("error", exc)))
    prefill.inject_step_failure()  # fires after the prompts are admitted, before their step
    got = [failures.get(timeout=5) for _ in range(3)]
    assert all(kind == "error" and isinstance(exc, EngineDeadError) for kind, exc in got)
    assert "prefill-f" in str(got[0][1]) and "InjectedStepFailure" in str(got[0][1])
    assert not prefill.health().alive
    prefill.submit(prefill_task("late"), on_result=lambda r: failures.put(("result", r)),
                   on_error=lambda exc: failures.put(("error", exc)))
    kind, exc = failures.get(timeout=1)  # at once, on the caller's thread
    assert kind == "error" and isinstance(exc, EngineDeadError)
    results: queue.Queue = queue.Queue()
    prefill.submit(prefill_task("late-default"), on_result=results.put)  # no on_error given
    assert results.get(timeout=1).first_token.error == "prefill instance failed"
    with pytest.raises(EngineDeadError):
        prefill.abort("p0")
    kv = prefill.engine.kv_manager
    assert kv.num_free_blocks == kv.num_blocks and kv.is_idle()
