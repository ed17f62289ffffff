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
Only READY instances are routed to (cluster/lifecycle.py): when the supervisor declares one
dead, every request that depends on it ends at once with UNAVAILABLE, and health turns
NOT_SERVING while a pool has no live instance.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray

from cluster.config import SupervisionConfig
from cluster.lifecycle import Supervisor
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


@dataclass(slots=True)
class _Flight:
    """Where one in-flight request lives, for aborts and for failing it when an instance dies."""

    queue: asyncio.Queue
    failure: asyncio.Future  # set to a reason when an instance it depends on died
    prefill: Worker | None = None
    decode: Worker | None = None
    reserving: tuple[Worker, object] | None = None  # (decode, ObjectRef) of a pending reserve
    prefilled: bool = False  # the prefill answered: only the decode instance matters now
    finished: bool = False
    aborted: bool = False  # by the Abort RPC; the workers are aborted when the stream ends

    def depends_on(self, worker: Worker) -> bool:
        return (self.decode is worker or (self.prefill is worker and not self.prefilled)
                or (self.reserving is not None and self.reserving[0] is worker))


class _InstanceDown:
    """Queue marker: the decode instance of this request died."""


class _Aborted(Exception):
    """The Abort RPC ended this request before its first token."""


_ABORT_REASON = "aborted"  # a flight's failure result when the Abort RPC ended it


