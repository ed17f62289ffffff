"""Goodput of disaggregation: 1 prefill + 1 decode instance against two colocated instances,
on the same two GPUs, behind one router, under the same prefill-heavy load.

  (a) disaggregated: the serving cluster (benchmarks/multigpu_cluster.py), 1P + 1D at TP=1,
      KV over NCCL between the GPUs;
  (b) colocated: two `ColocatedBackend`s, one engine per GPU, behind one router in this process
      (`ColocatedPair`: each request to the instance with fewer requests in flight).
The load is `benchmarks/serving.py`'s (gRPC client, Poisson arrivals, ShareGPT-like input
lengths, outputs capped at `--output-len`), at each of `--rates`. Per setup: the highest rate at
which >= 90% of requests meet TTFT <= 200 ms and TPOT <= 20 ms (DistServe's goodput), p99
inter-token latency per rate, and the ratio (a)/(b) of those rates (issue 20's target: >= 1.5).

  issue 20 part 3: python benchmarks/goodput.py
  dry run:         python benchmarks/goodput.py --device cpu --tiny
The disaggregated setup needs Ray and grpcio >= 1.85: on a GPU machine build .whl/ with
shared/device/make-wheels.sh, carry it, and install it first (benchmarks/multigpu_suite.sh
install); this script stops at once with that message when either is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: its kernels.py

import torch  # noqa: E402

from benchmarks.multigpu_cluster import (ClusterLayout, PoolLayout, cluster_config,  # noqa: E402
                                         running_cluster, start_ray)
from benchmarks.multigpu_common import (RunMode, add_mode_args, gpu_facts,  # noqa: E402
                                        mode_from_args, model_folder, require_cluster_packages,
                                        write_json)

DISAGG = ClusterLayout("1P-tp1_1D-tp1", PoolLayout(1, 1), PoolLayout(1, 1))
SLOS = ("ttft:200", "tpot:20")
ATTAINMENT = 0.9


class ColocatedPair:
    """A `GenerationBackend` over several colocated backends: each request goes to the one
    with the fewest requests in flight (ties: the first)."""

    def __init__(self, backends: list) -> None:
        self.backends = backends
        self.in_flight = [0] * len(backends)
        self.num_routed = [0] * len(backends)  # requests sent to each, for the results

    async def start(self) -> None:
        for backend in self.backends:
            await backend.start()

    async def stop(self) -> None:
        for backend in self.backends:
            await backend.stop()

    def is_ready(self) -> bool:
        return all(b.is_ready() for b in self.backends)

    def model_info(self):
        return self.backends[0].model_info()

    @property
    def tokenizer(self):
        return self.backends[0].tokenizer

    async def generate(self, inp) -> AsyncIterator:
        i = min(range(len(self.backends)), key=self.in_flight.__getitem__)
        self.in_flight[i] += 1
        self.num_routed[i] += 1
        try:
            async for event in self.backends[i].generate(inp):
                yield event
        finally:
            self.in_flight[i] -= 1

    async def abort(self, request_id: str) -> bool:
        return any([await b.abort(request_id) for b in self.backends])

    async def cluster_state(self) -> list:
        return [s for b in self.backends for s in await b.cluster_state()]

    async def drain_instance(self, instance_id: str, timeout_s: float | None) -> int:
        return await self.backends[0].drain_instance(instance_id, timeout_s)


def colocated_backend(folder: Path, mode: RunMode, gpu: int, max_queued: int):
    """One engine on `gpu`, and a ColocatedBackend whose engine thread runs on that GPU."""
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from engine.llm_engine import LLMEngine
    from router.colocated import ColocatedBackend

    if mode.device == "cuda":
        torch.cuda.set_device(gpu)  # the engine builds on the current device
    engine = LLMEngine(EngineConfig(
        model=str(folder), device=mode.device, dtype=mode.dtype,
        attention_backend="torch" if mode.device == "cpu" else "auto",
        cache=CacheConfig(block_size=16, num_blocks=1024 if mode.tiny else None,
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192)))
    backend = ColocatedBackend(engine, max_queued)  # its engine thread sets the engine's GPU
    if mode.device == "cuda":
        torch.cuda.set_device(0)
    return backend


@contextlib.asynccontextmanager
async def colocated_router(folder: Path, mode: RunMode, max_queued: int = 4096):
    from router.server import start_router

    pair = ColocatedPair([colocated_backend(folder, mode, gpu, max_queued) for gpu in (0, 1)])
    router = await start_router(pair, "127.0.0.1", 0)
    try:
        yield router.address, pair
    finally:
        await router.stop(grace_s=1.0)


async def sweep(address: str, rates: list[float], load_flags: list[str]) -> list[dict]:
    """serving.py's load at each rate against the router at `address`."""
    from benchmarks.serving import benchmark, parse_args

    rows = []
    for rate in rates:
        args = parse_args(["--address", address, "--request-rate", str(rate), "--goodput",
                           *SLOS, *load_flags])
        summary = await benchmark(args)
        rows.append({"rate": rate, **{k: summary.get(k) for k in (
            "slo_attainment", "request_goodput", "request_throughput", "failed_requests",
            "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "p99_itl_ms",
            "server_timing_mean_ms")}})
        print(rows[-1], flush=True)
    return rows


