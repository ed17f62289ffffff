"""Multi-turn chat replay against a CPU 2P+2D cluster: routing policies and prefix caching on/off
compared in one run (`benchmarks/serving.py --multiturn FILE`; the file comes from
benchmarks/multiturn_workload.py).

For each variant the same workload is replayed (benchmarks/multiturn_replay.py, shared with the
GPU run multiturn_gpu.py): every conversation runs its turns in order (each prompt = system + the
earlier turns and the answers the server gave + the new user turn), all conversations at once.
Variants on one cluster (prefix caching on) switch the router's policy between runs
(`Routing.use_policy`); each run's token ids are shifted by a run-specific offset, so no run
finds the previous run's blocks in a cache (same lengths, same sharing). The "cache off"
variant runs on a second cluster started with `prefix_caching: false` in both pools.

Reported per variant: TTFT p50/p99 (client side), prefill tokens computed (prompt tokens sent
minus the prefill instances' prefix-cache hits, from their /metrics), the hit rate, and the
router's predicted hit tokens, plus how the requests spread over the prefill instances.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.multiturn_replay import StreamFn, replay, summarize
from benchmarks.multiturn_replay import shifted  # noqa: F401  (tests import it from here)
from benchmarks.multiturn_workload import FIRST_TOKEN_ID, Workload
from router.client import PdserveClient
from router.policy import RoutingConfig

BENCHMARKS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True, slots=True)
class Variant:
    policy: str
    prefix_caching: bool

    @property
    def name(self) -> str:
        return f"{self.policy}/cache_{'on' if self.prefix_caching else 'off'}"


VARIANTS = (Variant("kv_aware", True), Variant("least_loaded", True),
            Variant("round_robin", True), Variant("kv_aware", False),
            Variant("least_loaded", False))


def cluster_config(num_kv_blocks: int, prefix_caching: bool):
    """2 prefill + 2 decode CPU instances of the default model, loopback, free ports."""
    from cluster.config import cluster_config_from_dict

    pool = {"num_instances": 2, "cpus_per_instance": 0.5, "num_kv_blocks": num_kv_blocks,
            "max_num_batched_tokens": 2048, "prefix_caching": prefix_caching}
    return cluster_config_from_dict({
        "model": "default", "device": "cpu", "dtype": "float32", "block_size": 16,
        "prefill": pool, "decode": pool,
        "server": {"grpc_host": "127.0.0.1", "grpc_port": 0, "metrics_port": 0,
                   "worker_metrics_port_base": 0, "max_queued_requests": 256},
        "transfer": {"timeout_s": 60}, "placement_timeout_s": 120,
    })


def client_stream(client: PdserveClient, timeout_s: float) -> StreamFn:
    """The replay's token stream over the router's gRPC API (greedy, ignore_eos)."""

    async def stream(prompt: list[int], max_tokens: int) -> AsyncIterator[list[int]]:
        async for response in client.generate_stream(
                prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0,
                ignore_eos=True, timeout_s=timeout_s):
            yield list(response.token_ids)

    return stream


def _scrape(address: str, name: str) -> float:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def prefill_hits(cluster) -> dict[str, float]:
    return {w.spec.instance_id: _scrape(w.metrics_address, "pdserve:prefix_cache_hits_total")
            for w in cluster.backend.pools.prefill}


def router_counts(cluster, policy: str) -> tuple[dict[str, float], float]:
    """Requests routed to each prefill instance, and predicted hit tokens, under `policy`."""
    routed, predicted = {}, 0.0
    for family in cluster.backend.metrics.registry.collect():
        for s in family.samples:
            if s.labels.get("policy") != policy:
                continue
            if s.name == "pdserve:router_routed_requests_total":
                routed[s.labels["instance_id"]] = s.value
            elif s.name == "pdserve:router_prefix_hit_tokens_total":
                predicted = s.value
    return routed, predicted


async def run_variant(cluster, client, workload: Workload, variant: Variant, run: int,
                      timeout_s: float) -> dict:
    cluster.backend.routing.use_policy(RoutingConfig(policy=variant.policy))
    hits_before = prefill_hits(cluster)
    routed_before, predicted_before = router_counts(cluster, variant.policy)
    started = time.perf_counter()
    turns = await replay(client_stream(client, timeout_s), workload, run)
    duration_s = time.perf_counter() - started
    await asyncio.sleep(1.5)  # the workers publish their counters after each engine iteration
    hits_after = prefill_hits(cluster)
    routed_after, predicted_after = router_counts(cluster, variant.policy)
    hits = sum(hits_after.values()) - sum(hits_before.values())
    return {"variant": variant.name, "policy": variant.policy,
            "ttfts_ms": [t.ttft_s * 1e3 for t in turns],
            "prefix_caching": variant.prefix_caching, "duration_s": round(duration_s, 2),
            **summarize(turns, int(hits)),
            "router_predicted_hit_tokens": int(predicted_after - predicted_before),
            "routed_per_prefill_instance": {k: int(v - routed_before.get(k, 0.0))
                                            for k, v in sorted(routed_after.items())}}


async def run_cluster(workload: Workload, variants: list[Variant], prefix_caching: bool,
                      num_kv_blocks: int, timeout_s: float, first_run: int) -> list[dict]:
    from cluster.serve import ServingCluster

    cluster = await ServingCluster.start(cluster_config(num_kv_blocks, prefix_caching))
    client = PdserveClient(cluster.router.address)
    try:
        warm = list(range(FIRST_TOKEN_ID, FIRST_TOKEN_ID + 32))
        for _ in range(4):  # every instance compiles its first steps before the clock starts
            await client.generate(prompt_token_ids=warm, max_tokens=2, temperature=0.0)
        results = []
        for run, variant in enumerate(variants, start=first_run):
            results.append(await run_variant(cluster, client, workload, variant, run, timeout_s))
            print({k: v for k, v in results[-1].items() if k != "ttfts_ms"}, flush=True)
        return results
    finally:
        await client.close()
        await cluster.stop(grace_s=1.0)


def by_variant(results: list[dict]) -> dict[str, dict]:
    """Each variant over its runs: TTFT percentiles of every turn pooled, token counts summed."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in results):
        runs = [r for r in results if r["variant"] == name]
        ttfts = np.array([t for r in runs for t in r["ttfts_ms"]])
        tokens = {key: sum(r[key] for r in runs) for key in
                  ("prompt_tokens", "prefill_tokens_computed", "prefix_hit_tokens",
                   "router_predicted_hit_tokens")}
        out[name] = {"runs": len(runs), "ttft_p50_ms": round(float(np.median(ttfts)), 1),
                     "ttft_p99_ms": round(float(np.percentile(ttfts, 99)), 1), **tokens,
                     "hit_rate": round(tokens["prefix_hit_tokens"] / tokens["prompt_tokens"], 4)}
    return out


