"""Speculative decoding's measured speed-up at controlled acceptance rates, through the engine.

Random weights accept no real draft (benchmarks/spec_costs.py only projects a speed-up from
step costs), so the drafts here come from an oracle (benchmarks/spec_oracle_proposer.py): a
plain greedy run records each prompt's continuation, and the speculative engine's proposer
replays it with each drafted position right with probability p (else a wrong token). The
acceptance rate is set; everything else is the real engine: scheduling the k + 1 tokens,
verification steps (CUDA graphs where the engine uses them), rejection sampling, read-back, KV
trimming, the `Payoff` controller that stops drafting where it does not pay, asynchronous
scheduling on. Not measured: a real proposer's cost (the oracle's is a list slice) and accuracy.

Two engines over one set of weights, same configuration but `speculative`: plain (off) and
speculative ("ngram", k = the largest --ks, the oracle swapped in: `engine.spec.proposer`).
Prefix caching is off (the prompts are replayed: a hit would skip their prefill). Weights
"chain" (default): random, with a greedy margin bf16 rounding cannot flip, so verification rows
agree with the plain decode rows that made the references (plain random weights have near-ties:
`--random-check` adds one row on them to count how many sequences leave the reference; a
sequence that does gets no more drafts). Per batch a plain run records the references; per
(k, p): plain, speculative, plain, speculative, the best of each counts (at p = 0 drafting
never pays: `Payoff` should stop it). Tokens/s are of the decode phase (from the step where
every request has a token; end-to-end rates are in the JSON too). Outputs are compared with the
references: asserted equal in fp32, counted otherwise.
Run: python benchmarks/spec_oracle.py --device cuda  -> benchmarks/results/spec_oracle_<gpu>.json
     python benchmarks/spec_oracle.py --device cpu --tiny  (a dry run on a tiny random Llama)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if Path(sys.path[0] or ".").resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)  # run as a script: benchmarks/kernels.py would shadow `kernels`

import torch  # noqa: E402

from benchmarks.spec_oracle_proposer import (CountingPayoff, OracleProposer,  # noqa: E402
                                              expected_tokens, implied_acceptance,
                                              set_chain_weights)
from engine.builder import LoadedModel, build_model, init_random_weights  # noqa: E402
from engine.config import (CacheConfig, EngineConfig, SchedulerConfig,  # noqa: E402
                           SpeculativeConfig)
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

BLOCK_SIZE = 16


@dataclass(slots=True)
class OracleBenchConfig:
    """What one benchmark run measures (every field lands in the JSON)."""

    device: str = "cuda"
    dtype: str = ""  # "" -> bfloat16 on CUDA, float32 on CPU (outputs asserted equal in fp32)
    tiny: bool = False  # a tiny random Llama instead of the Llama-3-8B shape
    batches: tuple[int, ...] = (1, 8, 32)
    acceptances: tuple[float, ...] = (0.0, 0.5, 0.7, 0.9, 1.0)  # p: each draft right with it
    ks: tuple[int, ...] = (3, 4)  # drafts per verification; the engine is built for max(ks)
    prompt_tokens: int = 512
    max_tokens: int = 128
    repeats: int = 2  # plain, spec, plain, spec: the best of each counts
    seed: int = 0  # prompts, weights and the oracle's keep decisions
    weights: str = "chain"  # | "random" (init_random_weights as is): module docstring
    random_check: bool = False  # then one row on "random" weights (middle batch, p 0.9)
    budget_s: float = 200.0  # from start (model build included): configs past it are skipped
    run_timeout_s: float = 120.0  # one run's deadline
    out: str | None = None  # JSON path; None -> benchmarks/results/spec_oracle_<device>.json

    def __post_init__(self) -> None:
        if self.weights not in ("chain", "random"):
            raise ValueError(f"weights must be chain or random, got {self.weights!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        self.dtype = self.dtype or ("bfloat16" if self.device == "cuda" else "float32")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be >= 1, got {self.batches}")
        if not self.acceptances or not all(0.0 <= p <= 1.0 for p in self.acceptances):
            raise ValueError(f"acceptances must be in [0, 1], got {self.acceptances}")
        if not self.ks or not all(1 <= k <= 7 for k in self.ks):
            raise ValueError(f"ks must be in [1, 7], got {self.ks}")
        if self.prompt_tokens < 16 or self.max_tokens < 2:
            raise ValueError(f"prompt_tokens must be >= 16 and max_tokens >= 2, got "
                             f"{self.prompt_tokens} and {self.max_tokens}")
        if self.repeats < 1 or self.budget_s <= 0 or self.run_timeout_s <= 0:
            raise ValueError(f"repeats, budget_s and run_timeout_s must be positive, got "
                             f"{self.repeats}, {self.budget_s}, {self.run_timeout_s}")

    @property
    def model_config(self) -> ModelConfig:
        from benchmarks.spec_costs import LLAMA3_8B, TINY_TARGET

        return TINY_TARGET if self.tiny else LLAMA3_8B


def engine_config(cfg: OracleBenchConfig, speculative: bool) -> EngineConfig:
    max_len = cfg.prompt_tokens + cfg.max_tokens + max(cfg.ks) + 1
    per_seq = -(-max_len // BLOCK_SIZE) + 1
    spec = SpeculativeConfig("ngram", max(cfg.ks)) if speculative else SpeculativeConfig()
    return EngineConfig(
        model="tiny-llama-random" if cfg.tiny else "llama-3-8b-shape-random",
        device=cfg.device, dtype=cfg.dtype, max_model_len=max_len,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=max(cfg.batches) * per_seq + 16,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(64, max(cfg.batches))),
        speculative=spec, async_scheduling=True)


def build_engines(cfg: OracleBenchConfig) -> tuple[LLMEngine, LLMEngine]:
    """(plain, speculative) over one model with random weights."""
    from benchmarks.multiturn_gpu import IdsOnlyTokenizer

    model_cfg = cfg.model_config
    model = build_model(model_cfg, getattr(torch, cfg.dtype), cfg.device)
    if cfg.weights == "chain":
        set_chain_weights(model, cfg.seed)
    else:
        init_random_weights(model, seed=cfg.seed)
    loaded = LoadedModel(model_cfg, model, IdsOnlyTokenizer())
    return (LLMEngine(engine_config(cfg, False), loaded),
            LLMEngine(engine_config(cfg, True), loaded))


def make_prompts(cfg: OracleBenchConfig, batch: int) -> list[list[int]]:
    """The first `batch` of one seeded set of random prompts (the same at every batch)."""
    shape = (max(cfg.batches), cfg.prompt_tokens)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, cfg.model_config.vocab_size, shape, generator=gen)[:batch].tolist()


@dataclass(slots=True)
class RunResult:
    outputs: list[list[int]]
    decode_tok_s: float  # from the step where every request has a token, to the end
    e2e_tok_s: float  # all output tokens over the whole run (prefill included)
    wall_s: float


def run_once(engine: LLMEngine, prompts: list[list[int]], max_tokens: int,
             timeout_s: float) -> RunResult:
    """Greedy, ignore_eos: every prompt to `max_tokens` as one continuously batched run."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    outputs: dict[str, list[int]] = {rid: [] for rid in ids}
    decode_from, tokens_then = None, 0
    while engine.has_unfinished():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"run of {len(prompts)} prompts past {timeout_s} s")
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
        if decode_from is None and all(outputs.values()):
            decode_from, tokens_then = time.perf_counter(), sum(map(len, outputs.values()))
    ended = time.perf_counter()
    total = sum(map(len, outputs.values()))
    decode_s = ended - (decode_from or started)
    return RunResult([outputs[rid] for rid in ids],
                     (total - tokens_then) / decode_s if decode_s > 0 else 0.0,
                     total / (ended - started), ended - started)


