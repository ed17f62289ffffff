"""Vocab-parallel sampling (engine/tp_sampler.py) gives the one-rank Sampler's ids.

Three rank processes are spawned once (real Gloo groups, as in test_model_parallel.py); ranks
0-1 form a TP=2 group and ranks 0-2 a TP=3 group (vocab 1000 and 7 do not divide by 3: the last
slice is padded; vocab 4 at TP=3 leaves rank 2 nothing but padding). Every rank samples each
case from its slice of seeded logits with planted exact ties across slices and at slice edges;
the test process runs `Sampler` on the full logits. Token ids must be identical. Logprobs
differ by rounding only: the slices' log-sum-exp (per-slice float32 sums of exp, combined in
float64) is within ~1e-7 of float64 truth, while the one-rank float32 `log_softmax` is off by
~1e-6 at vocab 1000 (~1e-5 at 128k, benchmarks/tp_sampling.py): so 1e-5 against the one-rank
value (`LOGPROB_ATOL`), and 2e-6 (a float32 ulp of a logprob near -16) against float64.
Each case also records how often `all_gather_last_dim` ran.
Last, a TP=2 engine (tiny Llama) against a one-rank engine on options that never gather.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import engine.model_runner
from engine.layers.embedding import ParallelLMHead, vocab_slice
from engine.llm_engine import LLMEngine
from engine.parallel import ParallelContext, init_parallel_context
from engine.plan import SamplingRow
from engine.sampler import Sampler, SamplingTensors
from engine.sampling_params import SamplingParams
from engine.tp_sampler import MAX_SLICED_TOP_K, sample_vocab_parallel
from tests.engine.factories import save_tiny_hf_model
from tests.engine.test_rank_group import _config

TP_SIZES = (2, 3)
NUM_RANKS = max(TP_SIZES)
LOGPROB_ATOL = 1e-5  # against the one-rank float32 log_softmax
EXACT_LOGPROB_ATOL = 2e-6  # against float64
TIMEOUT_S = 60.0
HEAD_VOCAB, HEAD_HIDDEN = 7, 16


@dataclass(frozen=True, slots=True)
class Case:
    """A batch of sampling rows over seeded logits; `options` the row kinds drawn from."""

    name: str
    vocab_size: int
    options: tuple[str, ...]
    gathers: bool = False  # the options need the whole row: the slices are all-gathered
    batch: int = 48


CASES = [
    Case("greedy-ties", 1000, ("greedy",)),
    Case("seeded-temperature", 1000, ("greedy", "temperature")),
    Case("penalty", 1000, ("greedy", "temperature", "penalty")),
    Case("logprobs", 1000, ("greedy", "temperature", "penalty", "logprobs")),
    Case("top-k-min-p", 1000, ("greedy", "temperature", "top_k", "min_p", "logprobs")),
    Case("top-p", 1000, ("greedy", "temperature", "top_p", "logprobs"), gathers=True),
    Case("large-top-k", 3000, ("temperature", "large_top_k"), gathers=True),
    Case("vocab-7", 7, ("greedy", "temperature", "penalty", "top_k", "min_p", "logprobs")),
    Case("vocab-4", 4, ("greedy", "temperature", "top_k", "logprobs")),
]


def case_inputs(case: Case) -> tuple[torch.Tensor, list[SamplingRow]]:
    """Seeded logits on a half-integer grid (ties everywhere), each row's max planted at 2-4
    ids spread over the TP=2 and TP=3 slices and their edges, plus the rows' options."""
    seed = sum(map(ord, case.name))
    vocab, rng = case.vocab_size, random.Random(seed)
    logits = (torch.randn(case.batch, vocab, generator=torch.Generator().manual_seed(seed))
              * 4).round() / 2
    edges = sorted({e for tp in TP_SIZES for s in range(tp)
                    for e in (vocab_slice(vocab, s, tp)[0] - 1, vocab_slice(vocab, s, tp)[0])
                    if 0 <= e < vocab} | {vocab - 1})
    for row in logits[::2]:
        row[rng.sample(edges + [rng.randrange(vocab)], min(len(edges), rng.randint(2, 4)))] = (
            row.max() + 1)
    return logits, [_row(case, rng) for _ in range(case.batch)]


