"""An engine with `kv_cache_dtype: fp8_e4m3` (engine/kv_cache/fp8.py) on CPU, torch reference:
the pool holds 2D / (D + 16) times the blocks of the same bytes, greedy decoding stays close to
the full-precision cache (agreement reported, not assumed), and a token's logprob computed at
decode time equals the one a prefill of the same prefix computes (both read the same fp8 KV)."""

from __future__ import annotations

import pytest

from engine.config import CacheConfig, EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model

BUDGET = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("fp8") / "llama", "llama", seed=6,
                                  extra_config={"num_hidden_layers": 3}))


def _engine(model: str, kv_dtype: str, **cache) -> LLMEngine:
    cache = dict(block_size=4, cpu_kv_cache_bytes=BUDGET, **cache)
    return LLMEngine(EngineConfig(model=model, device="cpu", attention_backend="torch",
                                  cache=CacheConfig(kv_cache_dtype=kv_dtype, **cache)))


def test_config_refuses_unknown_kv_dtypes():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        CacheConfig(kv_cache_dtype="int4")


def test_fp8_pool_holds_more_blocks_and_stays_close(model):
    full, fp8 = _engine(model, "auto"), _engine(model, "fp8_e4m3")
    d = full.model_config.head_dim
    assert fp8.kv_cache.shape[-1] == d + 16 and str(fp8.kv_cache.dtype) == "torch.uint8"
    ratio = fp8.executor.num_blocks / full.executor.num_blocks
    assert ratio == pytest.approx(4 * d / (d + 16), rel=0.01)  # fp32: 4 bytes -> 1 (+ tail)
    prompts = [[3 + (7 * i + 11 * j) % 400 for i in range(20 + 9 * j)] for j in range(6)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    got = [o.token_ids for o in fp8.generate(prompts, params)]
    want = [o.token_ids for o in full.generate(prompts, params)]
    first_diff = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), len(g))
                  for g, w in zip(got, want)]
    print(f"fp8 KV: greedy tokens equal to the full cache's for the first {first_diff} positions")
    assert sum(first_diff) >= 0.75 * sum(len(w) for w in want)  # a clear majority, reported


def test_decode_and_prefill_read_the_same_fp8_kv(model):
    """The logprob of output token i at decode time equals the logprob a fresh prefill of
    prompt + outputs[:i] gives it: both attend over the same quantized rows."""
    engine = _engine(model, "fp8_e4m3", enable_prefix_caching=False)
    prompt = [5 + (13 * i) % 300 for i in range(23)]
    out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, logprobs=True,
                                                   ignore_eos=True))[0]
    outputs = out.token_ids
    for i in (1, 4, 7):
        again = engine.generate([prompt + outputs[:i]],
                                SamplingParams(max_tokens=1, temperature=0.0, logprobs=True,
                                               ignore_eos=True))[0]
        assert again.token_ids[0] == outputs[i]
        assert again.logprobs[0] == pytest.approx(out.logprobs[i], abs=1e-4)
