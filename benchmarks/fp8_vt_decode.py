"""fp8 decode attention over the transposed value slabs, against the format before, same run.

Why: over fp8 rows for keys and values alike, decode attention ran at 0.76x of bf16's time for
0.56x the bytes (H100, RESULTS.md eleventh round). Compiled for sm_90 (Triton's own ptxas, no
GPU needed), that loop was 1,100 instructions per 128-key tile at 211 registers, against
bf16's 446 per 64-key tile (the same bytes) at 114: the values' tile was [keys, head_dim] with
head_dim contiguous while the P @ V product wants each thread's operand pairs along the keys,
so the 8-bit tile was read from shared memory one byte at a time (128 LDS.U8 per thread per
tile; ldmatrix cannot transpose 8-bit data on sm_90). The cache now stores each (block, head)'s
values transposed (engine/kv_cache/fp8.py) and the kernel reads full tiles without masks
(the last, partial tile masked): 692 instructions at 180 registers, every load 16 bytes wide.

This times, on one Llama-3-8B layer (32 / 8 heads, head_dim 128, block 16, shuffled blocks, one
sequence with a partial last tile), every row at one split per sequence:
  bf16 product                  : engine/kernels/decode_attention.py over a bf16 cache
  fp8 product                   : the same over the fp8 cache, at several tiles
  fp8 rows, split-free (before) : fp8_decode_variants.py's copy of the loop before, over the
                                  format before (values as rows), 81-83% of copy on an H100
  fp8 split-free (this file)    : the same loop over the slabs, several tiles and register caps
and checks the last against the product's output.
Run: python benchmarks/fp8_vt_decode.py -> results/fp8_vt_decode_<gpu>.json
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
from benchmarks.fp8_decode_variants import group_query, rows_head_major  # noqa: E402
from engine.kernels.decode_attention import _decode_tile  # noqa: E402
from engine.kv_cache.fp8 import cache_from_rows, quantize_rows  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16


@triton.jit
def _vt_kernel(q_ptr, kv_ptr, tables_ptr, ctx_lens_ptr, out_ptr, scale_log2e, table_stride,
               kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The product's fp8 tile (`_decode_tile`) in the split-free loop of fp8_decode_variants.py:
    full tiles unmasked, then the partial one."""
    kv_head, seq, ctx_len, d, heads, gmask, q = group_query(q_ptr, ctx_lens_ptr, GROUP,
                                                            GROUP_PAD, BLOCK_D)
    q = q.to(tl.float16)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = tables_ptr + seq * table_stride
    head_off = kv_head * kv_stride_h
    num_full = ctx_len // BLOCK_N
    for tile in range(0, num_full):
        m_i, l_i, acc = _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, tile, ctx_len, d,
                                     head_off, scale_log2e, kv_stride_block, kv_stride_kv,
                                     kv_stride_tok, BLOCK_D, BLOCK_SIZE, BLOCK_N, BLOCK_D, "tf32",
                                     True, BLOCK_SIZE, False)
    if num_full * BLOCK_N < ctx_len:
        m_i, l_i, acc = _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, num_full, ctx_len, d,
                                     head_off, scale_log2e, kv_stride_block, kv_stride_kv,
                                     kv_stride_tok, BLOCK_D, BLOCK_SIZE, BLOCK_N, BLOCK_D, "tf32",
                                     True, BLOCK_SIZE, True)
    o = acc / l_i[:, None]
    tl.store(out_ptr + (seq * GROUP * tl.num_programs(0) + heads)[:, None] * BLOCK_D + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=gmask[:, None])


def run_vt(q, kv, tables, lens, out, tile):
    """tile: (BLOCK_N, num_warps, num_stages, maxnreg or None)."""
    block_n, warps, stages, maxnreg = tile
    regs = {"maxnreg": maxnreg} if maxnreg else {}
    _vt_kernel[(HKV, q.shape[0])](
        q, kv, tables, lens, out, D ** -0.5 * 1.4426950408889634, tables.stride(0),
        *kv.stride()[:4], GROUP=HQ // HKV, GROUP_PAD=16, BLOCK_D=D, BLOCK_SIZE=BS,
        BLOCK_N=block_n, num_warps=warps, num_stages=stages, **regs)
    return out


