"""The router's view of a disaggregated cluster: a `GenerationBackend` over Ray worker pools.

Path of one request (see docs/ARCHITECTURE.md):
    1. pick a decode instance (most free KV blocks, fewest running) and reserve blocks there;
       a refusal tries the next one, all refusing is RESOURCE_EXHAUSTED
    2. pick a prefill instance (fewest outstanding prefill tokens) and await its PrefillResult:
       the first token, sampled after the prompt's KV was streamed layer by layer to the decode
    3. stream that token, then the decode instance's deltas until a finish reason
    Any exit before the finish (client cancel, deadline, error) aborts the request on both
    instances; the prefill's answer says whether KV is on the wire, so the decode side knows
    whether to free the reservation now or when the bytes have landed. A reservation still in
    flight when the request ends is awaited first, so a cancel at any moment frees it.

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

import ray

from cluster.cluster_metrics import ClusterMetrics, InstanceStatusCollector
from cluster.config import SupervisionConfig
from cluster.flight import (ABORT_REASON, Aborted, Attempt, Flight, InstanceDown, InstanceLost,
                            client_request_id, new_flight)
from cluster.lifecycle import Recovery, Supervisor
from cluster.pools import Pools, Worker, pair
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, generation_pb2, worker_pb2
from router.backend import GenerationInput, Timing, TokenEvent
from router.errors import (
    DuplicateRequestError,
    NoCapacityError,
    OverloadedError,
    RequestFailedError,
    UnavailableError,
)

log = logging.getLogger(__name__)
_ABORTED = worker_pb2.TokenDelta(finish_reason="abort")
CALL_TIMEOUT_S = 30.0  # deadline of a control call (stats, abort) to one instance
DEADLINE_MARGIN_S = 0.5  # a moving request gives up this long before its client's deadline
_WAIT_POLL_S = 0.05  # how often a moving request looks for live instances
_OVERLOADED_RETRY_S = 0.2  # a moving request refused by every decode instance retries this often


class DisaggregatedBackend:
    """Routes requests across prefill and decode pools, relays their tokens, moves them when an
    instance is lost."""

    def __init__(self, pools: Pools, tokenizer, model_config, max_inflight: int = 1024,
                 model_name: str | None = None,
                 supervision: SupervisionConfig | None = None,
                 recovery: Recovery | None = None) -> None:
        self.pools = pools
        self._tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name or model_config.name
        self.max_inflight = max_inflight
        self.config = supervision or SupervisionConfig()
        self._flights: dict[str, Flight] = {}
        self._prefill_tokens = {w.spec.instance_id: 0 for w in pools.prefill}
        self._decode_state: dict[str, generation_pb2.InstanceState] = {}
        self._reserving_blocks: dict[str, int] = {}  # per decode instance, reserves in flight
        self._pumps: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._generations = {(p.spec.instance_id, d.spec.instance_id): 0
                             for p in pools.prefill for d in pools.decode}
        self._repairing: set[tuple[str, str]] = set()
        self.supervisor = Supervisor(pools.all, self._on_dead, self.config, recovery)
        self.metrics = ClusterMetrics(self.model_name)
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
        self._prefill_tokens.setdefault(worker.spec.instance_id, 0)
        if worker.spec.role == "decode":
            stats = await asyncio.wait_for(_await(worker.actor.stats.remote()), CALL_TIMEOUT_S)
            self._decode_state[worker.spec.instance_id] = stats.state
            self._pumps.append(asyncio.create_task(self._pump(worker)))

    async def pair_with_live_peers(self, worker: Worker) -> None:
        """Build `worker`'s KV channel to every READY instance of the other pool, each under
        its pair's next generation."""
        if worker.spec.role == "prefill":
            pairs = [(worker, d) for d in self.supervisor.ready(self.pools.decode)]
        else:
            pairs = [(p, worker) for p in self.supervisor.ready(self.pools.prefill)]
        for p, d in pairs:
            key = (p.spec.instance_id, d.spec.instance_id)
            self._generations[key] = self._generations.get(key, -1) + 1
        await asyncio.gather(*(pair(p, d, self._generations[(p.spec.instance_id,
                                                               d.spec.instance_id)])
                               for p, d in pairs))

    async def stop(self) -> None:
        self._ready = False
        await self.supervisor.stop()
        for rid in list(self._flights):
            await self.abort(rid)
        for task in self._pumps:
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
        Returns how many requests moved."""
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        worker = next((w for w in self.pools.all if w.spec.instance_id == instance_id), None)
        if worker is None or not self.supervisor.is_ready(worker):
            raise ValueError(f"{instance_id!r} is not a READY instance of this cluster")
        self.supervisor.mark_draining(worker, "draining")
        started = time.monotonic()
        while self._needing(worker) and time.monotonic() - started < timeout_s:
            await asyncio.sleep(_WAIT_POLL_S)
        moved = self._needing(worker)
        self.lose_instance(worker, f"instance {instance_id} is draining", "drain")
        await asyncio.gather(*self._background, return_exceptions=True)  # their aborts there
        self.supervisor.remove(worker)
        pool = self.pools.prefill if worker.spec.role == "prefill" else self.pools.decode
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
                stats = await asyncio.wait_for(_await(worker.actor.stats.remote()), CALL_TIMEOUT_S)
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
                self._decode_state[outputs.instance_id] = outputs.state
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
            if not flight.finished or flight.aborted:
                self._spawn(self._abort_workers(flight.attempt))

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
                async for event in self._attempt(flight):
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
                    yield _event(_ABORTED, None, flight.inp, len(flight.streamed))
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
        self._spawn(self._abort_workers(old))
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
        await self._wait_for_instances(flight, lost)
        flight.migrations += 1
        self.metrics.migrations[lost.cause].inc()
        log.info("request %s moves (%s, %d tokens streamed, migration %d)",
                 flight.inp.request_id, lost.cause, len(flight.streamed), flight.migrations)
        flight.new_attempt()

    async def _wait_for_instances(self, flight: Flight, lost: InstanceLost) -> None:
        ready = self.supervisor.ready
        while not (ready(self.pools.prefill) and ready(self.pools.decode)):
            if flight.aborted:
                raise Aborted()
            if time.monotonic() >= flight.move_deadline_s or self.draining:
                self.metrics.migration_failures["no_instance"].inc()
                raise UnavailableError(f"{lost}; no live instance took it over in time")
            await asyncio.sleep(_WAIT_POLL_S)

    async def _attempt(self, flight: Flight) -> AsyncIterator[TokenEvent]:
        """One try on one (prefill, decode) pair; raises InstanceLost when it cannot finish."""
        inp, attempt = flight.inp, flight.attempt
        try:
            attempt.decode = await self._reserve(flight)
            attempt.prefill = self._pick_prefill()
            result = await self._prefill(flight)
        except Aborted:
            yield _event(_ABORTED, None, inp, len(flight.streamed))
            return
        attempt.prefilled = True
        first = result.first_token
        if first.error:
            raise RequestFailedError(first.error, retryable=False)
        if result.transfer.status != worker_pb2.TRANSFER_STATUS_OK and not first.finish_reason:
            self._repair(attempt)
            raise InstanceLost("transfer", result.transfer.message)
        if flight.timing is None:
            ttft_s = time.monotonic() - inp.arrival_time_s
            flight.timing = Timing(queue_s=first.timing.queue_s, prefill_s=first.timing.prefill_s,
                                   ttft_s=ttft_s)
        flight.finished = bool(first.finish_reason)
        num_output = len(flight.streamed) + len(first.token_ids)
        yield _event(first, flight.timing if flight.finished else None, inp, num_output)
        while not flight.finished:
            delta: worker_pb2.TokenDelta = await attempt.queue.get()
            if isinstance(delta, InstanceDown):
                if attempt.failure.result() == ABORT_REASON:
                    delta = _ABORTED
                else:
                    raise InstanceLost(attempt.lost_role, attempt.failure.result())
            if delta.error:
                transfer = delta.error.startswith("KV transfer failed")
                if transfer:
                    self._repair(attempt)
                elif reason := await self.supervisor.probe(attempt.decode):
                    self.supervisor.mark_dead(attempt.decode, reason)  # now, not at the next poll
                raise InstanceLost("transfer" if transfer else "decode", delta.error)
            num_output += len(delta.token_ids)
            flight.finished = bool(delta.finish_reason)
            if flight.finished:
                flight.timing.kv_transfer_s = delta.timing.kv_transfer_s
            yield _event(delta, flight.timing if flight.finished else None, inp, num_output)

    async def _reserve(self, flight: Flight) -> Worker:
        inp, attempt = flight.inp, flight.attempt
        request = worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=attempt.worker_id,
            num_prompt_tokens=len(inp.prompt_token_ids), max_tokens=inp.params.max_tokens,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, output_token_ids=flight.streamed)
        reasons = []
        num_tokens = len(inp.prompt_token_ids) + len(flight.streamed) + 1
        for worker in self._decode_order():
            ref = worker.actor.reserve.remote(request)
            attempt.reserving = (worker, ref)  # an abort from now on awaits it, then frees it
            wid = worker.spec.instance_id
            blocks = -(-num_tokens // worker.spec.engine.cache.block_size)
            self._reserving_blocks[wid] = self._reserving_blocks.get(wid, 0) + blocks
            try:
                reply = await self._unless_failed(attempt, worker, ref)
            finally:
                self._reserving_blocks[wid] -= blocks
            attempt.reserving = None
            state = self._decode_state.get(worker.spec.instance_id)
            if state is not None and reply.accepted:
                state.free_kv_blocks = reply.num_free_blocks
            if reply.accepted:
                return worker
            reasons.append(f"{worker.spec.instance_id}: {reply.reason}")
        if not reasons:  # every decode instance was lost since the request was admitted
            raise InstanceLost("decode", "no live decode instance")
        raise OverloadedError("no decode instance can take the request: " + "; ".join(reasons))

    def _decode_order(self) -> list[Worker]:
        """Most free KV blocks first, counting reservations still in flight as taken (a burst
        spreads instead of landing on whichever instance looked emptiest when it began)."""
        def load(w: Worker):
            s = self._decode_state.get(w.spec.instance_id)
            pending = self._reserving_blocks.get(w.spec.instance_id, 0)
            return (pending, 0) if s is None else (pending - s.free_kv_blocks,
                                                    s.num_running_requests)
        return sorted(self.supervisor.ready(self.pools.decode), key=load)

    def _pick_prefill(self) -> Worker:
        live = self.supervisor.ready(self.pools.prefill)
        if not live:
            raise InstanceLost("prefill", "no live prefill instance")
        return min(live, key=lambda w: self._prefill_tokens[w.spec.instance_id])

    async def _unless_failed(self, attempt: Attempt, worker: Worker, ref):
        """Await an actor call, unless an instance the attempt needs is lost first."""
        call = asyncio.ensure_future(_await(ref))
        try:
            await asyncio.wait({call, attempt.failure}, return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            if attempt.failure.result() == ABORT_REASON:
                raise Aborted()
            raise InstanceLost(attempt.lost_role, attempt.failure.result())
        except ray.exceptions.RayError:
            # the actor died, or its engine did (EngineDeadError): ask it now rather than at
            # the next poll; anything else is a bug of ours and stays INTERNAL
            reason = await self.supervisor.probe(worker)
            if not reason:
                raise
            self.supervisor.mark_dead(worker, reason)
            raise InstanceLost(worker.spec.role, f"instance {worker.spec.instance_id} failed "
                               f"({reason}); retry") from None
        finally:
            call.cancel()

    async def _prefill(self, flight: Flight) -> worker_pb2.PrefillResult:
        inp, attempt = flight.inp, flight.attempt
        worker = attempt.prefill
        task = worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=attempt.worker_id,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, decode_instance_id=attempt.decode.spec.instance_id,
            output_token_ids=flight.streamed)
        pid, num_tokens = worker.spec.instance_id, len(inp.prompt_token_ids) + len(flight.streamed)
        self._prefill_tokens[pid] += num_tokens
        try:
            return await self._unless_failed(attempt, worker, worker.actor.prefill.remote(task))
        finally:
            self._prefill_tokens[pid] -= num_tokens

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
        attempt.queue.put_nowait(_ABORTED)
        return True

    async def _abort_workers(self, attempt: Attempt) -> None:
        """Abort on the prefill first: its answer tells the decode side whether KV is coming.
        A reservation still in flight is awaited, so that it is freed too. Never raises: a dead
        or unresponsive instance frees nothing anyway."""
        if attempt.released:
            return
        attempt.released = True
        request_id = attempt.worker_id
        await self._settle_reserve(attempt)
        begun = False
        live = self.supervisor.is_live
        if attempt.prefill is not None and live(attempt.prefill):
            reply = await self._call(attempt.prefill, attempt.prefill.actor.abort.remote(request_id),
                                     f"abort of {request_id}")
            begun = reply is not None and reply.transfer_begun
        if attempt.decode is not None and live(attempt.decode):
            task = worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION, request_id=request_id,
                                        reason=worker_pb2.ABORT_REASON_CLIENT_CANCELLED,
                                        transfer_begun=begun)
            await self._call(attempt.decode, attempt.decode.actor.abort.remote(task),
                             f"abort of {request_id}")

    async def _settle_reserve(self, attempt: Attempt) -> None:
        if attempt.reserving is None:
            return
        worker, ref = attempt.reserving
        attempt.reserving = None
        reply = await self._call(worker, ref, f"reserve of {attempt.worker_id}")
        if reply is not None and reply.accepted:
            attempt.decode = worker

    async def _call(self, worker: Worker, ref, what: str):
        """An actor call with a deadline; None if it failed (logged)."""
        try:
            return await asyncio.wait_for(_await(ref), CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - see _abort_workers
            log.warning("%s on %s failed", what, worker.spec.instance_id, exc_info=True)
            return None

    def _repair(self, attempt: Attempt) -> None:
        """Rebuild a failed pair channel under the next generation, in the background."""
        key = (attempt.prefill.spec.instance_id, attempt.decode.spec.instance_id)
        ready = self.supervisor.is_ready
        if key in self._repairing or not (ready(attempt.prefill) and ready(attempt.decode)):
            return
        self._repairing.add(key)
        self._generations[key] += 1
        prefill, decode = attempt.prefill, attempt.decode

        async def repair() -> None:
            try:
                await pair(prefill, decode, self._generations[key])
                log.info("KV channel %s -> %s rebuilt (generation %d)", *key, self._generations[key])
            except Exception:
                log.exception("rebuilding KV channel %s -> %s failed", *key)
            finally:
                self._repairing.discard(key)

        self._spawn(repair())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


_ROLES = {"prefill": generation_pb2.INSTANCE_ROLE_PREFILL,
          "decode": generation_pb2.INSTANCE_ROLE_DECODE}


async def _await(ref):
    return await ref


def _event(delta: worker_pb2.TokenDelta, timing: Timing | None, inp: GenerationInput,
           num_output: int) -> TokenEvent:
    if timing is not None:
        timing.e2e_s = time.monotonic() - inp.arrival_time_s
        timing.decode_s = timing.e2e_s - timing.ttft_s
    return TokenEvent(token_ids=list(delta.token_ids), text=delta.text,
                      logprobs=list(delta.logprobs), finish_reason=delta.finish_reason or None,
                      num_prompt_tokens=len(inp.prompt_token_ids), num_output_tokens=num_output,
                      timing=timing)
