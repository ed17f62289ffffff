"""Decode attention tiles over a bf16 and an fp8 KV cache, one GPU, same run.

Why: the fp8 cache reads 0.56x the bytes of a bf16 one, yet the decode step over it ran at
1.06-1.09x bf16's time on an H100 (RESULTS.md). The kernel uses one tile (BLOCK_N 64, 4 warps,
3 stages) for both formats, so an fp8 tile carries half the bytes in flight per program; this
times (BLOCK_N, num_warps, num_stages) candidates per format and shape, one Llama-3-8B layer
(32 query / 8 KV heads, head_dim 128, block size 16, shuffled blocks), timed inside CUDA graphs
(as the decode step replays it), and reports GB/s of KV read against the copy bandwidth.
Outputs of every candidate are checked against the default tile's (same bits are not expected:
the tile changes the summation order; max abs difference is reported).
Run: python benchmarks/decode_attention_sweep.py -> results/decode_attention_sweep_<gpu>.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   print_table, write_results)
from engine.attention.metadata import SeqGroup  # noqa: E402
from engine.kernels.decode_attention import decode_attention, default_tile  # noqa: E402
from engine.kv_cache.fp8 import cache_from_rows, quantize_rows  # noqa: E402

HQ, HKV, D, BS = 32, 8, 128, 16
SHAPES = ((64, 4096), (256, 1024), (1, 4096), (8, 8192))
CANDIDATES = tuple(itertools.product((32, 64, 128, 256), (4, 8), (2, 3, 4)))


def _layer(batch: int, ctx: int, fp8: bool) -> tuple[torch.Tensor, SeqGroup]:
    """One layer's cache [blocks, 2, BS, HKV, D] (fp8: in the cache format, head-major memory
    with transposed value slabs, engine/kv_cache/fp8.py)."""
    blocks_per_seq = -(-ctx // BS)
    kv = torch.randn(batch * blocks_per_seq, 2, BS, HKV, D, device="cuda", dtype=torch.bfloat16)
    if fp8:
        kv = cache_from_rows(quantize_rows(kv))
    tables = torch.randperm(batch * blocks_per_seq, device="cuda").view(batch, -1)
    qs = torch.arange(batch + 1, device="cuda", dtype=torch.int32)
    lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    return kv, SeqGroup(tables.to(torch.int32), lens, qs, 1, ctx)


def sweep_shape(batch: int, ctx: int, fp8: bool, bw: float, budget_end: float,
                candidates=CANDIDATES) -> list[dict]:
    kv, group = _layer(batch, ctx, fp8)
    name = "fp8" if fp8 else "bf16"
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
    ref = torch.empty_like(q)
    decode_attention(q, kv, group, D ** -0.5, ref)
    kv_bytes = batch * ctx * HKV * 2 * (D + 16 if fp8 else 2 * D)
    default = default_tile(q.dtype, fp8)
    rows = []
    for tile in candidates:
        if time.monotonic() > budget_end:
            break
        out = torch.empty_like(q)
        try:
            ms = graph_ms(lambda: decode_attention(q, kv, group, D ** -0.5, out, tile=tile))
        except Exception as e:  # noqa: BLE001 - an unfit tile (shared memory) is a result
            rows.append({"kv": name, "shape": f"{batch}x{ctx}",
                         "tile": list(tile), "error": type(e).__name__})
            continue
        rows.append({"kv": name, "shape": f"{batch}x{ctx}",
                     "tile": list(tile), "default": tile == default, "us": ms * 1e3,
                     "GB/s": kv_bytes / ms / 1e6, "%copy": 100 * kv_bytes / ms / 1e6 / bw,
                     "max_abs_diff": float((out.float() - ref.float()).abs().max())})
    del kv
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-s", type=float, default=240.0)
    args = parser.parse_args()
    budget_end = time.monotonic() + args.budget_s
    bw = copy_bandwidth_gbs()
    rows, best = [], []
    for (batch, ctx), fp8 in itertools.product(SHAPES, (False, True)):
        got = [r for r in sweep_shape(batch, ctx, fp8, bw, budget_end) if "us" in r]
        rows += got
        if got:
            default = next((r for r in got if r["default"]), None)
            top = min(got, key=lambda r: r["us"])
            best.append({"kv": top["kv"], "shape": top["shape"], "best_tile": top["tile"],
                         "best_us": top["us"], "best_%copy": top["%copy"],
                         "default_us": default and default["us"],
                         "default_%copy": default and default["%copy"],
                         "speedup": default and default["us"] / top["us"]})
    print_table(best, ["kv", "shape", "best_tile", "best_us", "best_%copy", "default_us",
                       "default_%copy", "speedup"])
    path = write_results("decode_attention_sweep", {
        "device": device_info(), "copy_gbs": bw, "best": best, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
