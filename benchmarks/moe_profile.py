"""Launches against work in a MoE decode step (issue 14): the Qwen3-30B-A3B shape with a few
layers (random bf16 weights, benchmarks/moe_latency.py's config and driver), one GPU.

For batch 1 and 64 at 1k tokens of (random) context:
- eager: one decode step under the torch profiler, every kernel of every decoder layer in
  launch order with its GPU microseconds, split into attention and MLP (MoE) parts and summed.
  Layers are told apart by tiny marker kernels that forward hooks launch at each layer's start,
  its MLP's start and its end (they are left out of every sum, and the hooks are removed before
  anything is timed);
- graph: the same step replayed from ModelRunner's decode graph, its time per replay, and its
  kernels under the profiler: count, busy time (sum of kernel durations) and span; when the
  graph's kernels are the eager ones in the same order, each layer's busy time and span
  (first kernel's start to the next layer's), so `span - busy` is what launches and gaps cost
  inside the graph.
Run: python benchmarks/moe_profile.py [--layers 4] [--batches 1,64]
  -> benchmarks/results/moe_profile_<gpu>.json; --dry-run builds nothing (CPU import check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (kernels.py)

from benchmarks.gpu_common import device_info, replay_ms, write_results  # noqa: E402
from benchmarks.moe_latency import BS, QWEN3_30B_A3B, Driver  # noqa: E402

MARKERS = ("_mark_layer_start", "_mark_mlp_start", "_mark_layer_end")


@triton.jit
def _mark_layer_start(ptr, layer):
    tl.store(ptr, layer)


@triton.jit
def _mark_mlp_start(ptr, layer):
    tl.store(ptr + 1, layer)


@triton.jit
def _mark_layer_end(ptr, layer):
    tl.store(ptr + 2, layer)


def _add_markers(model) -> list:
    """Forward hooks launching a marker kernel at each layer's start, MLP start and end."""
    scratch = torch.zeros(3, dtype=torch.int32, device="cuda")
    handles = []

    def mark(kernel, layer_idx: int):
        def hook(*_) -> None:  # returns None: the module's inputs and outputs stay as they are
            kernel[(1,)](scratch, layer_idx)
        return hook

    for i, layer in enumerate(model.layers.values()):
        handles.append(layer.register_forward_pre_hook(mark(_mark_layer_start, i)))
        handles.append(layer.mlp.register_forward_pre_hook(mark(_mark_mlp_start, i)))
        handles.append(layer.register_forward_hook(mark(_mark_layer_end, i)))
    return handles