async def compare(workload: Workload, num_kv_blocks: int = 1024, timeout_s: float = 600.0,
                  repeats: int = 2) -> dict:
    """Every variant of VARIANTS; one cluster with prefix caching on, one with it off. With
    caching on, the policies run `repeats` times in alternating order (then reversed, ...), so
    that a drift of the machine's load does not favour the one that runs first."""
    results = []
    for caching in (True, False):
        chosen = [v for v in VARIANTS if v.prefix_caching == caching]
        if caching:
            chosen = [v for r in range(repeats) for v in (chosen if r % 2 == 0 else chosen[::-1])]
        results += await run_cluster(workload, chosen, caching, num_kv_blocks, timeout_s,
                                     first_run=len(results) + 1)
    summary = by_variant(results)
    for r in results:
        del r["ttfts_ms"]
    return {"workload": {"conversations": len(workload.conversations),
                         "turns": len(workload.conversations[0].turns),
                         "system_tokens": len(workload.system_token_ids),
                         "requests": workload.num_requests},
            "cluster": "2 prefill + 2 decode CPU instances, default model (SmolLM2-135M, "
                       "fp32), block_size 16, 0.5 Ray CPU and 1 torch thread each, "
                       f"{num_kv_blocks} KV blocks per instance",
            "by_variant": summary, "results": results}


def run(workload_path, result_file, timeout_s: float, num_kv_blocks: int = 1024) -> dict:
    """The --multiturn mode of benchmarks/serving.py: start a private Ray, compare, write."""
    import json
    import os
    import platform

    from cluster.ray_runtime import init_ray

    # run as a script, benchmarks/ is on sys.path, and its kernels.py would shadow the `kernels`
    # package that transformers imports while the router loads the tokenizer
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCHMARKS_DIR]
    init_ray("local", "pdserve-multiturn-bench")
    summary = asyncio.run(compare(Workload.load(workload_path), num_kv_blocks, timeout_s))
    summary |= {"workload_file": str(workload_path), "python": platform.python_version(),
                "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if result_file is not None:
        result_file.parent.mkdir(parents=True, exist_ok=True)
        result_file.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {result_file}")
    return summary

