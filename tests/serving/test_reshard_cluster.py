"""The disaggregated cluster with pools of different parallel layouts on a local Ray, over real
gRPC and Gloo, as `pdserve serve` starts it from the cluster config: prefill TP=1 -> decode TP=2
(the decode's rank 1 a Ray actor on its own bundle). The KV is re-sharded on the way: each decode
rank holds bitwise its half of the prefill's KV heads; streams equal one colocated rank; both
pools are full again afterwards."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import ray
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from kv_transfer.planner import ModelShape, ParallelLayout, rank_shard
from kv_transfer.shards import kv_blocks_from_hex
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_tokens_or_near_tie
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = pytest.mark.timeout(400)
PREFILL, DECODE = ParallelLayout(1), ParallelLayout(2)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("reshard-cluster")
    return str(save_tiny_hf_model(root / "llama", "llama", seed=13,
                                  extra_config={"num_hidden_layers": 4,
                                                "num_attention_heads": 8,
                                                "num_key_value_heads": 2}))


@pytest.fixture(scope="module")
def cluster(model):
    config = cluster_config(1, 1, num_blocks=256, transfer_timeout_s=10.0)
    config = dataclasses.replace(
        config, model=model,
        prefill=dataclasses.replace(config.prefill, tensor_parallel_size=PREFILL.tp,
                                    collective_timeout_s=60.0),
        decode=dataclasses.replace(config.decode, tensor_parallel_size=DECODE.tp,
                                   cpus_per_instance=2, collective_timeout_s=60.0))
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
    return [[(11 * i + 5 * j) % (vocab_size - 3) + 3 for j in range(6 + 9 * i)] for i in range(6)]


def test_each_decode_rank_holds_its_heads_of_the_prefill_kv(cluster, reference):
    # first in this module: both pools are fresh, so the request's KV sits in blocks 0..n-1
    prompt = _prompts(reference.model_config.vocab_size)[4][:40]  # 3 blocks of 16
    got = cluster.run(cluster.client.generate(prompt_token_ids=prompt, max_tokens=1,
                                              temperature=0.0), timeout_s=120)
    assert got.finish_reason == "length"  # ends at the prefill: the decode side only lands KV
    cluster.wait_until_idle(timeout_s=30)
    blocks = [0, 1, 2]
    prefill, decode = cluster.backend.pools.prefill[0], cluster.backend.pools.decode[0]
    (sent,) = [kv_blocks_from_hex(v) for v in
               ray.get(prefill.actor.kv_blocks.remote(blocks), timeout=60)]
    landed = [kv_blocks_from_hex(v) for v in
              ray.get(decode.actor.kv_blocks.remote(blocks), timeout=60)]
    model = ModelShape(4, 2)
    assert len(landed) == DECODE.world_size and sent.abs().sum() > 0
    for rank, kv in enumerate(landed):
        heads = rank_shard(DECODE, model, rank).heads
        assert torch.equal(kv, sent[:, :, :, :, slice(*heads)]), f"decode rank {rank}"


def test_streams_equal_one_colocated_rank(cluster, reference):
    prompts = _prompts(reference.model_config.vocab_size)
    kwargs = [dict(temperature=0.0) if i % 2 else dict(temperature=0.8, top_p=0.9, seed=50 + i)
              for i in range(len(prompts))]

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=10, ignore_eos=True, **kw)
            for p, kw in zip(prompts, kwargs)))

    completions = cluster.run(run_all(), timeout_s=300)
    params = [SamplingParams(max_tokens=10, ignore_eos=True, **kw) for kw in kwargs]
    expected = reference.generate(prompts, params)
    for prompt, sp, got, want in zip(prompts, params, completions, expected):
        assert_tokens_or_near_tie(reference, prompt, sp, list(got.token_ids), want.token_ids[-10:])
    cluster.wait_until_idle(timeout_s=30)
