"""KV-aware routing on a real 2 prefill + 2 decode CPU cluster (local Ray, prefix caching on in
both pools): a request that shares a long prefix with an earlier one goes to the prefill instance
that holds it, although the tie-break prefers the other (visible in the router's metrics, and the
instance's own prefix-cache hits confirm the prediction); greedy outputs equal a colocated engine
without caching; a gap in an instance's event batches makes the router resync its view."""

from __future__ import annotations

import dataclasses
import time
import urllib.request

import pytest
import ray

from router.policy import RoutingConfig
from tests.helpers import build_engine
from tests.serving.disagg_cluster import (GREEDY_16, assert_equal_or_near_tie, cluster_config,
                                          local_ray, start_disagg_harness)

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def cluster():
    config = cluster_config(2, 2)
    config = dataclasses.replace(
        config, routing=RoutingConfig(policy="kv_aware"),
        prefill=dataclasses.replace(config.prefill, prefix_caching=True),
        decode=dataclasses.replace(config.decode, prefix_caching=True))
    with local_ray(num_cpus=8):
        harness = start_disagg_harness(config)
        yield harness
        harness.close()


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _router_metric(cluster, name: str, **labels: str) -> float:
    registry = cluster.backend.metrics.registry
    value = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                value += sample.value
    return value


def _routed(cluster, instance_id: str) -> float:
    return _router_metric(cluster, "pdserve:router_routed_requests_total",
                          instance_id=instance_id)


def _worker_hits(worker) -> float:
    with urllib.request.urlopen(f"http://{worker.metrics_address}/metrics", timeout=10) as r:
        return _metric(r.read().decode(), "pdserve:prefix_cache_hits_total")


def _generate(cluster, prompt: list[int]) -> list[int]:
    async def call():
        return await cluster.client.generate(prompt_token_ids=prompt, max_tokens=16,
                                             temperature=0.0)
    return list(cluster.run(call(), timeout_s=300).token_ids)


def _set_draining(cluster, worker, draining: bool) -> None:
    supervisor = cluster.backend.supervisor

    async def mark():
        if draining:
            supervisor.mark_draining(worker, "test: routed around")
        else:
            supervisor.mark_ready(worker)
    cluster.run(mark())


def _prompts(tokenizer) -> tuple[list[int], list[int], list[int]]:
    system = tokenizer.encode("You are a careful assistant who answers in one sentence. " * 20)
    system = system[:160]  # 10 full blocks of 16
    ask = [tokenizer.encode(q) for q in (" Question: what is the capital of France?",
                                          " Question: name three colors.",
                                          " Question: what is 12 times 11?")]
    return system + ask[0], system + ask[1], system + ask[2]


def test_a_shared_prefix_goes_to_the_prefill_instance_that_holds_it(cluster, default_loaded):
    prefill_0, prefill_1 = cluster.backend.pools.prefill
    first, second, _ = _prompts(default_loaded.tokenizer)
    _set_draining(cluster, prefill_0, True)  # the first request can only warm prefill-1
    try:
        got_first = _generate(cluster, first)
    finally:
        _set_draining(cluster, prefill_0, False)
    assert _routed(cluster, "prefill-1") == 1 and _routed(cluster, "prefill-0") == 0
    hits_before = _worker_hits(prefill_1)
    got_second = _generate(cluster, second)  # idle cluster: only the cache argues for prefill-1
    assert _routed(cluster, "prefill-1") == 2 and _routed(cluster, "prefill-0") == 0
    predicted = _router_metric(cluster, "pdserve:router_prefix_hit_tokens_total")
    assert predicted == 160  # its 10 system-prompt blocks, as the router predicted them ...
    deadline = time.monotonic() + 20  # its /metrics is published after each engine iteration
    while _worker_hits(prefill_1) - hits_before < 160 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _worker_hits(prefill_1) - hits_before == 160  # ... and as the instance found them
    engine = build_engine(default_loaded)  # colocated, no prefix caching: the reference
    for prompt, got, want in zip((first, second), (got_first, got_second),
                                 engine.generate([first, second], GREEDY_16)):
        assert_equal_or_near_tie(engine, prompt, got, want.token_ids)
    cluster.wait_until_idle()


def test_a_gap_in_the_events_resyncs_the_routers_view(cluster, default_loaded):
    prefill_1 = cluster.backend.pools.prefill[1]
    _, _, third = _prompts(default_loaded.tokenizer)
    resyncs = _router_metric(cluster, "pdserve:router_kv_resyncs_total")
    # a snapshot the router did not ask for takes a batch number: its next batch has a gap
    held = set(ray.get(prefill_1.actor.kv_snapshot.remote()).stored)
    assert len(held) >= 10
    got = _generate(cluster, third)
    assert _routed(cluster, "prefill-1") == 3  # still predicted from the view it had
    deadline = time.monotonic() + 30
    index = cluster.backend.routing.index
    while index.needs_resync("prefill-1") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _router_metric(cluster, "pdserve:router_kv_resyncs_total") == resyncs + 1
    now = set(ray.get(prefill_1.actor.kv_snapshot.remote()).stored)  # (another gap, unused)
    assert index.num_hashes("prefill-1") == len(now) and now >= held
    engine = build_engine(default_loaded)
    assert_equal_or_near_tie(engine, third, got,
                             engine.generate([third], GREEDY_16)[0].token_ids)
    cluster.wait_until_idle()
