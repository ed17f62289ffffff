"""Where a request goes: the disaggregated backend's load bookkeeping around a `RoutingPolicy`.

The policy (router/policy.py, chosen by the config's `routing.policy`) ranks candidates; this
module gives it what it ranks, all counted in the router process, on its event loop:

    prefill  queued tokens: the predicted uncached tokens of every request assigned to the
             instance, counted from the moment it is chosen (`route`) until its PrefillResult
             arrives or the attempt gives up; predicted cached tokens from the instance's
             block-hash events (router/prefix_index.py), which arrive on its PrefillResults
    decode   free blocks: learnt from each instance's step outputs and reserve replies, minus
             the blocks of reservations still in flight; requests: accepted reservations whose
             attempt has not ended (`decode_done`)

Health checks never touch these counters; a new incarnation of an instance (`follow`) starts
from zero, with an empty cache view that its own events rebuild (a new epoch, or a gap in the
batch numbers, makes the router ask the instance for a snapshot: `_resync`).

The policy only reads the supervisor's lifecycle states; it never changes them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cluster.lifecycle import Supervisor
from cluster.pools import Pools, Worker, await_ref
from pdserve.metrics import MetricFactory
from protos.pdserve.v1 import generation_pb2, worker_pb2
from router.policy import (POLICIES, DecodeCandidate, PrefillCandidate, RequestView,
                           RoutingConfig, make_policy)
from router.prefix_index import PrefixIndex, request_block_hashes

log = logging.getLogger(__name__)
SNAPSHOT_TIMEOUT_S = 30.0  # one instance's snapshot of its cached block hashes


@dataclass(slots=True)
class Route:
    """One attempt's instances: the prefill one, and the decode ones to try in order."""

    prefill: Worker
    decode_order: list[Worker]
    num_tokens: int
    num_cached_tokens: int  # predicted on the prefill instance
    num_queued_tokens: int  # what this route adds to the prefill instance's queue


class RoutingMetrics:
    """pdserve:router_routed_requests_total{policy,instance_id}  attempts sent to each prefill
                                                                  instance, by policy
    pdserve:router_prefix_query_tokens_total{policy}            tokens of routed requests
    pdserve:router_prefix_hit_tokens_total{policy}              of those, predicted cached on
                                                                  the chosen prefill instance
    pdserve:router_kv_resyncs_total                             snapshots asked after a new
                                                                  epoch, a gap or dropped events"""

    def __init__(self, factory: MetricFactory) -> None:
        self.routed = factory.counter_by_each(
            "router_routed_requests", "Attempts routed to each prefill instance, by policy",
            "policy", POLICIES, "instance_id", ())
        self.query_tokens = factory.counter_by(
            "router_prefix_query_tokens", "Tokens of routed requests", "policy", POLICIES)
        self.hit_tokens = factory.counter_by(
            "router_prefix_hit_tokens",
            "Tokens of routed requests predicted cached on the chosen prefill instance",
            "policy", POLICIES)
        self.resyncs = factory.counter(
            "router_kv_resyncs", "Snapshots of an instance's cached block hashes asked")

    def count(self, policy: str, route: Route) -> None:
        self.routed[policy][route.prefill.spec.instance_id].inc()
        self.query_tokens[policy].inc(route.num_tokens)
        self.hit_tokens[policy].inc(route.num_cached_tokens)


