"""The decode experts path (engine/kernels/moe_gemv.py) alone: its tile sweep, which writes
engine/kernels/moe_gemv_configs.json, and each launch's time at decode batch sizes.

Timing: CUDA-graph replay (`graph_ms`: what a call costs inside a decode graph) over a ring of
routings that pick disjoint experts where the expert count allows (at one token of Qwen3's
top-8 over 128 experts, 16 calls touch 16 x 8 different experts). Repeating one routing would
serve the down launch's 25 MB from the H100's 50 MB L2 after the first call, which a model,
whose every layer has its own experts, never sees.

--sweep: per token bucket, gate/up tiles first (down at the default), then down tiles, unsplit
and split over slot groups (`slots_per_program` 1, 2, 4 below k); the best of each is merged
into the JSON. --down-only keeps each bucket's gate/up tile as looked up now (a sweep of the
down launch alone, ~1/3 of the compilations). `previous_us` is the bucket's tiles before the
sweep, `default_us` `DEFAULT_CONFIG`'s; both launches, same ring.
Then, per token count: gate/up, down (as looked up, and the same tile unsplit), and both
launches, each in us, GB/s of the touched experts' weights and % of the copy bandwidth; with
--sweep also before it (`rows_before_sweep`: the tiles it replaces).
Run: python benchmarks/moe_gemv_bench.py [--sweep [--down-only]] [--tokens 1,2,4,8]
     -> benchmarks/results/moe_gemv_<gpu>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   print_table, write_results)
from benchmarks.moe_kernel_bench import DT, SHAPES, write_configs  # noqa: E402
from engine.kernels import fused_moe, moe_gemv  # noqa: E402
from engine.kernels.moe_gemv import GemvTile, MoEGemvConfig  # noqa: E402
from engine.kernels.moe_tile_configs import shape_key  # noqa: E402
from engine.layers.moe import select_experts  # noqa: E402

GEMV_TOKENS = (1, 2, 4, 8, 16, 32)  # decode buckets (those within the threshold are swept)
RING = 16  # routings a timed graph cycles through
SPLIT_SLOTS = (1, 2, 4)  # slots_per_program tried below k
DEVICE = "cuda"  # (a CPU check of the script under TRITON_INTERPRET=1 sets "cpu")


@dataclasses.dataclass
class Problem:
    """One shape's weights and a ring of routings for `num_tokens` tokens."""

    x: torch.Tensor
    w13: torch.Tensor
    w2: torch.Tensor
    routings: list[tuple[torch.Tensor, torch.Tensor]]  # (weights, contiguous ids)

    @property
    def inter(self) -> int:
        return self.w2.shape[2]

    def touched_bytes(self) -> tuple[float, float]:
        """Mean bytes of (gate/up, down) expert weights one call reads."""
        hidden, inter = self.w2.shape[1], self.w2.shape[2]
        distinct = sum(int(ids.unique().numel()) for _, ids in self.routings) / RING
        return distinct * 2 * inter * hidden * 2, distinct * hidden * inter * 2


def make_problem(shape, num_tokens: int) -> Problem:
    """Random bf16 experts; routing r favours the r-th block of min(E, T * k) experts of a
    permutation (disjoint blocks while they last), softmax top-k within it."""
    num_experts, hidden, inter, top_k = shape
    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    w13 = torch.randn(num_experts, 2 * inter, hidden, device=DEVICE, dtype=DT, generator=gen)
    w2 = torch.randn(num_experts, hidden, inter, device=DEVICE, dtype=DT, generator=gen)
    w13.mul_(hidden**-0.5), w2.mul_(inter**-0.5)
    x = torch.randn(num_tokens, hidden, device=DEVICE, dtype=DT, generator=gen)
    perm = torch.randperm(num_experts, device=DEVICE, generator=gen)
    block = min(num_experts, num_tokens * top_k)
    routings = []
    for r in range(RING):
        logits = torch.randn(num_tokens, num_experts, device=DEVICE, generator=gen)
        favoured = perm[(torch.arange(block, device=DEVICE) + r * block) % num_experts]
        logits[:, favoured] += 100.0
        weights, ids = select_experts(logits, top_k, renormalize=True)
        routings.append((weights, ids.contiguous()))
    return Problem(x, w13, w2, routings)


