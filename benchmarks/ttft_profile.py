"""Where the time to first token of a short prompt goes (issue 18): Llama-3-8B shape, random bf16
weights, one GPU, the engine warmed up.

1. forward: one 128-token prefill step through `ModelRunner.execute` (host preparation, the
   forward's launches, LM head, sampling), wall time to the sampled id on the host; and the GPU
   time of the same step (CUDA events), so the host's launch cost shows as the difference.
   `forward_graph_*`: 100 and 128 tokens as one replay of the decode graph of their rows.
2. ttft: `LLMEngine.add_request` + `step()` until the first token, prompts of 100 and 128
   tokens, median of 10, asynchronous and synchronous scheduling.
3. where: the engine path under cProfile (host functions, cumulative) and under the torch
   profiler (kernel count, GPU busy time, first-to-last kernel span) for 10 TTFTs.
4. graph prefill on and off: (2) runs with the default `graph_prefill_max_context` (a short
   prompt's prefill is one decode-graph replay, engine/cuda_graphs.py); `*_eager_prefill` rows
   repeat it with the cap 0 (the eager prefill forward), and `graph_replays_*` count the
   replays per request (2 tokens: prefill + one decode step) to show which path ran.
Run: python benchmarks/ttft_profile.py -> benchmarks/results/ttft_profile_<gpu>.json
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

import torch  # noqa: E402

from benchmarks.first_request import ttft_ms  # noqa: E402
from benchmarks.gpu_common import bench_tokenizer, device_info, write_results  # noqa: E402
from benchmarks.latency import BS, CFG  # noqa: E402
from engine.builder import LoadedModel, build_model, init_random_weights  # noqa: E402
from engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402


def forward_ms(engine: LLMEngine, length: int, graph_prefill: bool = False) -> dict:
    """One prefill through the runner alone: wall to the id on the host, and GPU time; eager,
    or (`graph_prefill`) as one replay of the decode graph of its rows."""
    from benchmarks.latency import Workload
    from engine.plan import PlanBuilder

    work = Workload(engine.runner)
    if graph_prefill:
        work.planner = PlanBuilder(graph_prefill_max_context=length)
    work.next_block = engine.runner.kv_cache.shape[1] // 2  # clear of the engine's blocks
    walls, gpus = [], []
    for _ in range(12):
        reqs = work.requests(1, length, 1)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        begin.record()
        work.prefill(reqs)  # .tolist() of the sampled id: waits for the GPU
        end.record()
        walls.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
        gpus.append(begin.elapsed_time(end))
    return {"wall_ms": statistics.median(walls[2:]), "gpu_ms": statistics.median(gpus[2:])}


def host_profile(engine: LLMEngine, length: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        ttft_ms(engine, length)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
    return out.getvalue()


def device_profile(engine: LLMEngine, length: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        walls = [ttft_ms(engine, length) for _ in range(10)]
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    launches = [e for e in prof.events() if "LaunchKernel" in e.name or "cuLaunch" in e.name]
    busy_us = sum(e.device_time for e in kernels)
    span_us = (max(e.time_range.end for e in kernels) - min(e.time_range.start for e in kernels)
               if kernels else 0.0)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:60], []).append(e.device_time)
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    return {"ttft_ms_profiled": walls, "kernels_per_ttft": len(kernels) / 10,
            "launch_calls_per_ttft": len(launches) / 10, "gpu_busy_ms_per_ttft": busy_us / 1e4,
            "kernel_span_ms_total": span_us / 1e3,
            "top_kernels": [{"name": n, "count": len(v) / 10, "ms_per_ttft": sum(v) / 1e4}
                            for n, v in top]}


def engine(async_scheduling: bool, graph_prefill: bool = True) -> LLMEngine:
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model)
    off = {} if graph_prefill else {"graph_prefill_max_context": 0}  # else the default cap
    config = EngineConfig(model="llama-3-8b-shape", device="cuda", dtype="bfloat16",
                          async_scheduling=async_scheduling,
                          **off,
                          cache=CacheConfig(block_size=BS, num_blocks=4096),
                          scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192))
    return LLMEngine(config, LoadedModel(CFG, model, bench_tokenizer()))


def replays(eng: LLMEngine) -> int:
    graphs = eng.runner.decode_graphs
    return graphs.num_replays if graphs is not None else 0


def ttft_rows(eng: LLMEngine, key: str) -> dict:
    """Median TTFT of 100- and 128-token prompts (`key` formats the length in), and the graph
    replays per request."""
    rows = {}
    for n in (100, 128):
        ttft_ms(eng, n)
        before = replays(eng)
        rows[key.format(n)] = statistics.median(ttft_ms(eng, n) for _ in range(10))
        rows["graph_replays_" + key.format(n)] = (replays(eng) - before) / 10
    return rows


def eager_prefill_rows() -> dict:
    """TTFT with graph prefill off (cap 0), both scheduling modes, one engine at a time."""
    rows = {}
    for mode in ("async", "sync"):
        eng = engine(async_scheduling=mode == "async", graph_prefill=False)
        rows.update(ttft_rows(eng, f"ttft_{mode}_{{}}_eager_prefill"))
        print(mode, "eager prefill", rows, flush=True)
        del eng
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    if "--dry-run" in sys.argv:
        print("ttft_profile: imports fine")
        return
    rows = eager_prefill_rows()
    eng = engine(async_scheduling=True)
    rows["forward_128"] = forward_ms(eng, 128)
    for n in (100, 128):  # the same prefill as rows of a decode graph (what graph prefill runs)
        rows[f"forward_graph_{n}"] = forward_ms(eng, n, graph_prefill=True)
    for mode in ("async", "sync"):
        if mode == "sync":
            del eng
            torch.cuda.empty_cache()
            eng = engine(async_scheduling=False)
        rows.update(ttft_rows(eng, f"ttft_{mode}_{{}}"))  # graph prefill on (the default)
        print(mode, {k: v for k, v in rows.items() if mode in k}, flush=True)
    rows["ratio_ttft_sync_128_over_forward"] = rows["ttft_sync_128"] / rows["forward_128"]["wall_ms"]
    for mode in ("async", "sync"):  # issue 18's bar: <= 1.2x the 128-token forward's GPU time
        for n in (100, 128):
            for tag in ("", "_eager_prefill"):
                rows[f"ratio_ttft_{mode}_{n}{tag}_over_forward_gpu"] = (
                    rows[f"ttft_{mode}_{n}{tag}"] / rows["forward_128"]["gpu_ms"])
    rows["device_profile_sync_128"] = device_profile(eng, 128)
    host = host_profile(eng, 128)
    print(host)
    path = write_results("ttft_profile", {"device": device_info(), "rows": rows,
                                          "host_profile_sync_128": host,
                                          "model": "Llama-3-8B shape, random bf16"})
    print({k: v for k, v in rows.items() if k != "device_profile_sync_128"})
    print(rows["device_profile_sync_128"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
