"""Pipeline micro-batches on CPU: a PP=2 engine of the default model with two steps in flight
(the engine core's pipelined mode) against the same engine running one step at a time.

    .venv/bin/python benchmarks/pp_overlap.py [--requests 16] [--max-tokens 24] [--rounds 2]

Both modes run in one engine (the core's `pipeline_depth` is switched between rounds, A B A B),
so the ranks, weights and caches are the same. Writes benchmarks/results/pp_overlap_cpu.json.
On CPU the two stages are two processes that each want the cores: the ratio says how much of
the stages' time overlaps here, not what two GPUs would do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/kernels.py would shadow a package transformers probes
# one thread per rank (the rank processes inherit it): two stages computing at once on the
# 2-core box must not oversubscribe it, as they would with a thread pool each
os.environ.setdefault("OMP_NUM_THREADS", "1")

from engine.config import CacheConfig, EngineConfig, ParallelConfig, SchedulerConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def run_round(engine: LLMEngine, depth: int, requests: int, max_tokens: int) -> dict:
    engine.pipeline_depth = depth
    prompts = [[3 + (7 * i + j) % 4000 for j in range(16 + 4 * i)] for i in range(requests)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outputs)
    return {"depth": depth, "tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "token_ids": [o.token_ids for o in outputs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    config = EngineConfig(model="default", device="cpu", dtype="float32",
                          cache=CacheConfig(block_size=16, num_blocks=256),
                          scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=2048),
                          parallel=ParallelConfig(1, 2))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    engine = LLMEngine(config)
    try:
        run_round(engine, 2, 2, 2)  # warm-up
        rounds = [run_round(engine, depth, args.requests, args.max_tokens)
                  for _ in range(args.rounds) for depth in (2, 1)]
    finally:
        engine.shutdown()
    same = all(r["token_ids"] == rounds[0]["token_ids"] for r in rounds)
    for r in rounds:
        r.pop("token_ids")
    best = {d: max(r["tokens_per_s"] for r in rounds if r["depth"] == d) for d in (1, 2)}
    result = {"model": "default (SmolLM2-135M)", "device": "cpu (2 cores, shared)",
              "threads_per_rank": int(os.environ["OMP_NUM_THREADS"]),
              "layout": "tp=1 pp=2", "requests": args.requests, "max_tokens": args.max_tokens,
              "rounds": rounds, "best_tokens_per_s": best,
              "overlap_speedup": best[2] / best[1], "identical_tokens": same}
    out = ROOT / "benchmarks" / "results" / "pp_overlap_cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))


if __name__ == "__main__":
    main()
