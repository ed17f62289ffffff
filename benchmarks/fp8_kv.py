"""fp8 KV cache against the bf16 one, Llama-3-8B shape, random bf16 weights, one GPU, same run.

- Decode ms per step (the model runner with CUDA graphs, as latency.py) at batch 64 with 4k
  context and batch 256 with 1k, bf16 KV vs fp8 KV, and each one's HBM roofline fraction
  (weights + the KV bytes each format reads).
- Bytes per token in the pool and on the wire, and tokens per GiB of KV pool.
- Teacher-forced agreement: the same random 1,024-token sequences through one prefill with
  each cache; the fraction of positions whose argmax agrees, and the mean |logprob| gap of the
  bf16 run's argmax token.
Run: python benchmarks/fp8_kv.py -> benchmarks/results/fp8_kv_<gpu>.json
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, print_table,  # noqa: E402
                                   write_results)
from benchmarks.latency import BS, CFG, Workload, weight_bytes_per_step  # noqa: E402
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.kernels.attention_backend import TritonAttentionBackend  # noqa: E402
from engine.kv_cache.cache_tensor import bytes_per_block  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.models.context import ForwardContext  # noqa: E402
from engine.plan import PlanBuilder  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402

KV_DTYPES = ("auto", "fp8_e4m3")
STEPS = 30


def _cache(kv_dtype: str, num_blocks: int) -> torch.Tensor:
    shape = (CFG.num_layers, num_blocks, 2, BS, CFG.num_kv_heads, CFG.head_dim)
    if kv_dtype == "auto":
        return torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    cache = torch.randint(0, 0x70, (*shape[:-1], CFG.head_dim + 16), dtype=torch.uint8,
                          device="cuda")  # finite e4m3 values
    cache[..., CFG.head_dim:] = 0
    cache[..., CFG.head_dim:CFG.head_dim + 4] = torch.tensor([0.01]).view(torch.uint8).cuda()
    return cache


def _runner(model, kv_dtype: str, num_blocks: int) -> ModelRunner:
    return ModelRunner(model, _cache(kv_dtype, num_blocks), TritonAttentionBackend(), BS,
                       CFG.vocab_size, "cuda", max_model_len=8192)


def decode_ms(model, kv_dtype: str, batch: int, context: int, bw: float) -> dict:
    per_seq = -(-(context + STEPS + 16) // BS)
    runner = _runner(model, kv_dtype, batch * per_seq)
    work = Workload(runner)
    reqs = work.requests(batch, context, STEPS + 16)
    for r, _ in reqs:
        r.output_token_ids.append(0)
    for _ in range(3):
        work.decode_step(reqs)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(STEPS):
        work.decode_step(reqs)
    ms = (time.perf_counter() - start) * 1e3 / STEPS
    kv_bytes = bytes_per_block(CFG, BS, torch.bfloat16, kv_cache_dtype=kv_dtype) / BS
    num_bytes = weight_bytes_per_step(model, batch) + batch * (context + STEPS) * kv_bytes
    del runner, work
    gc.collect()
    torch.cuda.empty_cache()
    return {"kv": kv_dtype, "batch": batch, "context": context, "ms": ms,
            "roofline_ms": num_bytes / bw / 1e6, "%roofline": 100 * num_bytes / bw / 1e6 / ms}


@torch.inference_mode()
def all_logits(model, kv_dtype: str, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] float32 logits of one prefill of `tokens` over a `kv_dtype` cache."""
    runner = _runner(model, kv_dtype, -(-len(tokens) // BS) + 1)
    runner.kv_cache.zero_()
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    request = Request("tf", tokens, SamplingParams(max_tokens=1), 0, 1 << 20)
    table = list(range(-(-len(tokens) // BS)))
    plan = PlanBuilder().build(SchedulerOutput([ScheduledChunk(request, 0, len(tokens), table,
                                                               True)]))
    runner.tables.apply(plan)
    inputs = runner.prepare(plan)
    hidden = model(inputs.input_ids, inputs.positions,
                   ForwardContext(runner.kv_cache, inputs.attn_meta, runner.backend, None))
    return model.compute_logits(hidden).float()


def agreement(model, num_seqs: int = 4, length: int = 1024) -> dict:
    torch.manual_seed(1)
    agree, gaps = [], []
    for _ in range(num_seqs):
        tokens = torch.randint(0, CFG.vocab_size, (length,)).tolist()
        ref = all_logits(model, "auto", tokens).log_softmax(-1)
        fp8 = all_logits(model, "fp8_e4m3", tokens).log_softmax(-1)
        best = ref.argmax(-1)
        agree.append((fp8.argmax(-1) == best).float().mean().item())
        gaps.append((fp8.gather(1, best[:, None]) - ref.gather(1, best[:, None])).abs().mean().item())
    return {"sequences": num_seqs, "length": length, "top1_agreement": sum(agree) / len(agree),
            "mean_abs_logprob_gap": sum(gaps) / len(gaps)}


def main() -> None:
    bw = copy_bandwidth_gbs()
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    rows = []
    for batch, context in ((64, 4096), (256, 1024)):
        for kv in KV_DTYPES:
            try:
                rows.append(decode_ms(model, kv, batch, context, bw))
            except Exception as exc:
                rows.append({"kv": kv, "batch": batch, "context": context, "error": repr(exc)[:300]})
            print(rows[-1])
    sizes = {kv: bytes_per_block(CFG, BS, torch.bfloat16, kv_cache_dtype=kv) / BS
             for kv in KV_DTYPES}
    capacity = {kv: {"bytes_per_token": b, "tokens_per_GiB": (1 << 30) / b}
                for kv, b in sizes.items()}
    quality = agreement(model)
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "decode": rows,
               "capacity": capacity, "teacher_forced": quality,
               "model": "Llama-3-8B shape, random bf16 weights; fp8 = e4m3 rows + fp32 scale"}
    path = write_results("fp8_kv", payload)
    print_table(rows, ["kv", "batch", "context", "ms", "roofline_ms", "%roofline", "error"])
    print(capacity, quality)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
