"""The soak (issue 11): minutes of mixed, partly hostile load on a real 1 prefill + 1 decode CPU
cluster, then the books are checked: every response had a status its action allows, every KV
block is back, and the router's and workers' memory, threads and asyncio tasks stayed flat.

Not part of `make test` (marker `soak`); run it with `make soak` (PDSERVE_SOAK_S seconds,
default 600). The figures go to benchmarks/results/soak_cpu.json and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import os
import random
import time
from pathlib import Path

import grpc
import pytest
import ray

from tests.serving.disagg_cluster import REPO_ROOT, cluster_config, local_ray, start_disagg_harness
from tests.serving.hostile_requests import HOSTILE  # every layer must refuse these

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]
DURATION_S = float(os.environ.get("PDSERVE_SOAK_S", "600"))
NUM_CLIENTS = 6
BURST_EVERY_S = 60.0
BURST_SIZE = 150
RSS_GROWTH_BOUND_MB = 64.0  # after warm-up, per process
C = grpc.StatusCode
ALLOWED = {  # action -> statuses it may end with
    "stream": {C.OK},
    "cancel_early": {C.CANCELLED, C.OK},
    "cancel_late": {C.CANCELLED, C.OK},
    "deadline": {C.DEADLINE_EXCEEDED, C.OK},
    "hostile": {C.INVALID_ARGUMENT},
    "burst": {C.OK, C.RESOURCE_EXHAUSTED},
}
# While a burst fills the router's bound, any other call may be shed too: overload is a proper
# answer then (and only then).
DURING_BURST = {C.RESOURCE_EXHAUSTED}


@dataclasses.dataclass
class Books:
    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    wrong: list = dataclasses.field(default_factory=list)
    samples: list = dataclasses.field(default_factory=list)
    bursting: bool = False  # a burst's calls are in flight

    def record(self, action: str, code: grpc.StatusCode) -> None:
        shed = self.bursting and action != "burst" and code in DURING_BURST
        self.counts[f"{action}:{code.name}{' (during a burst)' if shed else ''}"] += 1
        if code not in ALLOWED[action] and not shed:
            self.wrong.append((action, code.name))


async def _finish(call) -> grpc.StatusCode:
    try:
        async for _ in call:
            pass
        return C.OK
    except grpc.aio.AioRpcError as error:
        return error.code()
    except asyncio.CancelledError:  # a call the soak cancelled raises CancelledError
        if not call.cancelled():
            raise
        return C.CANCELLED


async def _act(client, action: str, rng: random.Random) -> grpc.StatusCode:
    if action == "stream":
        return await _finish(client.generate_stream("Tell me a joke.", max_tokens=rng.randint(4, 24),
                                                    temperature=0.7, seed=rng.randint(0, 99)))
    if action == "hostile":
        request = dict(rng.choice(HOSTILE))
        prompt = request.pop("prompt", None)
        return await _finish(client.generate_stream(prompt, max_tokens=4, **request))
    call = client.generate_stream("Write a long story.", max_tokens=200, ignore_eos=True,
                                  timeout_s=rng.uniform(0.5, 3.0) if action == "deadline" else None)
    if action == "deadline":
        return await _finish(call)
    await asyncio.sleep(rng.uniform(0.0, 0.05) if action == "cancel_early" else rng.uniform(0.3, 1.5))
    call.cancel()
    return await _finish(call)


async def _client_loop(client, books: Books, seed: int, until_s: float) -> None:
    rng = random.Random(seed)
    actions = ["stream"] * 4 + ["cancel_early", "cancel_late", "deadline", "hostile"] * 2
    while time.monotonic() < until_s:
        action = rng.choice(actions)
        books.record(action, await _act(client, action, rng))


async def _bursts(client, books: Books, until_s: float) -> None:
    while time.monotonic() + BURST_EVERY_S < until_s:
        await asyncio.sleep(BURST_EVERY_S)
        calls = [client.generate_stream(f"n{i}", max_tokens=4) for i in range(BURST_SIZE)]
        books.bursting = True
        try:
            codes = await asyncio.gather(*(_finish(c) for c in calls))
        finally:
            books.bursting = False
        for code in codes:
            books.record("burst", code)


def _proc(pid: int) -> dict[str, float]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"])}


async def _sampler(pids: dict[str, int], books: Books, until_s: float, every_s: float) -> None:
    started = time.monotonic()
    while time.monotonic() < until_s:
        sample = {name: _proc(pid) for name, pid in pids.items()}
        sample["t_s"] = round(time.monotonic() - started, 1)
        sample["router_tasks"] = len(asyncio.all_tasks())
        books.samples.append(sample)
        await asyncio.sleep(every_s)


def test_soak_mixed_hostile_load():
    config = cluster_config(1, 1, num_blocks=256, transfer_timeout_s=5.0)
    config = dataclasses.replace(config, server=dataclasses.replace(config.server,
                                                                    max_queued_requests=64))
    with local_ray():
        cluster = start_disagg_harness(config)
        try:
            pids = {"router": os.getpid()}
            for w in cluster.backend.pools.all:
                pids[w.spec.instance_id] = ray.get(w.actor.__ray_call__.remote(
                    lambda actor: os.getpid()))
            books = Books()
            until_s = time.monotonic() + DURATION_S

            async def soak():
                loops = [_client_loop(cluster.client, books, seed, until_s)
                         for seed in range(NUM_CLIENTS)]
                await asyncio.gather(_sampler(pids, books, until_s, max(5.0, DURATION_S / 40)),
                                     _bursts(cluster.client, books, until_s), *loops)

            cluster.run(soak(), timeout_s=DURATION_S + 600)
            cluster.wait_until_idle(timeout_s=60)
            final = {name: _proc(pid) for name, pid in pids.items()}
            final["router_tasks"] = cluster.run(_num_tasks())
        finally:
            cluster.close()
    report = _report(books, final, pids)
    out = REPO_ROOT / "benchmarks" / "results" / "soak_cpu.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    assert not books.wrong, collections.Counter(books.wrong)
    for name, growth in report["rss_growth_mb"].items():
        assert growth < RSS_GROWTH_BOUND_MB, f"{name} grew {growth:.1f} MB: {report}"
    for name, growth in report["thread_growth"].items():
        assert growth <= 4, f"{name} has {growth} more threads: {report}"
    assert report["router_tasks_after_idle"] <= report["router_tasks_warm"] + 4, report


async def _num_tasks() -> int:
    return len(asyncio.all_tasks())


def _report(books: Books, final: dict, pids: dict[str, int]) -> dict:
    warm = books.samples[min(len(books.samples) - 1, max(1, len(books.samples) // 10))]
    return {
        "duration_s": DURATION_S, "clients": NUM_CLIENTS, "burst_size": BURST_SIZE,
        "statuses": dict(sorted(books.counts.items())), "wrong_statuses": len(books.wrong),
        "rss_warm_mb": {n: round(warm[n]["rss_mb"], 1) for n in pids},
        "rss_final_mb": {n: round(final[n]["rss_mb"], 1) for n in pids},
        "rss_growth_mb": {n: round(final[n]["rss_mb"] - warm[n]["rss_mb"], 1) for n in pids},
        "thread_growth": {n: final[n]["threads"] - warm[n]["threads"] for n in pids},
        "router_tasks_warm": warm["router_tasks"], "router_tasks_after_idle": final["router_tasks"],
        "samples": books.samples,
    }
