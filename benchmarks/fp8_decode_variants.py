"""Where an fp8 decode-attention tile's time goes: variants of one kernel, one GPU, same run.

Why: over an fp8 cache (0.56x the bytes) decode attention takes 0.76-0.77x of bf16's time on an
H100 (RESULTS.md, eleventh round), and the tile matters far more than the memory layout. This
times one split-free decode kernel (the product's loop, engine/kernels/decode_attention.py, at
one split per sequence, as the engine runs batch 64 x 4k) in variants that each drop one piece
of the per-tile work, so the differences say what each piece costs:

  bf16       : a bf16 cache, the product's plain path (the baseline)
  fp8        : the product's fp8 path (e4m3 -> fp16 tiles, key scales on the scores, value
               scales on the probabilities)
  no_scale   : fp8 without reading or applying the scales (wrong numbers; cost only)
  k_only     : keys fp8, values read as if fp8 but the PV product skipped (cost only)
  fp8_dot    : no conversion: the query and probabilities rounded to e4m3 and both products
               on fp8 operands (Hopper's fp8 MMA; less accurate; cost only)
  raw_only   : fp8 tiles loaded and summed, no products (the memory floor of this loop)

Each variant's output is checked only for being finite. Layer: Llama-3-8B (32 query / 8 KV
heads, head_dim 128), block size 16, shuffled blocks, head-major fp8 memory with values as rows:
the format before the transposed value slabs (engine/kv_cache/fp8.py; fp8_vt_decode.py times
both). Timed inside CUDA graphs.
Run: python benchmarks/fp8_decode_variants.py -> results/fp8_decode_variants_<gpu>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   print_table, write_results)
from engine.kernels.kv_tiles import load_fp8_keys  # noqa: E402
from engine.kv_cache.fp8 import cache_from_rows, quantize_rows  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
VARIANTS = ("bf16", "fp8", "no_scale", "k_only", "fp8_dot", "raw_only")


def rows_head_major(kv: torch.Tensor) -> torch.Tensor:
    """The fp8 format before the value slabs (engine/kv_cache/fp8.py): the same logical shape
    over head-major memory, keys and values alike as rows."""
    return kv.transpose(-3, -2).contiguous().transpose(-3, -2)


@triton.jit
def group_query(q_ptr, ctx_lens_ptr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """(kv_head, seq, ctx_len, d, heads, gmask, q [GROUP_PAD, BLOCK_D]) of this program: one
    sequence's queries of one KV head's group, q contiguous [B, GROUP * kv_heads, BLOCK_D]."""
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    ctx_len = tl.load(ctx_lens_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    gmask = g < GROUP
    q = tl.load(q_ptr + (seq * GROUP * tl.num_programs(0) + heads)[:, None] * BLOCK_D + d[None, :],
                mask=gmask[:, None], other=0.0)
    return kv_head, seq, ctx_len, d, heads, gmask, q


@triton.jit
def _variant_kernel(q_ptr, kv_ptr, tables_ptr, ctx_lens_ptr, out_ptr, scale_log2e, table_stride,
                    kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    kv_head, seq, ctx_len, d, heads, gmask, q = group_query(q_ptr, ctx_lens_ptr, GROUP,
                                                            GROUP_PAD, BLOCK_D)
    if MODE == 1 or MODE == 2 or MODE == 3 or MODE == 5:
        q = q.to(tl.float16)
    if MODE == 4:
        q = q.to(tl.float8e4nv)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    raw_sum = tl.zeros([BLOCK_D], tl.int32)
    head_off = kv_head * kv_stride_h
    for start in range(0, ctx_len, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        nmask = n < ctx_len
        block = tl.load(tables_ptr + seq * table_stride + n // BLOCK_SIZE, mask=nmask,
                        other=0).to(tl.int64)
        tok = block * kv_stride_block + (n % BLOCK_SIZE) * kv_stride_tok + head_off
        kv_mask = nmask[:, None] & (d < BLOCK_D)[None, :]
        if MODE == 0:
            k = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(kv_ptr + kv_stride_kv + tok[:, None] + d[None, :], mask=kv_mask,
                        other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2e
        elif MODE == 5:
            rk = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0)
            rv = tl.load(kv_ptr + kv_stride_kv + tok[:, None] + d[None, :], mask=kv_mask, other=0)
            raw_sum += tl.sum(rk.to(tl.int32) + rv.to(tl.int32), axis=0)
            s = tl.zeros([GROUP_PAD, BLOCK_N], tl.float32)
        else:
            k8, k_scale = load_fp8_keys(kv_ptr + tok, d, nmask, BLOCK_D, BLOCK_D, True)
            v8, v_scale = load_fp8_keys(kv_ptr + kv_stride_kv + tok, d, nmask, BLOCK_D, BLOCK_D,
                                        True)
            if MODE == 4:
                s = tl.dot(q, tl.trans(k8)) * (k_scale * scale_log2e)[None, :]
            elif MODE == 2:
                k8 = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=kv_mask,
                             other=0).to(tl.float8e4nv, bitcast=True)
                v8 = tl.load(kv_ptr + kv_stride_kv + tok[:, None] + d[None, :], mask=kv_mask,
                             other=0).to(tl.float8e4nv, bitcast=True)
                s = tl.dot(q, tl.trans(k8.to(tl.float16))) * scale_log2e
            else:
                s = tl.dot(q, tl.trans(k8.to(tl.float16))) * (k_scale * scale_log2e)[None, :]
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if MODE == 0:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        elif MODE == 1:
            acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(tl.float16),
                                                v8.to(tl.float16))
        elif MODE == 2:
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v8.to(tl.float16))
        elif MODE == 3:
            acc = acc * alpha[:, None] + tl.sum(v_scale) + tl.sum(v8.to(tl.float32), axis=0)[None, :]
        elif MODE == 4:
            acc = acc * alpha[:, None] + tl.dot((p * v_scale[None, :]).to(tl.float8e4nv), v8)
        m_i = m_new
    o = acc / l_i[:, None] + raw_sum.to(tl.float32)[None, :]
    tl.store(out_ptr + (seq * GROUP * tl.num_programs(0) + heads)[:, None] * BLOCK_D + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def _layer(batch: int, ctx: int, fp8: bool):
    blocks_per_seq = -(-ctx // BS)
    kv = torch.randn(batch * blocks_per_seq, 2, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    if fp8:
        kv = rows_head_major(quantize_rows(kv))
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return kv, tables, lens


def time_variant(mode: str, batch: int, ctx: int, tile: tuple[int, int, int], bw: float) -> dict:
    fp8 = mode != "bf16"
    kv, tables, lens = _layer(batch, ctx, fp8)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    block_n, warps, stages = tile

    def call():
        _variant_kernel[(HKV, batch)](
            q, kv, tables, lens, out, D ** -0.5 * 1.4426950408889634, tables.stride(0),
            *kv.stride()[:4], GROUP=HQ // HKV, GROUP_PAD=16, BLOCK_D=D, BLOCK_SIZE=BS,
            BLOCK_N=block_n, MODE=VARIANTS.index(mode), num_warps=warps, num_stages=stages)

    row = {"variant": mode, "shape": f"{batch}x{ctx}", "tile": list(tile)}
    try:
        ms = graph_ms(call)
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is a result
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return row
    kv_bytes = batch * ctx * HKV * 2 * (D + 16 if fp8 else 2 * D)
    row.update(us=ms * 1e3, pct_copy=100 * kv_bytes / ms / 1e6 / bw,
               finite=bool(torch.isfinite(out.float()).all()))
    if mode in ("bf16", "fp8"):  # the same math as the product's kernel at one split
        from engine.attention.metadata import SeqGroup
        from engine.kernels.decode_attention import decode_attention

        group = SeqGroup(tables, lens, torch.arange(batch + 1, device="cuda", dtype=torch.int32),
                         1, ctx)
        if fp8:  # the product reads the cache format (transposed value slabs)
            kv = cache_from_rows(kv)
        ref = decode_attention(q, kv, group, D ** -0.5, torch.empty_like(q), num_splits=1)
        row["max_abs_diff_vs_product"] = float((out.float() - ref.float()).abs().max())
    del kv
    torch.cuda.empty_cache()
    return row


def main() -> None:
    bw = copy_bandwidth_gbs()
    rows = []
    for batch, ctx in ((64, 4096), (256, 1024)):
        for mode in VARIANTS:
            for tile in ((128, 4, 2), (64, 4, 3)):
                rows.append(time_variant(mode, batch, ctx, tile, bw))
                print(rows[-1], flush=True)
    print_table([r for r in rows if "us" in r], ["variant", "shape", "tile", "us", "pct_copy"])
    path = write_results("fp8_decode_variants", {"device": device_info(), "copy_gbs": bw,
                                                 "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
