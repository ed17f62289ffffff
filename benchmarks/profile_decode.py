"""Where a decode step's time goes on a GPU: Llama-3-8B shape, random bf16 weights, 1k context.

For each batch size:
- host: `ModelRunner.execute` wall time per step next to its CUDA graph's replay alone, and the
  host part split into loading the inputs, launching the replay and waiting for the ids; the
  same with sampled (temperature 0.8, top-p 0.9) requests, which run the sampler after the graph;
- kernels: replayed steps under the torch profiler, grouped by kind (weight GEMMs, LM head,
  attention, norms, RoPE + KV write, SiLU, the rest) with count and GPU time; busy time against
  the replay time gives the gaps between kernels inside the graph;
- weight GEMMs alone (`F.linear`, replayed in a graph) per shape, as a fraction of the copy
  bandwidth, and decode attention alone for every number of context splits.
`--fused-combine off|on|both` (default both) runs the attention rows and the steps with the
split-K combine as its own kernel, fused into the split kernel
(`dispatch.use_fused_decode_combine`), or each in turn (a fresh runner per setting, so graphs are captured with it); `fused_combine`
in every row and `fused_combine_summary` (kernels per step, replay ms per batch) compare them.
Run: python benchmarks/profile_decode.py [--batches 1,64] [--fused-combine both]
  -> results/profile_decode_<gpu>.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_common import (copy_bandwidth_gbs, device_info, graph_ms,  # noqa: E402
                                   replay_ms, write_results)
from benchmarks.latency import BS, CFG, KV_BYTES_PER_TOKEN, Workload, weight_bytes_per_step  # noqa: E402
from engine.attention.metadata import SeqGroup  # noqa: E402
from engine.builder import build_model, init_random_weights  # noqa: E402
from engine.kernels import dispatch  # noqa: E402
from engine.kernels.attention_backend import TritonAttentionBackend  # noqa: E402
from engine.kernels.decode_attention import decode_attention, num_splits_for  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import ScheduledChunk, SchedulerOutput  # noqa: E402

KINDS = (("attention", ("_decode_kernel", "_combine_kernel")), ("norm", ("rms_norm",)),
         ("rope_kv", ("rope",)), ("silu", ("silu",)),
         ("gemm", ("gemm", "gemv", "nvjet", "cutlass", "xmma", "cublas", "splitk")))


def kernel_table(fn, steps: int = 3, top: int = 12) -> dict:
    """Kernels of `steps` calls of fn under the profiler, grouped by kind, per call (and the
    `top` kernels by time)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    kernels = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    if not kernels:
        return {"error": "the profiler recorded no kernels"}
    per_kind = defaultdict(lambda: [0, 0.0])
    gemms = [i for i, e in enumerate(kernels) if _kind(e["name"]) == "gemm"]
    lm_heads = set(gemms[len(gemms) // steps - 1 :: len(gemms) // steps]) if gemms else set()
    for i, e in enumerate(kernels):
        kind = "lm_head" if i in lm_heads else _kind(e["name"])
        per_kind[kind][0] += 1
        per_kind[kind][1] += e["dur"]
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy = sum(e["dur"] for e in kernels)
    names = defaultdict(float)
    for e in kernels:
        names[e["name"][:90]] += e["dur"]
    return {"kernels_per_step": len(kernels) / steps, "busy_ms": busy / steps / 1e3,
            "span_ms": span / steps / 1e3,
            "kinds": {k: {"count": c / steps, "ms": us / steps / 1e3} for k, (c, us) in per_kind.items()},
            "top_kernels_ms": {n: us / steps / 1e3 for n, us in
                               sorted(names.items(), key=lambda x: -x[1])[:top]}}


def _kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def host_split(runner, work, reqs, steps: int = 30) -> dict:
    """Wall time per step of execute, and its host parts done by hand in the same order."""
    graphs = runner.decode_graphs
    bucket = graphs.bucket_for(len(reqs))

    def chunks():
        return [ScheduledChunk(r, r.num_tokens - 1, 1, t, True) for r, t in reqs]

    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        work.decode_step(reqs)
    execute_ms = (time.perf_counter() - t) * 1e3 / steps
    load = launch = wait = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        c = chunks()
        plan = work.planner.build(SchedulerOutput(c))
        runner.tables.apply(plan)
        graphs.load_inputs(plan, runner.tables.of(plan), bucket)
        t1 = time.perf_counter()
        graphs.graphs[bucket].graph.replay()
        t2 = time.perf_counter()
        ids = graphs.graphs[bucket].greedy_ids[: len(c)].tolist()
        t3 = time.perf_counter()
        for (r, _), tok in zip(reqs, ids):
            r.output_token_ids.append(tok)
        load, launch, wait = load + t1 - t0, launch + t2 - t1, wait + t3 - t2
    return {"execute_ms": execute_ms, "load_inputs_ms": load * 1e3 / steps,
            "launch_ms": launch * 1e3 / steps, "wait_ids_ms": wait * 1e3 / steps}


def profile_batch(runner, work, model, bw: float, batch: int, context: int) -> dict:
    reqs = work.requests(batch, context, 200)
    for r, _ in reqs:
        r.output_token_ids.append(0)
    for _ in range(3):
        work.decode_step(reqs)
    graphs = runner.decode_graphs
    graph = graphs.graphs[graphs.bucket_for(batch)].graph
    replay = replay_ms(graph, reps=20)
    num_bytes = weight_bytes_per_step(model, batch) + batch * (context + 100) * KV_BYTES_PER_TOKEN
    row = {"batch": batch, "replay_ms": replay, "roofline_ms": num_bytes / bw / 1e6,
           "host": host_split(runner, work, reqs)}
    row["graph_kernels"] = kernel_table(graph.replay)
    graphs_saved, runner.decode_graphs = runner.decode_graphs, None
    try:
        row["eager_kernels"] = kernel_table(lambda: work.decode_step(reqs))
    finally:
        runner.decode_graphs = graphs_saved
    sampled = SamplingParams(max_tokens=1 << 20, temperature=0.8, top_p=0.9, ignore_eos=True)
    for r, _ in reqs:
        r.params = sampled
    work.decode_step(reqs)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        work.decode_step(reqs)
    row["execute_sampled_ms"] = (time.perf_counter() - t) * 1e3 / 20
    # the sampled step's kernels: the graph's, then the sampler's eager ones (top-p cut, race)
    row["sampled_kernels"] = kernel_table(lambda: work.decode_step(reqs), top=40)
    row["sampled_rows"] = _sampled_rows(runner, work, reqs)
    return row


def _sampled_rows(runner, work, reqs) -> dict:
    """The top-p cut on the logits this model's sampled step produced (not synthetic rows)."""
    from benchmarks.top_p_profile import real_rows_report

    seen, sampler = {}, runner.sampler

    def recording(logits, tensors):
        seen["args"] = (logits.clone(), tensors.temperatures.clone(), tensors.top_ps.clone())
        return sampler(logits, tensors)

    runner.sampler = recording
    try:
        work.decode_step(reqs)
    finally:
        runner.sampler = sampler
    report = real_rows_report(*seen["args"])
    print(json.dumps({"sampled_rows": report}), flush=True)
    return report


def gemm_rows(bw: float, batches: list[int]) -> list[dict]:
    c = CFG
    shapes = {"qkv": (c.q_size + 2 * c.kv_size, c.hidden_size), "o": (c.hidden_size, c.q_size),
              "gate_up": (2 * c.intermediate_size, c.hidden_size),
              "down": (c.hidden_size, c.intermediate_size), "lm_head": (c.vocab_size, c.hidden_size)}
    rows = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda")
        for m in batches:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ms = graph_ms(lambda: F.linear(x, w))
            rows.append({"gemm": name, "m": m, "ms": ms, "GB/s": w.numel() * 2 / ms / 1e6,
                         "%copy_bw": 100 * w.numel() * 2 / ms / 1e6 / bw})
        del w
    return rows


def attention_rows(bw: float, cases: list[tuple[int, int]],
                   fused_settings: tuple[bool, ...] = (False,)) -> list[dict]:
    c = CFG
    rows = []
    for batch, context in cases:
        blocks = -(-context // BS)
        kv = torch.randn(batch * blocks, 2, BS, c.num_kv_heads, c.head_dim, dtype=torch.bfloat16,
                         device="cuda")
        tables = torch.randperm(batch * blocks, device="cuda", dtype=torch.int32).view(batch, blocks)
        group = SeqGroup(tables, torch.full((batch,), context, dtype=torch.int32, device="cuda"),
                         torch.arange(batch + 1, dtype=torch.int32, device="cuda"), 1, context)
        q = torch.randn(batch, c.num_heads, c.head_dim, dtype=torch.bfloat16, device="cuda")
        out = torch.empty_like(q)
        kv_bytes = batch * context * 2 * c.num_kv_heads * c.head_dim * 2
        default = num_splits_for(batch, c.num_kv_heads)
        for splits in (1, 2, 4, 8, 16, 32):
            for fused in fused_settings if splits > 1 else fused_settings[:1]:
                ms = graph_ms(lambda: decode_attention(q, kv, group, c.head_dim ** -0.5, out,
                                                       splits, fused_combine=fused))
                rows.append({"batch": batch, "context": context, "splits": splits, "ms": ms,
                             "%hbm": 100 * kv_bytes / ms / 1e6 / bw,
                             "default": splits == default, "fused_combine": fused})
        del kv
    return rows


FUSED_SETTINGS = {"off": (False,), "on": (True,), "both": (False, True)}


def fused_summary(steps: list[dict]) -> dict:
    """Per batch and combine setting: graph kernels per step, replay and attention GPU ms."""
    summary: dict = defaultdict(dict)
    for row in steps:
        if "error" in row:
            continue
        kernels = row["graph_kernels"]
        attention = kernels.get("kinds", {}).get("attention", {})
        summary[f"batch {row['batch']}"]["on" if row["fused_combine"] else "off"] = {
            "replay_ms": row["replay_ms"], "roofline_ms": row["roofline_ms"],
            "kernels_per_step": kernels.get("kernels_per_step"),
            "attention_kernels": attention.get("count"), "attention_ms": attention.get("ms")}
    return dict(summary)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--fused-combine", choices=tuple(FUSED_SETTINGS), default="both",
                        help="split-K decode combine: its own kernel (off), fused (on), both")
    args = parser.parse_args()
    fused_settings = FUSED_SETTINGS[args.fused_combine]
    torch.manual_seed(0)
    bw = copy_bandwidth_gbs()
    batches = [int(b) for b in args.batches.split(",")]
    payload = {"device": device_info(), "copy_bandwidth_gbs": bw, "context": args.context}
    payload["gemms"] = gemm_rows(bw, batches)
    payload["attention"] = attention_rows(bw, [(1, 1024), (1, 4096), (8, 1024), (8, 4096),
                                               (32, 1024), (64, 1024), (64, 4096)],
                                          fused_settings)
    write_results("profile_decode", payload)
    model = build_model(CFG, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    num_blocks = max(batches) * (-(-(args.context + 300) // BS)) + 64
    kv_cache = torch.randn(CFG.num_layers, num_blocks, 2, BS, CFG.num_kv_heads, CFG.head_dim,
                           dtype=torch.bfloat16, device="cuda")
    payload["steps"] = []
    for fused in fused_settings:
        dispatch.use_fused_decode_combine(fused)  # graphs capture the path set at capture
        runner = ModelRunner(model, kv_cache, TritonAttentionBackend(), BS, CFG.vocab_size,
                             "cuda")
        work = Workload(runner)
        for batch in batches:
            try:
                row = profile_batch(runner, work, model, bw, batch, args.context)
            except Exception as exc:  # keep what was measured
                row = {"batch": batch, "error": repr(exc)[:400]}
            payload["steps"].append({**row, "fused_combine": fused})
            write_results("profile_decode", payload)
        del runner, work
        torch.cuda.empty_cache()
    payload["fused_combine_summary"] = fused_summary(payload["steps"])
    write_results("profile_decode", payload)
    print(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
