"""Model-level MoE latency on one GPU (issue 14, "Measure"): the Qwen3-30B-A3B and Mixtral-8x7B
shapes with random bf16 weights built in memory, our `ModelRunner` (decode in CUDA graphs, the
fused MoE kernel) against HF transformers (eager `generate`, SDPA) on the same config, one model
at a time, in the same run.

- Decode: ms per step at batch 1, 8, 64, 256 with 1k tokens of (random) context, and the
  fraction of the roofline: bytes a step must read, over the copy bandwidth measured in this
  run. Those bytes count the experts each layer's tokens actually routed to in that step (read
  back from the layers' on-device expert counters over the timed steps), every other weight
  (attention, norms, router, LM head; the embedding's rows only) and the KV of the context.
- Prefill: one 4,096-token prompt, ms and TFLOP/s.
Mixtral-8x7B is 94 GB in bf16, so it cannot sit beside an HF copy, nor its KV beside its
weights for long: both sides build the same reduced number of layers (--mixtral-layers; the
JSON says how many). Qwen3-30B-A3B (61 GB) runs all 48 unless --qwen-layers says otherwise.
Run: python benchmarks/moe_latency.py [--skip-hf]  -> benchmarks/results/moe_latency_<gpu>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, print_table,  # noqa: E402
                                   replay_ms, wall_ms, write_results)
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.kernels.attention_backend import TritonAttentionBackend  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.config import ModelConfig, MoEConfig  # noqa: E402
from engine.plan import PlanBuilder  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402

BS = 16
QWEN3_30B_A3B = ModelConfig(
    architecture="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
    num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, max_position_embeddings=40960,
    rms_norm_eps=1e-6, rope_theta=1e6, qk_norm=True, name="Qwen3-30B-A3B shape",
    moe=MoEConfig(num_experts=128, top_k=8, intermediate_size=768, norm_topk_prob=True))
MIXTRAL_8X7B = ModelConfig(
    architecture="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
    rope_theta=1e6, name="Mixtral-8x7B shape",
    moe=MoEConfig(num_experts=8, top_k=2, intermediate_size=14336, norm_topk_prob=True))


class Driver:
    """Requests over hand-assigned blocks, driven step by step through the runner."""

    def __init__(self, runner: ModelRunner, cfg: ModelConfig) -> None:
        self.runner, self.cfg = runner, cfg
        self.planner = PlanBuilder()
        self.next_block = 0
        self.num_blocks = runner.kv_cache.shape[1]

    def requests(self, batch: int, prompt_len: int, room: int):
        per_seq = -(-(prompt_len + room) // BS)
        if self.next_block + batch * per_seq > self.num_blocks:
            self.next_block = 0
        out = []
        params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            table = list(range(self.next_block, self.next_block + per_seq))
            self.next_block += per_seq
            prompt = torch.randint(0, self.cfg.vocab_size, (prompt_len,)).tolist()
            out.append((Request(f"b{batch}-{i}-{time.monotonic_ns()}", prompt, params, 0, 1 << 20),
                        table))
        return out

    def step(self, reqs, decode: bool) -> None:
        chunks = [ScheduledChunk(r, r.num_tokens - 1, 1, t, True) if decode
                  else ScheduledChunk(r, 0, r.num_tokens, t, True) for r, t in reqs]
        sampled = self.runner.execute(self.planner.build(SchedulerOutput(chunks)))
        for (r, _), tok in zip(reqs, sampled.token_ids.tolist()):
            r.output_token_ids.append(tok)


def _moe_layers(model):
    from engine.layers.moe import FusedMoE

    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def step_bytes(model, cfg: ModelConfig, batch: int, context: int, touched_experts: float) -> float:
    """Bytes one decode step must read: touched experts, other weights, embedding rows, KV."""
    layers = _moe_layers(model)
    expert_bytes = sum(m.w13.numel() * m.w13.element_size() + m.w2.numel() * m.w2.element_size()
                       for m in layers)
    per_expert = expert_bytes / (len(layers) * cfg.moe.num_experts)
    emb = model.embed_tokens.weight
    dense = (sum(p.numel() * p.element_size() for p in model.parameters()) - expert_bytes
             - emb.numel() * emb.element_size() + batch * cfg.hidden_size * 2)
    kv = batch * context * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    return dense + touched_experts * per_expert + kv


def prefill_flops(cfg: ModelConfig, n: int) -> float:
    """Active parameters only: attention projections, router, top-k experts, LM head."""
    c, m = cfg, cfg.moe
    per_token = 2 * c.num_layers * (c.hidden_size * (2 * c.q_size + 2 * c.kv_size)
                                    + c.hidden_size * m.num_experts
                                    + m.top_k * 3 * c.hidden_size * m.intermediate_size)
    attention = 4 * c.num_layers * c.num_heads * c.head_dim * n * (n + 1) / 2
    return per_token * n + attention + 2 * c.hidden_size * c.vocab_size


def bench_ours(cfg: ModelConfig, bw: float, batches, context: int, steps: int):
    model = build_model(cfg, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    assert model.supports_cuda_graphs  # the fused kernel: decode steps replay CUDA graphs
    num_blocks = max(max(batches) * -(-(context + steps + 32) // BS), 2 * 4096 // BS + 64)
    kv_cache = torch.zeros(cfg.num_layers, num_blocks, 2, BS, cfg.num_kv_heads, cfg.head_dim,
                           dtype=torch.bfloat16, device="cuda").normal_()
    runner = ModelRunner(model, kv_cache, TritonAttentionBackend(), BS, cfg.vocab_size, "cuda")
    driver = Driver(runner, cfg)
    reqs = driver.requests(1, 4096, 1)
    prefill_ms = wall_ms(lambda: (reqs[0][0].output_token_ids.clear(),
                                  driver.step(reqs, decode=False)), reps=3)
    prefill = {"prompt": 4096, "ours_ms": prefill_ms,
               "ours_TFLOP/s": prefill_flops(cfg, 4096) / prefill_ms / 1e9}
    decode = []
    for batch in batches:
        try:
            decode.append(_decode_row(runner, driver, model, cfg, bw, batch, context, steps))
        except Exception as exc:  # keep the other sizes; report the failure
            decode.append({"batch": batch, "error": repr(exc)[:300]})
        print(decode[-1], flush=True)
    del runner, driver, kv_cache, model
    gc.collect()
    torch.cuda.empty_cache()
    return prefill, decode


def _decode_row(runner, driver, model, cfg, bw, batch, context, steps) -> dict:
    reqs = driver.requests(batch, context, steps + 16)
    for r, _ in reqs:
        r.output_token_ids.append(0)  # the cache holds random KV: decode from `context` on
    for _ in range(3):
        driver.step(reqs, decode=True)  # captures this bucket's graph
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        driver.step(reqs, decode=True)
    ms = (time.perf_counter() - start) * 1e3 / steps
    touched = _touched_experts(driver, reqs, _moe_layers(model))
    graphs = runner.decode_graphs
    gpu_ms = replay_ms(graphs.graphs[graphs.bucket_for(batch)].graph) if graphs else None
    num_bytes = step_bytes(model, cfg, batch, context + steps, touched)
    roof_ms = num_bytes / bw / 1e6
    return {"batch": batch, "ours_ms": ms, "graph_ms": gpu_ms, "roofline_ms": roof_ms,
            "%roofline": 100 * roof_ms / ms,
            "%roofline_graph": 100 * roof_ms / gpu_ms if gpu_ms else None,
            "touched_experts_per_layer": touched / len(_moe_layers(model)), "step_GB": num_bytes / 1e9,
            "tok/s": batch * 1e3 / ms}


def _touched_experts(driver, reqs, layers, steps: int = 3) -> float:
    """Experts routed to per step, summed over layers (the layers' on-device counters, which
    the captured graphs update too), averaged over a few untimed steps."""
    total = 0
    for _ in range(steps):
        for m in layers:
            m.expert_counts.zero_()
        driver.step(reqs, decode=True)
        total += int(sum((m.expert_counts > 0).sum() for m in layers))
    return total / steps


def hf_model(cfg: ModelConfig):
    import transformers

    c, m = cfg, cfg.moe
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                  head_dim=c.head_dim, max_position_embeddings=c.max_position_embeddings,
                  rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False,
                  num_experts_per_tok=m.top_k)
    if c.architecture == "mixtral":
        hf_cfg = transformers.MixtralConfig(intermediate_size=m.intermediate_size,
                                            num_local_experts=m.num_experts, **common)
    else:
        hf_cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=m.intermediate_size,
                                             intermediate_size=c.intermediate_size,
                                             num_experts=m.num_experts,
                                             norm_topk_prob=m.norm_topk_prob, **common)
    with torch.device("cuda"):
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()


def bench_hf(cfg: ModelConfig, prefill: dict, decode: list[dict], context: int) -> str:
    hf = hf_model(cfg)
    impl = str(getattr(hf.config, "_experts_implementation", None)
               or getattr(hf.config, "experts_implementation", None) or "default")

    def generate(ids, new_tokens):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    ids = torch.randint(0, cfg.vocab_size, (1, prefill["prompt"]), device="cuda")
    prefill["hf_ms"] = wall_ms(lambda: generate(ids, 1), reps=2)
    prefill["speedup"] = prefill["hf_ms"] / prefill["ours_ms"]
    for row in decode:
        if "ours_ms" not in row:
            continue
        try:
            ids = torch.randint(0, cfg.vocab_size, (row["batch"], context), device="cuda")
            one = wall_ms(lambda: generate(ids, 1), reps=1, warmup=1)
            many = wall_ms(lambda: generate(ids, 9), reps=1, warmup=0)
            row["hf_ms"] = (many - one) / 8
            row["speedup"] = row["hf_ms"] / row["ours_ms"]
        except Exception as exc:
            row["hf_error"] = repr(exc)[:300]
        print(row, flush=True)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return impl


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--models", default="qwen3,mixtral")
    parser.add_argument("--qwen-layers", type=int, default=48)
    parser.add_argument("--mixtral-layers", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", default="1,8,64,256")
    args = parser.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    batches = [int(b) for b in args.batches.split(",")]
    base = {"qwen3": (QWEN3_30B_A3B, args.qwen_layers), "mixtral": (MIXTRAL_8X7B, args.mixtral_layers)}
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "context": args.context,
               "models": [],
               "hf": "transformers eager generate (SDPA), same config, bf16, same run",
               "roofline": "bytes of experts touched in the step + all other weights (embedding "
                           "rows only) + KV of the context, over the copy bandwidth"}
    for name in args.models.split(","):
        full, layers = base[name]
        cfg = dataclasses.replace(full, num_layers=layers)
        prefill, decode = bench_ours(cfg, bw, batches, args.context, args.steps)
        entry = {"model": full.name, "num_layers": layers, "full_num_layers": full.num_layers,
                 "prefill": prefill, "decode": decode}
        payload["models"].append(entry)
        write_results("moe_latency", payload)
        if not args.skip_hf:
            try:
                entry["hf_experts_implementation"] = bench_hf(cfg, prefill, decode, args.context)
            except Exception as exc:
                entry["hf_error"] = repr(exc)[:300]
                print(f"HF {name} failed: {exc!r}", flush=True)
        path = write_results("moe_latency", payload)
        print(f"\n{full.name}, {layers} of {full.num_layers} layers; copy bandwidth {bw:.0f} GB/s")
        print_table([prefill], ["prompt", "ours_ms", "hf_ms", "speedup", "ours_TFLOP/s"])
        print_table(decode, ["batch", "ours_ms", "graph_ms", "roofline_ms", "%roofline",
                             "%roofline_graph", "touched_experts_per_layer", "hf_ms", "speedup",
                             "error"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
