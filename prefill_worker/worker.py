"""The prefill instance: computes prompts, samples each one's first token and streams the KV
to the decode instance the router chose.

Lifecycle of a request here (all transitions on the engine thread):

    submit(PrefillTask) -> WAITING/RUNNING in the engine (chunked prefill as needed)
    step that completes the prompt (+ the task's output_token_ids: a migrated request resumes
    after the tokens its client already has; "first token" below is then the next one):
        begin transfer (descriptor sent to the decode side, header on the wire)
        forward pass; after each layer its KV is posted to the decode instance
        first token sampled -> PrefillResult to the router, TokenDelta to the decode side
        request leaves the scheduler; its blocks now belong to the transfer ("handed off")
    transfer acknowledged or failed -> blocks freed

An abort before the hand-off frees the blocks at once; after it, the transfer still completes
or times out (the decode side expects the bytes), and the blocks are freed then.

If the engine thread dies (a step raised), every prompt not yet handed off fails at once: its
`on_error` gets the loop's `EngineDeadError` (a prompt submitted later too), and `health()`
reports the death without the engine thread.

A multi-rank instance (tensor x pipeline): this worker is rank 0 and keeps its own links; ranks
1..N-1 keep theirs in a rank service (prefill_worker/rank_links.py) that every `connect` and
every step's `begin` reaches too. The two instances' layouts may differ: the transfer plan
(kv_transfer/planner.py) names which prefill rank sends which KV shard (layers x KV heads) to
which decode rank; the blocks are freed once every shard of the plan reported
(kv_transfer/shards.py). A rank that dies kills the engine thread, as a failed step does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.engine_loop import EngineDeadError, EngineLoop, LoopControls
from engine.executor.base import LayerListener
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from kv_transfer import (DEFAULT_MIN_MESSAGE_BYTES, FaultInjection, KVLayoutSpec,
                         OutgoingTransfer, layers_per_message_for, new_descriptor)
from kv_transfer.shards import InstanceTransfers
from prefill_worker.links import DecodeLinks, LinkConfig, connect_decode, layer_sender
from prefill_worker.metrics import PrefillMetrics
from protos.pdserve.v1 import PROTOCOL_VERSION, generation_pb2, worker_pb2
from protos.convert import sampling_from_proto, worker_stats

log = logging.getLogger(__name__)
RANK_CONNECT_TIMEOUT_S = 120.0  # the other ranks' pair channels, built while rank 0 builds its
ResultCallback = Callable[[worker_pb2.PrefillResult], None]
ErrorCallback = Callable[[BaseException], None]


@dataclass(slots=True)
class DecodePeer:
    """How this prefill instance reaches one decode instance's control plane."""

    expect_transfer: Callable[[worker_pb2.TransferDescriptor], None]
    first_token: Callable[[worker_pb2.TokenDelta], None]


@dataclass(slots=True)
class _Pending:
    """A submitted prompt until its first token is handed off: how to answer its caller."""

    task: worker_pb2.PrefillTask
    on_result: ResultCallback
    on_error: ErrorCallback


@dataclass(slots=True)
class _Handoff:
    request: Request
    task: worker_pb2.PrefillTask
    link: DecodeLinks | None = None  # None: no transfer could begin (channel down)
    transfer: list[tuple[object, OutgoingTransfer]] | None = None  # rank 0's shards
    desc: worker_pb2.TransferDescriptor | None = None  # the transfer's, when begun


