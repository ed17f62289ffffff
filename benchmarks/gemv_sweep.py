"""Configurations of the one-token GEMV kernel against cuBLAS (`F.linear`) on the Llama-3-8B
projections, each timed replayed in a CUDA graph, as a fraction of the copy bandwidth; then the
fused prologues against the unfused pair of kernels they replace at batch 1: add+RMSNorm then
the q/k/v GEMV, and SiLU-and-mul then the down projection (cuBLAS).
Run: python benchmarks/gemv_sweep.py [--fused-only]  -> results/gemv_sweep_<gpu>.json"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   write_results)
from engine.kernels import triton_ops  # noqa: E402
from engine.kernels import gemv as gemv_module  # noqa: E402
from engine.kernels.gemv import gemv, rms_norm_gemv, silu_and_mul_gemv  # noqa: E402
from engine.kernels.prefill_attention_configs import device_name  # noqa: E402
from engine.layers.activation import silu_and_mul as silu_and_mul_ref  # noqa: E402
from engine.layers.norm import rms_norm as rms_norm_ref  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
CONFIGS = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)))


def sweep_plain(bw: float) -> tuple[list, list]:
    rows = []
    for name, (n, k) in SHAPES.items():
        # several weights in rotation so that no run reads from L2
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        gb = n * k * 2 / 1e9

        def rate(fn) -> tuple[float, float]:
            ms = graph_ms(lambda: [fn(w) for w in ws], reps=5) / len(ws)
            return ms, 100 * gb / ms * 1e3 / bw

        ms, pct = rate(lambda w: F.linear(x, w))
        row = {"shape": name, "cublas_ms": ms, "cublas_%bw": pct, "configs": []}
        ref = F.linear(x.float(), ws[0].float())
        for cfg in CONFIGS:
            try:
                err = ((gemv(x, ws[0], config=cfg).float() - ref).abs().max() / ref.abs().max()).item()
                ms, pct = rate(lambda w: gemv(x, w, config=cfg))
                row["configs"].append({"config": cfg, "ms": ms, "%bw": pct, "rel_err": err})
            except Exception as exc:  # a config the compiler rejects
                row["configs"].append({"config": cfg, "error": repr(exc)[:200]})
        best = min((c for c in row["configs"] if "ms" in c), key=lambda c: c["ms"])
        row["best"] = best
        print(f"{name:8s} cublas {row['cublas_ms']*1e3:7.1f} us {row['cublas_%bw']:5.1f}%   "
              f"best {best['config']} {best['ms']*1e3:7.1f} us {best['%bw']:5.1f}% err {best['rel_err']:.1e}",
              flush=True)
        rows.append(row)
        del ws
    totals = {}
    for cfg in CONFIGS:
        per = [next(c for c in r["configs"] if c["config"] == cfg) for r in rows]
        if all("ms" in c for c in per):
            totals[str(cfg)] = sum(c["ms"] for c in per)
    ranked = sorted(totals.items(), key=lambda kv: kv[1])[:8]
    print("best single configs (sum over shapes, ms):", ranked)
    print("cublas sum:", sum(r["cublas_ms"] for r in rows))
    return rows, ranked


def sweep_fused(bw: float) -> list:
    """Each fused kernel beside the unfused pair it replaces, weights rotated as above."""
    rows = []
    for name, (n, k) in (("qkv+add_rms_norm", SHAPES["qkv"]), ("down+silu_and_mul", SHAPES["down"])):
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k**0.5 for _ in range(4)]
        g = torch.ones(k, dtype=torch.bfloat16, device="cuda")
        x, res = torch.randn(2, 1, k, dtype=torch.bfloat16, device="cuda")
        gate_up = torch.randn(1, 2 * k, dtype=torch.bfloat16, device="cuda")
        gb = n * k * 2 / 1e9
        if name.startswith("qkv"):
            def unfused(w):
                return gemv(triton_ops.add_rms_norm(x, res, g, 1e-5)[0], w)

            def fused(w, cfg):
                return rms_norm_gemv(x, res, g, 1e-5, w, config=cfg)[0]
        else:
            def unfused(w):
                return F.linear(triton_ops.silu_and_mul(gate_up), w)

            def fused(w, cfg):
                return silu_and_mul_gemv(gate_up, w, config=cfg)

        def rate(fn) -> tuple[float, float]:
            ms = graph_ms(lambda: [fn(w) for w in ws], reps=5) / len(ws)
            return ms, 100 * gb / ms * 1e3 / bw

        ms, pct = rate(unfused)
        row = {"fusion": name, "unfused_ms": ms, "unfused_%bw": pct, "configs": []}
        ref = unfused(ws[0]).float()
        for cfg in CONFIGS:
            row["configs"].append(_time_tile(fused, cfg, ws[0], ref, rate, "ms"))
        row["best"] = min((c for c in row["configs"] if "ms" in c), key=lambda c: c["ms"])
        b = row["best"]
        print(f"{name:18s} unfused {row['unfused_ms']*1e3:7.1f} us   fused best {b['config']} "
              f"{b['ms']*1e3:7.1f} us {b['%bw']:5.1f}% err {b['rel_err']:.1e}", flush=True)
        rows.append(row)
        del ws
    return rows


# --- per-shape tiles ------------------------------------------------------------------------
# (name, N, K, prologue) of the linears that take the GEMV at decode batch 1, tp 1: q/k/v
# (dispatch.rms_norm_linear), o (dispatch.linear), a dense MLP's down (silu_and_mul_linear).
# Not listed because cuBLAS serves them (`gemv.supports` rejects the size): Llama's gate/up
# (117M) and every LM head (Qwen3 151936 x 2048 = 311M, Mixtral 131M, Llama 525M). The MoE
# router (`TopKRouter`) calls F.linear, and the experts have their own kernels (moe_gemv.py).
MODEL_SHAPES: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    "llama3-8b": (("qkv", 6144, 4096, "rms_norm"), ("o", 4096, 4096, "plain"),
                  ("down", 4096, 14336, "silu_mul")),
    "qwen3-moe": (("qkv", 5120, 2048, "rms_norm"), ("o", 2048, 4096, "plain")),  # 30B-A3B
    "mixtral": (("qkv", 6144, 4096, "rms_norm"), ("o", 4096, 4096, "plain")),  # 8x7B
}
ROTATION_BYTES = 256 << 20  # weights in rotation per timing: well past the 50 MiB L2
MIN_GAIN = 0.02  # a swept tile replaces the constant only when this much faster


def model_shapes(names: str) -> list[tuple[str, int, int, str]]:
    """The shapes of `names` ("all": every model's, each (N, K, prologue) once)."""
    models = list(MODEL_SHAPES) if names == "all" else [names]
    shapes, seen = [], set()
    for model in models:
        for name, n, k, prologue in MODEL_SHAPES[model]:
            if (n, k, prologue) not in seen:
                seen.add((n, k, prologue))
                shapes.append((f"{model}/{name}", n, k, prologue))
    return shapes


def tile_candidates(k: int, default: tuple) -> list[tuple[int, int, int, int]]:
    """The prologue's constant first (today's tile, the baseline), then tiles whose float32
    partial sum takes 8..64 registers a thread, strips no wider than K."""
    space = itertools.product((1, 2, 4, 8, 16), (128, 256, 512, 1024, 2048), (1, 2, 4, 8))
    return [tuple(default)] + [(bn, bk, w, 1) for bn, bk, w in space
                               if bk <= k and 8 <= bn * bk // (32 * w) <= 64
                               and (bn, bk, w, 1) != tuple(default)]


def _problem(n: int, k: int, prologue: str):
    """Weights in rotation, the kernel call `run(w, config)`, the float32 reference on ws[0],
    and the prologue's output (cuBLAS's input)."""
    bf16 = dict(dtype=torch.bfloat16, device="cuda")
    ws = [torch.randn(n, k, **bf16) / k**0.5
          for _ in range(max(4, math.ceil(ROTATION_BYTES / (2 * n * k))))]
    if prologue == "plain":
        x = torch.randn(1, k, **bf16)
        return ws, lambda w, cfg: gemv(x, w, config=cfg), F.linear(x.float(), ws[0].float()), x
    if prologue == "rms_norm":  # with the residual add: every layer but the first
        x, res = torch.randn(2, 1, k, **bf16)
        g = 1 + 0.1 * torch.randn(k, **bf16)
        normed = rms_norm_ref(x.float() + res.float(), g.float(), 1e-5)
        return (ws, lambda w, cfg: rms_norm_gemv(x, res, g, 1e-5, w, config=cfg)[0],
                F.linear(normed, ws[0].float()), normed.to(torch.bfloat16))
    gate_up = torch.randn(1, 2 * k, **bf16)
    act = silu_and_mul_ref(gate_up.float())
    return (ws, lambda w, cfg: silu_and_mul_gemv(gate_up, w, config=cfg),
            F.linear(act, ws[0].float()), act.to(torch.bfloat16))


def sweep_shape(shape: tuple[str, int, int, str], bw: float, deadline: float) -> dict:
    """Every candidate tile (until `deadline`; the constant always) timed in CUDA graphs."""
    name, n, k, prologue = shape
    ws, run, ref, gemm_input = _problem(n, k, prologue)
    gb = n * k * 2 / 1e9

    def rate(fn) -> tuple[float, float]:
        ms = graph_ms(lambda: [fn(w) for w in ws], reps=5) / len(ws)
        return ms * 1e3, 100 * gb / ms * 1e3 / bw

    us, pct = rate(lambda w: F.linear(gemm_input, w))
    row = {"shape": name, "n": n, "k": k, "prologue": prologue, "num_weights": len(ws),
           "cublas_gemm_us": us, "cublas_gemm_%bw": pct, "configs": []}
    default = gemv_module.DEFAULT_CONFIGS[prologue]
    for cfg in tile_candidates(k, default):
        if row["configs"] and time.monotonic() > deadline:
            row["out_of_time"] = True
            break
        row["configs"].append(_time_tile(run, cfg, ws[0], ref, rate, "us"))
    row["default"] = row["configs"][0]
    valid = [c for c in row["configs"] if "us" in c and c["rel_err"] < 2e-2]
    row["best"] = min(valid, key=lambda c: c["us"]) if valid else None
    _print_shape(row)
    del ws
    torch.cuda.empty_cache()
    return row


def _time_tile(run, cfg, w0, ref, rate, unit: str) -> dict:
    """One candidate tile: its error against `ref` (relative, 2-norm) on `w0` and its time and
    bandwidth from `rate` (in `unit`), or the error of a tile the compiler rejects."""
    try:
        err = ((run(w0, cfg).float() - ref).norm() / ref.norm()).item()
        t, pct = rate(lambda w: run(w, cfg))
        return {"config": cfg, unit: t, "%bw": pct, "rel_err": err}
    except Exception as exc:  # a tile the compiler rejects
        return {"config": cfg, "error": repr(exc)[:200]}


def _print_shape(row: dict) -> None:
    d, b = row["default"], row["best"]
    print(f"{row['shape']:16s} {row['prologue']:8s} N={row['n']:6d} K={row['k']:5d}  cublas "
          f"{row['cublas_gemm_us']:6.1f} us {row['cublas_gemm_%bw']:5.1f}%  default {d['config']} "
          f"{d.get('us', float('nan')):6.1f} us {d.get('%bw', float('nan')):5.1f}%  best "
          f"{b and b['config']} {b['us'] if b else float('nan'):6.1f} us "
          f"{b['%bw'] if b else float('nan'):5.1f}%  ({len(row['configs'])} tiles)", flush=True)


def chosen_tile(row: dict) -> tuple[int, int, int, int] | None:
    """The tile to store: the best, unless the constant is within MIN_GAIN of it."""
    best, default = row["best"], row["default"]
    if best is None:
        return None
    if "us" in default and best["us"] > (1 - MIN_GAIN) * default["us"]:
        return tuple(default["config"])
    return tuple(best["config"])


def sweep_shapes(names: str, budget_s: float, write: bool) -> None:
    bw = copy_bandwidth_gbs()
    gpu = device_name(torch.device("cuda"))
    shapes = model_shapes(names)
    start, rows = time.monotonic(), []
    for i, shape in enumerate(shapes):  # the budget left is shared by the shapes left
        deadline = time.monotonic() + (budget_s - (time.monotonic() - start)) / (len(shapes) - i)
        rows.append(sweep_shape(shape, bw, deadline))
    chosen = {gemv_module.shape_key(gpu, r["prologue"], r["n"], r["k"]): chosen_tile(r)
              for r in rows}
    chosen = {key: cfg for key, cfg in chosen.items() if cfg is not None}
    if write and chosen:
        gemv_module.write_configs(chosen, f"benchmarks/gemv_sweep.py --shapes on {gpu}: fastest "
                                  f"tile per shape by CUDA-graph time (the constant unless "
                                  f">= {MIN_GAIN:.0%} faster)")
        print(f"wrote {len(chosen)} tiles to {gemv_module.CONFIG_PATH}")
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "shapes_set": names,
               "budget_s": budget_s, "rows": rows, "chosen": chosen, "written": write}
    print("results:", write_results("gemv_sweep_shapes", payload))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fused-only", action="store_true")
    parser.add_argument("--shapes", choices=[*MODEL_SHAPES, "all"],
                        help="sweep tiles per shape of these models' GEMV linears (only that)")
    parser.add_argument("--write-configs", action="store_true",
                        help="with --shapes: merge the chosen tiles into gemv_configs.json")
    parser.add_argument("--budget-s", type=float, default=240.0,
                        help="with --shapes: seconds of tile timing in all, shared by the shapes")
    args = parser.parse_args()
    if args.write_configs and not args.shapes:
        parser.error("--write-configs needs --shapes")
    if args.shapes:
        sweep_shapes(args.shapes, args.budget_s, args.write_configs)
        return
    bw = copy_bandwidth_gbs()
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw}
    if not args.fused_only:
        payload["shapes"], payload["ranked_configs"] = sweep_plain(bw)
    payload["fused"] = sweep_fused(bw)
    write_results("gemv_sweep" + ("_fused" if args.fused_only else ""), payload)


if __name__ == "__main__":
    main()
