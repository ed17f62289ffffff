"""Routing policies (router/policy.py), the router's prefix index (router/prefix_index.py) and the
backend's load bookkeeping (cluster/routing.py), without Ray: kv_aware goes where the prefix is
cached unless the queue there costs more than the hit saves; a burst spreads because load counts
from assignment; a restarted instance's view starts empty; gaps and drops ask for a snapshot."""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack

import pytest
from prometheus_client import CollectorRegistry

from cluster.lifecycle import Supervisor
from cluster.pools import Pools, Worker
from cluster.routing import Routing
from cluster.worker_spec import WorkerSpec
from engine.config import CacheConfig, EngineConfig
from pdserve.metrics import MetricFactory
from protos.pdserve.v1 import generation_pb2, worker_pb2
from router.policy import (DecodeCandidate, KVAwarePolicy, LeastLoadedPolicy, PrefillCandidate,
                           RequestView, RoundRobinPolicy, RoutingConfig)
from router.prefix_index import PrefixIndex, request_block_hashes

BS = 4
VIEW = RequestView(num_tokens=400, block_hashes=(), block_size=BS)


def _decode(wid: str, free: int = 100, requests: int = 0, needed: int = 10) -> DecodeCandidate:
    return DecodeCandidate(wid, free, 100, requests, needed)


# ---- policies -------------------------------------------------------------------------------
def test_kv_aware_goes_where_the_prefix_is_cached_unless_its_queue_costs_more():
    policy = KVAwarePolicy(RoutingConfig())
    cold, warm = PrefillCandidate("p0", 0, 0), PrefillCandidate("p1", 100, 384)
    assert policy.choose(VIEW, [cold, warm], [_decode("d0")]).prefill is warm  # 116 < 400
    busy = PrefillCandidate("p1", 500, 384)
    assert policy.choose(VIEW, [cold, busy], [_decode("d0")]).prefill is cold  # 516 > 400


def test_least_loaded_and_round_robin_ignore_the_cache():
    cold, warm = PrefillCandidate("p0", 0, 0), PrefillCandidate("p1", 100, 384)
    assert LeastLoadedPolicy().choose(VIEW, [cold, warm], [_decode("d0")]).prefill is cold
    rr = RoundRobinPolicy()
    picks = [rr.choose(VIEW, [cold, warm], [_decode("d0"), _decode("d1")]) for _ in range(4)]
    assert [c.prefill.instance_id for c in picks] == ["p0", "p1", "p0", "p1"]
    assert [c.decode.instance_id for c in picks] == ["d0", "d1", "d0", "d1"]


def test_decode_ranking_counts_requests_and_kv_and_puts_what_cannot_fit_last():
    policy = KVAwarePolicy(RoutingConfig())
    full, busy, idle = _decode("full", free=5), _decode("busy", requests=8), _decode("idle")
    order = policy.choose(VIEW, [PrefillCandidate("p0", 0, 0)], [full, busy, idle]).decode_order
    assert [c.instance_id for c in order] == ["idle", "busy", "full"]
    tight = _decode("tight", free=12)  # fits, but would leave its pool almost full
    assert policy.choose(VIEW, [PrefillCandidate("p0", 0, 0)], [tight, busy]).decode is busy
    ties = LeastLoadedPolicy().choose(VIEW, [PrefillCandidate("p0", 0, 0)],
                                      [_decode("a", requests=2), _decode("b", requests=1)])
    assert ties.decode.instance_id == "b"  # equal free blocks: fewer requests


def test_the_config_names_the_choices():
    with pytest.raises(ValueError, match="routing.policy must be one of kv_aware, least_loaded, "
                                         "round_robin, got 'random'"):
        RoutingConfig(policy="random")
    with pytest.raises(ValueError, match="routing.decode_kv_cost_tokens must be >= 0"):
        RoutingConfig(decode_kv_cost_tokens=-1)


# ---- the prefix index -------------------------------------------------------------------------
def _batch(seq: int, stored=(), evicted=(), epoch="e1", dropped=0, snapshot=False):
    return worker_pb2.KVEvents(epoch=epoch, seq=seq, stored=stored, evicted=evicted,
                               num_dropped=dropped, is_snapshot=snapshot)


def test_the_index_follows_batches_in_order_and_counts_leading_blocks():
    index = PrefixIndex()
    assert not index.apply("p0", _batch(1, stored=(1, 2, 3)))
    assert not index.apply("p0", _batch(2, evicted=(2,)))
    assert not index.apply("p0", _batch(2))  # a duplicate: ignored
    assert index.num_cached_blocks("p0", (1, 2, 3)) == 1  # block 2 gone: the chain stops
    assert index.num_cached_blocks("p1", (1,)) == 0


def test_a_gap_asks_for_a_snapshot_and_later_batches_apply_after_it():
    index = PrefixIndex()
    index.apply("p0", _batch(1, stored=(1,)))
    assert index.apply("p0", _batch(3, stored=(9,)))  # batch 2 lost
    assert index.needs_resync("p0") and index.num_cached_blocks("p0", (9,)) == 0
    assert not index.apply("p0", _batch(2, stored=(1, 5), snapshot=True))
    assert index.num_cached_blocks("p0", (1, 5, 9)) == 3 and not index.needs_resync("p0")
    index.apply("p0", _batch(1, stored=(7,), snapshot=True))  # older than applied: ignored
    assert index.num_cached_blocks("p0", (1, 5, 9)) == 3


