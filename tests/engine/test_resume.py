"""A request resumed from outputs already streamed (a migrated request) continues exactly as the
uninterrupted run: the same new tokens, finish reason and text, for greedy and seeded sampling,
a repetition penalty, a stop string and logprobs, cut after any token.

The uninterrupted run is recorded token by token; a run resumed after k tokens must stream the
uninterrupted text minus what the uninterrupted stream had emitted by its k-th token (so text
held back at the cut, a partial character or a stop-string prefix, comes out of the resumed
run)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.output_processor import RequestStream
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks

PROMPT = list(range(300, 340, 3))
SEED = 1234
CASES = {
    "greedy": SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
    "top_p": SamplingParams(max_tokens=20, temperature=0.8, top_p=0.9, ignore_eos=True),
    "repetition_penalty": SamplingParams(max_tokens=20, temperature=0.7,
                                         repetition_penalty=1.3, ignore_eos=True),
    "logprobs": SamplingParams(max_tokens=16, temperature=0.8, logprobs=True, ignore_eos=True),
}


@dataclass
class Run:
    """One request's stream, token by token."""

    token_ids: list[int] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    num_output_tokens: int = 0  # as the last output reports it (usage.completion_tokens)

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("resume"), "llama")


def _engine(path, async_scheduling: bool) -> LLMEngine:
    config = EngineConfig(model=str(path), device="cpu", dtype="float32",
                          async_scheduling=async_scheduling,
                          cache=CacheConfig(block_size=8, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_batched_tokens=64))
    return LLMEngine(config)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(request, tiny_path) -> LLMEngine:
    return _engine(tiny_path, request.param)


@pytest.fixture(scope="module")
def sync_engine(tiny_path) -> LLMEngine:
    """For what does not step: streams and validation."""
    return _engine(tiny_path, False)


def _run_all(engine: LLMEngine, requests: list[Request]) -> list[Run]:
    """Run requests (resumed or not) concurrently to completion; one Run each."""
    runs = {r.request_id: Run() for r in requests}
    for r in requests:
        engine.track(r)
        engine.scheduler.add(r)
    while engine.has_unfinished():
        for out in engine.step():
            run = runs[out.request_id]
            run.token_ids += out.new_token_ids
            run.deltas.append(out.text_delta)
            run.logprobs += out.new_logprobs
            if out.finished:
                run.finish_reason, run.num_output_tokens = out.finish_reason, out.num_output_tokens
    assert_no_leaks(engine)
    return [runs[r.request_id] for r in requests]


def _check_resumes(engine: LLMEngine, params: SamplingParams) -> Run:
    """Every cut 1..n-1 of the uninterrupted run resumes to exactly its continuation."""
    full, = _run_all(engine, [engine.make_request(PROMPT, params, seed=SEED)])
    n = len(full.token_ids)
    assert n >= 3 and full.num_output_tokens == n
    cuts = list(range(1, n))
    resumed = _run_all(engine, [engine.make_request(PROMPT, params, seed=SEED,
                                                    output_token_ids=full.token_ids[:k])
                                for k in cuts])
    for k, run in zip(cuts, resumed):
        emitted = "".join(full.deltas[:k])
        assert run.token_ids == full.token_ids[k:], f"cut {k}"
        assert run.finish_reason == full.finish_reason, f"cut {k}"
        assert run.num_output_tokens == n, f"cut {k}"
        assert run.text == full.text[len(emitted):], f"cut {k}"
        if params.logprobs:
            # the resumed KV of outputs [0, k) comes from one prefill, not k decode steps:
            # the same tokens, float sums in another order
            assert run.logprobs == pytest.approx(full.logprobs[k:], rel=1e-6, abs=1e-6)
    return full


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_run_continues_the_uninterrupted_one(engine, case):
    full = _check_resumes(engine, CASES[case])
    assert full.finish_reason == "length"


