"""The engine core: every decision of one instance, on the CPU, exactly one per instance.

It owns the requests and their text streams, the scheduler and the KV block manager. A step is
three calls: the scheduler picks what runs, the core turns that into a `StepPlan`
(engine/plan.py) and hands it to its executor (one rank in process, or a group of rank
processes: engine/executor/), then post-processes the `StepResult` (append sampled tokens,
detokenize, stop checks, finish requests and free their blocks). Only the plan and the result
cross to the executor; no `Request` does.

With asynchronous scheduling (engine/inflight.py) a `step()` plans and launches step N+1 first
and reads step N back after, while the device runs N+1; its outputs are then those of step N.

With pipeline parallelism (an executor whose `pipeline_depth` is its number of stages) up to
that many steps are in flight at once, each a *micro-batch* of different requests: a request
whose sampled token is still on its way is not scheduled again until that step is read back,
so the first stage starts step N+1 while later stages still run N, and no plan ever needs a
token in flight. Each step takes at most 1/depth of the running decodes.
Every worker kind runs this same step: a prefill instance installs a `KVHandoff` hook
(engine/hooks.py), a decode instance admits requests whose KV arrived (`admit_prefilled`).
"""

from __future__ import annotations

import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

from engine import compile_watch
from engine.config import EngineConfig
from engine.executor.base import Executor
from engine.expert_load import ExpertLoad
from engine.hooks import KVHandoff
from engine.inflight import InFlightStep
from engine.kv_cache.block_table import KVCacheManager, num_blocks_for
from engine.kv_cache.kv_events import KVEventBatch
from engine.models.config import ModelConfig
from engine.output_processor import RequestStream
from engine.outputs import RequestOutput, merge_outputs
from engine.plan import PlanBuilder
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.spec.decoding import build_spec_decoding
from engine.validation import check_prompt, check_resumed_outputs


@dataclass(frozen=True, slots=True)
class CoreStats:
    """A snapshot of an engine core's queues and KV pool (metrics, health, routing)."""

    num_running: int
    num_waiting: int  # waiting to be computed, or prefilled and waiting for a batch slot
    num_preemptions: int  # since start
    num_free_blocks: int
    num_blocks: int
    num_pending_tokens: int = 0  # tokens of queued and running requests not yet computed
    # prefix caching, since start (all 0 when it is off)
    prefix_queried_tokens: int = 0  # tokens of requests looked up at admission
    prefix_hit_tokens: int = 0  # of those, found cached
    prefix_evictions: int = 0  # cached blocks reused for other content
    # MoE: tokens routed to each expert since start, summed over layers (engine/expert_load.py;
    # refreshed from the device at most once a second); () for a dense model
    expert_token_counts: tuple[int, ...] = ()
    # speculative decoding, since start (all 0 when it is off): request-steps that verified
    # drafts, drafted tokens, and drafts kept
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    triton_compiles_after_ready: int = 0  # process-wide (engine/compile_watch.py)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


def resolve_max_model_len(config: EngineConfig, model_config: ModelConfig) -> int:
    limit = model_config.max_position_embeddings
    return min(config.max_model_len or limit, limit)


