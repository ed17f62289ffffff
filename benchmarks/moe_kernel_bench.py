"""The fused MoE kernel alone (engine/kernels/fused_moe.py) against a per-expert loop of cuBLAS
GEMMs over the same expert-sorted slices, at decode and prefill token counts, for the
Qwen3-30B-A3B MoE shape (H 2048, I 768, 128 experts, top-8) and Mixtral-8x7B's (H 4096,
I 14336, 8 experts, top-2), bf16, random softmax top-k routing.

Both sides are timed inside CUDA graphs (`graph_ms`: what the call costs in a decode graph, no
Python launch overhead; the loop's slice bounds are computed on the host beforehand, which the
real reference cannot do in a graph). Reported: time, TFLOP/s (2 * pairs * 3 * H * I), and GB/s
of the expert weights actually touched (distinct experts routed to, 3 * H * I * 2 bytes each,
plus activations) against the copy bandwidth measured in the same run and the HBM spec
(H200 4.8 TB/s, H100 SXM 3.35 TB/s).

At decode sizes (pairs T * k <= fused_moe.GEMV_MAX_PAIRS) each row also times both experts
paths forced (`gemv_ms`: engine/kernels/moe_gemv.py's two launches; `grouped_ms`: alignment,
grouped GEMMs, combine), their ratio and each one's share of the copy bandwidth over the touched
experts' bytes; `fused_ms` is whichever `fused_experts` picks by default.

--sweep: for each shape and token bucket, time candidate tiles for each GEMM alone and write the
best into engine/kernels/fused_moe_configs.json (which `fused_experts` then loads).
--gemv-sweep: the same for the GEMV path's two kernels at decode buckets, into
engine/kernels/moe_gemv_configs.json (benchmarks/moe_gemv_bench.py's sweep, which also times
each launch alone).
Run: python benchmarks/moe_kernel_bench.py [--sweep] [--gemv-sweep]
     -> benchmarks/results/moe_kernel_<gpu>.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   print_table, write_results)
from engine.kernels import fused_moe, moe_gemv, moe_tile_configs  # noqa: E402
from engine.kernels.moe_align import align_by_expert  # noqa: E402
from engine.kernels.moe_tile_configs import GemmTile, MoETileConfig, shape_key  # noqa: E402
from engine.layers.moe import select_experts  # noqa: E402

DT = torch.bfloat16
HBM_SPEC_GBS = {"H200": 4800.0, "H100": 3350.0}  # HBM spec by GPU (the roofline's spec figure)
SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2)}
TOKENS = (1, 8, 64, 256, 1024, 4096)


def _problem(shape, num_tokens: int):
    num_experts, hidden, inter, top_k = shape
    gen = torch.Generator(device="cuda").manual_seed(num_tokens)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=DT, generator=gen)
    w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=DT, generator=gen)
    w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5)
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=DT, generator=gen)
    logits = torch.randn(num_tokens, num_experts, device="cuda", generator=gen)
    weights, ids = select_experts(logits, top_k, renormalize=True)
    return x, w13, w2, weights, ids


def cublas_loop(x, w13, w2, weights, ids):
    """A callable: per-expert F.linear over the expert-sorted slices (bounds from the host)."""
    top_k = ids.shape[1]
    order = torch.argsort(ids.reshape(-1), stable=True)
    token_ids = order // top_k
    counts = torch.bincount(ids.reshape(-1), minlength=w13.shape[0]).tolist()
    bounds, start = [], 0
    for expert, count in enumerate(counts):
        if count:
            bounds.append((expert, start, start + count))
        start += count
    sorted_weights = weights.reshape(-1)[order, None]

    def run():
        xs = x[token_ids]
        outs = torch.empty(order.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
        for expert, lo, hi in bounds:
            gate, up = F.linear(xs[lo:hi], w13[expert]).chunk(2, dim=-1)
            outs[lo:hi] = F.linear(F.silu(gate) * up, w2[expert])
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token_ids, outs.float() * sorted_weights).to(x.dtype)

    return run


def touched_bytes(x, w13, ids) -> int:
    num_experts, two_i, hidden = w13.shape
    distinct = int(torch.unique(ids).numel())
    return distinct * 3 * hidden * (two_i // 2) * 2 + 2 * x.numel() * x.element_size()


def spec_gbs(gpu: str) -> float | None:
    return next((v for k, v in HBM_SPEC_GBS.items() if k in gpu), None)


def bench_shape(name: str, shape, bw: float, spec: float | None) -> list[dict]:
    rows = []
    num_experts, hidden, inter, top_k = shape
    for num_tokens in TOKENS:
        x, w13, w2, weights, ids = _problem(shape, num_tokens)
        ours = graph_ms(lambda: fused_moe.fused_experts(x, w13, w2, weights, ids), reps=10)
        loop = graph_ms(cublas_loop(x, w13, w2, weights, ids), reps=3)
        num_bytes = touched_bytes(x, w13, ids)
        flops = 2 * num_tokens * top_k * 3 * hidden * inter
        rows.append({"shape": name, "tokens": num_tokens, "fused_ms": ours, "cublas_loop_ms": loop,
                     "speedup": loop / ours, "distinct_experts": int(torch.unique(ids).numel()),
                     "touched_MB": num_bytes / 1e6, "fused_TFLOP/s": flops / ours / 1e9,
                     "loop_TFLOP/s": flops / loop / 1e9, "fused_GB/s": num_bytes / ours / 1e6,
                     "%copy_bw": 100 * num_bytes / ours / 1e6 / bw,
                     "%spec_bw": 100 * num_bytes / ours / 1e6 / spec if spec else None})
        if ids.numel() <= fused_moe.GEMV_MAX_PAIRS:
            rows[-1].update(_both_paths(x, w13, w2, weights, ids, num_bytes, loop, bw, spec))
        print(rows[-1], flush=True)
        del x, w13, w2
        torch.cuda.empty_cache()
    return rows


def _both_paths(x, w13, w2, weights, ids, num_bytes, loop_ms, bw, spec) -> dict:
    """The GEMV and grouped experts paths, each forced, at a decode size."""
    ms = {name: graph_ms(lambda: fused_moe.fused_experts(x, w13, w2, weights, ids,
                                                         use_gemv=use_gemv), reps=10)
          for name, use_gemv in (("gemv", True), ("grouped", False))}
    row = {"gemv_ms": ms["gemv"], "grouped_ms": ms["grouped"],
           "grouped/gemv": ms["grouped"] / ms["gemv"], "loop/gemv": loop_ms / ms["gemv"]}
    for name, t in ms.items():
        row[f"{name}_%copy_bw"] = 100 * num_bytes / t / 1e6 / bw
        row[f"{name}_%spec_bw"] = 100 * num_bytes / t / 1e6 / spec if spec else None
    return row


# --- tile sweep ---------------------------------------------------------------------------

def _block_m_candidates(num_tokens: int, num_experts: int, top_k: int) -> tuple[int, ...]:
    rows_per_expert = num_tokens * top_k / num_experts
    if rows_per_expert <= 8:
        return (16,)
    if rows_per_expert <= 64:
        return (16, 64)
    return (64, 128)


def _tile_candidates(block_m: int):
    """Decode-sized blocks: narrow N, wide K strips (weight streaming); prefill: larger tiles."""
    if block_m <= 32:
        space = itertools.product((32, 64, 128), (128, 256), (4,), (3, 4))
    else:
        space = itertools.product((64, 128), (64, 128), (4, 8), (3,))
    for bn, bk, warps, stages in space:
        if (block_m * bk + 2 * bk * bn) * 2 * stages > 200 << 10:
            continue  # the gate/up pipeline's shared memory (two weight tiles per stage)
        yield GemmTile(bn, bk, 8, warps, stages)


def _time_gemm(x, w, out, blocks, weights, top_k, tile, gate_up) -> float:
    def call():
        fused_moe._grouped_gemm(x, w, out, blocks, weights, top_k, tile, gate_up)
    try:
        return graph_ms(call, reps=10)
    except Exception as exc:  # a tile that does not compile or fit: skip it
        print(f"  tile {tile} failed: {type(exc).__name__}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def sweep_shape(shape, deadline: float) -> dict[str, dict]:
    """Best tiles per token bucket; buckets left when `deadline` (monotonic) passes are not
    swept (lookups fall back to the nearest swept bucket)."""
    num_experts, hidden, inter, top_k = shape
    best_by_tokens = {}
    for num_tokens in TOKENS:
        if time.monotonic() > deadline:
            print(f"sweep {shape}: out of time before T={num_tokens}", flush=True)
            break
        x, w13, w2, weights, ids = _problem(shape, num_tokens)
        best = None
        for block_m in _block_m_candidates(num_tokens, num_experts, top_k):
            blocks = align_by_expert(ids, num_experts, block_m)
            inter_buf = torch.empty(blocks.sorted_pair_ids.numel(), inter, dtype=DT, device="cuda")
            slots = torch.empty(ids.numel(), hidden, dtype=DT, device="cuda")
            up = min(((_time_gemm(x, w13, inter_buf, blocks, weights, top_k, t, True), t)
                      for t in _tile_candidates(block_m)), key=lambda p: p[0])
            down = min(((_time_gemm(inter_buf, w2, slots, blocks, weights, top_k, t, False), t)
                        for t in _tile_candidates(block_m)), key=lambda p: p[0])
            total = up[0] + down[0]
            if best is None or total < best[0]:
                best = (total, MoETileConfig(block_m, up[1], down[1]))
        print(f"sweep {shape} T={num_tokens}: {best[0] * 1e3:.1f} us {best[1]}", flush=True)
        best_by_tokens[str(num_tokens)] = {**best[1].to_json(), "gemm_us": best[0] * 1e3}
        del x, w13, w2
        torch.cuda.empty_cache()
    return best_by_tokens


def write_configs(configs: dict[str, dict], gpu: str, gemv: bool = False) -> None:
    """Merge swept shapes into the grouped GEMMs' JSON, or with `gemv` the GEMV path's."""
    path = moe_gemv.CONFIG_PATH if gemv else moe_tile_configs.CONFIG_PATH
    raw = json.loads(path.read_text()) if path.exists() else {}
    for key, buckets in configs.items():  # buckets not swept this time keep their tiles
        raw.setdefault("configs", {}).setdefault(key, {}).update(buckets)
    raw["note"] = (f"benchmarks/moe_gemv_bench.py --sweep on {gpu}: best tile per kernel by "
                   "CUDA-graph time over a ring of routings; gemv_us is both launches" if gemv else
                   f"benchmarks/moe_kernel_bench.py --sweep on {gpu}: best tile per GEMM by "
                   "CUDA-graph time; gemm_us is gate/up + down without alignment and combine")
    path.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    (moe_gemv if gemv else moe_tile_configs).clear_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="sweep tiles, write the JSON first")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep-budget-s", type=float, default=600.0,
                        help="seconds of sweeping per shape")
    parser.add_argument("--gemv-sweep", action="store_true",
                        help="sweep the GEMV path's tiles at decode sizes, write its JSON first")
    parser.add_argument("--gemv-sweep-budget-s", type=float, default=240.0,
                        help="seconds of GEMV sweeping per shape")
    args = parser.parse_args()
    names = args.shapes.split(",")
    info = device_info()
    if args.sweep:  # written shape by shape: a sweep cut short keeps what it found
        for name in names:
            num_experts, hidden, inter, top_k = SHAPES[name]
            key = shape_key(num_experts, hidden, inter, top_k, DT)
            deadline = time.monotonic() + args.sweep_budget_s
            write_configs({key: sweep_shape(SHAPES[name], deadline)}, info["gpu"])
    if args.gemv_sweep:
        from benchmarks.moe_gemv_bench import sweep_gemv_shape  # it imports this module

        for name in names:
            num_experts, hidden, inter, top_k = SHAPES[name]
            key = shape_key(num_experts, hidden, inter, top_k, DT)
            deadline = time.monotonic() + args.gemv_sweep_budget_s
            write_configs({key: sweep_gemv_shape(SHAPES[name], deadline)}, info["gpu"], True)
    bw = copy_bandwidth_gbs()
    spec = spec_gbs(info["gpu"])
    rows = [row for name in names for row in bench_shape(name, SHAPES[name], bw, spec)]
    payload = {"device": info, "copy_bandwidth_gbs": bw, "hbm_spec_gbs": spec,
               "dtype": "bfloat16", "timing": "CUDA graph replay (graph_ms), both sides",
               "configs": "swept" if args.sweep else "engine/kernels/fused_moe_configs.json",
               "gemv_configs": ("swept" if args.gemv_sweep
                                else "engine/kernels/moe_gemv_configs.json (or defaults)"),
               "gemv_max_pairs": fused_moe.GEMV_MAX_PAIRS,
               "rows": rows}
    path = write_results("moe_kernel", payload)
    print_table(rows, ["shape", "tokens", "fused_ms", "cublas_loop_ms", "speedup",
                       "distinct_experts", "fused_TFLOP/s", "fused_GB/s", "%copy_bw"])
    decode = [row for row in rows if "gemv_ms" in row]
    if decode:
        print_table(decode, ["shape", "tokens", "gemv_ms", "grouped_ms", "cublas_loop_ms",
                             "grouped/gemv", "loop/gemv", "gemv_%copy_bw", "grouped_%copy_bw",
                             "gemv_%spec_bw"])
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {path}")


if __name__ == "__main__":
    main()