def test_dropped_events_and_a_new_epoch_ask_again_and_forget_clears():
    index = PrefixIndex()
    index.apply("p0", _batch(1, stored=(1,)))
    assert index.apply("p0", _batch(2, stored=(2,), dropped=3))
    index.apply("p0", _batch(3, stored=(5,), snapshot=True))
    assert index.num_cached_blocks("p0", (5,)) == 1 and index.num_cached_blocks("p0", (1,)) == 0
    assert not index.apply("p0", _batch(1, stored=(8,), epoch="e2"))  # restarted: from scratch
    assert index.num_cached_blocks("p0", (5,)) == 0 and index.num_cached_blocks("p0", (8,)) == 1
    assert index.apply("p0", _batch(4, stored=(6,), epoch="e3"))  # joined late: resync
    index.forget("p0")
    assert index.num_hashes("p0") == 0 and not index.needs_resync("p0")


# ---- the backend's bookkeeping ----------------------------------------------------------------
def _worker(wid: str, role: str) -> Worker:
    engine = EngineConfig(model="unused", device="cpu", cache=CacheConfig(block_size=BS))
    return Worker(WorkerSpec(wid, role, engine), actor=None)


@pytest.fixture()
def routing():
    pools = Pools([_worker("prefill-0", "prefill"), _worker("prefill-1", "prefill")],
                  [_worker("decode-0", "decode"), _worker("decode-1", "decode")])
    supervisor = Supervisor(pools.all, on_dead=lambda w, reason: None)
    for w in pools.all:
        supervisor.mark_ready(w)
    spawned: list = []
    registry = CollectorRegistry()
    r = Routing(pools, supervisor, RoutingConfig(), MetricFactory("m", registry), spawned.append)
    for w in pools.decode:
        r.follow(w, generation_pb2.InstanceState(total_kv_blocks=1000, free_kv_blocks=1000))
    r.spawned, r.registry = spawned, registry
    yield r
    for coro in spawned:
        coro.close()


def _prefilled(routing: Routing, worker: Worker, events: worker_pb2.KVEvents) -> None:
    routing.prefilled(worker, worker_pb2.PrefillResult(kv_events=events))


def test_a_burst_spreads_because_load_counts_from_assignment(routing):
    """As an attempt does: route, then reserve on the first decode instance (no await between),
    four times before any instance answers."""
    tokens = list(range(3, 103))
    with ExitStack() as stack:
        routes = []
        for _ in range(4):
            route = stack.enter_context(routing.route(tokens))
            stack.enter_context(routing.reserving(route.decode_order[0], len(tokens) + 1))
            routes.append(route)
        assert Counter(r.prefill.spec.instance_id for r in routes) == {"prefill-0": 2,
                                                                       "prefill-1": 2}
        assert Counter(r.decode_order[0].spec.instance_id for r in routes) == {"decode-0": 2,
                                                                               "decode-1": 2}
    with routing.route(tokens) as route:  # every prefill answered: the queues are empty again
        assert route.num_queued_tokens == 100
        routing.reserved(route.decode_order[0], worker_pb2.ReserveReply(
            accepted=True, num_free_blocks=974), "a")
    with routing.route(tokens) as other:  # an accepted request counts until its attempt ends
        assert other.decode_order[0] is not route.decode_order[0]
    routing.decode_done(route.decode_order[0], "a")
    routing.decode_done(route.decode_order[0], "a")  # idempotent
    routing.observe(worker_pb2.DecodeOutputs(instance_id="decode-0", state=generation_pb2.
                                             InstanceState(total_kv_blocks=1000,
                                                           free_kv_blocks=1000)))
    with routing.route(tokens) as again:  # both idle again: the pool's order
        assert again.decode_order[0] is route.decode_order[0]


def test_kv_aware_routes_a_shared_prefix_to_the_instance_that_reported_it(routing):
    prefill_1 = routing.pools.prefill[1]
    prompt = list(range(3, 203))
    hashes = request_block_hashes(prompt, BS)
    _prefilled(routing, prefill_1, _batch(1, stored=hashes))
    follow_up = prompt + list(range(500, 520))
    with routing.route(follow_up) as route:
        assert route.prefill is prefill_1 and route.num_cached_tokens == len(hashes) * BS
        assert route.num_queued_tokens == len(follow_up) - len(hashes) * BS
    with routing.route(follow_up, cache_salt="other-tenant") as route:
        assert route.num_cached_tokens == 0  # a salt names other blocks
    hit = routing.registry.get_sample_value("pdserve:router_prefix_hit_tokens_total",
                                            {"model_name": "m", "policy": "kv_aware"})
    routed = routing.registry.get_sample_value("pdserve:router_routed_requests_total",
                                               {"model_name": "m", "policy": "kv_aware",
                                                "instance_id": "prefill-1"})
    assert hit == len(hashes) * BS and routed >= 1
    routing.follow(prefill_1)  # a new incarnation: its view starts empty
    with routing.route(follow_up) as route:
        assert route.num_cached_tokens == 0


def test_a_gap_spawns_one_resync(routing):
    prefill_0 = routing.pools.prefill[0]
    _prefilled(routing, prefill_0, _batch(1, stored=(1,)))
    _prefilled(routing, prefill_0, _batch(3, stored=(2,)))
    _prefilled(routing, prefill_0, _batch(4, stored=(3,)))  # one resync in flight is enough
    assert len(routing.spawned) == 1
    assert routing.registry.get_sample_value("pdserve:router_kv_resyncs_total",
                                             {"model_name": "m"}) == 1
