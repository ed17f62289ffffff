"""The engine against HF transformers on the same weights: greedy tokens identical, logits close."""

from __future__ import annotations

import pytest

from tests.helpers import GREEDY, PROMPTS, assert_no_leaks, chat_ids, hf_greedy


@pytest.fixture(scope="module")
def prompt_ids(default_loaded):
    return [chat_ids(default_loaded.tokenizer, p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_tokens(hf_default_model, default_loaded, prompt_ids):
    eos = default_loaded.tokenizer.eos_token_ids
    return [hf_greedy(hf_default_model, ids, GREEDY.max_tokens, eos) for ids in prompt_ids]


def test_prompts_cover_required_cases(prompt_ids):
    assert max(len(p) for p in prompt_ids) > 600
    assert len(set(len(p) for p in prompt_ids)) == len(prompt_ids)


def test_greedy_matches_hf_all_concurrent(make_engine, prompt_ids, hf_tokens):
    engine = make_engine()
    outputs = engine.generate(prompt_ids, GREEDY)
    for prompt, out, ref in zip(PROMPTS, outputs, hf_tokens):
        assert out.token_ids == ref, f"mismatch for prompt {prompt[:40]!r}"
    assert_no_leaks(engine)


def test_france_answer_is_paris(make_engine, prompt_ids):
    engine = make_engine()
    (out,) = engine.generate([prompt_ids[0]], GREEDY)
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("block_size,budget", [(16, 64), (8, 37)])
def test_chunked_prefill_and_block_sizes_match_hf(make_engine, prompt_ids, hf_tokens, block_size, budget):
    engine = make_engine(block_size=block_size, max_num_batched_tokens=budget)
    outputs = engine.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outputs] == hf_tokens
    assert_no_leaks(engine)


def test_preemption_matches_hf(make_engine, prompt_ids, hf_tokens):
    # Short prompts admitted together into a pool with 2 spare blocks: as they grow past block
    # boundaries the scheduler must preempt and later recompute.
    short = [i for i, p in enumerate(prompt_ids) if len(p) < 100]
    prompt_blocks = sum(-(-len(prompt_ids[i]) // 16) for i in short)
    engine = make_engine(num_blocks=prompt_blocks + 2)
    outputs = engine.generate([prompt_ids[i] for i in short], GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == [hf_tokens[i] for i in short]
    assert_no_leaks(engine)
