"""Per-kernel microbenchmarks on CUDA: each Triton kernel against its torch equivalent, as a
fraction of the HBM ceiling (a device-to-device copy measured in the same run) or, for prefill
attention, in TFLOP/s against torch's SDPA on the same (unpaged) tensors.

Times are medians of eager launches (`do_bench`): below ~40 us they measure the Python launch of
the kernels rather than the GPU (decode steps replay them in CUDA graphs, where that cost is gone).
Shapes are Llama-3-8B's (hidden 4096, intermediate 14336, 32 query / 8 KV heads of 128), bf16.
Run: python benchmarks/kernels.py  -> table on stdout, benchmarks/results/kernels_<gpu>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (bench_ms, copy_bandwidth_gbs, device_info,  # noqa: E402
                                   graph_ms, print_table, write_results)
from engine.attention.metadata import AttentionMetadata, SeqGroup  # noqa: E402
from engine.attention.torch_ref import TorchAttentionBackend, write_kv  # noqa: E402
from engine.kernels import triton_ops  # noqa: E402
from engine.kernels.decode_attention import decode_attention, num_splits_for  # noqa: E402
from engine.kernels.prefill_attention import prefill_attention  # noqa: E402
from engine.layers.activation import silu_and_mul as silu_and_mul_ref  # noqa: E402
from engine.layers.norm import rms_norm as rms_norm_ref  # noqa: E402
from engine.layers.rotary import RotaryEmbedding, apply_rope_ref  # noqa: E402

DT = torch.bfloat16
HIDDEN, INTER, HQ, HKV, D, BS = 4096, 14336, 32, 8, 128, 16


def _row(name: str, shape: str, num_bytes: float, ours_ms: float, torch_ms: float | None,
         bw_gbs: float, flops: float | None = None) -> dict:
    row = {"kernel": name, "shape": shape, "ours_ms": ours_ms, "torch_ms": torch_ms,
           "speedup": torch_ms / ours_ms if torch_ms else None,
           "GB/s": num_bytes / ours_ms / 1e6, "%HBM": 100 * num_bytes / ours_ms / 1e6 / bw_gbs}
    if flops is not None:
        row["TFLOP/s"] = flops / ours_ms / 1e9
        row["torch_TFLOP/s"] = flops / torch_ms / 1e9 if torch_ms else None
    return row


def elementwise(bw: float, tokens: int = 16384) -> list[dict]:
    x = torch.randn(tokens, HIDDEN, device="cuda", dtype=DT)
    res = torch.randn_like(x)
    w = torch.randn(HIDDEN, device="cuda", dtype=DT)
    e = x.element_size()
    rows = [
        _row("rms_norm", f"{tokens}x{HIDDEN}", 2 * x.numel() * e,
             bench_ms(lambda: triton_ops.rms_norm(x, w, 1e-5)),
             bench_ms(lambda: rms_norm_ref(x, w, 1e-5)), bw),
        _row("add_rms_norm", f"{tokens}x{HIDDEN}", 4 * x.numel() * e,
             bench_ms(lambda: triton_ops.add_rms_norm(x, res, w, 1e-5)),
             bench_ms(lambda: rms_norm_ref(x + res, w, 1e-5)), bw),
    ]
    del x, res
    gu = torch.randn(tokens // 2, 2 * INTER, device="cuda", dtype=DT)
    rows.append(_row("silu_and_mul", f"{tokens // 2}x{2 * INTER}", 1.5 * gu.numel() * e,
                     bench_ms(lambda: triton_ops.silu_and_mul(gu)),
                     bench_ms(lambda: silu_and_mul_ref(gu)), bw))
    return rows


def rope_write(bw: float, tokens: int = 16384) -> dict:
    rope = RotaryEmbedding(D, 8192, 500000.0).cuda()
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device="cuda", dtype=DT)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k, v = q.view(-1, HQ, D), k.view(-1, HKV, D), v.view(-1, HKV, D)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    kv = torch.zeros(tokens // BS + 1, 2, BS, HKV, D, device="cuda", dtype=DT)
    slots = torch.randperm(tokens, device="cuda")

    def ref():
        qr, kr = apply_rope_ref(q, k, rope.cos, rope.sin, pos)
        write_kv(kv, kr, v, slots)

    num_bytes = 2 * qkv.numel() * qkv.element_size()
    return _row("rope_and_write_kv", f"{tokens} tok", num_bytes,
                bench_ms(lambda: triton_ops.rope_and_write_kv(q, k, v, rope.cos, rope.sin, pos, kv, slots)),
                bench_ms(ref), bw)


def _paged(batch: int, ctx: int, q_len: int):
    """A cache with `batch` sequences of `ctx` tokens in shuffled blocks, and their group."""
    blocks_per_seq = -(-ctx // BS)
    kv = torch.randn(batch * blocks_per_seq, 2, BS, HKV, D, device="cuda", dtype=DT)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1).to(torch.int32)
    qs = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * q_len
    group = SeqGroup(tables, torch.full((batch,), ctx, device="cuda", dtype=torch.int32), qs,
                     q_len, ctx)
    return kv, group


def decode(bw: float, batch: int, ctx: int) -> dict:
    kv, group = _paged(batch, ctx, 1)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    meta = AttentionMetadata(torch.zeros(batch, dtype=torch.int64, device="cuda"), batch, group, None)
    ref_ms = None
    if batch * ctx <= 64 * 4096:
        ref_ms = bench_ms(lambda: (group.cache.clear(),
                                   TorchAttentionBackend().attend(q, kv, meta, D ** -0.5)))
    num_bytes = batch * ctx * HKV * D * 2 * kv.element_size()
    row = _row("decode_attention", f"B={batch} ctx={ctx}", num_bytes,
               bench_ms(lambda: decode_attention(q, kv, group, D ** -0.5, out)), ref_ms, bw)
    del kv
    return row


def decode_combine(bw: float, batch: int, ctx: int) -> list[dict]:
    """Split-K decode attention with its combine as a second kernel, then fused into the split
    kernel (the last split reduces), each timed inside a CUDA graph as decode steps run it
    (eager times would be the launches'). `vs_two_kernel` > 1: fused is faster. With one
    split (batch 64 at 8 KV heads on 132 SMs) there is no combine, so both are one launch."""
    kv, group = _paged(batch, ctx, 1)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    num_bytes = batch * ctx * HKV * D * 2 * kv.element_size()
    shape = f"B={batch} ctx={ctx} splits={num_splits_for(batch, HKV)}"
    ms = {fused: graph_ms(lambda: decode_attention(q, kv, group, D ** -0.5, out,
                                                   fused_combine=fused))
          for fused in (False, True)}
    del kv
    rows = [_row("decode_attention two-kernel (graph)", shape, num_bytes, ms[False], None, bw),
            _row("decode_attention fused combine (graph)", shape, num_bytes, ms[True], None, bw)]
    rows[1]["vs_two_kernel"] = ms[False] / ms[True]
    return rows


def prefill(bw: float, q_len: int, cached: int) -> dict:
    ctx = q_len + cached
    kv, group = _paged(1, ctx, q_len)
    q = torch.randn(q_len, HQ, D, device="cuda", dtype=DT)
    out = torch.empty_like(q)
    # torch equivalent: SDPA (flash) on dense, unpaged K/V of the same length
    k = torch.randn(1, HKV, ctx, D, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    qd = q.transpose(0, 1).unsqueeze(0)

    def ref():
        if cached == 0:
            return F.scaled_dot_product_attention(qd, k, v, is_causal=True, enable_gqa=True)
        mask = torch.ones(q_len, ctx, device="cuda", dtype=torch.bool).tril(cached)
        return F.scaled_dot_product_attention(qd, k, v, attn_mask=mask, enable_gqa=True)

    # causal FLOPs: QK^T and PV over the visible (query, key) pairs
    pairs = q_len * cached + q_len * (q_len + 1) / 2
    flops = 4 * pairs * D * HQ
    num_bytes = (2 * q_len * HQ + 2 * ctx * HKV) * D * 2
    return _row("prefill_attention", f"q={q_len} cached={cached}", num_bytes,
                bench_ms(lambda: prefill_attention(q, kv, group, D ** -0.5, out)),
                bench_ms(ref), bw, flops)


def sampling(bw: float, batch: int, vocab: int = 128256) -> list[dict]:
    """The sampler's draw and the whole sampler (T 0.8, top-p 0.9), fused race vs torch ops,
    timed inside CUDA graphs (GPU time; eager launches would time Python)."""
    from engine.kernels import dispatch
    from engine.kernels.sampling import sample_race
    from engine.sampler import Sampler, SamplingTensors, sample_race_ref
    from engine.sampling_params import SamplingParams

    logits = torch.randn(batch, vocab, device="cuda") * 3
    seeds = torch.randint(0, 2**62, (batch,), device="cuda")
    steps = torch.randint(0, 1000, (batch,), device="cuda")
    num_bytes = logits.numel() * 4
    rows = [_row("sample_race", f"B={batch} V={vocab}", num_bytes,
                 graph_ms(lambda: sample_race(logits, seeds, steps)),
                 graph_ms(lambda: sample_race_ref(logits, seeds, steps)), bw)]
    params = [SamplingParams(temperature=0.8, top_p=0.9)] * batch
    tensors = SamplingTensors.from_params(params, seeds.tolist(), steps.tolist(), None, vocab,
                                          "cuda")
    sampler = Sampler()
    fused = graph_ms(lambda: sampler(logits, tensors))
    dispatch.use_triton(False)
    try:
        reference = graph_ms(lambda: sampler(logits, tensors))
    finally:
        dispatch.use_triton(True)
    rows.append(_row("sampler T0.8 top-p0.9", f"B={batch} V={vocab}", num_bytes, fused,
                     reference, bw))
    return rows + top_p_cut_rows(bw, batch, vocab)


def top_p_cut_rows(bw: float, batch: int, vocab: int = 128256) -> list[dict]:
    """The sort-free top-p cut alone (vs the sorting mask), timed inside CUDA graphs: a flat
    row (randn * 3 / T 0.8: ~13k candidates at p 0.9), the same at p 0.99 (~35k candidates:
    over CAP: the overflow path), a nearly uniform row (randn * 0.02, as random weights
    give: the nucleus holds ~115k tokens, the case the engine hit) and a peaked row
    (randn * 12: tens of candidates)."""
    from engine.kernels.top_p import top_p_cut
    from engine.sampler import apply_top_p

    rows = []
    for name, scale, p in [("flat", 3 / 0.8, 0.9), ("flat", 3 / 0.8, 0.99),
                           ("uniform", 0.02, 0.9), ("peaked", 12.0, 0.9)]:
        logits = torch.randn(batch, vocab, device="cuda") * scale
        top_ps = torch.full((batch,), p, device="cuda")
        rows.append(_row(f"top_p_cut {name} p{p}", f"B={batch} V={vocab}", logits.numel() * 4,
                         graph_ms(lambda: top_p_cut(logits, top_ps)),
                         graph_ms(lambda: apply_top_p(logits, top_ps)), bw))
    return rows


def main() -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    rows = elementwise(bw) + [rope_write(bw)]
    for batch, ctx in [(1, 1024), (1, 8192), (8, 4096), (32, 1024), (64, 1024), (64, 4096),
                       (256, 1024)]:
        rows.append(decode(bw, batch, ctx))
    for batch, ctx in [(1, 1024), (1, 8192), (64, 1024), (64, 4096)]:
        rows += decode_combine(bw, batch, ctx)
    for q_len, cached in [(4096, 0), (1024, 3072), (8192, 0)]:
        rows.append(prefill(bw, q_len, cached))
    for batch in (1, 64):
        rows += sampling(bw, batch)
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "rows": rows}
    path = write_results("kernels", payload)
    print(f"\ncopy bandwidth (read+write): {bw:.0f} GB/s on {payload['device']['gpu']}")
    print_table(rows, ["kernel", "shape", "ours_ms", "torch_ms", "speedup", "GB/s", "%HBM",
                       "TFLOP/s", "torch_TFLOP/s", "vs_two_kernel"])
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
