"""Asynchronous scheduling (engine/inflight.py) on CPU: step N+1 is planned and launched before
step N's sampled ids are read back, its in-flight token ids fed from the device buffer.

The outputs must equal the synchronous engine's token for token, for every kind of request
(greedy, seeded sampling, stop strings and ids, EOS, logprobs, repetition penalty, chunked
prefill, preemption, abort), with no block leaked and no block freed while a launched step may
still write it. On CPU nothing overlaps, but every piece of bookkeeping runs as on CUDA.
"""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.helpers import LONG_TEXT, PROMPTS, assert_no_leaks, chat_ids

MIXED = [
    SamplingParams(max_tokens=24, temperature=0.0),
    SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=7),
    SamplingParams(max_tokens=1, temperature=0.0),
    SamplingParams(max_tokens=40, temperature=0.0),  # ends at <|im_end|> well before 40
    SamplingParams(max_tokens=16, temperature=1.0, min_p=0.05, seed=3, logprobs=True),
    SamplingParams(max_tokens=16, temperature=0.7, repetition_penalty=1.3, seed=11),
    SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=30, temperature=0.0, stop=[" the"]),
]


@pytest.fixture(scope="module")
def prompts(default_loaded):
    texts = PROMPTS + ["Name a color.", "Tell me a joke."]
    return [chat_ids(default_loaded.tokenizer, t) for t in texts][: len(MIXED)]


def _run(engine, prompts, params):
    out = engine.generate(prompts, params)
    assert_no_leaks(engine)
    return out


def _same(a, b):
    for x, y in zip(a, b):
        assert (x.token_ids, x.text, x.finish_reason) == (y.token_ids, y.text, y.finish_reason)
        # prefix caching: a hit reuses KV another batch computed (fp32 rounding of ~1e-6)
        assert x.logprobs == pytest.approx(y.logprobs, rel=1e-5, abs=1e-5)


@pytest.fixture(scope="module")
def synchronous(make_engine, prompts):
    sync = _run(make_engine(async_scheduling=False), prompts, MIXED)
    assert {o.finish_reason for o in sync} == {"stop", "length"}
    return sync


# The small token budget mixes chunked prefills with decodes whose tokens are in flight, and
# its later steps are the large budget's (every prompt prefilled): the large one is slow.
@pytest.mark.parametrize("budget", [pytest.param(2048, marks=pytest.mark.slow), 64])
def test_mixed_requests_identical_to_synchronous(make_engine, prompts, synchronous, budget):
    engine = make_engine(async_scheduling=True, max_num_batched_tokens=budget)
    _same(_run(engine, prompts, MIXED), synchronous)


def test_preemption_under_a_small_cache_identical(make_engine, default_loaded):
    prompts = [chat_ids(default_loaded.tokenizer, f"Write a long story about the number {n}.")
               for n in range(4)]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    reference = _run(make_engine(async_scheduling=False), prompts, params)
    engine = make_engine(async_scheduling=True, num_blocks=14, block_size=8)
    _same(_run(engine, prompts, params), reference)
    assert engine.scheduler.num_preemptions > 0


def test_outputs_lag_one_step_and_one_token_in_flight(make_engine, prompts):
    engine = make_engine(async_scheduling=True)
    rid = engine.add_request(prompts[0], SamplingParams(max_tokens=5, temperature=0.0))
    request = engine.requests[rid]
    assert engine.step() == []  # the prefill's token is in flight
    assert request.num_inflight_tokens == 1 and request.output_token_ids == []
    got = []
    while engine.has_unfinished():
        outs = engine.step()
        assert request.num_inflight_tokens <= 1
        got += [t for o in outs for t in o.new_token_ids]
    assert len(got) == 5
    assert_no_leaks(engine)


def test_length_limit_wastes_no_step(make_engine, prompts):
    """A request whose last token (by max_tokens) is in flight is not scheduled again."""
    counts = {}
    for mode in (False, True):
        engine = make_engine(async_scheduling=mode)
        calls = []
        execute = engine.runner.execute
        engine.runner.execute = lambda plan, hook=None: (calls.append(plan), execute(plan, hook))[1]
        _run(engine, prompts[:1], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        counts[mode] = len(calls)
    assert counts[True] == counts[False] == 6


def test_abort_while_in_flight_defers_the_blocks(make_engine, prompts):
    engine = make_engine(async_scheduling=True)
    keep = engine.add_request(prompts[0], SamplingParams(max_tokens=12, temperature=0.0))
    gone = engine.add_request(prompts[1], SamplingParams(max_tokens=12, temperature=0.0))
    for _ in range(3):
        engine.step()
    held = len(engine.kv_manager.block_table(gone))
    assert held > 0 and gone in engine._flights[-1].request_ids
    free_before = engine.kv_manager.num_free_blocks
    assert engine.abort(gone).finish_reason == "abort"
    # the launched step may still write the aborted request's blocks: not in the pool yet
    assert engine.kv_manager.num_free_blocks == free_before
    with pytest.raises(ValueError, match="already in use"):
        engine.make_request(prompts[1], SamplingParams(), request_id=gone)
    outputs = engine.step()
    assert all(o.request_id == keep for o in outputs)
    assert engine.kv_manager.num_free_blocks >= free_before + held - 1
    while engine.has_unfinished():
        engine.step()
    assert_no_leaks(engine)


def test_stop_wastes_at_most_one_token_and_frees_after_it(make_engine, prompts):
    """A request stopped by a stop id at step N had a token computed by step N+1; that token
    is dropped, and the blocks wait for step N+1 to be read back."""
    sync = make_engine(async_scheduling=False).generate(
        [prompts[0]], SamplingParams(max_tokens=10, temperature=0.0))[0]
    stop_id = sync.token_ids[3]
    params = SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id])
    engine = make_engine(async_scheduling=True)
    rid = engine.add_request(prompts[0], params)
    outputs = []
    while not any(o.finished for o in outputs):
        outputs += engine.step()
    assert [t for o in outputs for t in o.new_token_ids] == sync.token_ids[:4]
    assert engine.kv_manager.block_table(rid)  # step N+1 is still in flight
    assert engine.has_unfinished()
    assert engine.step() == []
    assert_no_leaks(engine)


def test_long_prompt_chunked_with_decodes_in_flight(make_engine, default_loaded):
    long = chat_ids(default_loaded.tokenizer, "Summarize: " + LONG_TEXT * 6)
    short = chat_ids(default_loaded.tokenizer, "Say hi.")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    sync = _run(make_engine(async_scheduling=False, max_num_batched_tokens=48), [short, long],
                params)
    engine = make_engine(async_scheduling=True, max_num_batched_tokens=48)
    _same(_run(engine, [short, long], params), sync)
