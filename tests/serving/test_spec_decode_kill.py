"""Fault containment of speculative decoding: the decode worker process of a 1P+1D cluster
(fp8 KV, the draft-model proposer on the decode pool, as tests/serving/test_disagg_fp8_spec.py
runs it) is SIGKILLed while it drafts and verifies for six mid-stream requests.

What the cluster promises for a killed decode process (docs/ARCHITECTURE.md, "Recovery"), with
the default supervision (migration on, the dead slot refilled):

- the router marks decode-0 DEAD ("process died"), then replaces it;
- the streams are not failed: they move (re-prefill of prompt + streamed tokens) and, once the
  replacement is READY, continue; each ends OK with exactly the tokens a colocated engine with
  the same fp8 cache and speculative config gives (greedy, and seeded top-2 sampling);
- the prefill pool has every KV block back, and so has the replacement;
- a new request afterwards is served and equals the colocated engine too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest
import ray

from engine.sampling_params import SamplingParams
from protos.pdserve.v1 import generation_pb2
from tests.helpers import assert_no_leaks
from tests.serving.disagg_cluster import local_ray, start_disagg_harness
from tests.serving.recovery_helpers import (Stream, gather, recovery_config, run_stream, sample,
                                            sigkill, states, wait_progress, wait_ready)
from tests.serving.test_disagg_fp8_spec import _colocated, _prompts, model  # noqa: F401

pytestmark = pytest.mark.timeout(400)
MAX_TOKENS = 96  # long enough that every stream is still running when the kill lands
KILL_AFTER_TOKENS = 6
RECOVERY_BOUND_S = 120.0  # kill -> replacement READY on a loaded 2-core CPU machine
DECODE_DOWN = (generation_pb2.INSTANCE_STATUS_DEAD, generation_pb2.INSTANCE_STATUS_STARTING)


@pytest.fixture(scope="module")
def cluster(model):  # noqa: F811 - the fixture imported above
    config = recovery_config(1, 1, max_num_seqs=16)
    prefill = dataclasses.replace(config.prefill, kv_cache_dtype="fp8_e4m3")
    decode = dataclasses.replace(config.decode, kv_cache_dtype="fp8_e4m3",
                                 speculative_method="draft_model", num_speculative_tokens=3,
                                 draft_model=model)
    with local_ray():
        harness = start_disagg_harness(dataclasses.replace(config, model=model, prefill=prefill,
                                                           decode=decode))
        yield harness
        harness.close()


def _sampling(i: int) -> dict:
    """Request i: greedy, or seeded sampling from each position's two likeliest tokens."""
    return dict(temperature=0.0) if i % 2 == 0 else dict(temperature=1.0, top_k=2)


def _expected(model: str, prompts: list[list[int]],  # noqa: F811
              seeds: list[int]) -> list[list[int]]:
    colocated = _colocated(model, "draft_model")
    outputs = colocated.generate(prompts, [
        SamplingParams(max_tokens=MAX_TOKENS, seed=seed, ignore_eos=True, **_sampling(i))
        for i, seed in enumerate(seeds)])
    assert colocated.spec.stats.num_accepted_tokens > 0  # the reference speculated too
    assert_no_leaks(colocated)
    return [o.token_ids for o in outputs]


def _draft_tokens(worker) -> int:
    """Tokens the decode instance has drafted since it started (its engine's counter)."""
    return ray.get(worker.actor.__ray_call__.remote(
        lambda actor: actor.worker.engine.spec.stats.num_draft_tokens), timeout=30)


def _wait_drafting(worker, timeout_s: float) -> None:
    """Until the instance drafts more tokens than it had: it is speculating right now."""
    drafted = _draft_tokens(worker)
    deadline = time.monotonic() + timeout_s
    while _draft_tokens(worker) == drafted:
        assert time.monotonic() < deadline, f"no drafts within {timeout_s} s"
        time.sleep(0.005)


def _start(cluster, prompts: list[list[int]], seeds: list[int]):
    streams = [Stream(f"spec-kill-{i}", wait_for_tokens=KILL_AFTER_TOKENS)
               for i in range(len(prompts))]

    async def start():
        return [asyncio.ensure_future(run_stream(
            cluster.client, stream, prompt_token_ids=prompt, max_tokens=MAX_TOKENS,
            ignore_eos=True, seed=seed, **_sampling(i)))
            for i, (stream, prompt, seed) in enumerate(zip(streams, prompts, seeds))]
    return streams, cluster.run(start())


def _wait_down(cluster, instance_id: str, timeout_s: float) -> generation_pb2.InstanceState:
    """Until the router no longer shows `instance_id` READY: DEAD, or already STARTING its
    replacement (the first restart of a slot is immediate)."""
    deadline = time.monotonic() + timeout_s
    while (state := states(cluster)[instance_id]).status not in DECODE_DOWN:
        assert time.monotonic() < deadline, f"{instance_id} still {state} {timeout_s} s after"
        time.sleep(0.05)
    return state


def test_decode_killed_while_drafting_streams_move_and_match(cluster, model):  # noqa: F811
    prompts, seeds = _prompts(), [7 + i for i in range(len(_prompts()))]
    decode = cluster.backend.pools.decode[0]
    streams, tasks = _start(cluster, prompts, seeds)
    for stream in streams:
        wait_progress(cluster, stream)
    _wait_drafting(decode, timeout_s=30)
    at_kill = [len(s.token_ids) for s in streams]
    sigkill(decode)
    assert all(0 < n < MAX_TOKENS for n in at_kill), at_kill  # mid-stream, every one

    state = _wait_down(cluster, "decode-0", timeout_s=15)
    assert "process died" in state.status_reason, state
    done = gather(cluster, tasks, timeout_s=300)
    for stream in done:
        assert stream.code == grpc.StatusCode.OK, (stream.request_id, stream.code, stream.details)
        assert stream.finish_reason == "length"
    expected = _expected(model, prompts, seeds)
    assert [s.token_ids for s in done] == expected
    assert sample(cluster, "pdserve:request_migrations_total", cause="decode") >= sum(
        n < MAX_TOKENS for n in at_kill)
    assert sample(cluster, "pdserve:instance_restarts_total", instance_id="decode-0",
                  pool="decode") == 1

    wait_ready(cluster, "decode-0", RECOVERY_BOUND_S)
    instances = {s.instance_id: s for s in cluster.wait_until_idle(timeout_s=30)}
    prefill = instances["prefill-0"]
    assert prefill.free_kv_blocks == prefill.total_kv_blocks > 0  # every block back


def test_replacement_serves_like_the_colocated_engine(cluster, model):  # noqa: F811
    """After the kill above: a new request on the new decode incarnation (its draft model
    loaded afresh, catching up on the whole prompt) equals the colocated engine."""
    assert states(cluster)["decode-0"].status == generation_pb2.INSTANCE_STATUS_READY
    prompt = [5 + (13 * j) % 700 for j in range(30)] * 2
    got = cluster.run(cluster.client.generate(prompt_token_ids=prompt, max_tokens=24,
                                              temperature=0.0, ignore_eos=True), timeout_s=120)
    colocated = _colocated(model, "draft_model")
    want = colocated.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0,
                                                       ignore_eos=True))[0]
    assert list(got.token_ids) == want.token_ids
    assert len(cluster.wait_until_idle(timeout_s=30)) == 2
