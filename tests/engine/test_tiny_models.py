"""Tiny random Llama, Mistral, Qwen2 and Qwen3 models saved with `save_pretrained`: greedy tokens
identical to HF transformers and next-token logits within 1e-4 relative (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_greedy_matches_hf, assert_logits_close_to_hf

VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-rope-scaled-tied": dict(arch="llama", rope_scaling=True, tie_word_embeddings=True),
    "llama-attention-bias": dict(arch="llama", extra_config={"attention_bias": True}),
    "mistral": dict(arch="mistral"),
    "qwen2-sharded": dict(arch="qwen2", shard=True),
    "qwen3": dict(arch="qwen3"),
}
PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 137)), list(range(7, 400, 13)), [42] * 16]


@pytest.fixture(scope="module", params=list(VARIANTS))
def tiny(request, tmp_path_factory):
    path = save_tiny_hf_model(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])
    hf = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()
    config = EngineConfig(model=str(path), device="cpu", dtype="float32",
                          cache=CacheConfig(block_size=8, num_blocks=128),
                          scheduler=SchedulerConfig(max_num_batched_tokens=24))
    return hf, LLMEngine(config)


def test_greedy_tokens_match_hf(tiny):
    hf, engine = tiny
    assert_greedy_matches_hf(engine, hf, PROMPTS, 24)  # concurrent, chunked (budget 24)


def test_next_token_logits_close_to_hf(tiny):
    hf, engine = tiny
    assert_logits_close_to_hf(engine, hf, PROMPTS)