class Routing:
    """Load per instance, the prefix index, and the choice of instances for one attempt."""

    def __init__(self, pools: Pools, supervisor: Supervisor, config: RoutingConfig | None = None,
                 metrics: MetricFactory | None = None,
                 spawn: Callable[[object], None] | None = None) -> None:
        self.pools = pools
        self._supervisor = supervisor
        self.use_policy(config or RoutingConfig())
        self.index = PrefixIndex()
        self.metrics = RoutingMetrics(metrics) if metrics else None
        self._spawn = spawn
        self._prefill_tokens = {w.spec.instance_id: 0 for w in pools.prefill}
        self._decode_state: dict[str, generation_pb2.InstanceState] = {}
        self._reserving_blocks: dict[str, int] = {}  # per decode instance, reserves in flight
        self._decode_requests: dict[str, set[str]] = {}  # per decode instance, attempt ids
        self._resyncing: set[str] = set()

    def follow(self, worker: Worker, state: generation_pb2.InstanceState | None = None) -> None:
        """Start tracking a (new) instance; a decode instance's first known state. A new
        incarnation's cache view starts empty: its events rebuild it."""
        wid = worker.spec.instance_id
        self.index.forget(wid)
        if worker.spec.role == "prefill":  # routes to the old incarnation uncount themselves
            self._prefill_tokens.setdefault(wid, 0)
        else:  # the old incarnation's requests are not the new one's
            self._decode_requests[wid] = set()
        if state is not None:
            self._decode_state[wid] = state

    def use_policy(self, config: RoutingConfig) -> None:
        """Route from now on by `config` (the load counts and cache views carry over)."""
        self.config = config
        self.policy = make_policy(config)

    def observe(self, outputs: worker_pb2.DecodeOutputs) -> None:
        """A decode instance's step outputs carry its state (free blocks, running requests)."""
        self._decode_state[outputs.instance_id] = outputs.state

    # ---- the choice -----------------------------------------------------------------------
    @contextmanager
    def route(self, token_ids: list[int], cache_salt: str = "") -> Iterator[Route | None]:
        """Choose the instances of one attempt over `token_ids` (prompt + tokens streamed);
        None when a pool has no READY instance. The prefill instance's queue counts this
        request until the block exits (its PrefillResult came, or the attempt gave up)."""
        prefill = self._supervisor.ready(self.pools.prefill)
        decode = self._supervisor.ready(self.pools.decode)
        if not prefill or not decode:
            yield None
            return
        block_size = prefill[0].spec.engine.cache.block_size
        view = RequestView(len(token_ids), request_block_hashes(token_ids, block_size, cache_salt),
                           block_size)
        choice = self.policy.choose(view, [self._prefill_candidate(w, view) for w in prefill],
                                    [self._decode_candidate(w, view) for w in decode])
        by_id = {w.spec.instance_id: w for w in prefill + decode}
        cached = choice.prefill.num_cached_tokens
        route = Route(by_id[choice.prefill.instance_id],
                      [by_id[c.instance_id] for c in choice.decode_order], view.num_tokens,
                      cached, max(1, view.num_tokens - cached))
        self._count_route(route)
        pid = choice.prefill.instance_id
        self._prefill_tokens[pid] += route.num_queued_tokens
        try:
            yield route
        finally:
            self._prefill_tokens[pid] -= route.num_queued_tokens

    def _prefill_candidate(self, worker: Worker, view: RequestView) -> PrefillCandidate:
        wid = worker.spec.instance_id
        cached = self.index.num_cached_blocks(wid, view.block_hashes) * view.block_size
        return PrefillCandidate(wid, self._prefill_tokens.get(wid, 0), cached)

    def _decode_candidate(self, worker: Worker, view: RequestView) -> DecodeCandidate:
        wid = worker.spec.instance_id
        state = self._decode_state.get(wid)
        pending = self._reserving_blocks.get(wid, 0)
        needed = -(-(view.num_tokens + 1) // view.block_size)
        total = state.total_kv_blocks if state is not None else 0
        free = (state.free_kv_blocks if state is not None else total) - pending
        return DecodeCandidate(wid, free, total, len(self._decode_requests.get(wid, ())), needed)

    def _count_route(self, route: Route) -> None:
        if self.metrics is not None:
            self.metrics.count(self.config.policy, route)

    # ---- decode ---------------------------------------------------------------------------
    @contextmanager
    def reserving(self, worker: Worker, num_tokens: int) -> Iterator[None]:
        """Count a reservation of `num_tokens` tokens' blocks on `worker` while it is asked."""
        wid = worker.spec.instance_id
        blocks = -(-num_tokens // worker.spec.engine.cache.block_size)
        self._reserving_blocks[wid] = self._reserving_blocks.get(wid, 0) + blocks
        try:
            yield
        finally:
            self._reserving_blocks[wid] -= blocks

    def reserved(self, worker: Worker, reply: worker_pb2.ReserveReply, attempt_id: str) -> None:
        """An accepted reservation tells how many blocks the instance has left; the attempt
        counts as one of its requests until `decode_done`."""
        wid = worker.spec.instance_id
        state = self._decode_state.get(wid)
        if reply.accepted:
            if state is not None:
                state.free_kv_blocks = reply.num_free_blocks
            self._decode_requests.setdefault(wid, set()).add(attempt_id)

    def decode_done(self, worker: Worker | None, attempt_id: str) -> None:
        """The attempt ended on `worker` (finished, aborted or abandoned). Idempotent."""
        if worker is not None:
            self._decode_requests.get(worker.spec.instance_id, set()).discard(attempt_id)

    # ---- prefill --------------------------------------------------------------------------
    def prefilled(self, worker: Worker, result: worker_pb2.PrefillResult) -> None:
        """A PrefillResult's block-hash events update the instance's cache view."""
        if result.HasField("kv_events") and self.index.apply(worker.spec.instance_id,
                                                            result.kv_events):
            self._ask_snapshot(worker)

    def _ask_snapshot(self, worker: Worker) -> None:
        wid = worker.spec.instance_id
        if wid in self._resyncing or self._spawn is None:
            return
        self._resyncing.add(wid)
        if self.metrics is not None:
            self.metrics.resyncs.inc()
        self._spawn(self._resync(worker))

    async def _resync(self, worker: Worker) -> None:
        wid = worker.spec.instance_id
        try:
            snapshot = await asyncio.wait_for(await_ref(worker.actor.kv_snapshot.remote()),
                                              SNAPSHOT_TIMEOUT_S)
            self.index.apply(wid, snapshot)
        except Exception:  # noqa: BLE001 - the next batch with a gap asks again
            log.warning("KV snapshot of %s failed", wid, exc_info=True)
        finally:
            self._resyncing.discard(wid)
