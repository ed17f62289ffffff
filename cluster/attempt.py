"""One attempt of a request on one (prefill, decode) pair (cluster/flight.py names the states):

    route     the routing policy (cluster/routing.py) picks the prefill instance and ranks the
              decode instances, from their load and the prefill instances' cached prefixes
    reserve   blocks on the first READY decode instance of that order (prompt + the tokens
              already streamed, + 1); a refusal tries the next, all refusing is RESOURCE_EXHAUSTED
    prefill   on the chosen prefill instance: its PrefillResult carries the first token,
              sampled after the KV was streamed layer by layer to the decode instance, and the
              instance's block-hash events
    decode    the decode instance's deltas, relayed by the backend's pump, until a finish reason

Whenever an instance the attempt needs is lost (the supervisor says so through the attempt's
failure future, or a call to it fails) the attempt raises `InstanceLost` and the backend moves
the request. `AttemptRunner.release` aborts an abandoned or ended attempt on its live workers,
so that every block it holds comes back, whatever stage it had reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import ray

from cluster.channels import PairChannels
from cluster.flight import ABORT_REASON, Aborted, Attempt, Flight, InstanceDown, InstanceLost
from cluster.lifecycle import Supervisor
from cluster.pools import Worker, await_ref
from cluster.routing import Route, Routing
from protos.convert import sampling_to_proto
from protos.pdserve.v1 import PROTOCOL_VERSION, worker_pb2
from router.backend import GenerationInput, Timing, TokenEvent
from router.errors import InvalidRequestError, OverloadedError, RequestFailedError

log = logging.getLogger(__name__)
ABORTED = worker_pb2.TokenDelta(finish_reason="abort")
CALL_TIMEOUT_S = 30.0  # deadline of a control call (stats, abort) to one instance
_TRANSFER_FAILED = "KV transfer failed"  # how a decode worker's transfer error delta begins


class AttemptRunner:
    """Runs attempts: the calls to the workers, and what their failures mean."""

    def __init__(self, routing: Routing, supervisor: Supervisor,
                 channels: PairChannels) -> None:
        self._routing = routing
        self._supervisor = supervisor
        self._channels = channels
        # conditional disaggregation (0 = off): a decode instance missing fewer than this many
        # tokens of the request in its prefix cache computes them itself (no prefill, no KV hand-off)
        self.prefill_here_below_tokens = 0

    async def run(self, flight: Flight) -> AsyncIterator[TokenEvent]:
        """The current attempt's events; raises InstanceLost when it cannot finish."""
        inp, attempt = flight.inp, flight.attempt
        try:
            with self._routing.route(inp.prompt_token_ids + flight.streamed,
                                     inp.cache_salt) as route:
                result = await self._reserve_and_prefill(flight, route)
        except Aborted:
            yield token_event(ABORTED, None, inp, len(flight.streamed))
            return
        attempt.prefilled = True
        if result is None:  # the decode instance prefills it: every event comes from its stream
            async for event in self._decoded_here(flight):
                yield event
            return
        first = result.first_token
        if first.error:
            raise RequestFailedError(first.error, retryable=False)
        if result.transfer.status != worker_pb2.TRANSFER_STATUS_OK and not first.finish_reason:
            self._channels.repair(attempt.prefill, attempt.decode)
            raise InstanceLost("transfer", result.transfer.message)
        if flight.timing is None:
            ttft_s = time.monotonic() - inp.arrival_time_s
            flight.timing = Timing(queue_s=first.timing.queue_s, prefill_s=first.timing.prefill_s,
                                   ttft_s=ttft_s)
        flight.finished = bool(first.finish_reason)
        num_output = len(flight.streamed) + len(first.token_ids)
        yield token_event(first, flight.timing if flight.finished else None, inp, num_output)
        while not flight.finished:
            delta = await self._next_delta(attempt)
            num_output += len(delta.token_ids)
            flight.finished = bool(delta.finish_reason)
            if flight.finished:
                flight.timing.kv_transfer_s = delta.timing.kv_transfer_s
            yield token_event(delta, flight.timing if flight.finished else None, inp, num_output)

    async def _decoded_here(self, flight: Flight) -> AsyncIterator[TokenEvent]:
        """Conditional disaggregation: the decode instance computes the uncached rest of the
        prompt and streams every token, the first included."""
        inp, num_output = flight.inp, len(flight.streamed)
        while not flight.finished:
            delta = await self._next_delta(flight.attempt)
            if flight.timing is None:
                flight.timing = Timing(ttft_s=time.monotonic() - inp.arrival_time_s)
            num_output += len(delta.token_ids)
            flight.finished = bool(delta.finish_reason)
            yield token_event(delta, flight.timing if flight.finished else None, inp, num_output)

    async def _next_delta(self, attempt: Attempt) -> worker_pb2.TokenDelta:
        """The decode instance's next delta for the attempt; InstanceLost if it cannot come."""
        delta = await attempt.queue.get()
        if isinstance(delta, InstanceDown):
            if attempt.failure.result() == ABORT_REASON:
                return ABORTED
            raise InstanceLost(attempt.lost_role, attempt.failure.result())
        if delta.error:
            transfer = delta.error.startswith(_TRANSFER_FAILED)
            if transfer:
                self._channels.repair(attempt.prefill, attempt.decode)
            elif reason := await self._supervisor.probe(attempt.decode):
                self._supervisor.mark_dead(attempt.decode, reason)  # now, not at the next poll
            raise InstanceLost("transfer" if transfer else "decode", delta.error)
        return delta

    async def _reserve_and_prefill(self, flight: Flight,
                                   route: Route | None) -> worker_pb2.PrefillResult | None:
        """The prefill's result; None when the decode instance prefills the request itself."""
        attempt = flight.attempt
        if route is None:
            role = "decode" if self._supervisor.ready(self._routing.pools.prefill) else "prefill"
            raise InstanceLost(role, f"no live {role} instance")
        attempt.decode, reserved = await self._reserve(flight, route.decode_order)
        if reserved.prefill_here:
            return None
        if not self._supervisor.is_ready(route.prefill):  # lost while the decode side reserved
            raise InstanceLost("prefill", f"instance {route.prefill.spec.instance_id} is gone")
        attempt.prefill = route.prefill
        result = await self._prefill(flight, reserved.num_cached_tokens)
        self._routing.prefilled(attempt.prefill, result)
        return result

    async def _reserve(self, flight: Flight,
                       order: list[Worker]) -> tuple[Worker, worker_pb2.ReserveReply]:
        inp, attempt = flight.inp, flight.attempt
        request = worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=attempt.worker_id,
            num_prompt_tokens=len(inp.prompt_token_ids), max_tokens=inp.params.max_tokens,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, output_token_ids=flight.streamed, cache_salt=inp.cache_salt,
            prefill_here_below_tokens=self.prefill_here_below_tokens)
        reasons = []
        num_tokens = len(inp.prompt_token_ids) + len(flight.streamed) + 1
        for worker in order:
            ref = worker.actor.reserve.remote(request)
            attempt.reserving = (worker, ref)  # an abort from now on awaits it, then frees it
            with self._routing.reserving(worker, num_tokens):
                reply = await self._unless_failed(attempt, worker, ref)
            attempt.reserving = None
            self._routing.reserved(worker, reply, attempt.worker_id)
            if reply.accepted:
                return worker, reply
            if reply.invalid:  # the pools are alike: no other decode instance would take it
                field = "max_tokens" if "max_tokens" in reply.reason else "prompt"
                raise InvalidRequestError(field, reply.reason)
            reasons.append(f"{worker.spec.instance_id}: {reply.reason}")
        if not reasons:  # every decode instance was lost since the request was admitted
            raise InstanceLost("decode", "no live decode instance")
        raise OverloadedError("no decode instance can take the request: " + "; ".join(reasons))

    async def _prefill(self, flight: Flight, decode_cached_tokens: int) -> worker_pb2.PrefillResult:
        inp, attempt = flight.inp, flight.attempt
        worker = attempt.prefill
        task = worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=attempt.worker_id,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, decode_instance_id=attempt.decode.spec.instance_id,
            output_token_ids=flight.streamed, cache_salt=inp.cache_salt,
            num_decode_cached_tokens=decode_cached_tokens)  # those blocks stay unsent
        return await self._unless_failed(attempt, worker, worker.actor.prefill.remote(task))

    async def _unless_failed(self, attempt: Attempt, worker: Worker, ref):
        """Await an actor call, unless an instance the attempt needs is lost first."""
        call = asyncio.ensure_future(await_ref(ref))
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
            reason = await self._supervisor.probe(worker)
            if not reason:
                raise
            self._supervisor.mark_dead(worker, reason)
            raise InstanceLost(worker.spec.role, f"instance {worker.spec.instance_id} failed "
                               f"({reason}); retry") from None
        finally:
            call.cancel()

    async def release(self, attempt: Attempt) -> None:
        """Abort the attempt on its live workers, once. The prefill first: its answer tells the
        decode side whether KV is coming. A reservation still in flight is awaited, so that it
        is freed too. Never raises: a dead or unresponsive instance frees nothing anyway."""
        if attempt.released:
            return
        attempt.released = True
        request_id = attempt.worker_id
        await self._settle_reserve(attempt)
        self._routing.decode_done(attempt.decode, request_id)
        begun = False
        live = self._supervisor.is_live
        if attempt.prefill is not None and live(attempt.prefill):
            reply = await call_with_deadline(
                attempt.prefill, attempt.prefill.actor.abort.remote(request_id),
                f"abort of {request_id}")
            begun = reply is not None and reply.transfer_begun
        if attempt.decode is not None and live(attempt.decode):
            task = worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION, request_id=request_id,
                                        reason=worker_pb2.ABORT_REASON_CLIENT_CANCELLED,
                                        transfer_begun=begun)
            await call_with_deadline(attempt.decode, attempt.decode.actor.abort.remote(task),
                                     f"abort of {request_id}")

    @staticmethod
    async def _settle_reserve(attempt: Attempt) -> None:
        if attempt.reserving is None:
            return
        worker, ref = attempt.reserving
        attempt.reserving = None
        reply = await call_with_deadline(worker, ref, f"reserve of {attempt.worker_id}")
        if reply is not None and reply.accepted:
            attempt.decode = worker


async def call_with_deadline(worker: Worker, ref, what: str):
    """An actor call with a deadline (CALL_TIMEOUT_S); None if it failed (logged)."""
    try:
        return await asyncio.wait_for(await_ref(ref), CALL_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - callers treat a failed control call as "nothing freed"
        log.warning("%s on %s failed", what, worker.spec.instance_id, exc_info=True)
        return None


def token_event(delta: worker_pb2.TokenDelta, timing: Timing | None, inp: GenerationInput,
                num_output: int) -> TokenEvent:
    """A worker's delta as the router's event (the timing on the last one)."""
    if timing is not None:
        timing.e2e_s = time.monotonic() - inp.arrival_time_s
        timing.decode_s = timing.e2e_s - timing.ttft_s
    return TokenEvent(token_ids=list(delta.token_ids), text=delta.text,
                      logprobs=list(delta.logprobs), finish_reason=delta.finish_reason or None,
                      num_prompt_tokens=len(inp.prompt_token_ids), num_output_tokens=num_output,
                      num_cached_tokens=delta.usage.cached_tokens, timing=timing)
