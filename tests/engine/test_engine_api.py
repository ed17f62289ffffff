"""Engine API behaviour on the default model: validation, abort, seeds, stop conditions, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from tests.helpers import assert_no_leaks, chat_ids

SAMPLED = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, top_k=50, seed=1234)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine()


@pytest.fixture(scope="module")
def prompt(default_loaded):
    return chat_ids(default_loaded.tokenizer, "Tell me a short story about a cat.")


@pytest.mark.parametrize("prompt_ids,params,match", [
    ([], SamplingParams(), "prompt is empty"),
    ([1] * 9000, SamplingParams(), "context length"),
    ([49152], SamplingParams(), "token ids must be in"),
])
def test_bad_prompts_raise_value_error(engine, prompt_ids, params, match):
    with pytest.raises(ValueError, match=match):
        engine.add_request(prompt_ids, params)
    assert_no_leaks(engine)


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path():
    from engine.llm_engine import LLMEngine

    with pytest.raises(ValueError, match="no-such-model"):
        LLMEngine(EngineConfig(model="/tmp/no-such-model", device="cpu"))


def test_request_needing_more_blocks_than_the_pool(make_engine, prompt):
    small = make_engine(num_blocks=4)
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request(prompt, SamplingParams(max_tokens=64))
    assert_no_leaks(small)


def test_same_seed_same_tokens_alone_or_batched(engine, prompt, default_loaded):
    alone = engine.generate([prompt], SAMPLED)[0].token_ids
    others = [chat_ids(default_loaded.tokenizer, f"Count to {n}.") for n in range(5)]
    batched = engine.generate(others + [prompt], [SamplingParams(max_tokens=12, temperature=1.0)] * 5 + [SAMPLED])
    assert batched[-1].token_ids == alone
    different = engine.generate([prompt], SamplingParams(**{**_params_dict(SAMPLED), "seed": 99}))
    assert different[0].token_ids != alone
    assert_no_leaks(engine)


def _params_dict(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__slots__}


def test_stop_string_cut_and_excluded(engine, prompt):
    full = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0))[0]
    # Pick a stop string spanning a token boundary from the greedy text itself.
    words = full.text.split(" ")
    assert len(words) > 4, full.text
    stop = words[2][-2:] + " " + words[3][:2]
    cut = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    assert_no_leaks(engine)


def test_stop_token_ids_max_tokens_ignore_eos(engine, prompt):
    full = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 10
    stop_id = full.token_ids[3]
    cut = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert cut.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    assert cut.finish_reason == "stop"
    france = chat_ids(engine.tokenizer, "What is the capital of France?")
    eos_run = engine.generate([france], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert eos_run.finish_reason == "length" and len(eos_run.token_ids) == 30
    assert eos_run.token_ids[7] in engine.tokenizer.eos_token_ids  # went on past <|im_end|>
    assert_no_leaks(engine)


def test_logprobs_returned(engine, prompt):
    out = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0.0, logprobs=True))[0]
    assert len(out.logprobs) == 5 and all(lp <= 0.0 for lp in out.logprobs)


def test_abort_waiting_running_and_mid_prefill(make_engine, prompt):
    engine = make_engine(max_num_batched_tokens=16)
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=50, temperature=0.0)) for _ in range(3)]
    engine.step()  # first request mid chunked prefill, the others waiting
    assert engine.abort(ids[0]).finish_reason == "abort"
    for _ in range(8):
        engine.step()
    assert engine.abort(ids[1]) is not None and engine.abort(ids[2]) is not None
    assert engine.abort("unknown") is None
    assert_no_leaks(engine)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pdserve", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_generate_json_matches_engine(engine):
    res = run_cli("generate", "--chat", "--json", "--max-tokens", "12",
                  "--prompt", "What is the capital of France?", "--prompt", "Name a color.")
    assert res.returncode == 0, res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 2
    expected = engine.generate([line["prompt_token_ids"] for line in lines],
                               SamplingParams(max_tokens=12, temperature=0.0))
    for line, exp in zip(lines, expected):
        assert line["token_ids"] == exp.token_ids and line["text"] == exp.text
        assert line["finish_reason"] in ("stop", "length")
    assert "Paris" in lines[0]["text"]


@pytest.mark.parametrize("args,needle", [
    (["generate", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--temperature", "-1"], "temperature"),
    (["generate", "--top-p", "2"], "top_p"),
    (["generate", "--model", "/nonexistent/model"], "/nonexistent/model"),
    (["generate", "--prompt", ""], "prompt is empty"),
    (["generate", "--max-tokens", "abc"], "invalid int"),
])
def test_cli_bad_arguments_one_line_error(args, needle):
    res = run_cli(*args)
    assert res.returncode != 0
    err = res.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert needle in err
