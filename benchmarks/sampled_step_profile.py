"""Where a sampled decode step's extra time goes: `LLMEngine.step()` with greedy and with
T 0.8 / top-p 0.9 requests (Llama-3-8B shape, random bf16 weights, 1k context), steady decode,
asynchronous and synchronous scheduling, under the torch profiler (host and device).

latency.py measured a sampled step 1.6-1.8 ms slower than a greedy one on an H100 while the
sampler's kernels take 0.3 ms (batch 1) and 0.8 ms (batch 64) inside CUDA graphs: this prints
the ops that differ, by host time and by device time, and the step times without the profiler.
Run: python benchmarks/sampled_step_profile.py [--batches 1,64] -> results/sampled_step_profile_<gpu>.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import device_info, write_results  # noqa: E402
from benchmarks.latency import CFG, decode_engine  # noqa: E402
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402

STEPS = 20


def _engine(model, batch: int, context: int, sampled: bool, async_on: bool) -> LLMEngine:
    engine = decode_engine(model, batch, context, 2 * STEPS, sampled, async_on)
    torch.cuda.synchronize()
    return engine


def _steps_ms(engine: LLMEngine) -> list[float]:
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _top(prof, key: str, n: int = 14) -> list[dict]:
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:n]:
        rows.append({"op": e.key[:70], "calls": e.count,
                     "self_cpu_ms": e.self_cpu_time_total / 1e3 / STEPS,
                     "device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3 / STEPS})
    return rows


def profile(model, batch: int, context: int, sampled: bool, async_on: bool) -> dict:
    engine = _engine(model, batch, context, sampled, async_on)
    plain = _steps_ms(engine)
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _steps_ms(engine)
        torch.cuda.synchronize()
    row = {"batch": batch, "sampled": sampled, "async": async_on,
           "step_ms_median": sorted(plain)[len(plain) // 2], "step_ms": plain,
           "by_host": _top(prof, "self_cpu_time_total"),
           "by_device": _top(prof, "self_device_time_total")}
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for async_on in (True, False):
            for sampled in (False, True):
                row = profile(model, batch, args.context, sampled, async_on)
                rows.append(row)
                print(f"batch {batch} async {async_on} sampled {sampled}: "
                      f"median step {row['step_ms_median']:.2f} ms", flush=True)
                if sampled:
                    for kind in ("by_host", "by_device"):
                        print(f"  {kind}: " + "; ".join(
                            f"{r['op'][:40]} x{r['calls']} {r['self_cpu_ms']:.3f}/"
                            f"{r['device_ms']:.3f}" for r in row[kind][:9]))
    path = write_results("sampled_step_profile", {"device": device_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