def _row(case: Case, rng: random.Random) -> SamplingRow:
    opts, vocab = case.options, case.vocab_size
    greedy = "greedy" in opts and (len(opts) == 1 or rng.random() < 0.3)
    top_k = 0
    if "top_k" in opts:
        top_k = rng.choice([0, 1, 2, 3, 20, 50])
    elif "large_top_k" in opts:
        top_k = rng.choice([MAX_SLICED_TOP_K + 1, 2000])
    return SamplingRow(
        temperature=0.0 if greedy else rng.choice([0.3, 1.0, 1.7]),
        top_k=top_k,
        top_p=rng.choice([1.0, 0.5, 0.9]) if "top_p" in opts else 1.0,
        min_p=rng.choice([0.0, 0.05, 0.3]) if "min_p" in opts else 0.0,
        repetition_penalty=rng.choice([1.0, 1.5, 0.7]) if "penalty" in opts else 1.0,
        logprobs="logprobs" in opts and rng.random() < 0.7,
        seed=rng.randrange(2**62), step=rng.randrange(1000),
        token_history=tuple(rng.randrange(vocab) for _ in range(rng.randrange(40))))


def local_slice(full: torch.Tensor, vocab_size: int, rank: int, tp: int) -> torch.Tensor:
    """What a head without gathering gives rank `rank`: its columns, padding at -inf."""
    first, width = vocab_slice(vocab_size, rank, tp)
    local = torch.full((full.shape[0], width), -torch.inf)
    real = max(0, min(width, vocab_size - first))
    local[:, :real] = full[:, first:first + real]
    return local


def head_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(HEAD_VOCAB, HEAD_HIDDEN, generator=g)
    return weight, torch.randn(3, HEAD_HIDDEN, generator=g)


# ---------------------------------------------------------------- the spawned ranks


def rank_main(rank: int, port: int, out_dir: str) -> None:
    """Spawned rank: every TP group it belongs to, every case, and the LM head's two outputs."""
    torch.set_num_threads(1)
    gathered: list[tuple[int, ...]] = []
    gather = ParallelContext.all_gather_last_dim

    def counting(self, x):  # this process only: count the full-logits gathers
        gathered.append(tuple(x.shape))
        return gather(self, x)

    ParallelContext.all_gather_last_dim = counting
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    for tp in TP_SIZES:
        if rank >= tp:
            continue
        prefixed = torch.distributed.PrefixStore(f"tp{tp}", store)
        ctx = init_parallel_context(prefixed, rank, tp, 1, 1, "cpu", TIMEOUT_S)
        results = {}
        for case in CASES:
            logits, rows = case_inputs(case)
            gathered.clear()
            out = sample_vocab_parallel(local_slice(logits, case.vocab_size, rank, tp), rows,
                                        case.vocab_size, ctx)
            results[case.name] = dict(ids=out.token_ids, logprobs=out.logprobs,
                                      gathers=list(gathered))
        results["head"] = _head_outputs(ctx, gathered)
        torch.save(results, Path(out_dir) / f"tp{tp}-rank{rank}.pt")


def _head_outputs(ctx: ParallelContext, gathered: list) -> dict:
    weight, hidden = head_inputs()
    head = ParallelLMHead(HEAD_VOCAB, HEAD_HIDDEN, ctx)
    head.load_full(head.weight, weight)
    full = head.compute_logits(hidden)
    head.gather_logits = False
    gathered.clear()
    return dict(full=full, local=head.compute_logits(hidden), gathers=list(gathered))


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> dict[int, list[dict]]:
    """{tp: [each rank's results]} from one spawn of NUM_RANKS processes."""
    out_dir = tmp_path_factory.mktemp("tp-sampling")
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    procs = mp.start_processes(rank_main, args=(store.port, str(out_dir)), nprocs=NUM_RANKS,
                               join=False, start_method="spawn")
    deadline = time.monotonic() + 2 * TIMEOUT_S
    try:
        while not procs.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"sampling ranks did not finish within {2 * TIMEOUT_S}s")
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    return {tp: [torch.load(out_dir / f"tp{tp}-rank{r}.pt") for r in range(tp)]
            for tp in TP_SIZES}


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("tp", TP_SIZES)
def test_every_rank_draws_the_one_rank_ids(rank_results, tp, case):
    logits, rows = case_inputs(case)
    want = Sampler()(logits, SamplingTensors.from_rows(rows, case.vocab_size, "cpu"))
    for rank in rank_results[tp]:
        got = rank[case.name]
        assert torch.equal(got["ids"], want.token_ids)
        if want.logprobs is None:
            assert got["logprobs"] is None
        else:
            torch.testing.assert_close(got["logprobs"], want.logprobs, atol=LOGPROB_ATOL, rtol=0)
            exact = logits.double().log_softmax(-1).gather(1, want.token_ids[:, None])
            torch.testing.assert_close(got["logprobs"].double(), exact.squeeze(1),
                                       atol=EXACT_LOGPROB_ATOL, rtol=0)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_only_top_p_and_large_top_k_gather_the_logits(rank_results, tp):
    for case in CASES:
        for rank, result in enumerate(rank_results[tp]):
            width = vocab_slice(case.vocab_size, rank, tp)[1]
            expected = [(case.batch, width)] if case.gathers else []
            assert result[case.name]["gathers"] == expected, case.name


