"""Iteration-level continuous batching.

Each `schedule()` call plans one engine step under a token budget: running requests first
(decodes and the next chunks of long prompts), then prefilled requests, then waiting requests,
while budget, batch slots (`max_num_seqs`, which also bounds the decode graph buckets) and KV
blocks last.

Queues of one engine:

    waiting    new or preempted requests: their KV is computed here (prefill or recompute)
    prefilled  requests whose prompt KV arrived from a prefill instance (a decode instance):
               they hold their blocks, num_computed_tokens == prompt length (+ the outputs a
               resumed request started with), one token pending; each is admitted like a
               decode once a batch slot and its next block exist
    running    the continuous batch

Preemption frees a victim's blocks and puts it at the front of the waiting queue, to be
recomputed later (recompute is just prefill over prompt + output so far). The victim is the
newest request holding blocks: the last prefilled request first (it has not started decoding),
then the most recently admitted running one. When nothing runs and the first prefilled request
cannot get its next block, prefilled requests are preempted from the back until it can: queued
requests never hold every block while nothing runs.

Micro-batches (pipeline parallelism, `schedule(micro_batches=n)` with n > 1): a request whose
sampled token is still in flight is skipped (it is in another micro-batch; a queued one blocks
admission behind it, first come first served), and one step takes at most 1/n of the requests
(running and queued), so n steps in flight split the batch between them.

The scheduler is CPU bookkeeping only; it hands the runner a typed plan, `SchedulerOutput`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import SchedulerConfig
from engine.kv_cache.block_table import KVCacheManager
from engine.request import Request, RequestStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at its configured bound; the caller should shed load."""


