"""The decode instance: reserves blocks for incoming requests, lands their KV, and runs them in
its continuous batch, streaming tokens to the router.

Lifecycle of a request here (all transitions on the engine thread):

    reserve(ReserveRequest)   RESERVED: blocks for the prompt (+ output_token_ids, the tokens
                              a migrated request's client already has) allocated, nothing
                              received yet
    KV landed (transfer OK)   LANDED (the KV of prompt + those outputs)
    first token from prefill  FIRST_TOKEN (it may arrive before or after the KV)
    both                      -> PREFILLED: text stream replayed (resumed outputs, then the
                                 first token), queued in the scheduler (num_computed = prompt
                                 + resumed outputs, one token pending), joins the running batch
                                 when a slot (max_num_seqs) and its next block are free
    transfer failed           -> blocks freed; the router gets an error delta
    abort                     RESERVED with no transfer begun: freed at once;
                              otherwise marked, and freed as soon as the transfer ends
A preempted request is recomputed here from its prompt and output tokens, like any other.

Prefix caching: a reservation starts with the blocks of the longest prefix cached here (same
salt; e.g. a conversation's previous turn), reported in ReserveReply.num_cached_tokens: the
prefill side sends only the blocks after them. Missing fewer than prefill_here_below_tokens
tokens, it is queued here instead (conditional disaggregation: no transfer; `prefill_here`).

Bounds: a reservation is refused (`ReserveReply.accepted` False, with the reason) when the KV
cache cannot hold the prompt (+ resumed outputs), or when `max_waiting_requests` requests
already wait here (reserved, queued or preempted); the router answers RESOURCE_EXHAUSTED when
every decode instance refuses.

If the engine thread dies (a step raised), every running, queued and reserved request gets an
error delta ("decode instance failed") at once, its blocks are freed, and every later call fails
with `EngineDeadError`; `health()` reports it without the engine thread.

A multi-rank instance (tensor x pipeline): this worker is rank 0; ranks 1..N-1 keep their
receive links in a rank service (decode_worker/rank_links.py) that every `accept` and `expect`
reaches too. The prefill instance's layout may differ from this one's: each rank receives the
KV shards the transfer plan names (kv_transfer/planner.py), and a request's KV has landed once
every shard of the plan has (kv_transfer/shards.py). A rank that dies kills the engine thread,
as a failed step does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from decode_worker.incoming import Arrival, Incoming
from decode_worker.links import PrefillLinks, RecvLink, accept_prefill
from decode_worker.metrics import DecodeMetrics
from engine.engine_loop import EngineLoop, LoopControls
from engine.executor.rank_calls import RankCallError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from engine.scheduler import QueueFullError
from kv_transfer import KVLayoutSpec, host_store
from kv_transfer.shards import InstanceTransfers
from protos.convert import sampling_from_proto, worker_stats
from protos.pdserve.v1 import PROTOCOL_VERSION, generation_pb2, worker_pb2

log = logging.getLogger(__name__)
EmitCallback = Callable[[worker_pb2.DecodeOutputs], None]
INSTANCE_FAILED = "decode instance failed"  # what clients see; the cause goes to the log
WAITING_PER_BATCH_SLOT = 4  # default max_waiting_requests = this x max_num_seqs
RANK_ACCEPT_TIMEOUT_S = 120.0  # the other ranks' pair channels, built while rank 0 builds its
LANDING_TIMEOUTS = 3  # a begun transfer's KV lands within this many transfer timeouts, or fails


class DecodeWorker(LoopControls):
    """Engine thread + receive links of one decode instance. Ray-free; the actor wraps it."""

    def __init__(self, engine: LLMEngine, instance_id: str, emit: EmitCallback,
                 host: str = "127.0.0.1", transfer_timeout_s: float = 30.0,
                 reserve_watermark: float = 0.01, metrics: DecodeMetrics | None = None,
                 max_waiting_requests: int | None = None) -> None:
        self.engine = engine
        max_num_seqs = engine.config.scheduler.max_num_seqs
        self.max_waiting_requests = max_waiting_requests or WAITING_PER_BATCH_SLOT * max_num_seqs
        self.instance_id = instance_id
        self.emit = emit
        self.transfer_timeout_s = transfer_timeout_s
        self.watermark_blocks = int(reserve_watermark * engine.stats().num_blocks)
        self.spec = KVLayoutSpec.for_engine_rank(engine.kv_cache, engine.model_config,
                                                 engine.config.parallel)
        self.ranks = engine.rank_caller  # None for a one-rank instance
        self.store = host_store(host, 0)
        self.host = host
        self.links: dict[str, PrefillLinks] = {}
        self.incoming: dict[str, Incoming] = {}
        self.transfer_s: dict[str, float] = {}  # per admitted request, reported on its last delta
        self.admitted_at_s: dict[str, float] = {}  # per admitted request, for its decode time
        self.cached_tokens: dict[str, int] = {}  # per admitted request, reported on its last delta
        self.num_transfers_failed = 0
        self.metrics = metrics or DecodeMetrics(engine.model_config.name)
        self.loop = EngineLoop(self._step, engine.has_unfinished, f"decode-{instance_id}",
                               after_iteration=self._publish_metrics,
                               device=engine.kv_cache.device, on_error=self._fail_everything)
        self.loop.start()
        self._transfers = InstanceTransfers(self.ranks, engine.config.parallel.world_size,
                                            self._transfer_finished, self.loop,
                                            f"decode instance {instance_id}")

    # ---- control plane (any thread) -------------------------------------------------------
    def endpoint(self, prefill_id: str, generation: int) -> worker_pb2.PairEndpoint:
        return worker_pb2.PairEndpoint(
            protocol_version=PROTOCOL_VERSION, prefill_instance_id=prefill_id,
            decode_instance_id=self.instance_id, store_host=self.host, store_port=self.store.port,
            generation=generation)

    def accept(self, prefill_id: str, generation: int, device: str) -> None:
        """Build this end of the pair channel (blocking; the prefill side connects meanwhile)."""
        started = time.monotonic()

        def new_link(prefill_rank: int) -> RecvLink:
            return RecvLink(self.store, prefill_id, self.instance_id, generation, device,
                            self.spec, self.engine.kv_cache, self._blocks_of,
                            self._transfers.rank0_done, self.transfer_timeout_s,
                            bind_host=self.host, prefill_rank=prefill_rank)
        link = accept_prefill(0, new_link, self.spec.parallel_layout, self.spec.model,
                              accept_other_ranks=lambda prefill_layout: self._accept_ranks(
                                  prefill_id, generation, device, prefill_layout))
        self.metrics.transfer.handshake_time.observe(time.monotonic() - started)
        old = self.links.get(prefill_id)
        self.links[prefill_id] = link
        if old is not None:
            old.close()

    def _accept_ranks(self, prefill_id: str, generation: int, device: str,
                      prefill_layout: str) -> None:
        if self.ranks is None:
            return
        layouts = (self.spec.parallel_layout, prefill_layout)
        model = (self.spec.num_layers, self.spec.num_kv_heads)
        self.ranks.call("accept", (prefill_id, self.instance_id, generation, self.host,
                                   self.store.port, device, self.transfer_timeout_s, self.host,
                                   layouts, model), timeout_s=RANK_ACCEPT_TIMEOUT_S)

    def reserve(self, req: worker_pb2.ReserveRequest) -> worker_pb2.ReserveReply:
        return self.loop.call(lambda: self._reserve(req)).result(timeout=30)

    def expect_transfer(self, prefill_id: str, desc: worker_pb2.TransferDescriptor) -> None:
        self.loop.submit(lambda: self._mark_begun(desc.request_id))
        link = self.links.get(prefill_id)
        if link is None or link.key != desc.pair_key:  # begun on a channel replaced since
            log.warning("descriptor for unknown pair %s", desc.pair_key)
            message = f"no channel {desc.pair_key} here (replaced or never built)"
            self.loop.submit(lambda: self._transfer_failed(desc.request_id, message))
            return
        expected = link.expected_outcomes()  # every shard of the plan reports
        self._transfers.begin(desc.request_id, expected)
        if self.ranks is not None:  # every rank receives its shards into the same block ids
            try:
                self.ranks.post("expect", (prefill_id, desc.SerializeToString(),
                                           self._blocks_of(desc.request_id), expected),
                                inline=True)
            except RankCallError as exc:  # a rank is gone: the instance is failing anyway
                self._transfers.forget(desc.request_id)
                self.loop.submit(lambda: self._transfer_failed(desc.request_id, str(exc)))
                return
        link.expect(desc)

    def first_token(self, delta: worker_pb2.TokenDelta) -> None:
        self.loop.submit(lambda: self._arrive(delta.request_id, Arrival.FIRST_TOKEN, delta))

    def abort(self, task: worker_pb2.AbortTask) -> worker_pb2.AbortReply:
        return self.loop.call(lambda: self._abort(task)).result(timeout=30)

    def stats(self) -> worker_pb2.WorkerStats:
        return self.loop.call(self._stats).result(timeout=30)

    def stop(self) -> None:
        self.loop.stop()
        for link in self.links.values():
            link.close()
        self.engine.shutdown()  # the other ranks of a multi-rank instance, with their links

    # ---- engine thread ---------------------------------------------------------------------
    def _reserve(self, req: worker_pb2.ReserveRequest) -> worker_pb2.ReserveReply:
        reply = worker_pb2.ReserveReply(protocol_version=PROTOCOL_VERSION, request_id=req.request_id)
        stats = self.engine.stats()
        num_waiting = len(self.incoming) + stats.num_waiting
        if num_waiting >= self.max_waiting_requests:
            reply.reason = (f"decode queue full: {num_waiting} requests waiting "
                            f"(limit {self.max_waiting_requests})")
            return reply
        try:
            request = self.engine.make_request(list(req.prompt_token_ids),
                                               sampling_from_proto(req.sampling),
                                               req.request_id, seed=req.seed,
                                               output_token_ids=list(req.output_token_ids))
        except ValueError as exc:  # can never be accepted as sent, here or elsewhere
            reply.reason, reply.invalid = str(exc), True
            return reply
        request.cache_salt = req.cache_salt  # the table starts with the cached prefix's blocks
        cached = self.engine.kv_manager.match_prefix(req.request_id, request.all_token_ids,
                                                     req.cache_salt)
        # the KV to land covers every known token (prompt + resumed outputs), +1 for the next
        needed = self.engine.num_blocks_needed(req.request_id, request.num_tokens + 1)
        if needed + self.watermark_blocks > (free := self.engine.stats().num_free_blocks):
            self.engine.release_blocks(req.request_id)
            reply.reason = f"KV cache full: {free} of {stats.num_blocks} blocks free, {needed} needed"
            return reply
        reply.num_cached_tokens = cached
        if cached and request.num_tokens - cached < req.prefill_here_below_tokens:
            return self._prefill_here(request, reply)
        blocks = self.engine.reserve_blocks(req.request_id, request.num_tokens)
        skip = cached // self.engine.kv_manager.block_size
        self.incoming[req.request_id] = Incoming(request, blocks[skip:], time.monotonic())
        reply.accepted, reply.num_blocks = True, len(blocks) - skip
        reply.num_free_blocks = self.engine.stats().num_free_blocks
        return reply

    def _prefill_here(self, request: Request, reply: worker_pb2.ReserveReply) -> worker_pb2.ReserveReply:
        """Conditional disaggregation: queue the request to be computed here (its held blocks
        go back, still cached: the scheduler's own match takes them again on admission)."""
        rid = request.request_id
        self.engine.release_blocks(rid)
        try:
            self.engine.track(request)  # replays resumed outputs: their stop strings raise
            self.engine.enqueue(request)
        except (ValueError, QueueFullError) as exc:
            self.engine.forget(request)
            reply.reason, reply.invalid = str(exc), isinstance(exc, ValueError)
            return reply
        request.arrival_time_s = time.monotonic()
        self.cached_tokens[rid] = reply.num_cached_tokens
        reply.accepted, reply.prefill_here = True, True
        reply.num_free_blocks = self.engine.stats().num_free_blocks
        return reply

    def _blocks_of(self, request_id: str) -> list[int] | None:
        """Receive threads look up a reservation's blocks (immutable once reserved)."""
        incoming = self.incoming.get(request_id)
        return None if incoming is None else incoming.block_ids

    def _mark_begun(self, request_id: str) -> None:
        if (incoming := self.incoming.get(request_id)) is not None:
            incoming.transfer_begun, incoming.begun_at_s = True, time.monotonic()

    def _expire_transfers(self) -> None:
        """The deadline behind every other one: a transfer begun LANDING_TIMEOUTS transfer
        timeouts ago whose KV has not landed (nor failed) fails now, freeing its blocks."""
        limit_s = LANDING_TIMEOUTS * self.transfer_timeout_s
        now = time.monotonic()
        late = [i for i in self.incoming.values() if i.transfer_begun
                and Arrival.KV not in i.arrived and now - i.begun_at_s > limit_s]
        for incoming in late:
            log.warning("KV of %s did not land within %g s", incoming.request.request_id, limit_s)
            self._transfer_failed(incoming.request.request_id, f"no KV within {limit_s:g} s")

    def _transfer_finished(self, request_id: str, result: worker_pb2.TransferResult) -> None:
        """Receive or reader thread: every rank's shard landed (or one failed): hand the
        outcome to the engine thread."""
        self.metrics.transfer.observe(result)
        if result.status == worker_pb2.TRANSFER_STATUS_OK:
            self.loop.submit(lambda: self._arrive(request_id, Arrival.KV, None, result.duration_s))
        else:
            self.num_transfers_failed += 1
            self.loop.submit(lambda: self._transfer_failed(request_id, result.message))

    def _arrive(self, request_id: str, what: Arrival, delta, transfer_s: float = 0.0) -> None:
        incoming = self.incoming.get(request_id)
        if incoming is None:
            return
        incoming.arrived |= what
        incoming.first = delta or incoming.first
        incoming.transfer_s = transfer_s or incoming.transfer_s
        if incoming.aborted and Arrival.KV in incoming.arrived:
            self._drop(incoming)
        elif incoming.arrived == Arrival.BOTH:
            self._admit(incoming)

    def _admit(self, incoming: Incoming) -> None:
        del self.incoming[incoming.request.request_id]
        first, landed = incoming.first, incoming.request  # name its landed full blocks: cached
        self.engine.kv_manager.commit(landed.request_id, landed.num_tokens, landed.new_token_ids)
        if first.finish_reason or first.error:  # finished at the prefill: nothing to decode
            self.engine.release_blocks(incoming.request.request_id)
            return
        request = incoming.request
        try:
            self.engine.track(request)  # replays resumed outputs: their stop strings raise
        except ValueError as exc:  # the prefill side rejects these first; kept for safety
            self.engine.release_blocks(request.request_id)
            self._emit_error(request.request_id, str(exc))
            return
        logprob = first.logprobs[0] if first.logprobs else None
        out = self.engine.record_token(request, first.token_ids[0], logprob)  # replays text state
        if out.finished:  # cannot differ from the prefill's verdict; kept for safety
            self.engine.finish_request(request, out.finish_reason)
            return
        request.first_token_time_s = time.monotonic()
        self.transfer_s[request.request_id] = incoming.transfer_s
        self.cached_tokens[request.request_id] = first.usage.cached_tokens  # the prefill's hit
        self.admitted_at_s[request.request_id] = request.first_token_time_s
        self.engine.admit_prefilled(request)  # prompt + resumed outputs landed

    def _transfer_failed(self, request_id: str, message: str) -> None:
        incoming = self.incoming.get(request_id)
        if incoming is None:
            return
        self._drop(incoming)
        if not incoming.aborted:
            self._emit_error(request_id, f"KV transfer failed: {message}")

    def _emit_error(self, request_id: str, message: str) -> None:
        self.emit(self._outputs([worker_pb2.TokenDelta(
            protocol_version=PROTOCOL_VERSION, request_id=request_id, error=message)]))

    def _drop(self, incoming: Incoming) -> None:
        self.incoming.pop(incoming.request.request_id, None)
        self.engine.release_blocks(incoming.request.request_id)

    def _abort(self, task: worker_pb2.AbortTask) -> worker_pb2.AbortReply:
        rid = task.request_id
        reply = worker_pb2.AbortReply(protocol_version=PROTOCOL_VERSION, request_id=rid)
        if self.engine.abort(rid) is not None:
            reply.found = True
            self.transfer_s.pop(rid, None)
            self.admitted_at_s.pop(rid, None)
            self.cached_tokens.pop(rid, None)
        elif (incoming := self.incoming.get(rid)) is not None:
            reply.found = True
            incoming.aborted = True
            if Arrival.KV in incoming.arrived or not (task.transfer_begun or incoming.transfer_begun):
                self._drop(incoming)  # no bytes will land in these blocks any more
        return reply

    def _fail_everything(self, exc: BaseException) -> None:
        """Engine thread, once, after it died: end every stream here at once with an error
        delta and free what can be freed (the cause is logged by the loop, not sent)."""
        request_ids = list(self.engine.requests) + list(self.incoming)
        for request_id in request_ids:
            try:
                self.engine.abort(request_id)
            except Exception:  # the engine's state may be broken; the blocks go back anyway
                log.exception("cannot abort %s on the dead decode instance", request_id)
            self.engine.release_blocks(request_id)
        self.incoming.clear()
        self.transfer_s.clear()
        self.admitted_at_s.clear()
        self.cached_tokens.clear()
        if request_ids:
            self.emit(self._outputs([
                worker_pb2.TokenDelta(protocol_version=PROTOCOL_VERSION, request_id=rid,
                                      error=INSTANCE_FAILED) for rid in request_ids]))

    def _step(self) -> None:
        outputs = self.engine.step()
        if outputs:
            self.metrics.batch_size.observe(len(outputs))
            self.emit(self._outputs([self._delta(o) for o in outputs]))

    def _delta(self, out: RequestOutput) -> worker_pb2.TokenDelta:
        delta = worker_pb2.TokenDelta(protocol_version=PROTOCOL_VERSION, request_id=out.request_id,
                                      token_ids=out.new_token_ids, logprobs=out.new_logprobs,
                                      text=out.text_delta, finish_reason=out.finish_reason or "")
        if out.finished:
            delta.usage.prompt_tokens = out.num_prompt_tokens
            delta.usage.completion_tokens = out.num_output_tokens
            delta.usage.cached_tokens = self.cached_tokens.pop(out.request_id, 0)
            delta.timing.kv_transfer_s = self.transfer_s.pop(out.request_id, 0.0)
            admitted_at_s = self.admitted_at_s.pop(out.request_id, None)
            if admitted_at_s is not None:
                self.metrics.decode_time.observe(time.monotonic() - admitted_at_s)
        return delta

    def _outputs(self, deltas: list[worker_pb2.TokenDelta]) -> worker_pb2.DecodeOutputs:
        out = worker_pb2.DecodeOutputs(protocol_version=PROTOCOL_VERSION,
                                       instance_id=self.instance_id, deltas=deltas)
        out.state.CopyFrom(self._stats().state)
        out.state.ClearField("expert_token_counts")  # per-expert totals: GetClusterState only
        return out

    def _publish_metrics(self) -> None:
        self._expire_transfers()  # after every iteration, and at least once a second
        inflight = sum(link.num_inflight for link in tuple(self.links.values()))
        self.metrics.publish(self.engine, len(self.incoming), inflight)

    def _stats(self) -> worker_pb2.WorkerStats:
        inflight = sum(link.num_inflight for link in self.links.values())
        return worker_stats(self.engine, self.instance_id, generation_pb2.INSTANCE_ROLE_DECODE,
                            inflight, self.num_transfers_failed)