class EngineCore:
    """Requests, scheduler, KV blocks and stop checks of one instance, driving an executor."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, tokenizer,
                 executor: Executor) -> None:
        self.config = config
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.executor = executor
        self.max_model_len = resolve_max_model_len(config, model_config)
        block_size = config.cache.block_size
        self.kv_manager = KVCacheManager(executor.num_blocks, block_size,
                                         config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        self._planner = PlanBuilder.for_engine(config,
                                               num_blocks_for(self.max_model_len, block_size))
        self.async_scheduling = config.use_async_scheduling
        self._handoff: KVHandoff | None = None
        # launched, not yet read back, oldest first: at most 2 (asynchronous scheduling), or
        # `pipeline_depth` micro-batches of different requests (pipeline parallelism)
        self._flights: deque[InFlightStep] = deque()
        self._last_read_back_s = 0.0  # when the latest step was read back (Payoff's clock)
        self.pipeline_depth = getattr(executor, "pipeline_depth", 1)
        self.spec = (build_spec_decoding(config.speculative, executor, self.kv_manager,
                                         num_blocks_for(self.max_model_len, block_size))
                     if config.speculative.enabled else None)
        if self.spec is not None and self.pipeline_depth > 1:
            raise ValueError("speculative decoding needs pipeline_parallel_size 1 (a "
                             "verification step's drafts need the previous step's tokens)")
        self.last_step_num_tokens = 0  # tokens the last launched step computes (metrics)
        self.requests: dict[str, Request] = {}
        self.streams: dict[str, RequestStream] = {}
        self.expert_load = ExpertLoad(getattr(getattr(executor, "runner", None), "model", None))

    # ---- requests -------------------------------------------------------------------------
    def make_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                     request_id: str | None = None, seed: int | None = None,
                     output_token_ids: Sequence[int] = ()) -> Request:
        """Validate and build a request (not yet queued). `seed` overrides `params.seed`: the
        router fixes one per request so prefill and decode instances sample alike.

        `output_token_ids` are tokens already streamed to the client (a migrated request): the
        request resumes after them. Its first step computes the KV of prompt + these and samples
        output index len(output_token_ids); with the same seed that is the token the
        uninterrupted run sampled there. `params.max_tokens` still counts every output."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.requests or self.kv_manager.block_table(request_id):
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt = [int(t) for t in prompt_token_ids]
        outputs = [int(t) for t in output_token_ids]
        vocab = self.model_config.vocab_size
        check_prompt(prompt, params, self.max_model_len, vocab, self.kv_manager.block_size,
                     self.kv_manager.num_blocks)
        check_resumed_outputs(prompt, outputs, params, self.max_model_len, vocab,
                              self.tokenizer.eos_token_ids)
        if seed is None:
            seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Request(request_id, prompt, params, seed, self.max_model_len,
                       output_token_ids=outputs)

    def add_request(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                    request_id: str | None = None) -> str:
        request = self.make_request(prompt_token_ids, params, request_id)
        self.scheduler.add(request)
        self.track(request)
        return request.request_id

    def track(self, request: Request) -> None:
        """Start the output stream of a request built by `make_request`; a resumed request's
        outputs are replayed into it first. Raises ValueError, tracking nothing, if they
        complete a stop string (the request had already finished)."""
        stream = RequestStream(request, self.tokenizer, self.tokenizer.eos_token_ids)
        stream.replay(request.output_token_ids)
        self.requests[request.request_id] = request
        self.streams[request.request_id] = stream

    def enqueue(self, request: Request) -> None:
        """Queue a tracked request for computing (QueueFullError past the queue's bound)."""
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is and free its blocks; None if it is unknown/finished."""
        request = self.requests.get(request_id)
        if request is None:
            return None
        self._end(request, RequestStatus.FINISHED_ABORTED)
        self.forget(request)
        return RequestOutput(request_id, [], "", True, "abort", [], request.num_prompt_tokens,
                             len(request.output_token_ids))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._flights)

    # ---- blocks held outside the scheduler (transfers) --------------------------------------
    def reserve_blocks(self, request_id: str, num_tokens: int) -> list[int]:
        """Allocate blocks for `num_tokens` tokens of a request not yet queued (the KV a prefill
        instance will send into them); the caller checked `num_free_blocks`."""
        return list(self.kv_manager.grow(request_id, num_tokens))

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (its KV's blocks, in order)."""
        return self.kv_manager.block_table(request_id)

    def num_blocks_needed(self, request_id: str, num_tokens: int) -> int:
        return self.kv_manager.num_missing_blocks(request_id, num_tokens)

    def release_blocks(self, request_id: str) -> None:
        """Return a request's blocks to the pool (a transfer's hold ended). Idempotent."""
        self.kv_manager.free(request_id)

    def admit_prefilled(self, request: Request) -> None:
        """Queue a tracked request whose KV (prompt + resumed outputs) landed in its reserved
        blocks and whose first token is recorded: it decodes once a batch slot is free."""
        request.num_computed_tokens = request.num_tokens - 1
        self.scheduler.add_prefilled(request)

    def set_handoff(self, handoff: KVHandoff | None) -> None:
        """Install the prefill side's hand-off hook (engine/hooks.py)."""
        self._handoff = handoff

    def stats(self) -> CoreStats:
        kv, scheduler = self.kv_manager, self.scheduler
        pending = sum(r.num_pending_tokens for r in chain(scheduler.waiting, scheduler.running))
        cache = kv.prefix_cache.stats if kv.prefix_cache is not None else None
        return CoreStats(len(scheduler.running), scheduler.num_waiting,
                         scheduler.num_preemptions, kv.num_free_blocks, kv.num_blocks, pending,
                         *((cache.queried_tokens, cache.hit_tokens, cache.evictions)
                           if cache is not None else (0, 0, 0)),
                         expert_token_counts=self.expert_load.totals(),
                         triton_compiles_after_ready=compile_watch.WATCH.count,
                         **(self.spec.stats.as_core_stats() if self.spec is not None else {}))

    def kv_events(self, snapshot: bool = False) -> KVEventBatch | None:
        """The prefix cache's block-hash changes since the last call, or (`snapshot`) every
        hash it holds now (engine/kv_cache/kv_events.py); None without prefix caching."""
        cache = self.kv_manager.prefix_cache
        if cache is None:
            return None
        return cache.events.snapshot(cache.cached_hashes()) if snapshot else cache.events.drain()

    # ---- stepping ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan and launch one step; returns the outputs of the step(s) it reads back: this one
        (synchronous), the previous one (asynchronous scheduling), or the oldest micro-batch
        once the pipeline is full (pipeline parallelism)."""
        if self.pipeline_depth > 1:
            return self._step_pipelined()
        started_s = time.monotonic()
        previous = self._flights.popleft() if self._flights else None
        outputs: list[RequestOutput] = []
        drafting = self.spec is not None and self.spec.wants_drafts(self.scheduler.running)
        if previous is not None and (drafting or not self._can_overlap(previous)):
            outputs += self._read_back(previous)  # drafts need every token on the host
            previous = None
        if self.spec is not None:
            self.spec.before_schedule(self.scheduler.running, drafting)
        scheduled = self.scheduler.schedule()
        draft_s = self.spec.fill(scheduled, self.scheduler.running) if drafting else 0.0
        self.last_step_num_tokens = scheduled.num_batched_tokens
        if not scheduled.is_empty:
            self._flights.append(self._launch(scheduled, draft_s, started_s))
        if previous is not None:
            outputs += self._read_back(previous)
        if not self.async_scheduling and self._flights:
            outputs += self._read_back(self._flights.popleft())
        return outputs

    def _step_pipelined(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if len(self._flights) >= self.pipeline_depth:
            outputs += self._read_back(self._flights.popleft())
        scheduled = self.scheduler.schedule(micro_batches=self.pipeline_depth)
        self.last_step_num_tokens = scheduled.num_batched_tokens
        if not scheduled.is_empty:
            self._flights.append(self._launch(scheduled))
        elif self._flights:  # everything schedulable is in flight: wait for the oldest
            outputs += self._read_back(self._flights.popleft())
        return outputs

    def _can_overlap(self, previous: InFlightStep) -> bool:
        """Whether the next step may launch before `previous` is read: not with a hand-off
        hook, nor when a repetition penalty needs every token id on the host."""
        return (self.async_scheduling and self._handoff is None and not previous.spec_lens
                and all(r.params.repetition_penalty == 1.0 for r in previous.sampling_requests))

    def _launch(self, scheduled: SchedulerOutput, draft_s: float = 0.0,
                started_s: float | None = None) -> InFlightStep:
        """`draft_s`: a draft model's time for this step's drafts (counted as the step's);
        `started_s`: when the step's host work (reading back, proposing, scheduling) began."""
        plan = self._planner.build(scheduled, self.kv_manager.take_freed())
        sampling = [c.request for c in scheduled.chunks if c.samples]
        listener = None
        hands_off = self._handoff is not None and bool(sampling)
        if hands_off:
            listener = self._handoff.begin(sampling)
        launched_at_s = time.monotonic() - draft_s
        handle = self.executor.launch(plan, listener)
        self.scheduler.on_step_done(scheduled)
        for row, request in enumerate(sampling):  # the next step is fed from these rows
            request.num_inflight_tokens += 1
            request.inflight_row = row
        decode_only = all(c.is_decode or c.num_spec for c in scheduled.chunks)
        return InFlightStep(sampling, frozenset(plan.request_ids), handle, launched_at_s,
                            hands_off, spec_lens=plan.spec_lens, decode_only=decode_only,
                            started_s=launched_at_s if started_s is None else started_s)

    def _read_back(self, step: InFlightStep) -> list[RequestOutput]:
        """Append each sampled token to its request, stream text, finish what is done. Tokens
        of requests that ended meanwhile (aborted, or stopped at the step before) are dropped."""
        result = step.wait()  # the step's only host sync
        now = time.monotonic()
        step_s = now - step.launched_at_s
        # Payoff compares throughput: a step's time is the interval since the previous read-back
        # (or its own host work, after an idle gap); async plain steps overlap, so their
        # launch-to-read-back times would count each interval twice
        interval_s = now - max(step.started_s, self._last_read_back_s)
        self._last_read_back_s = now
        if self.spec is not None and step.decode_only:  # what each mode yields, for Payoff
            tokens = (sum(t >= 0 for t in result.token_ids) if step.spec_lens
                      else len(result.token_ids))
            self.spec.payoff.record(len(step.sampling_requests), bool(step.spec_lens), tokens,
                                    interval_s)
        if step.spec_lens:
            outputs = self._read_back_verified(step, result)
            for request_id in step.deferred_frees:
                self.kv_manager.free(request_id)
            return outputs
        logprobs = result.logprobs or [None] * len(result.token_ids)
        outputs = []
        for request, token_id, logprob in zip(step.sampling_requests, result.token_ids, logprobs):
            request.num_inflight_tokens -= 1
            if request.is_finished or request.request_id not in self.requests:
                continue
            if step.hands_off:
                outputs.append(self._hand_off(request, token_id, logprob, step_s))
            else:
                outputs.append(self.append_token(request, token_id, logprob))
        for request_id in step.deferred_frees:
            self.kv_manager.free(request_id)
        return outputs

    def _read_back_verified(self, step: InFlightStep, result) -> list[RequestOutput]:
        """A speculative step: each request's kept drafts and one more token, appended one at
        a time (stop checks apply to each); the kept drafts' KV now counts as computed and the
        blocks past the sequence (rejected drafts' slots) go back to the pool."""
        outputs = []
        rows = self.spec.split(result.token_ids, result.logprobs, step.spec_lens)
        for request, (tokens, logprobs) in zip(step.sampling_requests, rows):
            request.num_inflight_tokens -= 1
            if request.is_finished or request.request_id not in self.requests:
                continue
            parts = []
            for i, token in enumerate(tokens):
                parts.append(self.record_token(request, token, logprobs[i] if logprobs else None))
                if parts[-1].finished:
                    break
            outputs.append(merge_outputs(parts))
            if parts[-1].finished:
                self.finish_request(request, parts[-1].finish_reason)
            else:
                request.num_computed_tokens += len(tokens) - 1
                self.kv_manager.trim(request.request_id, request.num_tokens)
        return outputs

    def _hand_off(self, request: Request, token_id: int, logprob: float | None,
                  step_s: float) -> RequestOutput:
        out = self.record_token(request, token_id, logprob)
        self.scheduler.detach(request)  # its blocks stay allocated: the transfer holds them
        self.forget(request)
        self._handoff.handed_off(request, out, step_s)
        return out

    def append_token(self, request: Request, token_id: int, logprob: float | None) -> RequestOutput:
        """Record a sampled token and finish the request (freeing its blocks) if it is done."""
        out = self.record_token(request, token_id, logprob)
        if out.finished:
            self.finish_request(request, out.finish_reason)
        return out

    def finish_request(self, request: Request, finish_reason: str) -> None:
        status = RequestStatus.FINISHED_STOPPED if finish_reason == "stop" else RequestStatus.FINISHED_LENGTH
        self._end(request, status)
        self.forget(request)

    def _end(self, request: Request, status: RequestStatus) -> None:
        """Finish a request; its blocks return to the pool now, or, if a step in flight
        computes it, once that step is read back (the device may still be writing them)."""
        flight = next((f for f in reversed(self._flights)
                       if request.request_id in f.request_ids), None)
        if flight is not None:  # freed after the last launched step that computes it
            self.scheduler.finish(request, status, free_blocks=False)
            flight.deferred_frees.append(request.request_id)
        else:
            self.scheduler.finish(request, status)

    def record_token(self, request: Request, token_id: int, logprob: float | None) -> RequestOutput:
        """Append a token to the request and its text stream; no effect on the scheduler."""
        now = time.monotonic()
        request.output_token_ids.append(token_id)
        if request.first_token_time_s is None:
            request.first_token_time_s = now
        new_logprobs = []
        if logprob is not None and request.params.logprobs:
            request.output_logprobs.append(logprob)
            new_logprobs = [logprob]
        delta, reason = self.streams[request.request_id].on_token(token_id)
        return RequestOutput(request.request_id, [token_id], delta, reason is not None, reason,
                             new_logprobs, request.num_prompt_tokens, len(request.output_token_ids))

    def forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        self.streams.pop(request.request_id, None)

    def shutdown(self) -> None:
        self.executor.shutdown()
