"""Configurations of the one-token GEMV kernel against cuBLAS (`F.linear`) on the Llama-3-8B
projections, each timed replayed in a CUDA graph, as a fraction of the copy bandwidth.
Run: python benchmarks/gemv_sweep.py  -> results/gemv_sweep_<gpu>.json"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   write_results)
from engine.kernels.gemv import gemv  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}
CONFIGS = list(itertools.product((4, 8, 16), (256, 512, 1024), (4, 8), (1, 3)))


def main() -> None:
    bw = copy_bandwidth_gbs()
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
    write_results("gemv_sweep", {"device": device_info(), "copy_bandwidth_gbs": bw,
                                 "shapes": rows, "ranked_configs": ranked})


if __name__ == "__main__":
    main()