def _spec_counters(engine: LLMEngine) -> tuple[int, int, int]:
    stats = engine.stats()  # the engine's own metrics counters
    return stats.spec_drafts, stats.spec_draft_tokens, stats.spec_accepted_tokens


def measure(cfg: OracleBenchConfig, plain: LLMEngine, spec: LLMEngine, prompts: list[list[int]],
            reference: list[list[int]], k: int, p: float) -> dict:
    """One (batch, k, p) row: plain and speculative runs interleaved, `repeats` of each."""
    batch = len(prompts)
    oracle = OracleProposer(k, p, cfg.model_config.vocab_size, cfg.seed)
    spec.spec.proposer = oracle
    before = _spec_counters(spec)
    plain_runs, spec_runs, diverged, proposals, short, shares = [], [], [], 0, 0, []
    rates: dict[bool, float] = {}
    for _ in range(cfg.repeats):
        plain_runs.append(run_once(plain, prompts, cfg.max_tokens, cfg.run_timeout_s))
        oracle.load(prompts, reference)
        spec.spec.payoff = payoff = CountingPayoff()  # each run decides afresh
        spec_runs.append(run_once(spec, prompts, cfg.max_tokens, cfg.run_timeout_s))
        diverged.append(len(oracle.counters.diverged))
        proposals += oracle.counters.num_proposals
        short += oracle.counters.num_short_proposals
        shares.append(payoff.drafting_share(batch))
        rates = payoff.rates(batch)
    verified, drafted, kept = (a - b for a, b in zip(_spec_counters(spec), before))
    same = [sum(o == r for o, r in zip(run.outputs, reference)) for run in spec_runs]
    if cfg.dtype == "float32" and min(same) != batch:
        raise AssertionError(f"batch {batch} k {k} p {p}: speculative outputs differ from "
                             f"plain ({min(same)} of {batch} identical)")
    tokens_per_verification = 1 + kept / verified if verified else 1.0
    best_plain = max(r.decode_tok_s for r in plain_runs)
    best_spec = max(r.decode_tok_s for r in spec_runs)
    return {
        "batch": batch, "k": k, "p": p,
        "plain_tok_s": round(best_plain, 1), "spec_tok_s": round(best_spec, 1),
        "speedup": round(best_spec / best_plain, 3),
        "plain_e2e_tok_s": round(max(r.e2e_tok_s for r in plain_runs), 1),
        "spec_e2e_tok_s": round(max(r.e2e_tok_s for r in spec_runs), 1),
        "plain_runs_tok_s": [round(r.decode_tok_s, 1) for r in plain_runs],
        "spec_runs_tok_s": [round(r.decode_tok_s, 1) for r in spec_runs],
        "acceptance_rate": round(kept / drafted, 4) if drafted else 0.0,
        "expected_acceptance_rate": round(sum(p ** i for i in range(1, k + 1)) / k, 4),
        "mean_tokens_per_verification": round(tokens_per_verification, 3),
        "expected_tokens_per_verification": round(expected_tokens(p, k), 3),
        "implied_p": round(implied_acceptance(tokens_per_verification, k), 3),
        "verifications": verified, "draft_tokens": drafted, "accepted_tokens": kept,
        "oracle_proposals": proposals, "oracle_short_proposals": short,
        "diverged_requests": diverged, "spec_outputs_identical": same,
        "plain_outputs_identical": [sum(o == r for o, r in zip(run.outputs, reference))
                                    for run in plain_runs],
        # per spec run: (steps decided at this batch, share drafting in their second half)
        "payoff_steps_at_batch": [(n, round(share, 2)) for n, share in shares],
        "payoff_tok_s_at_batch": {"spec": round(rates.get(True, 0.0), 1),
                                  "plain": round(rates.get(False, 0.0), 1)},
        "drafting_switched_off": rates.get(False, 0.0) > rates.get(True, float("inf")),
        "wall_s": round(sum(r.wall_s for r in plain_runs + spec_runs), 2),
    }


