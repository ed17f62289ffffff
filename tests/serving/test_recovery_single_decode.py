"""Recovery on a real 2 prefill + 1 decode cluster on a local Ray (issue 12), where losing the
decode instance leaves no live peer:

- the decode engine thread crashes (fault injection by config, mid-stream): 8 streams of 64
  tokens wait for the replacement and then continue, token for token equal to the
  uninterrupted run;
- the decode worker process is SIGKILLed at a random token: the same, after the restart
  backoff of the slot's second death in a row;
- a prefill worker process is SIGKILLed with prompts inside it: they are prefilled again on the
  other prefill instance, and every stream still equals the uninterrupted run;
- the decode process is SIGKILLed a third time, with streams whose deadline comes before the
  replacement can (its backoff has doubled): they end with UNAVAILABLE before their deadline
  (never INTERNAL, never a hang), and the backoff is visible in GetClusterState.
"""

from __future__ import annotations

import random
import time

import grpc
import pytest
import ray

from tests.serving.disagg_cluster import local_ray, start_disagg_harness
from tests.serving.recovery_helpers import (assert_same_as_reference, gather, recovery_config,
                                            run_reference, sample, sigkill, start_streams,
                                            states, wait_progress, wait_ready)

pytestmark = pytest.mark.timeout(420)
N_STREAMS = 8
MAX_TOKENS = 64
FAULT_STEP = 100  # decode-0's first engine raises at its 101st step: inside the second round
BACKOFF_S = 6.0  # a second restart within stable_after_s waits this long
RECOVERY_BOUND_S = 120.0


@pytest.fixture(scope="module")
def cluster():
    config = recovery_config(
        2, 1, N_STREAMS, restart_backoff_s=BACKOFF_S, stable_after_s=600.0,
        inject_engine_failure="decode-0", inject_engine_failure_after_steps=FAULT_STEP)
    with local_ray():
        harness = start_disagg_harness(config)
        yield harness
        harness.close()


@pytest.fixture(scope="module")
def reference(cluster):
    return run_reference(cluster, N_STREAMS, MAX_TOKENS)


def test_only_decode_crashes_streams_wait_for_its_replacement(cluster, reference):
    steps = ray.get(cluster.backend.pools.decode[0].actor.health.remote()).steps
    assert MAX_TOKENS <= steps < FAULT_STEP  # so the injected crash falls inside this round
    streams, tasks = start_streams(cluster, "crash", N_STREAMS, MAX_TOKENS)
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    assert sample(cluster, "pdserve:request_migrations_total", cause="decode") >= N_STREAMS
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-0",
                  pool="decode") == 1
    # the streams stalled while the replacement started, and only then
    assert max(s.max_gap_s for s in done) > 1.0
    cluster.wait_until_idle(timeout_s=30)


def test_only_decode_killed_streams_continue_after_its_replacement(cluster, reference):
    at = random.Random(14).randint(5, MAX_TOKENS // 2)
    streams, tasks = start_streams(cluster, "kill", N_STREAMS, MAX_TOKENS, wait_for_tokens=at)
    wait_progress(cluster, streams[0])
    sigkill(cluster.backend.pools.decode[0])
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    assert max(s.max_gap_s for s in done) > BACKOFF_S  # they waited out the restart backoff
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-0",
                  pool="decode") == 2
    cluster.wait_until_idle(timeout_s=30)


def test_prefill_killed_with_prompts_inside(cluster, reference):
    """prefill-0's engine is held in one step, so the prompts routed to it stay inside; then
    its process is killed: they move to prefill-1."""
    ray.get(cluster.backend.pools.prefill[0].actor.inject_step_hang.remote(30.0))
    streams, tasks = start_streams(cluster, "prefill", N_STREAMS, MAX_TOKENS, spacing_s=0.1)
    time.sleep(1.5)
    moved_before = sample(cluster, "pdserve:request_migrations_total", cause="prefill")
    sigkill(cluster.backend.pools.prefill[0])
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    assert sample(cluster, "pdserve:request_migrations_total", cause="prefill") > moved_before
    wait_ready(cluster, "prefill-0", RECOVERY_BOUND_S)
    cluster.wait_until_idle(timeout_s=30)


def test_only_decode_killed_during_backoff_ends_streams_before_their_deadline(cluster):
    deadline_s = 8.0
    streams, tasks = start_streams(cluster, "deadline", 4, 2 * MAX_TOKENS, wait_for_tokens=5,
                                   timeout_s=deadline_s)
    started = time.monotonic()
    for stream in streams:  # every one streams when the decode dies (not only the first)
        wait_progress(cluster, stream)
    sigkill(cluster.backend.pools.decode[0])
    reason = _wait_reason(cluster, "decode-0", "restart 3 in", timeout_s=5.0)
    assert f"restart 3 in {2 * BACKOFF_S:g} s" in reason
    done = gather(cluster, tasks, timeout_s=60)
    for stream in done:
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.details)
        assert stream.token_ids  # they were streaming when it died
    assert time.monotonic() - started < deadline_s + 1.0
    with pytest.raises(grpc.aio.AioRpcError) as info:  # meanwhile: no decode, no admission
        cluster.run(cluster.client.generate("Hello!", max_tokens=4), timeout_s=30)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_ready(cluster, "decode-0", RECOVERY_BOUND_S)
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-0",
                  pool="decode") == 3
    done = cluster.run(cluster.client.generate("Hello!", max_tokens=4, temperature=0.0))
    assert done.finish_reason == "length"
    cluster.wait_until_idle(timeout_s=30)


def _wait_reason(cluster, instance_id: str, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while text not in (reason := states(cluster)[instance_id].status_reason):
        assert time.monotonic() < deadline, f"{instance_id}: {reason!r}"
        time.sleep(0.05)
    return reason