def ring_us(p: Problem, call) -> float:
    """us per call of `call(weights, ids)`, the ring's routings in turn inside one graph."""
    return graph_ms(lambda: [call(w, i) for w, i in p.routings], reps=1) * 1e3 / RING


def time_config(p: Problem, config: MoEGemvConfig) -> float:
    """Both launches, us per call; inf for a tile that does not compile."""
    try:
        return ring_us(p, lambda w, i: moe_gemv.moe_gemv_experts(p.x, p.w13, p.w2, w, i,
                                                                 config=config))
    except Exception as exc:  # a tile that does not compile: skip it
        print(f"  gemv tiles {config} failed: {type(exc).__name__}", flush=True)
        torch.cuda.synchronize()
        return float("inf")


def gemv_candidates(num_accumulators: int):
    """Tiles whose fp32 partial sums take 8..64 registers a thread (gate/up keeps two sums)."""
    for bn, bk, warps in itertools.product((2, 4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
        if 8 <= num_accumulators * bn * bk // (32 * warps) <= 64:
            yield GemvTile(bn, bk, warps)


def down_candidates(top_k: int):
    """The unsplit tiles, then each again split `s` slots a program for s in SPLIT_SLOTS < k
    (a split compiles once per tile: s is a runtime argument)."""
    yield from gemv_candidates(1)
    for slots in (s for s in SPLIT_SLOTS if s < top_k):
        for tile in gemv_candidates(1):
            yield dataclasses.replace(tile, slots_per_program=slots)


def best_of(p: Problem, configs, deadline: float) -> tuple[float, MoEGemvConfig]:
    """The fastest config; candidates left when `deadline` (monotonic) passes are skipped."""
    best = (float("inf"), None)
    for config in configs:
        if time.monotonic() > deadline:
            print("  out of time: remaining candidates skipped", flush=True)
            break
        best = min(best, (time_config(p, config), config), key=lambda pair: pair[0])
    return best


def sweep_gemv_shape(shape, deadline: float, tokens=GEMV_TOKENS,
                     down_only: bool = False) -> dict[str, dict]:
    """Best GEMV tiles per decode bucket: gate/up first (down at its default), then down."""
    num_experts, hidden, inter, top_k = shape
    best_by_tokens = {}
    for num_tokens in (t for t in tokens if t * top_k <= fused_moe.GEMV_MAX_PAIRS):
        if time.monotonic() > deadline:
            print(f"gemv sweep {shape}: out of time before T={num_tokens}", flush=True)
            break
        p = make_problem(shape, num_tokens)
        default, previous = moe_gemv.DEFAULT_CONFIG, moe_gemv.get_config(
            num_tokens, num_experts, hidden, inter, top_k, DT)
        default_us, previous_us = time_config(p, default), time_config(p, previous)
        up = previous.gate_up if down_only else best_of(
            p, (MoEGemvConfig(t, default.down) for t in gemv_candidates(2)), deadline)[1]
        best_us, best = best_of(p, (MoEGemvConfig(up, t) for t in down_candidates(top_k)),
                                deadline)
        if previous_us <= best_us:  # noise must not replace the tiles with slower ones
            best_us, best = previous_us, previous
        print(f"gemv sweep {shape} T={num_tokens}: {best_us:.1f} us (before {previous_us:.1f}, "
              f"default {default_us:.1f}) {best}", flush=True)
        best_by_tokens[str(num_tokens)] = {**best.to_json(), "gemv_us": best_us,
                                           "previous_us": previous_us, "default_us": default_us}
        del p
        torch.cuda.empty_cache()
    return best_by_tokens


def time_launches(name: str, shape, num_tokens: int, bw: float) -> dict:
    """Each launch alone with the tiles looked up now, and the down tile unsplit."""
    num_experts, hidden, inter, top_k = shape
    p = make_problem(shape, num_tokens)
    config = moe_gemv.get_config(num_tokens, num_experts, hidden, inter, top_k, DT)
    hs = {id(ids): torch.zeros(ids.numel(), inter, dtype=DT, device=DEVICE)
          for _, ids in p.routings}
    out = torch.empty(num_tokens, hidden, dtype=DT, device=DEVICE)
    unsplit = dataclasses.replace(config.down, slots_per_program=0)

    def gate_up(w, i):
        moe_gemv.launch_gate_up(p.x, p.w13, i, hs[id(i)], config.gate_up)

    def down(tile):
        return lambda w, i: moe_gemv.launch_down(hs[id(i)], p.w2, i, w, out, tile)

    us = {"gate_up_us": ring_us(p, gate_up), "down_us": ring_us(p, down(config.down)),
          "down_unsplit_us": ring_us(p, down(unsplit)), "both_us": time_config(p, config)}
    up_bytes, down_bytes = p.touched_bytes()
    row = {"shape": name, "tokens": num_tokens, **us, "config": config.to_json()}
    for key, num_bytes in (("gate_up", up_bytes), ("down", down_bytes),
                           ("down_unsplit", down_bytes), ("both", up_bytes + down_bytes)):
        row[f"{key}_GB/s"] = num_bytes / us[f"{key}_us"] / 1e3
        row[f"{key}_%copy_bw"] = 100 * row[f"{key}_GB/s"] / bw
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="qwen3-30b-a3b")
    parser.add_argument("--tokens", default="1,2,4,8", help="token counts (buckets) to sweep/time")
    parser.add_argument("--sweep", action="store_true", help="sweep tiles, write the JSON first")
    parser.add_argument("--down-only", action="store_true",
                        help="sweep the down launch only (gate/up tiles as looked up now)")
    parser.add_argument("--sweep-budget-s", type=float, default=200.0,
                        help="seconds of sweeping per shape")
    args = parser.parse_args()
    names, tokens = args.shapes.split(","), [int(t) for t in args.tokens.split(",")]
    info, bw = device_info(), copy_bandwidth_gbs()

    def timed() -> list[dict]:
        return [time_launches(name, SHAPES[name], t, bw) for name in names for t in tokens
                if t * SHAPES[name][3] <= fused_moe.GEMV_MAX_PAIRS]

    before = timed() if args.sweep else None  # the launches with the tiles the sweep replaces
    if args.sweep:  # written shape by shape: a sweep cut short keeps what it found
        for name in names:
            deadline = time.monotonic() + args.sweep_budget_s
            swept = sweep_gemv_shape(SHAPES[name], deadline, tokens, args.down_only)
            write_configs({shape_key(*SHAPES[name], DT): swept}, info["gpu"], gemv=True)
    rows = timed()
    path = write_results("moe_gemv", {
        "device": info, "copy_bandwidth_gbs": bw, "dtype": "bfloat16", "ring": RING,
        "timing": "CUDA graph replay over a ring of routings (ring_us)",
        "gemv_configs": "swept" if args.sweep else "engine/kernels/moe_gemv_configs.json",
        "rows": rows, "rows_before_sweep": before})
    columns = ["shape", "tokens", "gate_up_us", "down_us", "down_unsplit_us", "both_us",
               "gate_up_%copy_bw", "down_%copy_bw", "down_unsplit_%copy_bw", "both_%copy_bw"]
    if before:
        print("before the sweep:")
        print_table(before, columns)
        print("after:")
    print_table(rows, columns)
    print(f"copy bandwidth {bw:.0f} GB/s; wrote {path}")


if __name__ == "__main__":
    main()