def _case(batch: int, ctx: int):
    blocks_per_seq = -(-ctx // BS)
    kv = torch.randn(batch * blocks_per_seq, 2, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1).to(torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    lens[0] = ctx - 37  # a partial last tile on one sequence: the masked path runs too
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    return kv, tables, lens, q


def _row(name, batch, ctx, tile, ms, bw, fp8=True):
    per_tok = HKV * 2 * ((D + 16) if fp8 else 2 * D)
    return {"variant": name, "shape": f"{batch}x{ctx}", "tile": tile, "us": ms * 1e3,
            "pct_copy": 100 * batch * ctx * per_tok / ms / 1e6 / bw}


def time_case(batch: int, ctx: int, bw: float, tiles, product_tiles) -> list[dict]:
    """bf16 and fp8 through the product (engine/kernels/decode_attention.py, one split), the
    old format's split-free loop (fp8_decode_variants.py, values as rows) and this file's."""
    from benchmarks.fp8_decode_variants import _variant_kernel
    from engine.attention.metadata import SeqGroup
    from engine.kernels.decode_attention import decode_attention

    kv, tables, lens, q = _case(batch, ctx)
    group = SeqGroup(tables, lens, torch.arange(batch + 1, device="cuda", dtype=torch.int32),
                     1, ctx)
    rows_fp8 = quantize_rows(kv)
    cache = cache_from_rows(rows_fp8)
    old_format = rows_head_major(rows_fp8)
    del rows_fp8
    out = torch.empty_like(q)
    rows = [_row("bf16 product", batch, ctx, "default", graph_ms(
        lambda: decode_attention(q, kv, group, D ** -0.5, out, num_splits=1)), bw, fp8=False)]
    del kv
    torch.cuda.empty_cache()
    ref = torch.empty_like(q)
    for tile in product_tiles:
        ms = graph_ms(lambda: decode_attention(q, cache, group, D ** -0.5, out, num_splits=1,
                                               tile=tile))
        rows.append(_row("fp8 product", batch, ctx, list(tile) if tile else "default", ms, bw))
        if tile is None:
            ref.copy_(out)
    old = lambda: _variant_kernel[(HKV, batch)](  # noqa: E731
        q, old_format, tables, lens, out, D ** -0.5 * 1.4426950408889634, tables.stride(0),
        *old_format.stride()[:4], GROUP=HQ // HKV, GROUP_PAD=16, BLOCK_D=D, BLOCK_SIZE=BS,
        BLOCK_N=128, MODE=1, num_warps=4, num_stages=2)
    rows.append(_row("fp8 rows, split-free (before)", batch, ctx, [128, 4, 2], graph_ms(old), bw))
    for tile in tiles:
        row = {"variant": "fp8 split-free (this file)", "shape": f"{batch}x{ctx}",
               "tile": list(tile)}
        try:
            ms = graph_ms(lambda: run_vt(q, cache, tables, lens, out, tile))
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is a result
            row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            rows.append(row)
            continue
        row.update(_row(row["variant"], batch, ctx, row["tile"], ms, bw))
        row["max_abs_diff_vs_product"] = float((out.float() - ref.float()).abs().max())
        rows.append(row)
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    bw = copy_bandwidth_gbs()
    # maxnreg: 168 registers let three 4-warp programs share an SM, 128 four (no spills at
    # either, checked with ptxas for sm_90); unbounded the 128-key tile takes 180
    tiles = ((128, 4, 2, None), (128, 4, 2, 168), (64, 4, 2, None), (64, 4, 2, 128),
             (128, 8, 2, None))
    product_tiles = (None, (64, 4, 2), (64, 4, 3), (128, 4, 3), (128, 8, 2), (256, 8, 2))
    rows = []
    for batch, ctx in ((64, 4096), (256, 1024)):
        rows += time_case(batch, ctx, bw, tiles, product_tiles)
        torch.cuda.empty_cache()
    print_table([r for r in rows if "us" in r], ["variant", "shape", "tile", "us", "pct_copy"])
    path = write_results("fp8_vt_decode", {"device": device_info(), "copy_gbs": bw,
                                           "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