def test_resumed_run_stops_at_the_same_stop_string(engine):
    plain = SamplingParams(max_tokens=24, temperature=0.8, ignore_eos=True)
    text, = [r.text for r in _run_all(engine, [engine.make_request(PROMPT, plain, seed=SEED)])]
    stop = text[len(text) // 2:len(text) // 2 + 3]  # from the uninterrupted output: it stops
    full = _check_resumes(engine, SamplingParams(max_tokens=24, temperature=0.8,
                                                 ignore_eos=True, stop=[stop]))
    assert full.finish_reason == "stop"
    assert stop not in full.text and full.text == text[:text.index(stop)]


def _stream_all(engine: LLMEngine, token_ids: list[int], stop: tuple[str, ...],
                resumed: int = 0) -> Run:
    """Stream `token_ids` through a RequestStream, the first `resumed` of them replayed."""
    params = SamplingParams(max_tokens=len(token_ids), stop=stop)
    request = Request("s", PROMPT, params, SEED, engine.max_model_len,
                      output_token_ids=token_ids[:resumed])
    stream = RequestStream(request, engine.tokenizer, engine.tokenizer.eos_token_ids)
    stream.replay(request.output_token_ids)
    run = Run()
    for token_id in token_ids[resumed:]:
        request.output_token_ids.append(token_id)
        delta, run.finish_reason = stream.on_token(token_id)
        run.deltas.append(delta)
    return run


@pytest.mark.parametrize("stop", [(), ("東京X",)], ids=["no-stop", "stop-prefix-held"])
def test_replay_restores_held_back_text(sync_engine, stop):
    # Multi-byte characters split across byte-level tokens, and (with the stop string) "東京"
    # held back as its prefix until "で" rules it out: cuts land inside both.
    text = "日本の首都は東京です。🙂 Ünïcödé ok"
    token_ids = sync_engine.tokenizer.encode(text)
    full = _stream_all(sync_engine, token_ids, stop)
    assert full.text == text and full.finish_reason == "length"
    held = 0
    for k in range(1, len(token_ids)):
        emitted = "".join(full.deltas[:k])
        held += emitted != sync_engine.tokenizer.decode(token_ids[:k])
        run = _stream_all(sync_engine, token_ids, stop, resumed=k)
        assert run.text == full.text[len(emitted):], f"cut {k}"
        assert run.finish_reason == "length", f"cut {k}"
    assert held >= 2  # the test means something: some cuts held back text


def _make(engine: LLMEngine, outputs: list[int], **params) -> Request:
    return engine.make_request(PROMPT, SamplingParams(**params), output_token_ids=outputs)


def test_resumed_outputs_are_validated(sync_engine):
    vocab = sync_engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"output token ids must be in \[0, {vocab}\)"):
        _make(sync_engine, [5, vocab], max_tokens=8)
    with pytest.raises(ValueError, match=r"output token ids must be in"):
        _make(sync_engine, [-1], max_tokens=8)
    room = sync_engine.max_model_len - len(PROMPT)
    with pytest.raises(ValueError, match=r"reach the model's context length"):
        _make(sync_engine, [7] * room, max_tokens=sync_engine.max_model_len)
    _make(sync_engine, [7] * (room - 1), max_tokens=sync_engine.max_model_len)  # 1 left
    with pytest.raises(ValueError, match=r"3 output tokens already reach max_tokens 3"):
        _make(sync_engine, [7, 8, 9], max_tokens=3)
    _make(sync_engine, [7, 8], max_tokens=3)
    with pytest.raises(ValueError, match=r"output_token_ids\[1\] = 77 is a stop token"):
        _make(sync_engine, [7, 77, 9], max_tokens=8, stop_token_ids=[77])
    eos = sync_engine.tokenizer.eos_token_ids[0]
    with pytest.raises(ValueError, match=rf"output_token_ids\[0\] = {eos} is a stop token"):
        _make(sync_engine, [eos], max_tokens=8)
    _make(sync_engine, [eos], max_tokens=8, ignore_eos=True)
    assert not sync_engine.requests


def test_outputs_completing_a_stop_string_are_refused_by_track(sync_engine):
    outputs = sync_engine.tokenizer.encode(" hello world, again")
    text = sync_engine.tokenizer.decode(outputs)
    request = _make(sync_engine, outputs, max_tokens=32, stop=[text[-4:]])
    with pytest.raises(ValueError, match=r"complete a stop string"):
        sync_engine.track(request)
    assert not sync_engine.requests and not sync_engine.streams
    accepted = _make(sync_engine, outputs, max_tokens=32, stop=["never in it"])
    sync_engine.track(accepted)
    assert list(sync_engine.requests) == [accepted.request_id]
    sync_engine.forget(accepted)