def test_cases_plant_cross_slice_ties_and_hit_every_path():
    logits, _ = case_inputs(CASES[0])
    for tp in TP_SIZES:  # some row's max sits in two different slices
        owners = [{int(i) // vocab_slice(1000, 0, tp)[1] for i in (row == row.max()).nonzero()}
                  for row in logits]
        assert any(len(o) > 1 for o in owners)
    rows = [r for case in CASES for r in case_inputs(case)[1]]
    assert any(r.is_greedy for r in rows) and any(r.repetition_penalty != 1.0 for r in rows)
    assert any(0 < r.top_k <= MAX_SLICED_TOP_K and not r.is_greedy for r in rows)


@pytest.mark.parametrize("tp", TP_SIZES)
def test_lm_head_returns_its_slice_with_padding_at_minus_inf(rank_results, tp):
    weight, hidden = head_inputs()
    want = hidden @ weight.T
    for rank, result in enumerate(rank_results[tp]):
        head = result["head"]
        torch.testing.assert_close(head["full"], want)
        assert head["gathers"] == []
        first, width = vocab_slice(HEAD_VOCAB, rank, tp)
        real = max(0, min(width, HEAD_VOCAB - first))
        assert head["local"].shape == (3, width)
        assert torch.equal(head["local"][:, :real], head["full"][:, first:first + real])
        assert torch.isneginf(head["local"][:, real:]).all()


def test_one_rank_head_ignores_the_flag():
    weight, hidden = head_inputs()
    head = ParallelLMHead(HEAD_VOCAB, HEAD_HIDDEN, ParallelContext.single())
    head.load_full(head.weight, weight)
    full = head.compute_logits(hidden)
    head.gather_logits = False
    assert full.shape == (3, HEAD_VOCAB) and torch.equal(head.compute_logits(hidden), full)


def _engine_workload(vocab_size: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(11)
    prompts = [[rng.randrange(3, vocab_size) for _ in range(rng.randrange(4, 30))]
               for _ in range(8)]
    kinds = [dict(temperature=0.0), dict(temperature=0.8, seed=1),
             dict(temperature=0.0, repetition_penalty=1.3, logprobs=True),
             dict(temperature=1.1, top_k=5, seed=2, logprobs=True),
             dict(temperature=0.9, min_p=0.05, repetition_penalty=0.8, seed=3)]
    params = [SamplingParams(max_tokens=8, ignore_eos=True, **kinds[i % len(kinds)])
              for i in range(len(prompts))]
    return prompts, params


def test_tp2_engine_samples_slices_and_matches_one_rank(tmp_path, monkeypatch):
    """Rank 0 lives in this process: count its full-logits gathers and vocab-parallel draws."""
    path = str(save_tiny_hf_model(tmp_path / "llama", "llama", seed=3))
    reference = LLMEngine(_config(path))
    prompts, params = _engine_workload(reference.model_config.vocab_size)
    want = reference.generate(prompts, params)
    calls = {"gather": 0, "draw": 0}
    gather = ParallelContext.all_gather_last_dim

    def counting_gather(self, x):
        calls["gather"] += 1
        return gather(self, x)

    def counting_draw(*args):
        calls["draw"] += 1
        return sample_vocab_parallel(*args)

    monkeypatch.setattr(ParallelContext, "all_gather_last_dim", counting_gather)
    monkeypatch.setattr(engine.model_runner, "sample_vocab_parallel", counting_draw)
    tp2 = LLMEngine(_config(path, tp=2))
    try:
        got = tp2.generate(prompts, params)
    finally:
        tp2.shutdown()
    assert calls["draw"] > 0 and calls["gather"] == 0
    # the TP=2 forward sums its row-parallel all-reduces in another order: logits (and so
    # logprobs) move by ~1e-6, far below any gap between the drawn keys of this workload
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs),
                                   atol=1e-4, rtol=0)