class PrefillWorker(LoopControls):
    """Engine thread + send links of one prefill instance. Ray-free; the actor wraps it."""

    def __init__(self, engine: LLMEngine, instance_id: str, layers_per_message: int = 1,
                 transfer_timeout_s: float = 30.0, host: str | None = None,
                 metrics: PrefillMetrics | None = None,
                 min_message_bytes: int = DEFAULT_MIN_MESSAGE_BYTES,
                 faults: FaultInjection | None = None) -> None:
        self.host = host
        self.faults = faults or FaultInjection()  # of every link built from now on
        self.engine = engine
        self.instance_id = instance_id
        self.layers_per_message = layers_per_message
        self.min_message_bytes = min_message_bytes
        kv = engine.kv_cache  # [layers, blocks, 2, block_size, kv_heads, head_dim]
        self._block_head_bytes = kv[0, 0, :, :, 0].numel() * kv.element_size()  # 1 layer, 1 head
        self.transfer_timeout_s = transfer_timeout_s
        self.spec = KVLayoutSpec.for_engine_rank(engine.kv_cache, engine.model_config,
                                                 engine.config.parallel)
        self.ranks = engine.rank_caller  # None for a one-rank instance
        self.links: dict[str, DecodeLinks] = {}
        self.peers: dict[str, DecodePeer] = {}
        self._pending: dict[str, _Pending] = {}  # admitted, first token not yet handed off
        self._handed_off: set[str] = set()  # request ids whose blocks the transfer holds
        self.num_transfers_failed = 0
        self.metrics = metrics or PrefillMetrics(engine.model_config.name)
        self._begun: dict[str, _Handoff] = {}  # transfers begun by the step now running
        engine.set_handoff(self)  # the core's step calls begin() and handed_off()
        self.loop = EngineLoop(self._step, engine.has_unfinished, f"prefill-{instance_id}",
                               after_iteration=self._publish_metrics,
                               device=engine.kv_cache.device, on_error=self._fail_pending)
        self.loop.start()
        self._transfers = InstanceTransfers(self.ranks, engine.config.parallel.world_size,
                                            self._transfer_finished, self.loop,
                                            f"prefill instance {instance_id}")

    # ---- control plane (any thread) -------------------------------------------------------
    def connect(self, decode_id: str, endpoint: worker_pb2.PairEndpoint, peer: DecodePeer,
                device: str) -> None:
        """Build the pair channel to `decode_id` (blocking: the decode side accepts at once)."""
        cfg = LinkConfig(self.instance_id, decode_id, device, self.transfer_timeout_s,
                         faults=self.faults, bind_host=self.host)
        started = time.monotonic()
        link = connect_decode(cfg, endpoint, self.spec, self._transfers.rank0_done,
                              connect_other_ranks=lambda decode_layout: self._connect_ranks(
                                  decode_id, endpoint, device, decode_layout))
        self.metrics.transfer.handshake_time.observe(time.monotonic() - started)
        old = self.links.get(decode_id)
        self.links[decode_id], self.peers[decode_id] = link, peer
        if old is not None:
            old.close()

    def _connect_ranks(self, decode_id: str, endpoint: worker_pb2.PairEndpoint,
                       device: str, decode_layout: str) -> None:
        if self.ranks is None:
            return
        faults = {f: getattr(self.faults, f) for f in self.faults.__dataclass_fields__}
        layouts = (self.spec.parallel_layout, decode_layout)
        model = (self.spec.num_layers, self.spec.num_kv_heads)
        self.ranks.call("connect", (self.instance_id, decode_id, endpoint.SerializeToString(),
                                    device, self.transfer_timeout_s, self.host, faults, layouts,
                                    model), timeout_s=RANK_CONNECT_TIMEOUT_S)

    def set_faults(self, faults: FaultInjection, future_links: bool = False) -> None:
        """Fault injection (tests, chaos runs) on every current link: a fault of this channel
        generation, which a rebuilt channel no longer has; with `future_links`, on the links
        built later too (a fault that persists)."""
        if future_links:
            self.faults = faults
        for link in self.links.values():
            link.set_faults(faults)

    def submit(self, task: worker_pb2.PrefillTask, on_result: ResultCallback,
               on_error: ErrorCallback | None = None) -> None:
        """Queue a prompt; `on_result` is called (engine thread) once its first token exists,
        or `on_error` with an `EngineDeadError` if the engine thread dies first (any thread;
        by default `on_result` gets a result whose first token carries the error)."""
        if on_error is None:
            def on_error(exc: BaseException) -> None:
                on_result(_failed_result(task.request_id, "prefill instance failed"))
        pending = _Pending(task, on_result, on_error)

        def on_admitted(admitted: Future) -> None:
            if (exc := admitted.exception()) is not None:  # the engine died before admitting it
                on_error(exc)

        self.loop.call(lambda: self._admit(pending)).add_done_callback(on_admitted)

    def abort(self, request_id: str) -> worker_pb2.AbortReply:
        return self.loop.call(lambda: self._abort(request_id)).result(timeout=30)

    def stats(self) -> worker_pb2.WorkerStats:
        return self.loop.call(self._stats).result(timeout=30)

    def kv_snapshot(self) -> worker_pb2.KVEvents:
        """Every block hash the prefix cache holds now (the router resyncs its view)."""
        events = worker_pb2.KVEvents()
        _set_kv_events(events, self.loop.call(lambda: self.engine.kv_events(snapshot=True))
                       .result(timeout=30))
        return events

    def stop(self) -> None:
        self.loop.stop()
        for link in self.links.values():
            link.close()
        self.engine.shutdown()  # the other ranks of a multi-rank instance, with their links

    # ---- engine thread ---------------------------------------------------------------------
    def _admit(self, pending: _Pending) -> None:
        task = pending.task
        try:
            request = self.engine.make_request(list(task.prompt_token_ids),
                                               sampling_from_proto(task.sampling),
                                               task.request_id, seed=task.seed,
                                               output_token_ids=list(task.output_token_ids))
            self.engine.track(request)  # replays resumed outputs: their stop strings raise
        except ValueError as exc:
            pending.on_result(_failed_result(task.request_id, str(exc)))
            return
        request.arrival_time_s = time.monotonic()
        request.cache_salt = task.cache_salt  # prefix caching: this salt's blocks only
        self.engine.enqueue(request)
        self._pending[task.request_id] = pending

    def _step(self) -> None:
        self.engine.step()  # the core's step; hand-offs happen in it, through the hook below
        if self.engine.last_step_num_tokens:
            self.metrics.iteration_tokens.observe(self.engine.last_step_num_tokens)

    # ---- the core's hand-off hook (engine/hooks.py), engine thread ---------------------------
    def begin(self, requests: list[Request]) -> LayerListener | None:
        """The step about to run completes these prompts: begin their transfers; the returned
        listener posts each layer's KV as soon as the forward pass has written it."""
        handoffs = [self._begin_transfer(request) for request in requests]
        self._begun.update((h.request.request_id, h) for h in handoffs)  # pipelines: several
        self._begin_on_ranks([h for h in handoffs if h.transfer is not None])
        return layer_sender({sender for h in handoffs if h.link is not None
                             for sender in h.link.senders})

    def _begin_on_ranks(self, handoffs: list[_Handoff]) -> None:
        """The other ranks begin their shards of these transfers before the plan runs (the
        call goes down the plan socket ahead of the plan); each reports on its own."""
        if self.ranks is None or not handoffs:
            return
        orders = []
        for h in handoffs:
            rid = h.request.request_id
            orders.append((h.task.decode_instance_id, h.desc.SerializeToString(),
                           self._blocks_to_send(h.request, h.task), h.link.expected_outcomes()))
        self.ranks.post("begin", (orders,), inline=True)

    def _blocks_to_send(self, request: Request, task: worker_pb2.PrefillTask) -> list[int]:
        """The request's blocks after those the decode instance already holds (its cached
        prefix, PrefillTask.num_decode_cached_tokens): only these cross the wire."""
        table = self.engine.block_ids(request.request_id)
        held = task.num_decode_cached_tokens // self.engine.kv_manager.block_size
        return table[min(held, len(table) - 1):]  # never the last block: it holds new KV

    def _begin_transfer(self, request: Request) -> _Handoff:
        task = self._pending[request.request_id].task
        link = self.links.get(task.decode_instance_id)
        if link is None or not link.is_ready:
            return _Handoff(request, task, None)
        table = self._blocks_to_send(request, task)  # allocated for this step
        num_unsent = len(self.engine.block_ids(request.request_id)) - len(table)
        num_layers = self.spec.num_layers  # the model's: each shard takes its part
        shard_layer_bytes = len(table) * self._block_head_bytes * link.min_shard_heads()
        per_message = layers_per_message_for(num_layers, shard_layer_bytes,
                                             self.layers_per_message, self.min_message_bytes)
        # this step completes the KV of every token known so far: prompt + resumed outputs
        num_tokens = request.num_tokens - num_unsent * self.engine.kv_manager.block_size
        desc = new_descriptor(link.key, link.next_seq, request.request_id,
                              num_tokens, len(table), (0, num_layers), per_message)
        self.peers[task.decode_instance_id].expect_transfer(desc)
        try:
            transfer = link.begin(desc, self.engine.kv_cache, table)
        except Exception as exc:  # a broken channel: the decode side times out on its own
            log.warning("cannot begin KV transfer for %s: %s", request.request_id, exc)
            return _Handoff(request, task, None)
        # every shard of the plan reports, rank 0's (its links) and the other ranks' (events)
        self._transfers.begin(request.request_id, link.expected_outcomes())
        return _Handoff(request, task, link, transfer, desc)

    def handed_off(self, request: Request, out: RequestOutput, step_s: float) -> None:
        """The first token exists and the request left the core; its blocks are held by its
        transfer (freed on the acknowledgement) or freed now if no transfer could start."""
        h = self._begun.pop(request.request_id)
        rid = request.request_id
        delta = _token_delta(request, out, step_s)
        self.metrics.queue_time.observe(delta.timing.queue_s)
        self.metrics.prefill_time.observe(delta.timing.prefill_s)
        # a link replaced (repaired) since the transfer began refuses it: no ack can come
        handed = h.link is not None and h.link.hand_over(h.transfer)
        if handed:
            self._handed_off.add(rid)
            self.peers[h.task.decode_instance_id].first_token(delta)
        else:
            self._transfers.forget(rid)  # the other ranks' shards cannot complete alone
            self.engine.release_blocks(rid)
        result = worker_pb2.PrefillResult(protocol_version=PROTOCOL_VERSION, request_id=rid,
                                          first_token=delta, prefill_s=step_s)
        if not handed:
            self.metrics.transfer.observe_failure(worker_pb2.TRANSFER_STATUS_FAILED)
            result.transfer.status = worker_pb2.TRANSFER_STATUS_FAILED
            result.transfer.message = f"no ready KV channel to {h.task.decode_instance_id}"
        else:
            result.transfer.status = worker_pb2.TRANSFER_STATUS_OK  # begun; the ack is async
        _set_kv_events(result.kv_events, self.engine.kv_events())  # piggybacked, for routing
        self._pending.pop(rid).on_result(result)

    def _transfer_finished(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        """Finisher or reader thread: every rank's shard was acknowledged (or one failed):
        free the blocks."""
        self.metrics.transfer.observe(result)
        if result.status != worker_pb2.TRANSFER_STATUS_OK:
            self.num_transfers_failed += 1
            log.warning("KV transfer of %s failed: %s", request_id, result.message)

        def release() -> None:
            self._handed_off.discard(request_id)
            self.engine.release_blocks(request_id)

        self.loop.submit(release)

    def _abort(self, request_id: str) -> worker_pb2.AbortReply:
        reply = worker_pb2.AbortReply(protocol_version=PROTOCOL_VERSION, request_id=request_id)
        if request_id in self._handed_off:
            reply.found, reply.transfer_begun = True, True
            return reply
        if self.engine.abort(request_id) is not None:
            reply.found = True
            pending = self._pending.pop(request_id, None)
            if pending is not None:
                pending.on_result(_aborted_result(request_id))
        return reply

    def _fail_pending(self, exc: BaseException) -> None:
        """Engine thread, once, after it died: every prompt not handed off fails at once and
        its blocks are freed (handed-off blocks stay with their transfers)."""
        error: EngineDeadError = self.loop.dead_error()
        pending, self._pending = self._pending, {}
        for request_id, entry in pending.items():
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine's state may be broken; the blocks go back anyway
                log.exception("cannot abort %s on the dead prefill instance", request_id)
            self.engine.release_blocks(request_id)
            entry.on_error(error)

    def _publish_metrics(self) -> None:
        inflight = sum(link.num_inflight for link in tuple(self.links.values()))
        self.metrics.publish(self.engine, inflight)

    def _stats(self) -> worker_pb2.WorkerStats:
        inflight = sum(link.num_inflight for link in self.links.values())
        return worker_stats(self.engine, self.instance_id, generation_pb2.INSTANCE_ROLE_PREFILL,
                            inflight, self.num_transfers_failed)


def _token_delta(request: Request, out, step_s: float) -> worker_pb2.TokenDelta:
    delta = worker_pb2.TokenDelta(protocol_version=PROTOCOL_VERSION, request_id=request.request_id,
                                  token_ids=out.new_token_ids, logprobs=out.new_logprobs,
                                  text=out.text_delta, finish_reason=out.finish_reason or "")
    queue_s = (request.first_scheduled_time_s or request.arrival_time_s) - request.arrival_time_s
    delta.timing.queue_s = queue_s
    delta.timing.prefill_s = time.monotonic() - (request.first_scheduled_time_s or time.monotonic())
    delta.usage.prompt_tokens = request.num_prompt_tokens
    delta.usage.completion_tokens = len(request.output_token_ids)
    delta.usage.cached_tokens = request.num_cached_tokens  # this instance's prefix-cache hit
    return delta


def _set_kv_events(message: worker_pb2.KVEvents, batch) -> None:
    """An engine `KVEventBatch` (None: no prefix cache) into its message."""
    if batch is not None:
        message.protocol_version = PROTOCOL_VERSION
        message.epoch, message.seq, message.num_dropped = batch.epoch, batch.seq, batch.num_dropped
        message.stored.extend(batch.stored)
        message.evicted.extend(batch.evicted)
        message.is_snapshot = batch.is_snapshot


def _failed_result(request_id: str, message: str) -> worker_pb2.PrefillResult:
    """The request could not be prefilled (e.g. it failed validation here)."""
    result = worker_pb2.PrefillResult(protocol_version=PROTOCOL_VERSION, request_id=request_id)
    result.first_token.request_id = request_id
    result.first_token.error = message
    return result


def _aborted_result(request_id: str) -> worker_pb2.PrefillResult:
    result = worker_pb2.PrefillResult(protocol_version=PROTOCOL_VERSION, request_id=request_id)
    result.first_token.request_id = request_id
    result.first_token.finish_reason = "abort"
    return result
