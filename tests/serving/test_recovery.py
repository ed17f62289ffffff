"""Recovery on a real 1 prefill + 2 decode cluster on a local Ray (issue 12): a decode worker
process SIGKILLed at a random token, an engine-thread crash injected into a decode instance, and
a decode instance drained while it streams. Each time, 8 concurrent streams (greedy and seeded
top-p at temperature 0.8, half with a repetition penalty) of 120 tokens complete with status OK
and their tokens equal the uninterrupted run of the same requests, token for token; the pools
are full again (the dead slot refilled by a new incarnation) and nothing leaks.

The scenarios run in file order on one cluster. Recovery figures go to
benchmarks/results/recovery_cpu.json (see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import pytest
import ray

from cluster.config import SupervisionConfig
from tests.serving.disagg_cluster import REPO_ROOT, cluster_config, local_ray, start_disagg_harness
from tests.serving.recovery_helpers import (assert_same_as_reference, gather, sample, sigkill,
                                            start_streams, states, wait_progress, wait_ready)

pytestmark = pytest.mark.timeout(420)
N_STREAMS = 8
MAX_TOKENS = 120
RECOVERY_BOUND_S = 120.0  # kill -> replacement READY on a loaded 2-core CPU machine
RESULTS = REPO_ROOT / "benchmarks" / "results" / "recovery_cpu.json"
_figures: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster():
    config = cluster_config(1, 2, num_blocks=256, transfer_timeout_s=10.0)
    config = dataclasses.replace(
        config,
        decode=dataclasses.replace(config.decode, max_num_seqs=N_STREAMS),
        supervision=SupervisionConfig(poll_interval_s=0.5, health_timeout_s=5.0,
                                      step_timeout_s=60.0, restart_backoff_s=0.5))
    with local_ray():
        harness = start_disagg_harness(config)
        yield harness
        harness.close()
    if _figures:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"device": "cpu (CI-like, 2 cores)", **_figures}, indent=1))


@pytest.fixture(scope="module")
def reference(cluster):
    """The uninterrupted run of the requests every scenario repeats."""
    _, tasks = start_streams(cluster, "reference", N_STREAMS, MAX_TOKENS)
    streams = gather(cluster, tasks, timeout_s=300)
    assert all(len(s.token_ids) == MAX_TOKENS for s in streams), [s.code for s in streams]
    cluster.wait_until_idle(timeout_s=30)
    return streams


def test_decode_process_killed_at_a_random_token(cluster, reference):
    rng = random.Random(12)
    at = rng.randint(5, MAX_TOKENS // 2)
    streams, tasks = start_streams(cluster, "kill", N_STREAMS, MAX_TOKENS, wait_for_tokens=at)
    wait_progress(cluster, streams[0])
    moved_before = sample(cluster, "pdserve:request_migrations_total", cause="decode")
    killed_at = sigkill(cluster.backend.pools.decode[0])
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    moved = sample(cluster, "pdserve:request_migrations_total", cause="decode") - moved_before
    assert moved >= 1  # decode-0 had streams: they moved, and still match
    ready_at = wait_ready(cluster, "decode-0", RECOVERY_BOUND_S)
    state = states(cluster)["decode-0"]
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-0",
                  pool="decode") == 1
    probe = cluster.run(cluster.client.generate("Hello!", max_tokens=4, temperature=0.0))
    served_at = time.monotonic()
    assert probe.finish_reason == "length" and state.total_kv_blocks > 0
    gaps = [s.max_gap_s for s in done]
    _figures.update(kill_token=at, streams_moved=moved, recovery_ready_s=ready_at - killed_at,
                    recovery_first_token_s=served_at - killed_at,
                    migrated_stream_max_gap_s=max(gaps),
                    reference_max_gap_s=max(s.max_gap_s for s in reference))
    cluster.wait_until_idle(timeout_s=30)


def test_replacement_serves_and_an_engine_crash_moves_its_streams(cluster, reference):
    """decode-1's engine thread raises at a random step: its streams move to decode-0 (the
    replacement of the killed one), and decode-1's slot is refilled in turn."""
    streams, tasks = start_streams(cluster, "crash", N_STREAMS, MAX_TOKENS, wait_for_tokens=3)
    wait_progress(cluster, streams[0])
    steps = random.Random(13).randint(5, 40)
    ray.get(cluster.backend.pools.decode[1].actor.inject_step_failure.remote(steps))
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    wait_ready(cluster, "decode-1", RECOVERY_BOUND_S)
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-1",
                  pool="decode") == 1
    cluster.wait_until_idle(timeout_s=30)


def test_draining_a_decode_instance_moves_what_it_cannot_finish(cluster, reference):
    streams, tasks = start_streams(cluster, "drain", N_STREAMS, MAX_TOKENS, wait_for_tokens=10)
    wait_progress(cluster, streams[0])
    moved = cluster.run(cluster.backend.drain_instance("decode-1", timeout_s=0.5), timeout_s=60)
    assert moved >= 1
    done = gather(cluster, tasks, timeout_s=300)
    assert_same_as_reference(done, reference)
    assert [w.spec.instance_id for w in cluster.backend.pools.decode] == ["decode-0"]
    assert "decode-1" not in states(cluster)
    assert sample(cluster, "pdserve:request_migrations_total", cause="drain") == moved
    cluster.wait_until_idle(timeout_s=30)