def commit_id() -> str:
    """HEAD's id, or .head_commit's (a copy of the tree without .git), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    marker = ROOT / ".head_commit"
    return marker.read_text().strip() if marker.exists() else "unknown"


def references(cfg: OracleBenchConfig, plain: LLMEngine, spec: LLMEngine,
               prompts: list[list[int]]) -> list[list[int]]:
    """The plain engine's greedy continuations at this batch (its warm-up too), then a short
    speculative warm-up run at p = 1 over them per k."""
    reference = run_once(plain, prompts, cfg.max_tokens, cfg.run_timeout_s).outputs
    for k in cfg.ks:
        spec.spec.proposer = oracle = OracleProposer(k, 1.0, cfg.model_config.vocab_size)
        oracle.load(prompts, reference)
        run_once(spec, prompts, min(16, cfg.max_tokens), cfg.run_timeout_s)
    return reference


class Report:
    """The JSON, rewritten after every row (a run cut short still leaves its rows)."""

    def __init__(self, cfg: OracleBenchConfig, started: float) -> None:
        from benchmarks.gpu_common import RESULTS_DIR, device_info

        self.started = started
        device = (device_info() if cfg.device == "cuda"
                  else {"gpu": "cpu", "torch": torch.__version__})
        self.path = Path(cfg.out) if cfg.out else (
            RESULTS_DIR / f"spec_oracle_{device['gpu'].replace(' ', '-')}.json")
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.payload = {
            "what": "decode tokens/s with and without speculative decoding through the engine, "
                    "oracle drafts each right with probability p (not a real proposer)",
            "model": f"{'tiny random Llama' if cfg.tiny else 'Llama-3-8B shape'}, random "
                     f"{cfg.dtype} weights ({cfg.weights})",
            "config": asdict(cfg), "device": device, "commit": commit_id(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": self.rows,
            "skipped": self.skipped}

    def add(self, row: dict) -> None:
        self.rows.append(row)
        print(_line(row), flush=True)
        self.write()

    def write(self) -> None:
        self.payload["script_wall_s"] = round(time.perf_counter() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.payload, indent=2) + "\n")


def run_all(cfg: OracleBenchConfig, report: Report) -> None:
    """Every (k, batch, p) row that fits the budget, k by k (the first k first)."""
    build_started = time.perf_counter()
    plain, spec = build_engines(cfg)
    report.payload["engine"] = {
        "build_s": round(time.perf_counter() - build_started, 1),
        "warmup_s": round(plain.warmup_s + spec.warmup_s, 1),
        "spec_config": asdict(spec.config.speculative),
        "async_scheduling": spec.async_scheduling,
        "cuda_graphs": spec.runner.decode_graphs is not None, "prefix_caching": False,
        "num_blocks": spec.kv_manager.num_blocks, "max_model_len": spec.max_model_len,
        "max_num_seqs": spec.config.scheduler.max_num_seqs}
    refs, cost = {}, {}
    for k in cfg.ks:
        for batch in cfg.batches:
            prompts = make_prompts(cfg, batch)
            for p in cfg.acceptances:
                left = cfg.budget_s - (time.perf_counter() - report.started)
                if left < cost.get(batch, 0.0) * 1.2 + (0 if batch in refs else 5):
                    report.skipped.append({"batch": batch, "k": k, "p": p, "why": "budget"})
                    continue
                if batch not in refs:
                    refs[batch] = references(cfg, plain, spec, prompts)
                t0 = time.perf_counter()
                row = measure(cfg, plain, spec, prompts, refs[batch], k, p)
                cost[batch] = time.perf_counter() - t0
                report.add(dict(row, weights=cfg.weights))
    if cfg.random_check:
        random_check(cfg, plain, spec, cost, report)
    for engine in (plain, spec):
        if not engine.kv_manager.is_idle():
            raise RuntimeError("a run left KV blocks held")


def random_check(cfg: OracleBenchConfig, plain: LLMEngine, spec: LLMEngine,
                 cost: dict[int, float], report: Report) -> None:
    """One row on plain random weights (set in place: the engines' graphs keep their
    buffers), after every other row."""
    batch, k, p = cfg.batches[len(cfg.batches) // 2], cfg.ks[0], 0.9
    left = cfg.budget_s - (time.perf_counter() - report.started)
    if left < cost.get(batch, 0.0) * 0.6 + 5:
        report.skipped.append({"batch": batch, "k": k, "p": p, "weights": "random",
                               "why": "budget"})
        return
    init_random_weights(plain.runner.model, seed=cfg.seed)
    one = replace(cfg, repeats=1, weights="random")
    prompts = make_prompts(one, batch)
    row = measure(one, plain, spec, prompts, references(one, plain, spec, prompts), k, p)
    report.add(dict(row, weights="random"))


def _line(r: dict) -> str:
    return (f"batch {r['batch']:>2} k {r['k']} p {r['p']:.2f}: plain {r['plain_tok_s']:8.1f} "
            f"spec {r['spec_tok_s']:8.1f} tok/s x{r['speedup']:.2f}  accept "
            f"{r['acceptance_rate']:.3f} (exp {r['expected_acceptance_rate']:.3f})  tok/verify "
            f"{r['mean_tokens_per_verification']:.2f} (exp "
            f"{r['expected_tokens_per_verification']:.2f})  diverged {r['diverged_requests']}  "
            f"identical {r['spec_outputs_identical']}/{r['batch']}  "
            f"payoff {r['payoff_steps_at_batch']}")


def main(argv: list[str] | None = None) -> dict:
    """Runs what fits the budget; an error is recorded in the JSON, then raised."""
    started = time.perf_counter()
    cfg = parse_args(argv)
    report = Report(cfg, started)
    try:
        run_all(cfg, report)
    except BaseException as exc:
        report.payload["error"] = repr(exc)[:2000]
        raise
    finally:
        report.write()
        print(f"wrote {report.path} ({len(report.rows)} rows, {len(report.skipped)} skipped, "
              f"{report.payload['script_wall_s']} s)", flush=True)
    return report.payload


def _numbers(kind: type):
    return lambda text: tuple(kind(x) for x in text.split(","))


def parse_args(argv: list[str] | None = None) -> OracleBenchConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (dry run)")
    parser.add_argument("--dtype", default="", help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--batches", type=_numbers(int), help="default 1,8,32 (tiny 1,4)")
    parser.add_argument("--acceptances", type=_numbers(float), default=(0.0, 0.5, 0.7, 0.9, 1.0))
    parser.add_argument("--ks", type=_numbers(int), default=(3, 4))
    parser.add_argument("--prompt-tokens", type=int, default=None, help="default 512 (tiny 48)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default 128 (tiny 24)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="seconds from start (build included); later configs are skipped")
    parser.add_argument("--run-timeout-s", type=float, default=120.0)
    parser.add_argument("--weights", default="chain", choices=["chain", "random"])
    parser.add_argument("--random-check", action="store_true",
                        help="then one row on plain random weights (divergence count)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/)")
    a = parser.parse_args(argv)
    return OracleBenchConfig(
        device=a.device, dtype=a.dtype, tiny=a.tiny,
        batches=a.batches or ((1, 4) if a.tiny else (1, 8, 32)), acceptances=a.acceptances, ks=a.ks,
        prompt_tokens=a.prompt_tokens or (48 if a.tiny else 512),
        max_tokens=a.max_tokens or (24 if a.tiny else 128), repeats=a.repeats, seed=a.seed,
        weights=a.weights, random_check=a.random_check, budget_s=a.budget_s,
        run_timeout_s=a.run_timeout_s, out=a.out)


if __name__ == "__main__":
    main()