class DisaggregatedBackend:
    """Routes requests across prefill and decode pools and relays their tokens."""

    def __init__(self, pools: Pools, tokenizer, model_config, max_inflight: int = 1024,
                 model_name: str | None = None,
                 supervision: SupervisionConfig | None = None) -> None:
        self.pools = pools
        self._tokenizer = tokenizer
        self.model_config = model_config
        self.model_name = model_name or model_config.name
        self.max_inflight = max_inflight
        self._flights: dict[str, _Flight] = {}
        self._prefill_tokens = {w.spec.instance_id: 0 for w in pools.prefill}
        self._decode_state: dict[str, generation_pb2.InstanceState] = {}
        self._pumps: list[asyncio.Task] = []
        self._background: set[asyncio.Task] = set()
        self._generations = {(p.spec.instance_id, d.spec.instance_id): 0
                             for p in pools.prefill for d in pools.decode}
        self._repairing: set[tuple[str, str]] = set()
        self.supervisor = Supervisor(pools.all, self._on_dead, supervision)
        self._ready = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for w in self.pools.decode:
            stats = await asyncio.wait_for(_await(w.actor.stats.remote()), CALL_TIMEOUT_S)
            self._decode_state[w.spec.instance_id] = stats.state
            self._pumps.append(asyncio.create_task(self._pump(w)))
        for w in self.pools.all:
            self.supervisor.mark_ready(w)
        self.supervisor.start()
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        await self.supervisor.stop()
        for rid in list(self._flights):
            await self.abort(rid)
        for task in self._pumps:
            task.cancel()
        await self.pools.stop()

    def is_ready(self) -> bool:
        """Serving: started, and each pool has a live (READY) instance."""
        return (self._ready and bool(self.supervisor.ready(self.pools.prefill))
                and bool(self.supervisor.ready(self.pools.decode)))

    @property
    def tokenizer(self):
        return self._tokenizer

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
        if self.supervisor.is_ready(worker):
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
                    flight = self._flights.get(delta.request_id)
                    if flight is not None:
                        flight.queue.put_nowait(delta)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - the actor died: its error is in the log
            log.warning("output stream of %s failed", worker.spec.instance_id, exc_info=True)
        if self._ready:
            self.supervisor.mark_dead(worker, "process died")

    def _on_dead(self, worker: Worker, reason: str) -> None:
        """End, with UNAVAILABLE, every request that needs the dead instance."""
        message = f"instance {worker.spec.instance_id} failed ({reason}); retry"
        for flight in self._flights.values():
            if flight.depends_on(worker) and not flight.failure.done():
                flight.failure.set_result(message)
                flight.queue.put_nowait(_InstanceDown())

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        flight = self._admit(inp)
        try:
            async for event in self._run(inp, flight):
                yield event
        finally:
            self._flights.pop(inp.request_id, None)
            if not flight.finished or flight.aborted:
                self._spawn(self._abort_workers(inp.request_id, flight))

    def _admit(self, inp: GenerationInput) -> _Flight:
        if not self._ready:
            raise UnavailableError("the cluster is not ready")
        for role, pool in (("prefill", self.pools.prefill), ("decode", self.pools.decode)):
            if not self.supervisor.ready(pool):
                raise NoCapacityError(f"no live {role} instance")
        if inp.request_id in self._flights:
            raise DuplicateRequestError(inp.request_id)
        if len(self._flights) >= self.max_inflight:
            raise OverloadedError(f"{len(self._flights)} requests in flight (limit {self.max_inflight})")
        flight = _Flight(asyncio.Queue(), asyncio.get_running_loop().create_future())
        self._flights[inp.request_id] = flight
        return flight

    async def _run(self, inp: GenerationInput, flight: _Flight) -> AsyncIterator[TokenEvent]:
        try:
            flight.decode = await self._reserve(inp, flight)
            flight.prefill = self._pick_prefill()
            result = await self._prefill(inp, flight)
        except _Aborted:
            yield _event(_ABORTED, None, inp, 0.0)
            return
        flight.prefilled = True
        first = result.first_token
        if first.error:
            raise RequestFailedError(first.error, retryable=False)
        if result.transfer.status != worker_pb2.TRANSFER_STATUS_OK and not first.finish_reason:
            self._repair(flight)
            raise RequestFailedError(result.transfer.message, retryable=True)
        ttft_s = time.monotonic() - inp.arrival_time_s
        timing = Timing(queue_s=first.timing.queue_s, prefill_s=first.timing.prefill_s, ttft_s=ttft_s)
        flight.finished = bool(first.finish_reason)
        yield _event(first, timing if flight.finished else None, inp, ttft_s)
        num_output = len(first.token_ids)
        while not flight.finished:
            delta: worker_pb2.TokenDelta = await flight.queue.get()
            if isinstance(delta, _InstanceDown):
                raise RequestFailedError(flight.failure.result(), retryable=True)
            if delta.error:
                self._repair(flight)
                raise RequestFailedError(delta.error, retryable=True)
            num_output += len(delta.token_ids)
            flight.finished = bool(delta.finish_reason)
            if flight.finished:
                timing.kv_transfer_s = delta.timing.kv_transfer_s
            yield _event(delta, timing if flight.finished else None, inp, ttft_s, num_output)

    async def _reserve(self, inp: GenerationInput, flight: _Flight) -> Worker:
        request = worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=inp.request_id,
            num_prompt_tokens=len(inp.prompt_token_ids), max_tokens=inp.params.max_tokens,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed)
        reasons = []
        for worker in self._decode_order():
            ref = worker.actor.reserve.remote(request)
            flight.reserving = (worker, ref)  # an abort from now on awaits it, then frees it
            reply = await self._unless_failed(flight, worker, ref)
            flight.reserving = None
            state = self._decode_state.get(worker.spec.instance_id)
            if state is not None and reply.accepted:
                state.free_kv_blocks = reply.num_free_blocks
            if reply.accepted:
                return worker
            reasons.append(f"{worker.spec.instance_id}: {reply.reason}")
        raise OverloadedError("no decode instance can take the request: " + "; ".join(reasons))

    def _decode_order(self) -> list[Worker]:
        def load(w: Worker):
            s = self._decode_state.get(w.spec.instance_id)
            return (0, 0) if s is None else (-s.free_kv_blocks, s.num_running_requests)
        return sorted(self.supervisor.ready(self.pools.decode), key=load)

    def _pick_prefill(self) -> Worker:
        live = self.supervisor.ready(self.pools.prefill)
        if not live:
            raise NoCapacityError("no live prefill instance")
        return min(live, key=lambda w: self._prefill_tokens[w.spec.instance_id])

    async def _unless_failed(self, flight: _Flight, worker: Worker, ref):
        """Await an actor call, unless an instance the request needs dies first."""
        call = asyncio.ensure_future(_await(ref))
        try:
            await asyncio.wait({call, flight.failure}, return_when=asyncio.FIRST_COMPLETED)
            if call.done():
                return call.result()
            if flight.failure.result() == _ABORT_REASON:
                raise _Aborted()
            raise RequestFailedError(flight.failure.result(), retryable=True)
        except ray.exceptions.RayError:
            # the actor died, or its engine did (EngineDeadError): ask it now rather than at
            # the next poll; anything else is a bug of ours and stays INTERNAL
            reason = await self.supervisor.probe(worker)
            if not reason:
                raise
            self.supervisor.mark_dead(worker, reason)
            raise RequestFailedError(f"instance {worker.spec.instance_id} failed ({reason}); "
                                     "retry", retryable=True) from None
        finally:
            call.cancel()

    async def _prefill(self, inp: GenerationInput, flight: _Flight) -> worker_pb2.PrefillResult:
        worker = flight.prefill
        task = worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=inp.request_id,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, decode_instance_id=flight.decode.spec.instance_id)
        pid = worker.spec.instance_id
        self._prefill_tokens[pid] += len(inp.prompt_token_ids)
        try:
            return await self._unless_failed(flight, worker, worker.actor.prefill.remote(task))
        finally:
            self._prefill_tokens[pid] -= len(inp.prompt_token_ids)

    async def abort(self, request_id: str) -> bool:
        """End the request's stream with finish_reason "abort"; its stream's end aborts the
        workers (once, whatever stage it was in)."""
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.aborted = True
        if not flight.failure.done():
            flight.failure.set_result(_ABORT_REASON)
        flight.queue.put_nowait(_ABORTED)
        return True

    async def _abort_workers(self, request_id: str, flight: _Flight) -> None:
        """Abort on the prefill first: its answer tells the decode side whether KV is coming.
        A reservation still in flight is awaited, so that it is freed too. Never raises: a dead
        or unresponsive instance frees nothing anyway."""
        await self._settle_reserve(request_id, flight)
        begun = False
        if flight.prefill is not None and self.supervisor.is_ready(flight.prefill):
            reply = await self._call(flight.prefill, flight.prefill.actor.abort.remote(request_id),
                                     f"abort of {request_id}")
            begun = reply is not None and reply.transfer_begun
        if flight.decode is not None and self.supervisor.is_ready(flight.decode):
            task = worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION, request_id=request_id,
                                        reason=worker_pb2.ABORT_REASON_CLIENT_CANCELLED,
                                        transfer_begun=begun)
            await self._call(flight.decode, flight.decode.actor.abort.remote(task),
                             f"abort of {request_id}")

    async def _settle_reserve(self, request_id: str, flight: _Flight) -> None:
        if flight.reserving is None:
            return
        worker, ref = flight.reserving
        flight.reserving = None
        reply = await self._call(worker, ref, f"reserve of {request_id}")
        if reply is not None and reply.accepted:
            flight.decode = worker

    async def _call(self, worker: Worker, ref, what: str):
        """An actor call with a deadline; None if it failed (logged)."""
        try:
            return await asyncio.wait_for(_await(ref), CALL_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - see _abort_workers
            log.warning("%s on %s failed", what, worker.spec.instance_id, exc_info=True)
            return None

    def _repair(self, flight: _Flight) -> None:
        """Rebuild a failed pair channel under the next generation, in the background."""
        key = (flight.prefill.spec.instance_id, flight.decode.spec.instance_id)
        ready = self.supervisor.is_ready
        if key in self._repairing or not (ready(flight.prefill) and ready(flight.decode)):
            return
        self._repairing.add(key)
        self._generations[key] += 1

        async def repair() -> None:
            try:
                await pair(flight.prefill, flight.decode, self._generations[key])
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
           ttft_s: float, num_output: int | None = None) -> TokenEvent:
    num_output = len(delta.token_ids) if num_output is None else num_output
    if timing is not None:
        timing.e2e_s = time.monotonic() - inp.arrival_time_s
        timing.decode_s = timing.e2e_s - ttft_s
    return TokenEvent(token_ids=list(delta.token_ids), text=delta.text,
                      logprobs=list(delta.logprobs), finish_reason=delta.finish_reason or None,
                      num_prompt_tokens=len(inp.prompt_token_ids), num_output_tokens=num_output,
                      timing=timing)
