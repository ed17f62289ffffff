"""Tiles of the sort-free top-p cut's whole-row split passes (`engine.kernels.top_p.TUNE`):
the compactions' scan block and warps, the narrowing passes' [NT, block] tile and warps. Each
choice is timed (CUDA-graph time of the whole cut) on the row kinds of `top_p_profile.py` at
batch 1 and 64, one knob group varied at a time from the default, and its cut checked equal to
the default's on the same rows (the tiles only change how the passes walk the row).
Smaller tiles take fewer registers, so more programs share an SM (sm_90 AOT, Triton 3.9: the
narrowing pass takes 127 registers at [16, 512] x 8 warps, 76 at [16, 256] x 8).
Run: python benchmarks/top_p_sweep.py -> results/top_p_sweep_<gpu>.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import device_info, graph_ms, write_results  # noqa: E402
from benchmarks.top_p_profile import ROWS  # noqa: E402
from engine.kernels import top_p  # noqa: E402

COMPACT = [(1024, 4), (512, 4), (256, 4), (512, 8), (1024, 8), (2048, 8)]
NARROW = [(512, 8), (256, 8), (256, 4), (128, 4), (128, 2), (64, 2)]


def _choices(default: top_p.TopPTuning) -> list[top_p.TopPTuning]:
    out = [replace(default, compact_block=b, compact_warps=w) for b, w in COMPACT]
    out += [replace(default, narrow_block=b, narrow_warps=w) for b, w in NARROW]
    unique = []
    for t in out:
        if t not in unique:
            unique.append(t)
    return unique


def _inputs(batches: list[int], vocab: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for batch in batches:
        for name, scale, p in ROWS:
            logits = torch.randn(batch, vocab, device="cuda", generator=gen) * scale
            out.append((f"{name} p{p} B={batch}", logits, torch.full((batch,), p, device="cuda")))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    inputs = _inputs([int(b) for b in args.batches.split(",")], args.vocab)
    default = top_p.TUNE
    want = [top_p.top_p_cut(logits, ps) for _, logits, ps in inputs]
    rows = []
    for tune in _choices(default):
        top_p.TUNE = tune
        times, same = {}, True
        for (name, logits, ps), (thr, cut) in zip(inputs, want):
            got_thr, got_cut = top_p.top_p_cut(logits, ps)
            same &= torch.equal(got_thr, thr) and torch.equal(got_cut, cut)
            times[name] = round(graph_ms(lambda: top_p.top_p_cut(logits, ps)) * 1e3, 1)
        rows.append({"tuning": asdict(tune), "cut_us": times, "same_cut": same})
        print(f"{asdict(tune)} same={same} " + " ".join(f"{k}: {v}" for k, v in times.items()),
              flush=True)
    top_p.TUNE = default
    path = write_results("top_p_sweep", {"device": device_info(), "default": asdict(default),
                                         "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
