"""Prefix caching in the engine (CPU): full blocks named by a hash chain and found again. Greedy
and seeded outputs are identical with the cache on and off (hits ending mid-block, hits on
evicted-and-recomputed prefixes, preemption and aborts of requests that share blocks); salts
never share; a hash collision costs a miss, never a wrong block; every block comes back."""

from __future__ import annotations

import pytest

import engine.kv_cache.prefix_cache as prefix_cache
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.kv_cache.block_table import KVCacheManager
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks

BS = 4


def _tokens(n: int, offset: int = 0) -> list[int]:
    return [3 + (offset + 7 * i) % 500 for i in range(n)]


def _committed(kv: KVCacheManager, rid: str, tokens: list[int]) -> list[int]:
    table = kv.grow(rid, len(tokens))
    kv.commit(rid, len(tokens), lambda start, count: tokens[start:start + count])
    return table


def test_hits_are_whole_blocks_of_the_longest_shared_prefix():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    first = _tokens(10)  # blocks of 4, 4 and 2: two full blocks named
    table = _committed(kv, "a", first)
    second = first[:6] + _tokens(5, 99)  # shares 6 tokens: one full block, a hit ending mid-block
    assert kv.match_prefix("b", second) == 4
    assert kv.block_table("b") == table[:1]
    assert kv.match_prefix("c", first[:8]) == 4  # never the last token: 8 tokens -> 1 block
    assert kv.match_prefix("d", first[:8] + [1]) == 8
    assert kv.match_prefix("e", first, cache_salt="tenant-2") == 0  # salts never share
    for rid in "abcde":
        kv.free(rid)
    assert kv.is_idle() and kv.pool.num_cached_free_blocks == 2


def test_freed_cached_blocks_are_evicted_last_and_tail_first():
    kv = KVCacheManager(6, BS, enable_prefix_caching=True)
    tokens = _tokens(12)
    _committed(kv, "a", tokens)  # 3 named blocks
    kv.free("a")
    assert kv.pool.num_free_blocks == 6 and kv.pool.num_cached_free_blocks == 3
    kv.grow("b", 3 * BS + 1)  # the 3 plain free blocks, then 1 eviction: the tail
    assert kv.prefix_cache.stats.evictions == 1
    assert kv.match_prefix("c", tokens + [1]) == 2 * BS  # the head blocks survived
    kv.free("b")
    kv.free("c")
    assert kv.is_idle()


def test_a_hash_collision_is_a_miss_not_a_wrong_block(monkeypatch):
    monkeypatch.setattr(prefix_cache, "block_hash", lambda parent, ids, salt: 42)
    kv = KVCacheManager(8, BS, enable_prefix_caching=True)
    _committed(kv, "a", _tokens(8))
    assert kv.match_prefix("b", _tokens(8, 5) + [1]) == 0  # same name, other tokens
    assert kv.match_prefix("c", _tokens(8) + [1]) == BS  # block 2's name is taken by block 1
    for rid in "abc":
        kv.free(rid)
    assert kv.is_idle()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("prefix") / "llama", "llama", seed=4,
                                  extra_config={"num_hidden_layers": 3}))


def _engine(model: str, caching: bool, num_blocks: int = 64) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch",
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24)))


def _workload() -> tuple[list[list[int]], list[SamplingParams]]:
    system = _tokens(22)  # 5.5 blocks shared by every request: hits end mid-block
    prompts = [system + _tokens(3 + 4 * i, 100 * i) for i in range(8)] + [system[:9] + [7]]
    params = [SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=10, temperature=0.9, top_p=0.8, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    return prompts, params


def _run_in_waves(engine: LLMEngine, prompts, params) -> list[list[int]]:
    """Two at a time, so later requests find what earlier ones cached."""
    out = []
    for i in range(0, len(prompts), 2):
        out += [o.token_ids for o in engine.generate(prompts[i:i + 2], params[i:i + 2])]
    return out


@pytest.mark.parametrize("num_blocks", [64, 18])  # 18: preemption and eviction under pressure
def test_outputs_identical_with_the_cache_on_and_off(model, num_blocks):
    prompts, params = _workload()
    want = _run_in_waves(_engine(model, False, num_blocks), prompts, params)
    engine = _engine(model, True, num_blocks)
    got = _run_in_waves(engine, prompts, params)
    assert got == want
    stats = engine.kv_manager.prefix_cache.stats
    assert stats.hit_tokens >= 5 * BS * 3  # later waves hit the shared system prompt
    if num_blocks == 18:
        assert stats.evictions > 0 and engine.scheduler.num_preemptions > 0
    again = _run_in_waves(engine, prompts[:2], params[:2])  # evicted or not: recomputed alike
    assert again == want[:2]
    assert_no_leaks(engine)


def test_abort_one_of_two_requests_sharing_a_prefix(model):
    prompts, params = _workload()
    want = _engine(model, False).generate(prompts[1:2], params[1:2])[0].token_ids
    engine = _engine(model, True)
    engine.generate(prompts[:1], params[:1])  # caches the shared prefix
    keep = engine.add_request(prompts[1], params[1])
    gone = engine.add_request(prompts[3], params[3])
    tokens = []
    for step in range(200):
        for out in engine.step():
            if out.request_id == keep:
                tokens += out.new_token_ids
        if step == 2:
            engine.abort(gone)
        if not engine.has_unfinished():
            break
    assert tokens == want
    assert_no_leaks(engine)


def test_hits_misses_and_evictions_are_published_as_counters(model):
    from prometheus_client import CollectorRegistry

    from engine.metrics import EngineMetrics
    from pdserve.metrics import MetricFactory

    registry = CollectorRegistry()
    metrics = EngineMetrics(MetricFactory("tiny", registry))
    engine = _engine(model, True, num_blocks=18)
    prompts, params = _workload()
    _run_in_waves(engine, prompts[:4], params[:4])
    metrics.publish(engine)
    _run_in_waves(engine, prompts[4:], params[4:])
    metrics.publish(engine)
    metrics.publish(engine)  # nothing new: no double counting
    stats = engine.kv_manager.prefix_cache.stats

    def value(name: str) -> float:
        return registry.get_sample_value(f"pdserve:{name}_total", {"model_name": "tiny"})
    assert value("prefix_cache_queries") == stats.queried_tokens > 0
    assert value("prefix_cache_hits") == stats.hit_tokens > 0
    assert value("prefix_cache_evictions") == stats.evictions > 0
