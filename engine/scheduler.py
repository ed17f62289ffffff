"""Iteration-level continuous batching.

Each `schedule()` call plans one engine step under a token budget: running requests first
(decodes and the next chunks of long prompts), then waiting requests while budget, batch slots
and KV blocks last. When a running request needs a block and none is free, the most recently
admitted running request is preempted: its blocks are freed and it goes back to the front of the
waiting queue, to be recomputed later (recompute is just prefill over prompt + output so far).

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
    """Owns the waiting and running queues and the KV block assignment of one engine."""

    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.waiting: deque[Request] = deque()
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
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if free_blocks:
            self.kv.free(request.request_id)

    def detach(self, request: Request) -> list[int]:
        """Remove a request from the queues but KEEP its blocks (ownership passes to the caller,
        e.g. a KV transfer that frees them on acknowledgement). Returns its block table."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        return self.kv.block_table(request.request_id)

    def add_running(self, request: Request) -> None:
        """Admit a request whose KV is already in its blocks (e.g. received from a prefill
        instance) straight into the running batch."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- planning -----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted_ids:
            self._schedule_waiting(out, budget)
        out.chunks.sort(key=lambda c: not c.is_decode)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            if request.num_inflight_tokens and request.length_capped:
                index += 1  # its last token is in flight; it finishes when that is read back
                continue
            num_new = min(request.num_pending_tokens, budget)
            if not self._reserve_or_preempt(request, request.num_computed_tokens + num_new, out):
                break  # the request itself was preempted; everything after it is gone too
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new
            index += 1
        return budget

    def _reserve_or_preempt(self, request: Request, num_tokens: int, out: SchedulerOutput) -> bool:
        rid = request.request_id
        while not self.kv.can_fit(rid, num_tokens):
            victim = self.running.pop()
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
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = min(request.num_pending_tokens, budget)
            if num_new < request.num_pending_tokens and not self.config.enable_chunked_prefill:
                break
            end = request.num_computed_tokens + num_new
            if not self.kv.can_fit(request.request_id, end):
                break
            self.kv.grow(request.request_id, end)
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time_s is None:
                request.first_scheduled_time_s = time.monotonic()
            self.running.append(request)
            out.chunks.append(self._chunk(request, num_new))
            budget -= num_new

    def _chunk(self, request: Request, num_new: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(request, start, num_new, self.kv.block_table(request.request_id),
                              samples=start + num_new == request.num_tokens)

    def on_step_done(self, out: SchedulerOutput) -> None:
        """Advance each scheduled request's progress once the runner has computed its KV."""
        for chunk in out.chunks:
            chunk.request.num_computed_tokens = chunk.start + chunk.num_tokens
