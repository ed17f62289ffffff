"""The MoE router at decode sizes: cuBLAS's GEMM + the routing kernel (two launches, what
`TopKRouter` ran before) against the fused router (engine/kernels/moe_router.py, one launch),
for Qwen3-30B-A3B's router (hidden 2048, 128 experts, top-8) and Mixtral-8x7B's (4096, 8,
top-2), bf16, at T = 1, 2 and 8 tokens.

Each side is timed inside a CUDA graph (`graph_ms`: what it costs in a decode graph, Triton
kernels with PDL as the decode steps launch them), over a rotation of ROTATION_BYTES of router
weights so that every call reads its weight from HBM, as a decode step does (the layer's
router was last read a whole step earlier). Rows: the GEMM alone, GEMM + route, the fused
kernel with its default tile, and (T = 1, `--no-sweep` skips it) a few other tiles. Every
timed configuration is first checked (`check`): logits within a bf16 ulp of the fp32 product,
routed as `moe_route.route` routes them, the counters as a bincount; its largest distance to
cuBLAS's bf16 logits is recorded (`max_ulps_from_cublas`).

Run: python benchmarks/moe_router_bench.py   -> benchmarks/results/moe_router_<gpu>.json
     python benchmarks/moe_router_bench.py --dry-run   (CPU: Triton's interpreter, fp16, the
     same checks on every shape and tile, no timing, no file)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

SHAPES = {"qwen3-30b-a3b": (128, 2048, 8), "mixtral-8x7b": (8, 4096, 2)}  # E, H, top-k
TOKENS = (1, 2, 8)
ROTATION_BYTES = 128 << 20  # router weights in rotation per timing: well past the 50 MiB L2
# (block_e, block_k, split_k, num_warps, routing_rows) tried at T = 1 besides the default
# (routing_rows 16 / 128: the routing kernel's own tile, bit-identical weights, more work)
SWEEP = {"qwen3-30b-a3b": [(1, 1024, 1, 4, 0), (1, 1024, 2, 4, 0), (2, 1024, 1, 4, 0),
                           (1, 2048, 1, 8, 0), (1, 2048, 1, 4, 16), (1, 2048, 1, 8, 16)],
         "mixtral-8x7b": [(1, 1024, 4, 4, 0), (1, 256, 16, 4, 0), (2, 512, 8, 4, 0),
                          (1, 512, 8, 8, 0), (1, 512, 8, 4, 128), (1, 1024, 4, 4, 128)]}


def check(x, w, top_k: int, tile=None) -> float:
    """AssertionError unless the fused router matches the layer's old path on (x, w): logits
    within an ulp of the fp32 product, routed as `moe_route.route` routes them, counts as a
    bincount. Returns the largest distance to cuBLAS's own logits, in ulps of x's dtype."""
    import torch
    import torch.nn.functional as F

    from engine.kernels import moe_route
    from engine.kernels.moe_router import router_route_with_logits

    counts = torch.zeros(w.shape[0], dtype=torch.int64, device=x.device)
    weights, ids, logits = router_route_with_logits(x, w, top_k, True, counts, tile)
    ref = F.linear(x.float(), w.float())
    # an ulp, plus the fp32 sums' own rounding where the logit is a near-cancellation
    ulp = torch.finfo(x.dtype).eps * ref.abs() + 1e-6 * F.linear(x.float().abs(), w.float().abs())
    assert ((logits.float() - ref).abs() <= ulp).all(), f"logits off by > 1 ulp ({tile})"
    ref_weights, ref_ids = moe_route.route(logits, top_k, True)
    assert torch.equal(ids, ref_ids), f"ids differ from route's ({tile})"
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-9)
    assert torch.equal(counts.cpu(), torch.bincount(ids.flatten().cpu(), minlength=w.shape[0]))
    cublas = F.linear(x, w).float()
    return ((logits.float() - cublas).abs() / ulp.clamp_min(1e-30)).max().item()


def _tiles(name: str, num_tokens: int, sweep: bool) -> list:
    from engine.kernels.moe_router import RouterTile, default_tile

    num_experts, hidden, _ = SHAPES[name]
    tiles = [default_tile(num_tokens, num_experts, hidden)]
    if sweep and num_tokens == 1:
        tiles += [RouterTile(*t) for t in SWEEP[name] if RouterTile(*t) != tiles[0]]
    return tiles


def _inputs(name: str, num_tokens: int, dtype, device, num_weights: int = 1):
    import torch

    num_experts, hidden, _ = SHAPES[name]
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=device)
    ws = [torch.randn(num_experts, hidden, dtype=dtype, device=device) * hidden ** -0.5
          for _ in range(num_weights)]
    return x, ws


def dry_run(sweep: bool) -> None:
    import torch

    torch.manual_seed(0)
    for name, (_, _, top_k) in SHAPES.items():
        for num_tokens in TOKENS:
            x, (w,) = _inputs(name, num_tokens, torch.float16, "cpu")
            for tile in _tiles(name, num_tokens, sweep):
                ulps = check(x, w, top_k, tile)
                print(f"{name:14s} T={num_tokens} {tile}: checked, at most {ulps:.2f} ulp "
                      f"from F.linear's logits", flush=True)


def bench(sweep: bool) -> None:
    import torch
    import torch.nn.functional as F

    from benchmarks.gpu_common import device_info, graph_ms, print_table, write_results
    from engine.kernels import moe_route

    torch.manual_seed(0)
    rows = []
    for name, (num_experts, hidden, top_k) in SHAPES.items():
        weight_bytes = num_experts * hidden * 2
        num_weights = min(2048, max(20, ROTATION_BYTES // weight_bytes))
        for num_tokens in TOKENS:
            x, ws = _inputs(name, num_tokens, torch.bfloat16, "cuda", num_weights)
            counts = torch.zeros(num_experts, dtype=torch.int64, device="cuda")

            def per_call_us(fn) -> float:
                return graph_ms(lambda: [fn(w) for w in ws], reps=1) / len(ws) * 1e3

            base = {"model": name, "tokens": num_tokens, "weight_bytes": weight_bytes,
                    "rotated_weights": num_weights}
            linear_us = per_call_us(lambda w: F.linear(x, w))
            unfused_us = per_call_us(
                lambda w: moe_route.route(F.linear(x, w), top_k, True, counts))
            for i, tile in enumerate(_tiles(name, num_tokens, sweep)):
                ulps_from_cublas = check(x, ws[0], top_k, tile)
                fused_us = per_call_us(lambda w: router_route_tile(x, w, top_k, counts, tile))
                rows.append({**base, "tile": "default" if i == 0 else "sweep",
                             "block_e,block_k,split_k,warps,rows": (
                                 tile.block_e, tile.block_k, tile.split_k, tile.num_warps,
                                 tile.routing_rows),
                             "cublas_linear_us": linear_us, "linear+route_us": unfused_us,
                             "fused_us": fused_us, "saved_us": unfused_us - fused_us,
                             "speedup": unfused_us / fused_us,
                             "fused_GB/s": weight_bytes / fused_us / 1e3,
                             "max_ulps_from_cublas": ulps_from_cublas})
                print_table(rows[-1:], list(rows[-1]))
            del ws
    payload = {"device": device_info(), "pdl": os.environ.get("PDSERVE_PDL", "1"),
               "rotation_bytes": ROTATION_BYTES, "rows": rows}
    path = write_results("moe_router", payload)
    print()
    print_table(rows, ["model", "tokens", "tile", "block_e,block_k,split_k,warps,rows",
                       "cublas_linear_us", "linear+route_us", "fused_us", "speedup",
                       "fused_GB/s"])
    print(f"wrote {path}")


def router_route_tile(x, w, top_k, counts, tile):
    from engine.kernels.moe_router import router_route_with_logits

    return router_route_with_logits(x, w, top_k, True, counts, tile)[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU only: check every shape and tile in Triton's interpreter")
    parser.add_argument("--no-sweep", action="store_true", help="default tiles only")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        dry_run(not args.no_sweep)
    else:
        bench(not args.no_sweep)


if __name__ == "__main__":
    main()
