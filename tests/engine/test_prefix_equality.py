"""Prefix caching in one engine, beyond tests/engine/test_prefix_caching.py: salted requests with
the same prompts never share a block (checked on every block table the scheduler hands out),
and outputs with the cache on equal those with it off under chunked prefill, asynchronous
scheduling and a pool small enough to preempt and evict. After every scenario the pool's free
+ cached-free blocks equal its total."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.kv_cache.prefix_cache import salt_key
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks

BS = 4


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("prefix_eq") / "llama", "llama",
                                  seed=9, extra_config={"num_hidden_layers": 2}))


def _engine(model: str, caching: bool, num_blocks: int = 64, budget: int = 24,
            async_scheduling: bool = False) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch", async_scheduling=async_scheduling,
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=budget)))


def _tokens(n: int, offset: int = 0) -> list[int]:
    return [5 + (offset + 11 * i) % 400 for i in range(n)]


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    system = _tokens(19)  # 4.75 blocks: every hit ends mid-block
    prompts = [system + _tokens(2 + 3 * i, 50 * i) for i in range(6)]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


def _record_hits(engine: LLMEngine) -> list[tuple[str, int, list[int]]]:
    """(request id, its salt's key, the salt keys of the cached blocks it was started with)
    per admission."""
    kv, hits = engine.kv_manager, []
    match = kv.match_prefix

    def recording(request_id, token_ids, cache_salt=""):
        cached = match(request_id, token_ids, cache_salt)
        blocks = kv.block_table(request_id)[:cached // BS]
        hits.append((request_id, salt_key(cache_salt),
                     [kv.prefix_cache._blocks[b].salt for b in blocks]))
        return cached

    kv.match_prefix = recording
    return hits


def test_different_salts_never_share_a_block(model):
    prompts, params = _workload()
    engine = _engine(model, True)
    hits = _record_hits(engine)
    outputs: dict[str, list[list[int]]] = {"tenant-a": [], "tenant-b": []}
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        for salt in outputs:  # interleaved: b's request arrives right after a's identical one
            rid = engine.add_request(prompt, p, request_id=f"{salt}-{i}")
            engine.requests[rid].cache_salt = salt
            tokens = []
            while engine.has_unfinished():
                tokens += [t for o in engine.step() for t in o.new_token_ids]
            outputs[salt].append(tokens)
    for rid, salt, block_salts in hits:
        assert set(block_salts) <= {salt}, rid  # every hit was a block named with its salt
    hit_tenants = {rid.split("-")[0] + "-" + rid.split("-")[1] for rid, _, b in hits if b}
    assert hit_tenants == {"tenant-a", "tenant-b"}  # each tenant hits its own system prompt
    assert all(not b for rid, _, b in hits if rid.endswith("-0"))  # never the other's
    assert outputs["tenant-a"] == outputs["tenant-b"]  # a salt changes no token
    assert_no_leaks(engine)


@pytest.mark.parametrize("num_blocks, budget, async_scheduling", [
    (64, 6, False),  # chunked prefill: hits, then the rest in chunks of 6 tokens
    (64, 24, True),  # asynchronous scheduling: a token in flight when blocks are named
    (16, 24, False),  # preemption and eviction
])
def test_outputs_equal_without_caching(model, num_blocks, budget, async_scheduling):
    prompts, params = _workload()

    def run(engine: LLMEngine) -> list[list[int]]:
        out = []
        for i in range(0, len(prompts), 2):  # waves: later ones hit what earlier ones cached
            out += [o.token_ids for o in engine.generate(prompts[i:i + 2], params[i:i + 2])]
        return out

    want = run(_engine(model, False, num_blocks, budget, async_scheduling))
    engine = _engine(model, True, num_blocks, budget, async_scheduling)
    assert run(engine) == want
    assert engine.kv_manager.prefix_cache.stats.hit_tokens > 0
    if num_blocks == 16:
        assert engine.scheduler.num_preemptions > 0
    pool = engine.kv_manager.pool  # free + cached-free == total, and some stay cached
    assert pool.num_free_blocks == pool.num_blocks and pool.num_cached_free_blocks > 0
    assert_no_leaks(engine)
