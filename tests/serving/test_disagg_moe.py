"""A disaggregated cluster serving a MoE model, on a local Ray over real gRPC and Gloo: 1 prefill
+ 1 decode instance, each expert parallel over 2 ranks (tensor_parallel_size = 2,
expert_parallel_size = 2; rank 1 a Ray actor on the instance's placement group). A tiny Qwen2-MoE
(8 experts of odd size 37, top-2, a gated shared expert, layer 1 dense). Greedy streams equal one
colocated rank; every KV block is back in both pools afterwards; GetClusterState shows each
instance's per-expert token counts: what it computed x top-2 x 2 MoE layers."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.expert_load import DEFAULT_INTERVAL_S
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.moe_factories import save_tiny_moe_model
from tests.helpers import assert_no_leaks
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = pytest.mark.timeout(400)
RANKS = 2
MAX_TOKENS = 10
NUM_MOE_LAYERS, TOP_K, NUM_EXPERTS = 2, 2, 8


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_moe_model(tmp_path_factory.mktemp("disagg-moe") / "qwen2_moe",
                                   "qwen2_moe", seed=4))


@pytest.fixture(scope="module")
def cluster(model):
    config = cluster_config(1, 1, num_blocks=128, transfer_timeout_s=10.0)
    pools = {role: dataclasses.replace(getattr(config, role), tensor_parallel_size=RANKS,
                                       expert_parallel_size=RANKS, cpus_per_instance=2,
                                       collective_timeout_s=30.0)
             for role in ("prefill", "decode")}
    with local_ray():
        harness = start_disagg_harness(dataclasses.replace(config, model=model, **pools))
        yield harness
        harness.close()


def _prompts() -> list[list[int]]:
    """Distinct first tokens (no shared prefix), 5 to 40 tokens: 1 to 3 blocks of 16."""
    return [[100 + i] + [(37 * i + 11 * j) % 900 + 3 for j in range(4 + 6 * i)] for i in range(7)]


def test_streams_equal_colocated_and_every_block_comes_back(cluster, model):
    prompts = _prompts()

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
            for p in prompts))

    completions = cluster.run(run_all(), timeout_s=300)
    colocated = LLMEngine(EngineConfig(model=model, device="cpu", dtype="float32",
                                       cache=CacheConfig(block_size=16, num_blocks=128),
                                       scheduler=SchedulerConfig(max_num_seqs=16)))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = colocated.generate(prompts, params)
    assert [list(c.token_ids) for c in completions] == [e.token_ids for e in expected]
    assert_no_leaks(colocated)
    instances = cluster.wait_until_idle(timeout_s=30)  # both pools full again
    assert len(instances) == 2

    time.sleep(DEFAULT_INTERVAL_S + 0.2)  # the engines' expert counts snapshot is that fresh
    states = {s.instance_id: s for s in cluster.run(cluster.client.cluster_state()).instances}
    per_token = TOP_K * NUM_MOE_LAYERS
    prefill_counts = list(states["prefill-0"].expert_token_counts)
    decode_counts = list(states["decode-0"].expert_token_counts)
    assert len(prefill_counts) == len(decode_counts) == NUM_EXPERTS
    assert sum(prefill_counts) == sum(len(p) for p in prompts) * per_token
    # the decode instance computes every output token but the last, the first one's KV included
    assert sum(decode_counts) == len(prompts) * (MAX_TOKENS - 1) * per_token
