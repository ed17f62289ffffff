"""End-to-end latency of the engine's model runner on CUDA, Llama-3-8B shape, random bf16 weights,
against HF transformers (eager `generate`) on the same config in the same run.

- TTFT: one prefill step of a 128 / 1k / 4k-token prompt through `ModelRunner.execute` (host
  preparation, forward, LM head, sampling, copying the token id back), and prefill TFLOP/s.
- Decode: ms per step at batch 1 ... 256 with 1k tokens of context, through `execute` (CUDA
  graphs), and the fraction of the HBM roofline: (weights + KV bytes read per step) / copy
  bandwidth measured in the same run, over the measured time.
- Engine decode: the same through the whole `LLMEngine.step()` (scheduler, runner, read-back,
  detokenizer, stop checks), with synchronous and asynchronous scheduling, greedy and sampled.
Run: python benchmarks/latency.py [--skip-hf]  -> table, benchmarks/results/latency_<gpu>.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (bench_tokenizer, copy_bandwidth_gbs,  # noqa: E402
                                   device_info, print_table, replay_ms, wall_ms, write_results)
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.kernels.attention_backend import TritonAttentionBackend  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.plan import PlanBuilder  # noqa: E402
from engine.models.config import ModelConfig  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402

CFG = ModelConfig(architecture="llama", vocab_size=128256, hidden_size=4096,
                  intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                  head_dim=128, max_position_embeddings=8192, rope_theta=500000.0)
BS = 16
KV_BYTES_PER_TOKEN = CFG.num_layers * 2 * CFG.num_kv_heads * CFG.head_dim * 2
PARAMS = dict(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)


def weight_bytes_per_step(model, batch: int) -> int:
    """Every weight is read once per step except the embedding table (only `batch` rows)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.embed_tokens.weight
    return total - emb.numel() * emb.element_size() + batch * CFG.hidden_size * 2


def prefill_flops(num_tokens: int) -> float:
    c = CFG
    per_token = 2 * c.num_layers * (c.hidden_size * (c.q_size + 2 * c.kv_size) + c.q_size * c.hidden_size
                                    + 3 * c.hidden_size * c.intermediate_size)
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * num_tokens * (num_tokens + 1) / 2
    return per_token * num_tokens + attention + 2 * c.hidden_size * c.vocab_size