def profiled_kernels(fn) -> list[dict]:
    """The kernels one call of fn runs, in start order: {name, ts, us}."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    return [{"name": e["name"], "ts": float(e["ts"]), "us": float(e["dur"])} for e in kernels]


def split_by_layer(kernels: list[dict]) -> tuple[list[dict], list[dict]]:
    """(per-layer {attention, mlp} kernel lists, kernels outside the layers) from the markers."""
    layers, outside, part = [], [], None
    for k in kernels:
        name = k["name"]
        if name.startswith(MARKERS[0]):
            layers.append({"attention": [], "mlp": []})
            part = layers[-1]["attention"]
        elif name.startswith(MARKERS[1]):
            part = layers[-1]["mlp"]
        elif name.startswith(MARKERS[2]):
            part = None
        else:
            (outside if part is None else part).append(k)
    return layers, outside


def _row(kernels: list[dict]) -> dict:
    return {"kernels": [[k["name"][:80], round(k["us"], 2)] for k in kernels],
            "count": len(kernels), "sum_us": sum(k["us"] for k in kernels)}


def graph_per_layer(graph_kernels: list[dict], layers: list[dict]) -> list[dict] | None:
    """Each layer's busy time and span inside the graph, when the graph runs the eager step's
    layer kernels in the same order (None otherwise)."""
    names = [k["name"] for k in graph_kernels]
    per_layer = [[k["name"] for k in layer["attention"] + layer["mlp"]] for layer in layers]
    flat = [n for layer in per_layer for n in layer]
    start = next((i for i in range(len(names) - len(flat) + 1)
                  if names[i:i + len(flat)] == flat), None)
    if start is None or not flat:
        return None
    rows, i = [], start
    last = graph_kernels[-1]
    for layer in per_layer:
        run, end = graph_kernels[i:i + len(layer)], i + len(layer)
        stop = graph_kernels[end]["ts"] if end < len(graph_kernels) else last["ts"] + last["us"]
        rows.append({"count": len(run), "busy_us": sum(k["us"] for k in run),
                     "span_us": stop - run[0]["ts"] if run else 0.0})
        i = end
    return rows


def profile_batch(runner, driver, model, batch: int, context: int) -> dict:
    reqs = driver.requests(batch, context, 64)
    for r, _ in reqs:
        r.output_token_ids.append(0)  # the cache holds random KV: decode from `context` on
    for _ in range(3):
        driver.step(reqs, decode=True)  # captures this bucket's graph
    graphs = runner.decode_graphs
    graph = graphs.graphs[graphs.bucket_for(batch)].graph
    row = {"batch": batch, "graph_replay_ms": replay_ms(graph, reps=20)}
    graph_kernels = profiled_kernels(graph.replay)
    saved, runner.decode_graphs = runner.decode_graphs, None
    handles = _add_markers(model)
    try:
        driver.step(reqs, decode=True)  # compiles the markers
        eager = profiled_kernels(lambda: driver.step(reqs, decode=True))
    finally:
        for h in handles:
            h.remove()
        runner.decode_graphs = saved
    layers, outside = split_by_layer(eager)
    row["eager_layers"] = [{"attention": _row(layer["attention"]), "mlp": _row(layer["mlp"])}
                           for layer in layers]
    row["eager_outside_layers"] = _row(outside)
    busy = sum(k["us"] for k in graph_kernels)
    span = graph_kernels[-1]["ts"] + graph_kernels[-1]["us"] - graph_kernels[0]["ts"]
    row["graph"] = {"kernels": len(graph_kernels), "busy_us": busy, "span_us": span,
                    "per_layer": graph_per_layer(graph_kernels, layers)}
    return row


def print_batch(row: dict) -> None:
    print(f"\n=== batch {row['batch']}: graph replay {row['graph_replay_ms'] * 1e3:.1f} us/step; "
          f"in the graph {row['graph']['kernels']} kernels, busy {row['graph']['busy_us']:.1f} "
          f"us, span {row['graph']['span_us']:.1f} us")
    in_graph = row["graph"]["per_layer"] or []
    for i, layer in enumerate(row["eager_layers"]):
        print(f"layer {i}:")
        for part in ("attention", "mlp"):
            p = layer[part]
            print(f"  {part}: {p['count']} kernels, {p['sum_us']:.1f} us (eager GPU time)")
            for name, us in p["kernels"]:
                print(f"    {us:8.2f}  {name}")
        if i < len(in_graph):
            g = in_graph[i]
            print(f"  in the graph: {g['count']} kernels, busy {g['busy_us']:.1f} us, span "
                  f"{g['span_us']:.1f} us (gaps {g['span_us'] - g['busy_us']:.1f} us)")
    out = row["eager_outside_layers"]
    print(f"outside the layers: {out['count']} kernels, {out['sum_us']:.1f} us")
    if not in_graph:
        print("(the graph's kernels differ from the eager step's: no per-layer graph split)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--dry-run", action="store_true", help="import check only, no CUDA")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    cfg = dataclasses.replace(QWEN3_30B_A3B, num_layers=args.layers)
    if args.dry_run:
        print(f"dry run: {cfg.name}, {args.layers} layers, batches {batches}")
        return
    from engine.builder import build_model, init_random_weights
    from engine.kernels.attention_backend import TritonAttentionBackend
    from engine.model_runner import ModelRunner

    torch.manual_seed(0)
    model = build_model(cfg, torch.bfloat16, "cuda")
    init_random_weights(model, seed=0)
    num_blocks = sum(b * -(-(args.context + 64 + 8) // BS) for b in batches) + 64
    kv_cache = torch.zeros(cfg.num_layers, num_blocks, 2, BS, cfg.num_kv_heads, cfg.head_dim,
                           dtype=torch.bfloat16, device="cuda").normal_()
    runner = ModelRunner(model, kv_cache, TritonAttentionBackend(), BS, cfg.vocab_size, "cuda")
    assert runner.decode_graphs is not None, "decode graphs are off: nothing to compare"
    driver = Driver(runner, cfg)
    payload = {"device": device_info(), "model": cfg.name, "num_layers": args.layers,
               "context": args.context, "batches": []}
    for batch in batches:
        row = profile_batch(runner, driver, model, batch, args.context)
        payload["batches"].append(row)
        print_batch(row)
    print(f"wrote {write_results('moe_profile', payload)}")


if __name__ == "__main__":
    main()
