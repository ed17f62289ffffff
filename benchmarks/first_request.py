"""Time to first token right after start-up, on a fresh Triton compile cache, with the start-up
warm-up (engine/warmup.py) on and off. Llama-3-8B shape, random bf16 weights, one GPU.

Each mode runs in a child process with an empty TRITON_CACHE_DIR: engine start-up seconds
(construction, graph capture, warm-up), then the TTFT through `LLMEngine.step()` of prompts of
100, 1,024 and 4,096 tokens in that order (each the first of its shape), then the same three again
(steady state). Run: python benchmarks/first_request.py -> benchmarks/results/first_request_<gpu>.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/: its kernels.py would shadow the `kernels` package

LENGTHS = (100, 1024, 4096)


def ttft_ms(engine, length: int) -> float:
    """Milliseconds from add_request to the step that returns the first token of a random
    `length`-token prompt (greedy, 2 tokens), then the request runs out."""
    import torch

    from engine.sampling_params import SamplingParams

    prompt = torch.randint(0, engine.model_config.vocab_size, (length,)).tolist()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    rid = engine.add_request(prompt, params)
    while not any(o.request_id == rid and o.new_token_ids for o in engine.step()):
        pass
    ms = (time.perf_counter() - start) * 1e3
    while engine.has_unfinished():
        engine.step()
    return ms


def child(warmup: bool) -> dict:
    import torch

    from benchmarks.gpu_common import bench_tokenizer
    from benchmarks.latency import BS, CFG
    from engine.builder import LoadedModel, build_model, init_random_weights
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine

    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model)
    config = EngineConfig(model="llama-3-8b-shape", device="cuda", dtype="bfloat16",
                          warmup=warmup, cache=CacheConfig(block_size=BS, num_blocks=4096),
                          scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=8192))
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine = LLMEngine(config, LoadedModel(CFG, model, bench_tokenizer()))
    torch.cuda.synchronize()
    row = {"warmup": warmup, "startup_s": time.perf_counter() - start,
           "warmup_s": engine.warmup_s}
    row["first_ms"] = {n: ttft_ms(engine, n) for n in LENGTHS}
    row["steady_ms"] = {n: min(ttft_ms(engine, n) for _ in range(3)) for n in LENGTHS}
    return row


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(child(sys.argv[2] == "warm")))
        return
    from benchmarks.gpu_common import device_info, write_results

    rows = []
    for mode in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            proc = subprocess.run([sys.executable, __file__, "--child", mode], env=env,
                                  capture_output=True, text=True, timeout=900)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
            rows.append({"warmup": mode == "warm", "error": proc.stderr[-500:]})
            continue
        rows.append(json.loads(lines[-1][7:]))
        print(rows[-1])
    path = write_results("first_request", {"device": device_info(), "rows": rows,
                                           "model": "Llama-3-8B shape, random bf16",
                                           "compile_cache": "empty TRITON_CACHE_DIR per mode"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
