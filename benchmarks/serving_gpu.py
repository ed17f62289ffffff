"""The serving benchmark on one GPU: `benchmarks/serving.py`'s load generator (gRPC, Poisson
arrivals, ShareGPT-like lengths) against an in-process router over one colocated engine holding
a Llama-3-8B-shaped model with random bf16 weights, with asynchronous and with synchronous
scheduling in the same run. TTFT / TPOT / ITL / E2E percentiles and throughput per setting.

Run: PDSERVE_BENCH_TOKENIZER=DIR python benchmarks/serving_gpu.py
  -> benchmarks/results/serving_<gpu>.json and a table
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import bench_tokenizer, device_info, print_table, write_results  # noqa: E402
from benchmarks.latency import CFG  # noqa: E402
from benchmarks.serving import benchmark, parse_args  # noqa: E402
from engine.builder import LoadedModel, build_model, init_random_weights  # noqa: E402

NUM_PROMPTS = int(os.environ.get("PDSERVE_BENCH_PROMPTS", "300"))
LOADS = {  # name -> load generator flags
    "rate 8/s": ["--request-rate", "8"],
    "concurrency 64": ["--max-concurrency", "64"],
}
COLUMNS = ["load", "async", "request_throughput", "output_throughput", "mean_ttft_ms",
           "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "failed_requests"]


def main() -> None:
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    loaded = LoadedModel(CFG, model, bench_tokenizer())
    # warm-up (not recorded): compiles the Triton kernels of every prefill / mixed-step shape
    _run(loaded, "on", ["--max-concurrency", "64"], num_prompts=64)
    rows = []
    for name, flags in LOADS.items():
        for mode in ("off", "on"):
            rows.append({"load": name, "async": mode, **_run(loaded, mode, flags, NUM_PROMPTS)})
            print({k: rows[-1].get(k) for k in COLUMNS}, flush=True)
    payload = {"device": device_info(), "model": "Llama-3-8B shape, random bf16",
               "colocated": True, "runs": rows}
    path = write_results("serving", payload)
    print_table(rows, COLUMNS)
    print(f"wrote {path}")


def _run(loaded, mode: str, flags: list[str], num_prompts: int) -> dict:
    args = parse_args(["--start-colocated", "--device", "cuda", "--dataset", "sharegpt-like",
                       "--num-prompts", str(num_prompts), "--max-num-seqs", "128",
                       "--async-scheduling", mode, "--goodput", "ttft:1000", "tpot:50",
                       "--max-duration-s", "240", *flags])
    summary = asyncio.run(benchmark(args, loaded))
    gc.collect()  # the run's engine (its KV cache is most of the GPU) before the next one
    torch.cuda.empty_cache()
    return summary


if __name__ == "__main__":
    main()