@dataclass(slots=True)
class ScheduledChunk:
    """Compute KV for `num_tokens` tokens of `request` starting at position `start`."""

    request: Request
    start: int
    num_tokens: int
    block_table: list[int]
    samples: bool  # the chunk reaches the end of the sequence, so a token is sampled after it
    # speculative decoding: drafted tokens computed after the last real one (the last
    # `num_spec` of `num_tokens`), each verified by the sample after the token before it
    spec_token_ids: tuple[int, ...] = ()

    @property
    def num_spec(self) -> int:
        return len(self.spec_token_ids)

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclass(slots=True)
class SchedulerOutput:
    """The plan of one step. Decode chunks come first, then prefill chunks."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    """Owns the waiting, prefilled and running queues and the KV block assignment of one
    engine."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
        self.prefilled: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------
    def add(self, request: Request) -> None:
        bound = self.config.max_queued_requests
        if bound is not None and len(self.waiting) >= bound:
            raise QueueFullError(f"waiting queue is full ({bound} requests)")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def finish(self, request: Request, status: RequestStatus, free_blocks: bool = True) -> None:
        """Move a request to a finished state and return its blocks (unless the caller frees
        them later: a launched step may still write them). Idempotent."""
        if request.is_finished:
            return
        request.status = status
        self._remove(request)
        if free_blocks:
            self.kv.free(request.request_id)

    def detach(self, request: Request) -> list[int]:
        """Remove a request from the queues but KEEP its blocks (ownership passes to the caller,
        e.g. a KV transfer that frees them on acknowledgement). Returns its block table."""
        self._remove(request)
        return self.kv.block_table(request.request_id)

    def _remove(self, request: Request) -> None:
        for queue in (self.running, self.prefilled, self.waiting):
            if request in queue:
                queue.remove(request)
                return

    def add_prefilled(self, request: Request) -> None:
        """Queue a request whose prompt KV (and a resumed request's outputs') is already in its
        blocks (received from a prefill instance, first token recorded): it joins the running
        batch when a slot and its next block are free, ahead of waiting requests."""
        computed = request.num_computed_tokens
        if computed < request.num_prompt_tokens or request.num_pending_tokens != 1:
            raise ValueError(f"request {request.request_id!r} is not prefilled: "
                             f"{computed} of {request.num_tokens} tokens computed")
        request.status = RequestStatus.WAITING
        self.prefilled.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.prefilled or self.running)

    @property
    def num_waiting(self) -> int:
        """Requests outside the running batch: waiting and prefilled."""
        return len(self.waiting) + len(self.prefilled)

    # ---- planning -----------------------------------------------------------------------
    def schedule(self, micro_batches: int = 1) -> SchedulerOutput:
        """Plan one step; with `micro_batches` > 1, one of that many in flight (see above)."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        total = len(self.running) + len(self.waiting) + len(self.prefilled)
        limit = -(-total // micro_batches)  # sequences in this step
        budget = self._schedule_running(out, budget, micro_batches > 1, limit)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget, micro_batches > 1, limit)
        out.chunks.sort(key=lambda c: not c.is_decode)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, micro: bool,
                          limit: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0 and len(out.chunks) < limit:
            request = self.running[index]
            if request.num_inflight_tokens and (request.length_capped or micro):
                index += 1  # its token is in flight; it finishes / continues when read back
                continue
            num_new = min(request.num_pending_tokens, budget)
            if request.spec_token_ids:
                num_new += self._fit_drafts(request, budget - num_new)
            if not self._reserve_or_preempt(request, request.num_computed_tokens + num_new, out):
                break  # the request itself was preempted; everything after it is gone too
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _fit_drafts(self, request: Request, budget: int) -> int:
        """Keep as many of a decode's drafts as the budget and free blocks allow (drafts never
        preempt anything); returns how many."""
        drafts = request.spec_token_ids
        del drafts[max(0, budget):]
        while drafts and not self.kv.can_fit(request.request_id,
                                             request.num_tokens + len(drafts)):
            drafts.pop()
        return len(drafts)

    def _reserve_or_preempt(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        rid = request.request_id
        while not self.kv.can_fit(rid, num_tokens):
            victim = self.prefilled.pop() if self.prefilled else self.running.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)
            if victim is request:
                return False
        self.kv.grow(rid, num_tokens)
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_draft_computed_tokens = 0
        request.spec_token_ids.clear()
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, micro: bool,
                          limit: int) -> None:
        if self.prefilled and not self.running:
            self._unblock_prefilled(out)
        budget = self._admit_from(self.prefilled, out, budget, micro, limit)
        if not self.prefilled:  # FCFS: nothing is recomputed while transferred requests wait
            self._admit_from(self.waiting, out, budget, micro, limit)

    def _unblock_prefilled(self, out: SchedulerOutput) -> None:
        """Nothing runs, so no block will be freed: preempt prefilled requests from the back
        until the first one can take its next block (or is itself preempted, to recompute)."""
        head = self.prefilled[0]
        while self.prefilled and not self.kv.can_fit(head.request_id, head.num_tokens):
            victim = self.prefilled.pop()
            self._preempt(victim)
            out.preempted_ids.append(victim.request_id)

    def _admit_from(self, queue: deque[Request], out: SchedulerOutput, budget: int,
                    micro: bool = False, limit: int | None = None) -> int:
        """Move requests from the front of `queue` into the running batch while budget, batch
        slots and blocks last; returns the budget left. With micro-batches, a request whose
        token is in flight (preempted meanwhile) waits at the front until it is read back."""
        while queue and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = queue[0]
            if micro and (request.num_inflight_tokens or len(out.chunks) >= limit):
                break
            matched = self._match_prefix(request)
            num_new = min(request.num_pending_tokens, budget)
            end = request.num_computed_tokens + num_new
            if ((num_new < request.num_pending_tokens and not self.config.enable_chunked_prefill)
                    or not self.kv.can_fit(request.request_id, end)):
                if matched:  # it waits: hand the cached blocks back (they stay cached)
                    self.kv.free(request.request_id)
                    request.num_computed_tokens = 0
                break
            self.kv.grow(request.request_id, end)
            queue.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time_s is None:
                request.first_scheduled_time_s = time.monotonic()
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
        return budget

    def _match_prefix(self, request: Request) -> bool:
        """A request computed from scratch starts after its longest cached prefix."""
        if request.num_computed_tokens or self.kv.prefix_cache is None:
            return False
        cached = self.kv.match_prefix(request.request_id, request.all_token_ids,
                                      request.cache_salt)
        request.num_computed_tokens = cached
        if request.first_scheduled_time_s is None:  # reported once, as its first admission saw it
            request.num_cached_tokens = min(cached, request.num_prompt_tokens)
        return cached > 0

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        drafts = tuple(request.spec_token_ids)
        request.spec_token_ids = []  # the chunk owns them now
        return ScheduledChunk(request, start, num_new, self.kv.block_table(request.request_id),
                              samples=start + num_new - len(drafts) == request.num_tokens,
                              spec_token_ids=drafts)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request's progress once the runner has computed its KV."""
        for chunk in out.chunks:
            request = chunk.request
            # drafts' KV counts once verified (the core adds the accepted ones on read-back)
            request.num_computed_tokens = chunk.start + chunk.num_tokens - chunk.num_spec
            if self.kv.prefix_cache is not None:  # name the full blocks it completed
                known = min(request.num_computed_tokens, request.num_known_tokens)
                self.kv.commit(request.request_id, known, request.new_token_ids)
