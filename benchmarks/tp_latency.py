"""Tensor (and expert) parallel decode and prefill through the real multi-rank executor.

One engine per layout (`LLMEngine` with `ParallelConfig`: rank 0 here, ranks 1..N-1 in their
own processes, NCCL between GPUs; Gloo on CPU), all loading the same random-weight folder:
  - greedy tokens of the parallel layout equal the baseline's; a difference is shown with the
    baseline's top-two logit gap where the sequences part (a near-tie explains it);
  - decode ms per `engine.step()` at each batch with `--context` tokens of context;
  - one `--prefill`-token prompt's prefill (generate with max_tokens 1);
  - the share of a decode step spent in the tensor group's collectives on rank 0 (the
    all-reduces of the split layers, the experts' all-reduce with expert parallelism);
  - on CUDA, each GPU's HBM roofline: (its weight slice + its KV read per step) / copy bandwidth.
Multi-rank instances run without CUDA graphs (engine/executor/rank.py), so the one-rank
baseline is also timed without them ("tp1-eager") to separate the graphs' effect from the split.

  issue 20 part 2: python benchmarks/tp_latency.py --shape llama-3-8b --tp 2 --baseline-tp 1
  issue 21 part 3: python benchmarks/tp_latency.py --shape llama-3-70b --tp 4 --baseline-tp 2
  issue 21 part 4: python benchmarks/tp_latency.py --shape qwen3-30b-a3b --tp 4 --ep \\
                       --baseline-tp 1 --batches 1,64,256
  dry run:         ... --device cpu --tiny   (tiny stand-in, Gloo, a handful of tokens)
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py

import torch  # noqa: E402

from benchmarks.multigpu_common import (RunMode, add_mode_args, first_difference,  # noqa: E402
                                        gpu_facts, mode_from_args, model_folder, write_json)
from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.parallel import ParallelContext  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

BLOCK = 16


@dataclass(frozen=True, slots=True)
class Layout:
    name: str
    tp: int
    ep: int = 1
    cuda_graphs: bool = True


@dataclass(frozen=True, slots=True)
class Workload:
    batches: tuple[int, ...]
    context: int
    steps: int
    prefill: int
    num_prompts: int
    max_tokens: int

    @property
    def num_blocks(self) -> int:
        per_seq = -(-(self.context + self.steps + 16) // BLOCK)
        return max(self.batches) * per_seq + -(-self.prefill // BLOCK) + 64


def engine_config(folder: Path, layout: Layout, mode: RunMode, work: Workload) -> EngineConfig:
    return EngineConfig(
        model=str(folder), device=mode.device, dtype=mode.dtype,
        attention_backend="torch" if mode.device == "cpu" else "auto",
        use_cuda_graphs=layout.cuda_graphs,
        cache=CacheConfig(block_size=BLOCK, num_blocks=work.num_blocks,
                          enable_prefix_caching=False),  # every timed prompt computes in full
        scheduler=SchedulerConfig(max_num_seqs=max(64, *work.batches),
                                  max_num_batched_tokens=max(work.prefill, 2048)),
        parallel=ParallelConfig(layout.tp, 1, expert_parallel_size=layout.ep,
                                collective_timeout_s=300.0))


def prompts_of(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def decode_step_ms(engine: LLMEngine, mode: RunMode, batch: int, work: Workload) -> dict:
    """Steady decode: `batch` requests with `context` tokens each; ms per engine step, and the
    collectives' share of rank 0's step time."""
    vocab = engine.model_config.vocab_size
    for prompt in prompts_of(vocab, batch, work.context, seed=batch):
        engine.add_request(prompt, greedy(work.steps * 2 + 8))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(3):
        engine.step()  # warm-up
    mode.sync()
    started = time.perf_counter()
    for _ in range(work.steps):
        engine.step()
    mode.sync()
    ms = (time.perf_counter() - started) * 1e3 / work.steps
    comm = collective_ms_per_step(engine, mode, work.steps)
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    return {"batch": batch, "ms_per_step": ms,
            "collective_ms_per_step": comm and comm[0], "collective_share": comm and comm[1]}


def collective_ms_per_step(engine: LLMEngine, mode: RunMode,
                           steps: int) -> tuple[float, float] | None:
    """Rank 0's time in the tensor group's collectives per step, and its share of those same
    steps' wall time: NCCL kernels' device time (profiler) on CUDA; on CPU the wall time of the
    Gloo calls (they block). None for one rank."""
    if engine.config.parallel.world_size == 1:
        return None
    if mode.device == "cpu":
        return _timed_collectives(engine, steps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - started
    device_us = sum(e.self_device_time_total for e in prof.key_averages()
                    if "nccl" in e.key.lower())
    return device_us / 1e3 / steps, device_us / 1e6 / wall_s


def _timed_collectives(engine: LLMEngine, steps: int) -> tuple[float, float]:
    spent = [0.0]
    originals = {}
    for name in ("all_reduce", "all_gather_last_dim", "all_gather_stacked", "all_reduce_max"):
        originals[name] = method = getattr(ParallelContext, name)

        def timed(ctx, x, _method=method):
            started = time.perf_counter()
            try:
                return _method(ctx, x)
            finally:
                spent[0] += time.perf_counter() - started
        setattr(ParallelContext, name, timed)
    started = time.perf_counter()
    try:
        for _ in range(steps):
            engine.step()
    finally:
        wall_s = time.perf_counter() - started
        for name, method in originals.items():
            setattr(ParallelContext, name, method)
    return spent[0] * 1e3 / steps, spent[0] / wall_s


def prefill_ms(engine: LLMEngine, mode: RunMode, work: Workload) -> float:
    times = []
    for seed in range(3):
        prompt = prompts_of(engine.model_config.vocab_size, 1, work.prefill, 1000 + seed)
        mode.sync()
        started = time.perf_counter()
        engine.generate(prompt, greedy(1))
        times.append((time.perf_counter() - started) * 1e3)
    return min(times[1:])  # the first one compiles


def roofline(folder: Path, layout: Layout, work: Workload, batch: int, bw_gbs: float) -> float:
    """ms per step at each GPU's copy bandwidth: its share of the weights a step reads plus
    its share of the KV (bf16). A step reads every weight once except the embedding table
    (`batch` rows) and, in a MoE model, the experts no token picked (expected distinct experts
    per layer: E * (1 - (1 - k/E)^batch))."""
    from engine.loader.source import open_model

    cfg = open_model(str(folder)).config
    read = (sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            - (cfg.vocab_size - batch) * cfg.hidden_size * 2)
    if cfg.moe is not None:
        moe = cfg.moe
        experts = cfg.num_layers * moe.num_experts * 3 * cfg.hidden_size * moe.intermediate_size * 2
        read -= experts * (1 - moe.top_k / moe.num_experts) ** batch
    kv_heads = max(1, cfg.num_kv_heads // layout.tp)
    kv = batch * (work.context + work.steps) * cfg.num_layers * 2 * kv_heads * cfg.head_dim * 2
    return (read / layout.tp + kv) / bw_gbs / 1e6


def measure(folder: Path, layout: Layout, mode: RunMode, work: Workload,
            keep: bool) -> tuple[dict, LLMEngine | None]:
    started = time.perf_counter()
    engine = LLMEngine(engine_config(folder, layout, mode, work))
    row = {"layout": layout.name, "tp": layout.tp, "ep": layout.ep,
           "cuda_graphs": layout.cuda_graphs, "start_s": time.perf_counter() - started}
    try:
        prompts = prompts_of(engine.model_config.vocab_size, work.num_prompts, 24, seed=7)
        row["prompts"] = prompts
        row["tokens"] = [o.token_ids[-work.max_tokens:]
                         for o in engine.generate(prompts, greedy(work.max_tokens))]
        row["decode"] = [decode_step_ms(engine, mode, b, work) for b in work.batches]
        row["prefill_tokens"] = work.prefill
        row["prefill_ms"] = prefill_ms(engine, mode, work)
        assert engine.kv_manager.is_idle(), "KV blocks left allocated after the runs"
    finally:
        if not keep:
            engine.shutdown()
            engine = None
            gc.collect()
            if mode.device == "cuda":
                torch.cuda.empty_cache()
    print({k: v for k, v in row.items() if k not in ("prompts", "tokens")}, flush=True)
    return row, engine


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b",
                   choices=("llama-3-8b", "llama-3-70b", "qwen3-30b-a3b"))
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--baseline-tp", type=int, default=1)
    p.add_argument("--ep", action="store_true", help="experts split over the tensor ranks")
    p.add_argument("--batches", default="1,64")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--prefill", type=int, default=4096)
    p.add_argument("--num-layers", type=int, default=None,
                   help="only this many of the shape's layers (a quicker, smaller folder)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random-weight folder is written (default: a temp dir)")
    add_mode_args(p)
    args = p.parse_args(argv)
    if args.tp < 1 or args.baseline_tp < 1:
        raise ValueError(f"--tp and --baseline-tp must be >= 1, got {args.tp}, {args.baseline_tp}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = mode_from_args(args, max(args.tp, args.baseline_tp))
    if mode.tiny:
        work = Workload((1, 4), context=32, steps=3, prefill=64, num_prompts=3, max_tokens=6)
    else:
        work = Workload(tuple(int(b) for b in args.batches.split(",")), args.context,
                        args.steps, args.prefill, num_prompts=8, max_tokens=32)
    root = args.model_dir or Path(tempfile.mkdtemp(prefix="pdserve-models-"))
    started = time.perf_counter()
    folder = model_folder(args.shape, mode, root, num_layers=args.num_layers)
    save_s = time.perf_counter() - started
    ep = args.tp if args.ep else 1
    parallel = Layout(f"tp{args.tp}" + (f"-ep{ep}" if args.ep else ""), args.tp, ep, False)
    baseline = Layout(f"tp{args.baseline_tp}", args.baseline_tp, args.baseline_tp if args.ep else 1)
    layouts = [baseline]
    if mode.device == "cuda" and baseline.tp == 1:
        layouts.append(Layout("tp1-eager", 1, 1, cuda_graphs=False))
    rows = [measure(folder, parallel, mode, work, keep=False)[0]]
    for layout in layouts[1:]:
        rows.append(measure(folder, layout, mode, work, keep=False)[0])
    base_row, reference = measure(folder, baseline, mode, work, keep=True)
    rows.append(base_row)
    checks = [first_difference(reference, prompt, got, want) | {"prompt": i}
              for i, (prompt, got, want) in enumerate(zip(base_row["prompts"], rows[0]["tokens"],
                                                          base_row["tokens"]))]
    reference.shutdown()
    payload = summarize(args, mode, folder, save_s, work, rows, checks)
    path = write_json(mode, f"tp_latency_{args.shape}_tp{args.tp}", payload)
    print(f"wrote {path}")
    return 0 if payload["outputs_match"] else 1


def summarize(args, mode: RunMode, folder: Path, save_s: float, work: Workload,
              rows: list[dict], checks: list[dict]) -> dict:
    if mode.device == "cuda":
        from benchmarks.gpu_common import copy_bandwidth_gbs

        bw = copy_bandwidth_gbs()
    else:  # the dry run takes the same path with the host's copy rate
        bw = _host_copy_gbs()
    parallel, base = rows[0], rows[-1]
    for row in rows:
        for d in row["decode"]:
            d["vs_baseline"] = d["ms_per_step"] / next(
                b["ms_per_step"] for b in base["decode"] if b["batch"] == d["batch"])
            d["roofline_ms"] = roofline(folder, Layout(row["layout"], row["tp"]), work,
                                        d["batch"], bw)
            d["fraction_of_roofline"] = d["roofline_ms"] / d["ms_per_step"]
        del row["prompts"]
    b1 = next((d for d in parallel["decode"] if d["batch"] == 1), None)
    return {"shape": args.shape, "num_layers": args.num_layers, "tiny": mode.tiny,
            "device": mode.device, "facts": gpu_facts(),
            "copy_bandwidth_gbs": bw, "folder_write_s": save_s, "workload": asdict(work),
            "outputs_match": all(c["equal"] or c.get("near_tie") for c in checks),
            "output_checks": checks, "layouts": rows,
            "b1_decode_vs_baseline": b1 and b1["vs_baseline"],
            "target": "b1 decode at TP=N <= 0.6x the baseline (issue 20)"}


def _host_copy_gbs(num_bytes: int = 64 << 20) -> float:
    """Host memory copy rate, bytes read plus written (the dry run's stand-in for HBM)."""
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)
    started = time.perf_counter()
    dst.copy_(src)
    return 2 * num_bytes / (time.perf_counter() - started) / 1e9


if __name__ == "__main__":
    sys.exit(main())
