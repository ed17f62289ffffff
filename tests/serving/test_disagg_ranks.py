"""The disaggregated cluster with multi-rank instances on a local Ray, over real gRPC and Gloo:
1 prefill (TP=2) + 1 decode (TP=2), each instance's rank 1 a Ray actor on its own bundle of the
instance's placement group. Streams equal one colocated rank; a decode rank SIGKILLed
mid-stream fails its instance at once: its streams end with UNAVAILABLE (migration off here),
the prefill pool is full again, and the supervisor brings the instance back with new ranks."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time

import grpc
import pytest
import ray

from cluster.config import SupervisionConfig
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_tokens_or_near_tie
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness
from tests.serving.recovery_helpers import gather, start_streams, wait_progress, wait_ready

pytestmark = pytest.mark.timeout(400)
TP = 2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("disagg-ranks")
    return str(save_tiny_hf_model(root / "llama", "llama", seed=9,
                                  extra_config={"num_hidden_layers": 4}))


@pytest.fixture(scope="module")
def cluster(model):
    config = cluster_config(1, 1, num_blocks=256, transfer_timeout_s=5.0)
    pools = {role: dataclasses.replace(getattr(config, role), tensor_parallel_size=TP,
                                       cpus_per_instance=2, collective_timeout_s=20.0)
             for role in ("prefill", "decode")}
    config = dataclasses.replace(
        config, model=model, **pools,
        supervision=SupervisionConfig(poll_interval_s=0.5, health_timeout_s=5.0,
                                      step_timeout_s=60.0, max_migrations=0))
    with local_ray():
        harness = start_disagg_harness(config)
        yield harness
        harness.close()


@pytest.fixture(scope="module")
def reference(model) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32",
                                  cache=CacheConfig(block_size=16, num_blocks=256),
                                  scheduler=SchedulerConfig(max_num_seqs=16)))


def _prompts(vocab_size: int) -> list[list[int]]:
    return [[(11 * i + 5 * j) % (vocab_size - 3) + 3 for j in range(6 + 9 * i)] for i in range(8)]


def test_each_decode_rank_lands_its_prefill_ranks_kv_byte_for_byte(cluster, reference):
    # first in this module: both pools are fresh, so the request's KV sits in blocks 0..n-1
    prompt = _prompts(reference.model_config.vocab_size)[4][:40]  # 3 blocks of 16
    got = cluster.run(cluster.client.generate(prompt_token_ids=prompt, max_tokens=1,
                                              temperature=0.0), timeout_s=120)
    assert got.finish_reason == "length"  # ends at the prefill: the decode side only lands KV
    cluster.wait_until_idle(timeout_s=30)
    blocks = [0, 1, 2]
    prefill, decode = cluster.backend.pools.prefill[0], cluster.backend.pools.decode[0]
    sent = ray.get(prefill.actor.kv_digests.remote(blocks), timeout=60)
    landed = ray.get(decode.actor.kv_digests.remote(blocks), timeout=60)
    assert len(sent) == TP and len(set(sent)) == TP and landed == sent


def test_streams_equal_one_colocated_rank(cluster, reference):
    prompts = _prompts(reference.model_config.vocab_size)
    kwargs = [dict(temperature=0.0) if i % 2 else dict(temperature=0.8, top_p=0.9, seed=50 + i)
              for i in range(len(prompts))]

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=12, ignore_eos=True, **kw)
            for p, kw in zip(prompts, kwargs)))

    completions = cluster.run(run_all(), timeout_s=300)
    params = [SamplingParams(max_tokens=12, ignore_eos=True, **kw) for kw in kwargs]
    expected = reference.generate(prompts, params)
    for prompt, sp, got, want in zip(prompts, params, completions, expected):
        assert_tokens_or_near_tie(reference, prompt, sp, list(got.token_ids), want.token_ids[-12:])
    cluster.wait_until_idle(timeout_s=30)
    ranks = [ray.get(w.actor.rank_pids.remote(), timeout=30) for w in cluster.backend.pools.all]
    assert all(len(pids) == TP - 1 for pids in ranks)


def test_killed_decode_rank_ends_its_streams_and_the_instance_comes_back(cluster, reference):
    decode = cluster.backend.pools.decode[0]
    (rank1_pid,) = ray.get(decode.actor.rank_pids.remote(), timeout=30)
    streams, tasks = start_streams(cluster, "rank-kill", 4, 2000, wait_for_tokens=3)
    for stream in streams:
        wait_progress(cluster, stream)
    os.kill(rank1_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    done = gather(cluster, tasks, timeout_s=120)
    for stream in done:
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.details)
        assert "rank" not in stream.details  # no internal error text reaches the client
    assert time.monotonic() - killed_at < 25  # well within the 20 s collective timeout + poll
    wait_ready(cluster, "decode-0", timeout_s=180)
    # the replacement has fresh ranks; it serves, and every pool is full again afterwards
    replacement = cluster.backend.pools.decode[0]
    assert ray.get(replacement.actor.rank_pids.remote(), timeout=30) != [rank1_pid]
    prompt = _prompts(reference.model_config.vocab_size)[3]
    got = cluster.run(cluster.client.generate(prompt_token_ids=prompt, max_tokens=8,
                                              temperature=0.0, ignore_eos=True), timeout_s=120)
    want = reference.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True,
                                                       temperature=0.0))[0].token_ids[-8:]
    assert_tokens_or_near_tie(reference, prompt, SamplingParams(temperature=0.0), list(got.token_ids),
                      want)
    cluster.wait_until_idle(timeout_s=30)
