"""A disaggregated 1P+1D cluster on a local Ray with an fp8 KV cache in both pools and
speculative decoding on the decode pool (n-gram drafts, or a draft model): the hand-off moves
fp8 blocks (scales inline) and the decode instance verifies drafts over them. Greedy and seeded
streams equal a colocated engine with the same fp8 cache and speculative config; every block is
back in both pools."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks
from tests.serving.disagg_cluster import cluster_config, local_ray, start_disagg_harness

pytestmark = pytest.mark.timeout(400)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("fp8-spec") / "llama", "llama",
                                  seed=9, extra_config={"num_hidden_layers": 2}))


@pytest.fixture(scope="module", params=["ngram", "draft_model"])
def method(request) -> str:
    """The decode pool's proposer: n-gram drafts, or a draft model (the target itself, so
    every draft is right: the hand-off's first verification must accept, as SGLang's did not)."""
    return request.param


@pytest.fixture(scope="module")
def cluster(model, method):
    config = cluster_config(1, 1, num_blocks=128, transfer_timeout_s=10.0)
    prefill = dataclasses.replace(config.prefill, kv_cache_dtype="fp8_e4m3")
    decode = dataclasses.replace(config.decode, kv_cache_dtype="fp8_e4m3",
                                 speculative_method=method, num_speculative_tokens=3,
                                 draft_model=model if method == "draft_model" else None)
    with local_ray():
        harness = start_disagg_harness(dataclasses.replace(config, model=model, prefill=prefill,
                                                           decode=decode))
        yield harness
        harness.close()


def _prompts() -> list[list[int]]:
    """Prompts that repeat a motif (n-gram drafts find matches), 20 to 41 tokens."""
    return [([100 + i] + [(37 * i + 11 * j) % 900 + 3 for j in range(5 + i)]) * 4
            for i in range(6)]


def _colocated(model: str, method: str) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model, device="cpu", dtype="float32",
        cache=CacheConfig(block_size=16, num_blocks=128, kv_cache_dtype="fp8_e4m3"),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048),
        speculative=SpeculativeConfig(method=method, num_speculative_tokens=3,
                                      draft_model=model if method == "draft_model" else None)))


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 2)])
def test_streams_equal_colocated_fp8_spec(cluster, model, method, temperature, top_k):
    """Greedy (whose outputs repeat enough for n-gram drafts), and seeded sampling from each
    position's two likeliest tokens (which rarely repeats: drafts are checked for greedy; the
    sampled verification itself is tested in tests/engine/test_spec_*.py)."""
    prompts = _prompts()

    async def run_all():
        return await asyncio.gather(*(cluster.client.generate(
            prompt_token_ids=p, max_tokens=MAX_TOKENS, temperature=temperature, top_k=top_k,
            seed=7 + i, ignore_eos=True) for i, p in enumerate(prompts)))

    completions = cluster.run(run_all(), timeout_s=300)
    colocated = _colocated(model, method)
    expected = colocated.generate(prompts, [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, top_k=top_k,
                       seed=7 + i, ignore_eos=True) for i in range(len(prompts))])
    assert [list(c.token_ids) for c in completions] == [e.token_ids for e in expected]
    if temperature == 0.0:
        assert colocated.spec.stats.num_accepted_tokens > 0  # the drafts were exercised
    assert_no_leaks(colocated)
    assert len(cluster.wait_until_idle(timeout_s=30)) == 2  # both pools full again