def goodput_rate(rows: list[dict]) -> float | None:
    """The highest rate at which the SLOs held for >= 90% of requests."""
    passing = [r["rate"] for r in rows if (r["slo_attainment"] or 0) >= ATTAINMENT
               and not r["failed_requests"]]
    return max(passing) if passing else None


async def run_disaggregated(folder: Path, mode: RunMode, rates, flags, max_prompt: int):
    config = cluster_config(folder, mode, DISAGG, max_prompt, 1024 if mode.tiny else None)
    async with running_cluster(config) as (cluster, _):
        return await sweep(cluster.router.address, rates, flags)


async def run_colocated(folder: Path, mode: RunMode, rates, flags) -> tuple[list[dict], list]:
    async with colocated_router(folder, mode) as (address, pair):
        return await sweep(address, rates, flags), pair.num_routed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-3-8b")
    p.add_argument("--rates", default="2,4,6,8,12,16", help="requests per second, ascending")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--output-len", type=int, default=64, help="every output's length")
    p.add_argument("--max-duration-s", type=float, default=120.0, help="per rate")
    p.add_argument("--model-dir", type=Path, default=None)
    add_mode_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = mode_from_args(args, 2)
    require_cluster_packages()
    if mode.tiny:
        rates = [2.0, 8.0]
        flags = ["--dataset", "random", "--random-input-len", "48", "--random-output-len", "6",
                 "--num-prompts", "8", "--max-duration-s", "120"]
        max_prompt = 64
    else:
        rates = [float(r) for r in args.rates.split(",")]
        flags = ["--dataset", "sharegpt-like", "--sharegpt-output-len", str(args.output_len),
                 "--num-prompts", str(args.num_prompts),
                 "--max-duration-s", str(args.max_duration_s)]
        max_prompt = 8192
    folder = model_folder(args.shape, mode,
                          args.model_dir or Path(tempfile.mkdtemp(prefix="pdserve-models-")))
    colocated, routed = asyncio.run(run_colocated(folder, mode, rates, flags))
    gc.collect()  # the two colocated engines' weights and KV, before the cluster takes the GPUs
    if mode.device == "cuda":
        torch.cuda.empty_cache()
    start_ray(mode)
    disagg = asyncio.run(run_disaggregated(folder, mode, rates, flags, max_prompt))
    rate_a, rate_b = goodput_rate(disagg), goodput_rate(colocated)
    payload = {"shape": args.shape, "tiny": mode.tiny, "facts": gpu_facts(),
               "slos_ms": SLOS, "attainment": ATTAINMENT, "load": flags,
               "disaggregated_1p1d": {"goodput_rate": rate_a, "rates": disagg},
               "colocated_x2": {"goodput_rate": rate_b, "rates": colocated,
                                "requests_per_instance": routed},
               "ratio": rate_a / rate_b if rate_a and rate_b else None, "target_ratio": 1.5}
    path = write_json(mode, "goodput", payload)
    print(f"goodput rate: 1P+1D {rate_a}, 2 colocated {rate_b}, ratio {payload['ratio']}; "
          f"wrote {path}")
    failed = sum(r["failed_requests"] or 0 for r in disagg + colocated)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