class Workload:
    """Requests over hand-assigned blocks, driven step by step through the runner."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.next_block = 0
        self.num_blocks = runner.kv_cache.shape[1]
        self.planner = PlanBuilder()  # what the engine core does per step (host cost included)

    def execute(self, chunks):
        return self.runner.execute(self.planner.build(SchedulerOutput(chunks)))

    def requests(self, batch: int, prompt_len: int, room: int) -> list[tuple[Request, list[int]]]:
        per_seq = -(-(prompt_len + room) // BS)
        if self.next_block + batch * per_seq > self.num_blocks:
            self.next_block = 0
        out = []
        for i in range(batch):
            table = list(range(self.next_block, self.next_block + per_seq))
            self.next_block += per_seq
            prompt = torch.randint(0, CFG.vocab_size, (prompt_len,)).tolist()
            out.append((Request(f"b{batch}-{i}-{time.monotonic_ns()}", prompt,
                                SamplingParams(**PARAMS), 0, 1 << 20), table))
        return out

    def prefill(self, reqs) -> None:
        chunks = [ScheduledChunk(r, 0, r.num_tokens, t, True) for r, t in reqs]
        sampled = self.execute(chunks)
        for (r, _), tok in zip(reqs, sampled.token_ids.tolist()):
            r.output_token_ids.append(tok)

    def decode_step(self, reqs) -> None:
        chunks = [ScheduledChunk(r, r.num_tokens - 1, 1, t, True) for r, t in reqs]
        sampled = self.execute(chunks)
        for (r, _), tok in zip(reqs, sampled.token_ids.tolist()):
            r.output_token_ids.append(tok)


def bench_ours(bw: float, batches: list[int], context: int, steps: int) -> tuple[list, list]:
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    max_batch = max(batches)
    num_blocks = max(max_batch * (-(-(context + steps + 16) // BS)), 8192 // BS * 2)
    kv_cache = torch.randn(CFG.num_layers, num_blocks, 2, BS, CFG.num_kv_heads, CFG.head_dim,
                           dtype=torch.bfloat16, device="cuda")
    runner = ModelRunner(model, kv_cache, TritonAttentionBackend(), BS, CFG.vocab_size, "cuda")
    work = Workload(runner)

    ttft = []
    for n in (128, 1024, 4096):
        reqs = work.requests(1, n, 1)
        try:
            ms = wall_ms(lambda: (reqs[0][0].output_token_ids.clear(), work.prefill(reqs)), reps=5)
        except Exception as exc:
            print(f"prefill {n} failed: {exc!r}")
            ttft.append({"prompt": n, "error": repr(exc)[:300]})
            continue
        ttft.append({"prompt": n, "ours_ms": ms, "ours_TFLOP/s": prefill_flops(n) / ms / 1e9})

    decode = []
    for batch in batches:
        try:
            decode.append(_bench_decode(runner, work, model, bw, batch, context, steps))
        except Exception as exc:  # keep the other batch sizes' numbers; report the failure
            decode.append({"batch": batch, "error": repr(exc)[:300]})
            print(f"decode batch {batch} failed: {exc!r}")
    del runner, kv_cache, work
    gc.collect()
    torch.cuda.empty_cache()
    return ttft, decode, model


def bench_engine(model, bw: float, batches: list[int], context: int, steps: int) -> list[dict]:
    """ms per `LLMEngine.step()` in steady decode, synchronous vs asynchronous scheduling."""
    rows = []
    for batch in batches:
        for sampled in (False, True):
            row = {"batch": batch, "sampling": "top-p 0.9, T 0.8" if sampled else "greedy"}
            for mode in ("sync", "async"):
                try:
                    row[f"{mode}_ms"], row["graph_ms"] = _engine_step_ms(
                        model, batch, context, steps, sampled, mode == "async")
                except Exception as exc:
                    row[f"{mode}_error"] = repr(exc)[:300]
                    print(f"engine {mode} batch {batch} failed: {exc!r}")
            num_bytes = (weight_bytes_per_step(model, batch)
                         + batch * (context + steps) * KV_BYTES_PER_TOKEN)
            row["roofline_ms"] = num_bytes / bw / 1e6
            for mode in ("sync", "async"):
                if f"{mode}_ms" in row:
                    row[f"%roofline_{mode}"] = 100 * row["roofline_ms"] / row[f"{mode}_ms"]
            rows.append(row)
            print(row)
    return rows


def decode_engine(model, batch: int, context: int, steps: int, sampled: bool,
                  async_scheduling: bool):
    """An `LLMEngine` over `model` with `batch` requests of `context` random tokens (greedy, or
    T 0.8 / top-p 0.9), prefilled and `steps` + 32 tokens of room each, 4 decode steps in
    (graphs captured): ready for steady decode steps."""
    from engine.builder import LoadedModel
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine

    per_seq = -(-(context + steps + 32) // BS)
    config = EngineConfig(model="llama-3-8b-shape", device="cuda", dtype="bfloat16",
                          cache=CacheConfig(block_size=BS, num_blocks=batch * per_seq + 16),
                          scheduler=SchedulerConfig(max_num_seqs=max(batch, 64),
                                                    max_num_batched_tokens=8192),
                          async_scheduling=async_scheduling)  # the model's 8k context
    engine = LLMEngine(config, LoadedModel(CFG, model, bench_tokenizer()))
    params = SamplingParams(max_tokens=steps + 32, ignore_eos=True, seed=1,
                            temperature=0.8 if sampled else 0.0, top_p=0.9 if sampled else 1.0)
    for _ in range(batch):
        engine.add_request(torch.randint(0, CFG.vocab_size, (context,)).tolist(), params)
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()  # prefill
    for _ in range(4):
        engine.step()  # graph capture, warm-up
    return engine


def _engine_step_ms(model, batch: int, context: int, steps: int, sampled: bool,
                    async_scheduling: bool) -> tuple[float, float]:
    """(ms per engine step, ms per replay of the engine's own decode graph)."""
    engine = decode_engine(model, batch, context, steps, sampled, async_scheduling)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = (time.perf_counter() - start) * 1e3 / steps
    graphs = engine.runner.decode_graphs
    gpu_ms = replay_ms(graphs.graphs[graphs.bucket_for(batch)].graph)
    for rid in list(engine.requests):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.kv_manager.is_idle()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return ms, gpu_ms


def _bench_decode(runner, work, model, bw: float, batch: int, context: int, steps: int) -> dict:
    # the cache already holds (random) KV: decode from position `context` without prefill
    reqs = work.requests(batch, context, steps + 16)
    for r, _ in reqs:
        r.output_token_ids.append(0)
    for _ in range(3):
        work.decode_step(reqs)  # captures this bucket's graph, warms up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        work.decode_step(reqs)
    ms = (time.perf_counter() - start) * 1e3 / steps
    graph = runner.decode_graphs.graphs[runner.decode_graphs.bucket_for(batch)].graph
    gpu_ms = replay_ms(graph)
    eager_ms = _eager_step_ms(runner, work, reqs) if batch in (1, 64) else None
    num_bytes = weight_bytes_per_step(model, batch) + batch * (context + steps) * KV_BYTES_PER_TOKEN
    return {"batch": batch, "ours_ms": ms, "graph_ms": gpu_ms, "eager_ms": eager_ms,
            "roofline_ms": num_bytes / bw / 1e6, "%roofline": 100 * num_bytes / bw / 1e6 / ms,
            "tok/s": batch * 1e3 / ms}


def _eager_step_ms(runner, work, reqs, steps: int = 5) -> float:
    """The same decode step without CUDA graphs, for the graphs' share of the speed."""
    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        work.decode_step(reqs)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            work.decode_step(reqs)
        return (time.perf_counter() - start) * 1e3 / steps
    finally:
        runner.decode_graphs = graphs


def bench_hf(ttft: list[dict], decode: list[dict], context: int, hf_batches: list[int]) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    c = CFG
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                      intermediate_size=c.intermediate_size, num_hidden_layers=c.num_layers,
                      num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                      head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                      rope_theta=c.rope_theta, tie_word_embeddings=False)
    with torch.device("cuda"):
        hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()

    def generate(ids, new_tokens):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    for row in ttft:
        if "ours_ms" not in row:
            continue
        ids = torch.randint(0, c.vocab_size, (1, row["prompt"]), device="cuda")
        row["hf_ms"] = wall_ms(lambda: generate(ids, 1), reps=3)
        row["hf_TFLOP/s"] = prefill_flops(row["prompt"]) / row["hf_ms"] / 1e9
        row["speedup"] = row["hf_ms"] / row["ours_ms"]
    for row in decode:
        if row["batch"] not in hf_batches or "ours_ms" not in row:
            continue
        ids = torch.randint(0, c.vocab_size, (row["batch"], context), device="cuda")
        one = wall_ms(lambda: generate(ids, 1), reps=1, warmup=1)
        many = wall_ms(lambda: generate(ids, 17), reps=1, warmup=0)
        row["hf_ms"] = (many - one) / 16
        row["speedup"] = row["hf_ms"] / row["ours_ms"]
    del hf
    gc.collect()
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batches", default="1,8,32,64,128,256")
    parser.add_argument("--hf-batches", default="1,8,64")
    parser.add_argument("--engine-batches", default="1,64")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    batches = [int(b) for b in args.batches.split(",")]
    ttft, decode, model = bench_ours(bw, batches, args.context, args.steps)
    engine_batches = [int(b) for b in args.engine_batches.split(",") if b]
    engine = bench_engine(model, bw, engine_batches, args.context, args.steps)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "model": "Llama-3-8B shape, bf16",
               "context": args.context, "ttft": ttft, "decode": decode, "engine_decode": engine,
               "hf": "transformers eager generate (SDPA), same config and dtype"}
    path = write_results("latency", payload)  # again below with HF's numbers
    print_table(decode, ["batch", "ours_ms", "graph_ms", "roofline_ms", "%roofline", "tok/s"])
    if not args.skip_hf:
        try:
            bench_hf(ttft, decode, args.context, [int(b) for b in args.hf_batches.split(",")])
        except Exception as exc:
            print(f"HF baseline failed: {exc!r}")
            payload["hf_error"] = repr(exc)[:300]
        path = write_results("latency", payload)
    print(f"\ncopy bandwidth (read+write): {bw:.0f} GB/s on {payload['device']['gpu']}")
    print_table(ttft, ["prompt", "ours_ms", "hf_ms", "speedup", "ours_TFLOP/s", "hf_TFLOP/s"])
    print()
    print_table(decode, ["batch", "ours_ms", "graph_ms", "eager_ms", "roofline_ms", "%roofline",
                         "tok/s", "hf_ms", "speedup", "error"])
    print()
    print_table(engine, ["batch", "sampling", "sync_ms", "async_ms", "graph_ms", "roofline_ms",
                         "%roofline_sync", "%roofline_async"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
