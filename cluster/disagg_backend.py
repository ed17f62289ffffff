"""The router's view of a disaggregated cluster: a `GenerationBackend` over Ray worker pools.

Path of one request (see docs/ARCHITECTURE.md): admitted here (bounded: max_inflight), it runs
as attempts (cluster/attempt.py): reserve KV blocks on a decode instance, prefill on a prefill
instance (the KV streamed layer by layer to the decode one, the first token back here), then the
decode instance's deltas, relayed by one pump task per decode instance, until a finish reason.
Instances are chosen by cluster/routing.py. Any exit before the finish (client cancel, deadline,
error) releases the attempt: it is aborted on both instances, so every block comes back.

Migration (cluster/flight.py): the backend records the token ids it has streamed. When an
instance the request needs is lost (it died, is drained, or the KV hand-off failed), the attempt
is abandoned and the request moves: prompt + streamed tokens are prefilled on a live prefill
instance and decoding goes on on a live decode instance. Sampling noise is a function of (seed,
output index) and the engines rebuild stop-string and penalty state from the streamed tokens, so
the client's stream continues exactly as the uninterrupted run would have. A request moves at
most `supervision.max_migrations` times and waits at most `migration_wait_s` (within its
deadline) for live instances; then it ends with UNAVAILABLE.

Only READY instances are routed to (cluster/lifecycle.py); health is NOT_SERVING while a pool
has none, or while the backend drains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from cluster.attempt import ABORTED, CALL_TIMEOUT_S, AttemptRunner, token_event
from cluster.channels import PairChannels
from cluster.cluster_metrics import ClusterMetrics, InstanceStatusCollector
from cluster.config import SupervisionConfig
from cluster.flight import (ABORT_REASON, Aborted, Attempt, Flight, InstanceDown, InstanceLost,
                            client_request_id, new_flight)
from cluster.lifecycle import Recovery, Supervisor
from cluster.pools import Pools, Worker, await_ref
from cluster.routing import Routing
from protos.pdserve.v1 import generation_pb2, worker_pb2
from pdserve.metrics import MetricFactory
from router.backend import GenerationInput, TokenEvent
from router.policy import RoutingConfig
from router.errors import (
    DuplicateRequestError,
    InvalidRequestError,
    NoCapacityError,
    OverloadedError,
    RequestFailedError,
    UnavailableError,
)

log = logging.getLogger(__name__)
DEADLINE_MARGIN_S = 0.5  # a moving request gives up this long before its client's deadline
_WAIT_POLL_S = 0.05  # how often a moving request looks for live instances
_OVERLOADED_RETRY_S = 0.2  # a moving request refused by every decode instance retries this often


class DisaggregatedBackend:
    """Routes requests across prefill and decode pools, relays their tokens, moves them when an
    instance is lost."""

    def __init__(self, pools: Pools, tokenizer, model_config, max_inflight: int = 1024,
                 model_name: str | None = None,
                 supervision: SupervisionConfig | None = None,
                 recovery: Recovery | None = None,
                 routing: RoutingConfig | None = None,
                 conditional_disagg_max_uncached_tokens: int = 0) -> None:
        self.pools = pools
        self._tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name or model_config.name
        self.max_inflight = max_inflight
        self.config = supervision or SupervisionConfig()
        self._flights: dict[str, Flight] = {}
        self._pumps: set[asyncio.Task] = set()  # one per live decode instance
        self._background: set[asyncio.Task] = set()
        self.supervisor = Supervisor(pools.all, self._on_dead, self.config, recovery)
        self.metrics = ClusterMetrics(self.model_name)
        self.routing = Routing(pools, self.supervisor, routing,
                               MetricFactory(self.model_name, self.metrics.registry), self._spawn)
        self.channels = PairChannels(pools, self.supervisor, self._spawn)
        self._attempts = AttemptRunner(self.routing, self.supervisor, self.channels)
        self._attempts.prefill_here_below_tokens = conditional_disagg_max_uncached_tokens
        self._ready = False
        self.draining = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for w in self.pools.decode:
            await self.adopt(w)
        for w in self.pools.all:
            self.supervisor.mark_ready(w)
        self.supervisor.start()
        self._ready = True

    async def adopt(self, worker: Worker) -> None:
        """Start following a (new) instance: its load, and a decode instance's output stream."""
        if worker.spec.role != "decode":
            self.routing.follow(worker)
        else:
            stats = await asyncio.wait_for(await_ref(worker.actor.stats.remote()), CALL_TIMEOUT_S)
            self.routing.follow(worker, stats.state)
            pump = asyncio.create_task(self._pump(worker))
            self._pumps.add(pump)
            pump.add_done_callback(self._pumps.discard)

    async def stop(self) -> None:
        self._ready = False
        await self.supervisor.stop()
        for rid in list(self._flights):
            await self.abort(rid)
        await asyncio.sleep(0)  # the aborted streams end and spawn their releases
        await asyncio.gather(*self._background, return_exceptions=True)  # while workers live
        for task in list(self._pumps):
            task.cancel()
        await self.pools.stop()

    async def drain(self, timeout_s: float | None = None) -> int:
        """Stop admitting (health NOT_SERVING, new requests UNAVAILABLE), let the requests in
        flight finish for up to `timeout_s` (default supervision.drain_timeout_s), then end the
        rest with UNAVAILABLE. Returns how many had to be ended."""
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        self.draining = True
        started = time.monotonic()
        while self._flights and time.monotonic() - started < timeout_s:
            await asyncio.sleep(_WAIT_POLL_S)
        left = list(self._flights.values())
        for flight in left:
            self._lose(flight.attempt, "the cluster is shutting down; retry", "shutdown")
        self.metrics.drain_duration.set(time.monotonic() - started)
        log.info("drained in %.1f s; %d requests ended unfinished", time.monotonic() - started,
                 len(left))
        return len(left)

    async def drain_instance(self, instance_id: str, timeout_s: float | None = None) -> int:
        """Take one instance out of service (the primitive a planner scales down with): no new
        request is routed to it, the requests that need it get `timeout_s` to finish, the rest
        move to other instances; then it stops and leaves its pool (it is not replaced).
        Returns how many requests moved. InvalidRequestError for an instance that is not
        READY, or the last READY one of its pool."""
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        worker = next((w for w in self.pools.all if w.spec.instance_id == instance_id), None)
        if worker is None or not self.supervisor.is_ready(worker):
            raise InvalidRequestError("instance_id", f"{instance_id!r} is not a READY instance "
                                      "of this cluster (see GetClusterState)")
        pool = self.pools.prefill if worker.spec.role == "prefill" else self.pools.decode
        if len(self.supervisor.ready(pool)) < 2:
            raise InvalidRequestError("instance_id", f"{instance_id!r} is the last READY "
                                      f"{worker.spec.role} instance: its pool would be empty")
        self.supervisor.mark_draining(worker, "draining")
        started = time.monotonic()
        while self._needing(worker) and time.monotonic() - started < timeout_s:
            await asyncio.sleep(_WAIT_POLL_S)
        moved = self._needing(worker)
        self.lose_instance(worker, f"instance {instance_id} is draining", "drain")
        await asyncio.gather(*self._background, return_exceptions=True)  # their aborts there
        self.supervisor.remove(worker)
        pool.remove(worker)
        await self.pools.stop_workers([worker])
        log.info("instance %s drained in %.1f s (%d requests moved)", instance_id,
                 time.monotonic() - started, len(moved))
        return len(moved)

    def _needing(self, worker: Worker) -> list[Flight]:
        return [f for f in self._flights.values() if f.attempt.depends_on(worker)]

    def is_ready(self) -> bool:
        """Serving: started, not draining, and each pool has a live (READY) instance."""
        return (self._ready and not self.draining
                and bool(self.supervisor.ready(self.pools.prefill))
                and bool(self.supervisor.ready(self.pools.decode)))

    @property
    def tokenizer(self):
        return self._tokenizer

    def collectors(self) -> list:
        """What the router's /metrics should also serve."""
        return [self.metrics.registry, InstanceStatusCollector(self.supervisor, self.model_name)]

    def model_info(self) -> generation_pb2.ModelInfo:
        pools = [generation_pb2.PoolInfo(name="prefill", role=generation_pb2.INSTANCE_ROLE_PREFILL,
                                         num_instances=len(self.pools.prefill)),
                 generation_pb2.PoolInfo(name="decode", role=generation_pb2.INSTANCE_ROLE_DECODE,
                                         num_instances=len(self.pools.decode))]
        return generation_pb2.ModelInfo(model_name=self.model_name,
                                        context_length=self.model_config.max_position_embeddings,
                                        vocab_size=self.model_config.vocab_size, pools=pools)

    async def cluster_state(self) -> list[generation_pb2.InstanceState]:
        """Every instance with its lifecycle status; a dead or slow one from what is known."""
        return list(await asyncio.gather(*(self._instance_state(w) for w in self.pools.all)))

    async def _instance_state(self, worker: Worker) -> generation_pb2.InstanceState:
        state = generation_pb2.InstanceState(instance_id=worker.spec.instance_id,
                                             role=_ROLES[worker.spec.role])
        if self.supervisor.is_live(worker):
            try:
                stats = await asyncio.wait_for(await_ref(worker.actor.stats.remote()), CALL_TIMEOUT_S)
                state = stats.state
            except Exception:  # noqa: BLE001 - the supervisor decides whether it died
                log.warning("stats of %s failed", worker.spec.instance_id, exc_info=True)
        return self.supervisor.annotate(state)

    async def _pump(self, worker: Worker) -> None:
        """Relay one decode instance's step outputs to the requests' queues. The stream ends
        only when the actor dies."""
        stream = worker.actor.stream_outputs.options(num_returns="streaming").remote()
        try:
            async for ref in stream:
                outputs: worker_pb2.DecodeOutputs = await ref
                self.routing.observe(outputs)
                for delta in outputs.deltas:
                    flight = self._flights.get(client_request_id(delta.request_id))
                    if flight is not None and flight.attempt.worker_id == delta.request_id:
                        flight.attempt.queue.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the actor died: its error is in the log
            log.warning("output stream of %s failed", worker.spec.instance_id, exc_info=True)
        if self._ready:
            self.supervisor.mark_dead(worker, "process died")

    def _on_dead(self, worker: Worker, reason: str) -> None:
        """Every request whose current attempt needs the dead instance moves (or ends)."""
        self.lose_instance(worker, f"instance {worker.spec.instance_id} failed ({reason}); retry",
                           worker.spec.role)

    def lose_instance(self, worker: Worker, message: str, cause: str) -> None:
        for flight in list(self._flights.values()):
            if flight.attempt.depends_on(worker):
                self._lose(flight.attempt, message, cause)

    @staticmethod
    def _lose(attempt: Attempt, message: str, cause: str) -> None:
        if not attempt.failure.done():
            attempt.lost_role = cause
            attempt.failure.set_result(message)
            attempt.queue.put_nowait(InstanceDown())

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        flight = self._admit(inp)
        try:
            async for event in self._run(flight):
                yield event
        finally:
            self._flights.pop(inp.request_id, None)
            self.routing.decode_done(flight.attempt.decode, flight.attempt.worker_id)
            if not flight.finished or flight.aborted:
                self._spawn(self._attempts.release(flight.attempt))

    def _admit(self, inp: GenerationInput) -> Flight:
        if not self._ready or self.draining:
            raise UnavailableError("the cluster is not ready" if not self._ready
                                   else "the cluster is shutting down; retry")
        for role, pool in (("prefill", self.pools.prefill), ("decode", self.pools.decode)):
            if not self.supervisor.ready(pool):
                raise NoCapacityError(f"no live {role} instance")
        if inp.request_id in self._flights:
            raise DuplicateRequestError(inp.request_id)
        if len(self._flights) >= self.max_inflight:
            raise OverloadedError(f"{len(self._flights)} requests in flight (limit {self.max_inflight})")
        flight = new_flight(inp)
        self._flights[inp.request_id] = flight
        return flight

    async def _run(self, flight: Flight) -> AsyncIterator[TokenEvent]:
        """Attempts until one finishes: each loss abandons the attempt and moves the request."""
        lost_at: float | None = None
        while True:
            try:
                async for event in self._attempts.run(flight):
                    if lost_at is not None:
                        self.metrics.migration_gap.observe(time.monotonic() - lost_at)
                        lost_at = None
                    flight.streamed += event.token_ids
                    yield event
                return
            except InstanceLost as lost:
                lost_at = lost_at or time.monotonic()
                try:
                    await self._move(flight, lost)
                except Aborted:
                    yield token_event(ABORTED, None, flight.inp, len(flight.streamed))
                    return
            except OverloadedError:
                if not flight.migrations or time.monotonic() >= flight.move_deadline_s:
                    raise
                await asyncio.sleep(_OVERLOADED_RETRY_S)  # a moving request is not shed: the
                flight.new_attempt()  # reservation was refused, nothing to release; try again

    async def _move(self, flight: Flight, lost: InstanceLost) -> None:
        """Abandon the current attempt and start the next, once both pools have a READY
        instance; UNAVAILABLE when the request may not move again, or none is ready in time."""
        old = flight.attempt
        self._spawn(self._attempts.release(old))
        if lost.cause == "shutdown" or self.draining:
            self.metrics.migration_failures["shutdown"].inc()
            raise UnavailableError(str(lost))
        if flight.migrations >= self.config.max_migrations:
            self.metrics.migration_failures["limit"].inc()
            raise RequestFailedError(f"{lost} (moved {flight.migrations} times already)",
                                     retryable=True)
        flight.move_deadline_s = time.monotonic() + self.config.migration_wait_s
        if flight.inp.deadline_s is not None:
            flight.move_deadline_s = min(flight.move_deadline_s,
                                         flight.inp.deadline_s - DEADLINE_MARGIN_S)
        await self._wait_for_instances(flight, lost, old)
        flight.migrations += 1
        self.metrics.migrations[lost.cause].inc()
        log.info("request %s moves (%s, %d tokens streamed, migration %d)",
                 flight.inp.request_id, lost.cause, len(flight.streamed), flight.migrations)
        flight.new_attempt()

    async def _wait_for_instances(self, flight: Flight, lost: InstanceLost, old: Attempt) -> None:
        """Until both pools have a READY instance (and a failed pair's channel is rebuilt, so
        that the next attempt does not spend a migration on it)."""
        ready = self.supervisor.ready
        while (not (ready(self.pools.prefill) and ready(self.pools.decode))
               or self.channels.is_repairing(old.prefill, old.decode)):
            if flight.aborted:
                raise Aborted()
            if time.monotonic() >= flight.move_deadline_s or self.draining:
                self.metrics.migration_failures["no_instance"].inc()
                raise UnavailableError(f"{lost}; no live instance took it over in time")
            await asyncio.sleep(_WAIT_POLL_S)

    async def abort(self, request_id: str) -> bool:
        """End the request's stream with finish_reason "abort"; its stream's end aborts the
        workers (once, whatever stage it was in)."""
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.aborted = True
        attempt = flight.attempt
        if not attempt.failure.done():
            attempt.failure.set_result(ABORT_REASON)
        attempt.queue.put_nowait(ABORTED)
        return True

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_ROLES = {"prefill": generation_pb2.INSTANCE_ROLE_PREFILL,
          "decode": generation_pb2.INSTANCE_ROLE_DECODE}
