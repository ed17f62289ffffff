"""The start-up warm-up (engine/warmup.py) runs the engine's own step path over every sampling
path, a chunked prompt and a mixed step, then leaves the engine as it found it: every block
free, no request, no cached block, hash or counter; outputs afterwards equal a cold engine's."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("warm") / "llama", "llama", seed=5,
                                  extra_config={"num_hidden_layers": 2}))


def _engine(model: str, warmup: bool) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch", warmup=warmup, max_model_len=256,
        cache=CacheConfig(block_size=4, num_blocks=400, enable_prefix_caching=True),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64)))


def test_warmup_leaves_a_clean_engine_with_the_same_outputs(model):
    warm, cold = _engine(model, True), _engine(model, False)
    assert warm.warmup_s > 0 and cold.warmup_s == 0
    stats = warm.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (0, 0, 0)
    assert (stats.prefix_queried_tokens, stats.prefix_hit_tokens) == (0, 0)
    assert not warm.kv_manager.prefix_cache.cached_hashes()
    assert not warm.requests and not warm.has_unfinished()
    prompts = [[5 + (3 * i + j) % 300 for i in range(90)] for j in range(3)]
    params = [SamplingParams(max_tokens=8, temperature=0.0),
              SamplingParams(max_tokens=8, temperature=0.9, top_p=0.8, seed=3),
              SamplingParams(max_tokens=8, temperature=0.7, top_k=5, seed=4)]
    got = [o.token_ids for o in warm.generate(prompts, params)]
    assert got == [o.token_ids for o in cold.generate(prompts, params)]


def test_warmup_refuses_a_busy_engine(model):
    from engine.warmup import warm_up

    engine = _engine(model, False)
    engine.add_request([5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        warm_up(engine)


def test_warmup_takes_each_sampler_path(model, monkeypatch):
    """The sort-free top-p (a batch with top-p and no top-k) and the sorting path (top-k) both
    run during the warm-up, so neither compiles on the request path on CUDA."""
    from engine import sampler
    from engine.kernels import dispatch

    calls = {"sort_free": 0, "sort": 0}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dispatch, "apply_top_p", counted("sort_free", dispatch.apply_top_p))
    monkeypatch.setattr(sampler, "apply_top_k_top_p",
                        counted("sort", sampler.apply_top_k_top_p))
    _engine(model, True)
    assert calls["sort_free"] > 0 and calls["sort"] > 0


def test_warmup_runs_eager_decode_at_each_split_class(model, monkeypatch):
    """Mixed steps (a prompt joining decoding ones) run decode attention eagerly, at a batch
    size the decode graphs' captures do not cover with eager launches: the warm-up runs one at
    each power of two below the largest batch and at the largest."""
    from engine import model_runner
    from engine.warmup import _mixed_decode_batches

    seen = set()
    real = model_runner.AttentionMetadata

    def recording(slots, num_decode, decode, prefill):
        if decode is not None and prefill is not None:
            seen.add(num_decode)
        return real(slots, num_decode, decode, prefill)

    monkeypatch.setattr(model_runner, "AttentionMetadata", recording)
    engine = _engine(model, True)
    batches = _mixed_decode_batches(engine)
    assert batches[:3] == [1, 2, 4] and set(batches) <= seen
    assert engine.stats().num_preemptions == 0  # the largest batch fit the cache


def test_mixed_step_batches_fit_a_small_cache(model):
    """With few KV blocks the largest warm-up batch shrinks so that it fits without
    preemption: each decoding request needs ceil(18 / block_size) blocks."""
    from engine.warmup import _DECODING, _joining_length, _mixed_decode_batches

    engine = LLMEngine(EngineConfig(model=model, device="cpu", attention_backend="torch",
                                    warmup=True, max_model_len=256,
                                    cache=CacheConfig(block_size=8, num_blocks=40)))
    per_request = -(-(2 + _DECODING.max_tokens) // 8)
    joining = -(-(_joining_length(engine) + 1) // 8)
    top = _mixed_decode_batches(engine)[-1]
    assert top * per_request + joining <= 40 < (top + 1) * per_request + joining
    assert engine.stats().num_preemptions == 0


def _tile(block_m: int, block_n: int) -> dict:
    gemm = dict(block_n=block_n, block_k=32, group_m=1, num_warps=4, num_stages=2)
    return dict(block_m=block_m, gate_up=gemm, down=gemm)


def test_moe_warmup_reaches_every_fused_moe_tile_configuration(tmp_path, monkeypatch):
    """On a MoE model every tile configuration of the fused MoE kernels that a step can select
    (the GEMV path's, then each swept bucket's: here a tiles file with buckets at 8, 36, 64, 90
    and 256 tokens) is selected by some step of the warm-up, so none compiles on the request
    path on CUDA. The other warm-up steps alone miss the 64-token bucket (48 to 75 tokens)."""
    import json

    import torch

    from engine.kernels import fused_moe, moe_tile_configs
    from engine.layers import moe
    from engine.warmup import moe_prompt_lengths
    from tests.engine.moe_factories import save_tiny_moe_model

    tiles = tmp_path / "tiles.json"
    key = moe_tile_configs.shape_key(8, 64, 37, 2, torch.float32)
    tiles.write_text(json.dumps({"configs": {key: {
        "8": _tile(16, 32), "36": _tile(16, 64), "64": _tile(32, 32), "90": _tile(32, 64),
        "256": _tile(64, 64)}}}))
    monkeypatch.setattr(moe_tile_configs, "CONFIG_PATH", tiles)
    seen = set()
    real = moe._experts

    def recording(x, *args):
        seen.add(fused_moe.kernel_variant(x.shape[0], 8, 64, 37, 2, torch.float32))
        return real(x, *args)

    monkeypatch.setattr(moe, "_experts", recording)
    path = save_tiny_moe_model(tmp_path / "qwen3_moe", "qwen3_moe", seed=1)
    engine = LLMEngine(EngineConfig(
        model=str(path), device="cpu", attention_backend="torch", warmup=True,
        max_model_len=512, cache=CacheConfig(block_size=4, num_blocks=600),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=384)))
    lengths = moe_prompt_lengths(engine)
    assert lengths == [1, 33, 48, 76, 152]  # GEMV; buckets 36, 64, 90, 256 (8: GEMV's range)
    every = {fused_moe.kernel_variant(n, 8, 64, 37, 2, torch.float32) for n in range(1, 385)}
    assert len(every) == 5 and seen == every
    assert engine.stats().num_free_blocks == engine.stats().num_blocks


def test_warmup_prompts_fit_a_cache_smaller_than_the_context(model):
    """A KV cache that holds fewer tokens than max_model_len (96 against 512): the warm-up's
    prompts stay within it, so start-up does not fail on a prompt the cache would refuse, and
    the engine serves afterwards with every block back."""
    engine = LLMEngine(EngineConfig(
        model=model, device="cpu", attention_backend="torch", warmup=True, max_model_len=512,
        cache=CacheConfig(block_size=4, num_blocks=24),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64)))
    assert engine.warmup_s > 0
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4
    assert engine.stats().num_free_blocks == engine.stats().num_blocks
