"""Configurations of the one-token GEMV kernel against cuBLAS (`F.linear`) on the Llama-3-8B
projections, each timed replayed in a CUDA graph, as a fraction of the copy bandwidth; then the
fused prologues against the unfused pair of kernels they replace at batch 1: add+RMSNorm then
the q/k/v GEMV, and SiLU-and-mul then the down projection (cuBLAS).
Run: python benchmarks/gemv_sweep.py [--fused-only]  -> results/gemv_sweep_<gpu>.json"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   write_results)
from engine.kernels import triton_ops  # noqa: E402
from engine.kernels.gemv import gemv, rms_norm_gemv, silu_and_mul_gemv  # noqa: E402

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
            try:
                err = ((fused(ws[0], cfg).float() - ref).norm() / ref.norm()).item()
                ms, pct = rate(lambda w: fused(w, cfg))
                row["configs"].append({"config": cfg, "ms": ms, "%bw": pct, "rel_err": err})
            except Exception as exc:  # a config the compiler rejects
                row["configs"].append({"config": cfg, "error": repr(exc)[:200]})
        row["best"] = min((c for c in row["configs"] if "ms" in c), key=lambda c: c["ms"])
        b = row["best"]
        print(f"{name:18s} unfused {row['unfused_ms']*1e3:7.1f} us   fused best {b['config']} "
              f"{b['ms']*1e3:7.1f} us {b['%bw']:5.1f}% err {b['rel_err']:.1e}", flush=True)
        rows.append(row)
        del ws
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fused-only", action="store_true")
    args = parser.parse_args()
    bw = copy_bandwidth_gbs()
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw}
    if not args.fused_only:
        payload["shapes"], payload["ranked_configs"] = sweep_plain(bw)
    payload["fused"] = sweep_fused(bw)
    write_results("gemv_sweep" + ("_fused" if args.fused_only else ""), payload)


if __name__ == "__main__":
    main()
