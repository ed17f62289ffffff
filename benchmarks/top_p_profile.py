"""Where the sort-free top-p cut's time goes, launch by launch (`engine/kernels/top_p.py`: 8
fixed launches) on the row kinds of `kernels.py`'s top-p rows, at batch 1 and 64, under the
torch profiler; also the whole sampler draw on the same rows and the candidates per row
(how much serial work the per-row program has).

An H100 timed the cut at 0.11 ms (batch 1) and 0.37-0.47 ms (batch 64) on flat and nearly
uniform 128k rows, while the split passes read 33 MB at batch 64 (about 11 us each at copy
bandwidth): this says which launch holds the rest. Each row is also timed with
`narrow_to=CAP` (the policy before `NARROW_TO`: only rows over the buffer narrowed by the split
passes), in the same run.
Run: python benchmarks/top_p_profile.py [--batches 1,64] -> results/top_p_profile_<gpu>.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import device_info, graph_ms, write_results  # noqa: E402
from engine.kernels.sampling import sample_race  # noqa: E402
from engine.kernels.top_p import CAP, apply_top_p, top_p_cut  # noqa: E402
from engine.kernels.top_p_race import draws_and_done, sample_top_p  # noqa: E402

REPS = 20
# "engine": the logits of latency.py's random Llama-3-8B (std 0.02 weights: std ~1.28) at T 0.8
ROWS = [("flat", 3 / 0.8, 0.9), ("flat", 3 / 0.8, 0.99), ("uniform", 0.02, 0.9),
        ("peaked", 12.0, 0.9), ("engine", 1.28 / 0.8, 0.9)]


def _by_kernel(prof) -> list[dict]:
    rows = [{"kernel": e.key[:60], "calls_per_cut": e.count / REPS,
             "us_per_cut": e.self_device_time_total / REPS}
            for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: r["us_per_cut"], reverse=True)


def _draw_vs_argmax(logits: torch.Tensor, top_ps: torch.Tensor) -> dict:
    """The sampler's whole top-p draw on these rows at temperature 0.8 as
    `engine.sampler._sample` runs it (`top_p_race.sample_top_p`: the whole row's race first,
    the cut only for the rows it does not decide), the cut-then-race draw of every row (how it
    ran before) and on a tempered copy, and the greedy argmax of the same rows; also the
    fraction of rows the race decided."""
    batch = logits.shape[0]
    temps = torch.full((batch,), 0.8, device="cuda")
    seeds = torch.arange(batch, device="cuda", dtype=torch.int64)
    steps = torch.zeros(batch, device="cuda", dtype=torch.int64)
    raw = logits * 0.8  # tempered back to these rows

    def draw():
        return sample_top_p(raw, seeds, steps, top_ps, temps)

    def cut_then_race():
        bounds = top_p_cut(raw, top_ps, temperatures=temps)
        return sample_race(raw, seeds, steps, bounds, temps)

    def draw_on_copy():
        tempered = raw / temps[:, None]
        return sample_race(tempered, seeds, steps, top_p_cut(tempered, top_ps))

    ids, decided = draws_and_done(raw, seeds, steps, top_ps, temps)
    assert torch.equal(ids, cut_then_race()), "the race-first draw differs from cut + race"
    return {"draw_graph_ms": graph_ms(draw), "cut_then_race_graph_ms": graph_ms(cut_then_race),
            "draw_on_copy_graph_ms": graph_ms(draw_on_copy),
            "argmax_graph_ms": graph_ms(lambda: raw.argmax(dim=-1)),
            "decided_by_race": decided.float().mean().item()}


def real_rows_report(logits: torch.Tensor, temps: torch.Tensor, top_ps: torch.Tensor) -> dict:
    """The cut on rows a model produced (`profile_decode.py` records a sampled step's): their
    spread, candidates and kept tokens per row (min / median / max), the cut's time launch by
    launch, and the whole draw."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from engine.sampler import apply_top_p as reference

    tempered = logits.float() / temps[:, None]
    m = tempered.max(dim=1, keepdim=True).values
    s = (tempered - m).exp().sum(dim=1, keepdim=True)
    bound = m + torch.log(s * (1 - top_ps[:, None]) / logits.shape[1])
    spread = lambda t: [t.min().item(), t.median().item(), t.max().item()]  # noqa: E731
    cut = lambda: top_p_cut(logits, top_ps, temperatures=temps)  # noqa: E731
    cut()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            cut()
        torch.cuda.synchronize()
    seeds = torch.arange(logits.shape[0], device="cuda", dtype=torch.int64)
    return {"std": spread(tempered.std(dim=1)),
            "max_minus_mean": spread(m[:, 0] - tempered.mean(dim=1)),
            "candidates": spread((tempered >= bound).sum(dim=1).float()),
            "kept": spread(torch.isfinite(reference(tempered, top_ps)).sum(dim=1).float()),
            "cut_graph_ms": graph_ms(cut), "by_kernel": _by_kernel(prof),
            "cut_then_race_graph_ms": graph_ms(
                lambda: sample_race(logits, seeds, seeds, cut(), temps)),
            "draw_graph_ms": graph_ms(lambda: sample_top_p(logits, seeds, seeds, top_ps, temps)),
            "decided_by_race": draws_and_done(logits, seeds, seeds, top_ps, temps)[1]
            .float().mean().item()}


def profile_row(name: str, scale: float, p: float, batch: int, vocab: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(batch, vocab, device="cuda", generator=gen) * scale
    top_ps = torch.full((batch,), p, device="cuda")
    top_p_cut(logits, top_ps)  # compile outside the profile
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPS):
            top_p_cut(logits, top_ps)
        torch.cuda.synchronize()
    kept = torch.isfinite(apply_top_p(logits, top_ps)).sum(dim=1).float()
    row = {"row": f"{name} p{p}", "batch": batch, "vocab": vocab,
           "cut_graph_ms": graph_ms(lambda: top_p_cut(logits, top_ps)),
           "cut_graph_ms_narrow_at_cap": graph_ms(lambda: top_p_cut(logits, top_ps,
                                                                    narrow_to=CAP)),
           "kept_mean": kept.mean().item(), "by_kernel": _by_kernel(prof)}
    row.update(_draw_vs_argmax(logits, top_ps))
    print(f"{row['row']:16s} B={batch:<3d} cut {row['cut_graph_ms'] * 1e3:7.1f} us (graph; "
          f"narrowing only over CAP: {row['cut_graph_ms_narrow_at_cap'] * 1e3:7.1f} us), "
          f"kept {row['kept_mean']:9.0f}; draw {row['draw_graph_ms'] * 1e3:7.1f} us "
          f"(race decided {row['decided_by_race']:.2f} of the rows; cut then race "
          f"{row['cut_then_race_graph_ms'] * 1e3:7.1f}, on a copy "
          f"{row['draw_on_copy_graph_ms'] * 1e3:7.1f}), "
          f"argmax {row['argmax_graph_ms'] * 1e3:6.1f} us")
    for k in row["by_kernel"]:
        print(f"    {k['kernel']:40s} x{k['calls_per_cut']:.0f} {k['us_per_cut']:8.1f} us")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--vocab", type=int, default=128256)
    args = parser.parse_args()
    rows = [profile_row(name, scale, p, batch, args.vocab)
            for batch in (int(b) for b in args.batches.split(","))
            for name, scale, p in ROWS]
    path = write_results("top_p_profile", {"device": device_info(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
