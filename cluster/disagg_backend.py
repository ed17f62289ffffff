"""The router's view of a disaggregated cluster: a `GenerationBackend` over Ray worker pools.

Path of one request (see docs/ARCHITECTURE.md):
    1. pick a decode instance (most free KV blocks, fewest running) and reserve blocks there;
       a refusal tries the next one, all refusing is RESOURCE_EXHAUSTED
    2. pick a prefill instance (fewest outstanding prefill tokens) and await its PrefillResult:
       the first token, sampled after the prompt's KV was streamed layer by layer to the decode
    3. stream that token, then the decode instance's deltas until a finish reason
    Any exit before the finish (client cancel, deadline, error) aborts the request on both
    instances; the prefill's answer says whether KV is on the wire, so the decode side knows
    whether to free the reservation now or when the bytes have landed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

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


@dataclass(slots=True)
class _Flight:
    """Where one in-flight request lives, for aborts."""

    queue: asyncio.Queue
    prefill: Worker | None = None
    decode: Worker | None = None
    finished: bool = False


class DisaggregatedBackend:
    """Routes requests across prefill and decode pools and relays their tokens."""

    def __init__(self, pools: Pools, tokenizer, model_config, max_inflight: int = 1024,
                 model_name: str | None = None) -> None:
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
        self._ready = False

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        for w in self.pools.decode:
            stats = await w.actor.stats.remote()
            self._decode_state[w.spec.instance_id] = stats.state
            self._pumps.append(asyncio.create_task(self._pump(w)))
        self._ready = True

    async def stop(self) -> None:
        self._ready = False
        for rid in list(self._flights):
            await self.abort(rid)
        for task in self._pumps:
            task.cancel()
        await self.pools.stop()

    def is_ready(self) -> bool:
        return self._ready

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
        stats = await asyncio.gather(*(w.actor.stats.remote() for w in self.pools.all))
        return [s.state for s in stats]

    async def _pump(self, worker: Worker) -> None:
        """Relay one decode instance's step outputs to the requests' queues."""
        stream = worker.actor.stream_outputs.options(num_returns="streaming").remote()
        async for ref in stream:
            outputs: worker_pb2.DecodeOutputs = await ref
            self._decode_state[outputs.instance_id] = outputs.state
            for delta in outputs.deltas:
                flight = self._flights.get(delta.request_id)
                if flight is not None:
                    flight.queue.put_nowait(delta)

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, inp: GenerationInput) -> AsyncIterator[TokenEvent]:
        flight = self._admit(inp)
        try:
            async for event in self._run(inp, flight):
                yield event
        finally:
            self._flights.pop(inp.request_id, None)
            if not flight.finished:
                self._spawn(self._abort_workers(inp.request_id, flight))

    def _admit(self, inp: GenerationInput) -> _Flight:
        if not self._ready:
            raise UnavailableError("the cluster is not ready")
        if not self.pools.prefill or not self.pools.decode:
            missing = "prefill" if not self.pools.prefill else "decode"
            raise NoCapacityError(f"no live {missing} instance")
        if inp.request_id in self._flights:
            raise DuplicateRequestError(inp.request_id)
        if len(self._flights) >= self.max_inflight:
            raise OverloadedError(f"{len(self._flights)} requests in flight (limit {self.max_inflight})")
        flight = _Flight(asyncio.Queue())
        self._flights[inp.request_id] = flight
        return flight

    async def _run(self, inp: GenerationInput, flight: _Flight) -> AsyncIterator[TokenEvent]:
        flight.decode = await self._reserve(inp)
        flight.prefill = self._pick_prefill()
        result = await self._prefill(inp, flight)
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
            if delta.error:
                self._repair(flight)
                raise RequestFailedError(delta.error, retryable=True)
            num_output += len(delta.token_ids)
            flight.finished = bool(delta.finish_reason)
            if flight.finished:
                timing.kv_transfer_s = delta.timing.kv_transfer_s
            yield _event(delta, timing if flight.finished else None, inp, ttft_s, num_output)

    async def _reserve(self, inp: GenerationInput) -> Worker:
        request = worker_pb2.ReserveRequest(
            protocol_version=PROTOCOL_VERSION, request_id=inp.request_id,
            num_prompt_tokens=len(inp.prompt_token_ids), max_tokens=inp.params.max_tokens,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed)
        reasons = []
        for worker in self._decode_order():
            reply = await worker.actor.reserve.remote(request)
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
        return sorted(self.pools.decode, key=load)

    def _pick_prefill(self) -> Worker:
        return min(self.pools.prefill, key=lambda w: self._prefill_tokens[w.spec.instance_id])

    async def _prefill(self, inp: GenerationInput, flight: _Flight) -> worker_pb2.PrefillResult:
        worker = flight.prefill
        task = worker_pb2.PrefillTask(
            protocol_version=PROTOCOL_VERSION, request_id=inp.request_id,
            prompt_token_ids=inp.prompt_token_ids, sampling=sampling_to_proto(inp.params),
            seed=inp.seed, decode_instance_id=flight.decode.spec.instance_id)
        pid = worker.spec.instance_id
        self._prefill_tokens[pid] += len(inp.prompt_token_ids)
        try:
            return await worker.actor.prefill.remote(task)
        finally:
            self._prefill_tokens[pid] -= len(inp.prompt_token_ids)

    async def abort(self, request_id: str) -> bool:
        flight = self._flights.get(request_id)
        if flight is None:
            return False
        flight.queue.put_nowait(_ABORTED)
        await self._abort_workers(request_id, flight)
        return True

    async def _abort_workers(self, request_id: str, flight: _Flight) -> None:
        """Abort on the prefill first: its answer tells the decode side whether KV is coming."""
        begun = False
        try:
            if flight.prefill is not None:
                begun = (await flight.prefill.actor.abort.remote(request_id)).transfer_begun
            if flight.decode is not None:
                task = worker_pb2.AbortTask(protocol_version=PROTOCOL_VERSION, request_id=request_id,
                                            reason=worker_pb2.ABORT_REASON_CLIENT_CANCELLED,
                                            transfer_begun=begun)
                await flight.decode.actor.abort.remote(task)
        except Exception:  # a dead worker frees nothing anyway; never fail the caller
            log.exception("abort of %s failed", request_id)

    def _repair(self, flight: _Flight) -> None:
        """Rebuild a failed pair channel under the next generation, in the background."""
        key = (flight.prefill.spec.instance_id, flight.decode.spec.instance_id)
        if key in self._repairing:
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
