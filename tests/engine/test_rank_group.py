"""Engines that span ranks (real rank processes, real Gloo groups on CPU) produce exactly the
tokens of one rank: tensor, pipeline and tensor x pipeline parallel, 16 concurrent requests with
chunked prefill and preemption, greedy and seeded top-p. A killed rank fails the step, bounded
by the collective timeout; a layout the model cannot take is refused before any rank starts."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.factories import save_tiny_hf_model
from tests.helpers import assert_no_leaks, next_logits

NUM_REQUESTS = 16
MAX_TOKENS = 10
NEAR_TIE = 1e-4  # a greedy pick may differ only where the top two TP=1 logits are this close


def _config(model: str, tp: int = 1, pp: int = 1, timeout_s: float = 60.0) -> EngineConfig:
    # 4-token blocks, 56 of them, 48-token steps: prompts are chunked and requests preempted
    return EngineConfig(model=model, device="cpu", attention_backend="torch",
                        cache=CacheConfig(block_size=4, num_blocks=56),
                        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=48),
                        parallel=ParallelConfig(tp, pp, collective_timeout_s=timeout_s))


def _workload(vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(7)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(rng.randrange(4, 40))]
               for _ in range(NUM_REQUESTS)]
    params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True) if i % 2
              else SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.8, seed=i,
                                  ignore_eos=True)
              for i in range(NUM_REQUESTS)]
    return prompts, params


def _run(engine: LLMEngine) -> list[list[int]]:
    prompts, params = _workload(engine.model_config.vocab_size)
    outputs = [out.token_ids[-MAX_TOKENS:] for out in engine.generate(prompts, params)]
    assert_no_leaks(engine)
    return outputs


def _assert_same_as_one_rank(reference: LLMEngine, got: list[list[int]],
                             want: list[list[int]]) -> None:
    """Identical tokens; where a greedy token differs, it must be a near-tie in the TP=1
    logits (then nothing after it is compared: the sequences diverged)."""
    prompts, params = _workload(reference.model_config.vocab_size)
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        k = next(j for j, (a, b) in enumerate(zip(g, w)) if a != b)
        assert params[i].temperature == 0.0, f"request {i}: sampled token {k} differs: {g} vs {w}"
        logits = next_logits(reference, prompts[i] + w[:k])
        top2 = logits.topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < NEAR_TIE, f"request {i} token {k}: {g[k]} vs {w[k]}, TP=1 top-2 gap {gap}"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("parallel-models")
    return {arch: str(save_tiny_hf_model(root / arch, arch, seed=3,
                                         extra_config={"num_hidden_layers": 6}))
            for arch in ("llama", "qwen2", "qwen3")}


class _References(dict):
    """arch -> (its one-rank engine, that engine's tokens), run when first asked for."""

    def __init__(self, paths: dict[str, str]) -> None:
        super().__init__()
        self.paths = paths

    def __missing__(self, arch: str) -> tuple[LLMEngine, list[list[int]]]:
        engine = LLMEngine(_config(self.paths[arch]))
        self[arch] = (engine, _run(engine))
        assert engine.scheduler.num_preemptions > 0  # the workload does preempt
        return self[arch]


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, tuple[LLMEngine, list[list[int]]]]:
    return _References(tiny_models)


# Every layout on llama and TP x PP on qwen3 in make test; the other architectures' layouts are
# slow (test_model_parallel.py checks every architecture x layout at the model level).
@pytest.mark.parametrize("arch,tp,pp", [
    ("llama", 2, 1), ("llama", 4, 1), ("llama", 1, 2), ("llama", 1, 4), ("llama", 2, 2),
    pytest.param("qwen2", 2, 1, marks=pytest.mark.slow),
    pytest.param("qwen2", 1, 2, marks=pytest.mark.slow),
    pytest.param("qwen3", 4, 1, marks=pytest.mark.slow), ("qwen3", 2, 2),
])
def test_tiny_models_match_one_rank(tiny_models, references, arch, tp, pp):
    """tp=4 on 2 KV heads replicates each head on two ranks; pp=4 splits 6 layers 2+2+1+1."""
    engine = LLMEngine(_config(tiny_models[arch], tp, pp))
    try:
        got = _run(engine)
        reference, want = references[arch]
        _assert_same_as_one_rank(reference, got, want)
        assert engine.scheduler.num_preemptions > 0
        stats = engine.executor.plan_stats
        assert stats.num_plans > 0 and stats.num_bytes > 0
    finally:
        engine.shutdown()
    assert not [pid for pid in engine.executor.rank_pids if _alive(pid)]


@pytest.mark.slow  # make test: the same split through `pdserve generate` (test_cli_generate.py)
def test_default_model_tp3_matches_one_rank():
    """The default model's 9 query / 3 KV heads split three ways."""
    reference = LLMEngine(_config("default"))
    want = _run(reference)
    engine = LLMEngine(_config("default", tp=3))
    try:
        _assert_same_as_one_rank(reference, _run(engine), want)
    finally:
        engine.shutdown()


def test_killed_rank_fails_the_step_within_the_timeout(tiny_models):
    # the timeout also bounds the rank's start-up: 15 s leaves room on a loaded 2-core box; a
    # killed rank's socket closes at once, so the step fails well within it
    timeout_s = 15.0
    engine = LLMEngine(_config(tiny_models["llama"], tp=2, timeout_s=timeout_s))
    try:
        prompts, params = _workload(engine.model_config.vocab_size)
        for prompt, p in zip(prompts[:4], params[:4]):
            engine.add_request(prompt, p)
        for _ in range(2):
            engine.step()
        os.kill(engine.executor.rank_pids[0], signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(Exception) as failure:
            for _ in range(100):
                engine.step()
        assert time.monotonic() - started < timeout_s, "the failure took longer than the timeout"
        assert "rank" in str(failure.value).lower() or isinstance(failure.value, OSError)
        deadline = time.monotonic() + 5.0  # the process may be reaped just after the step fails
        while engine.executor.dead_ranks() != [1] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.executor.dead_ranks() == [1]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("tp,pp,message", [
    (2, 1, "num_heads .9. is not divisible by tensor parallel size 2"),
    (1, 31, "pipeline parallel size 31 exceeds the model's 30 layers"),
])
def test_impossible_layout_is_refused_before_any_rank_starts(tp, pp, message):
    with pytest.raises(ValueError, match=message):
        LLMEngine(_config("default", tp, pp))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
