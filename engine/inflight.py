"""Asynchronous scheduling: steps whose sampled ids are still on their way to the host.

A synchronous engine launches step N, waits for its sampled ids, turns them into outputs, plans
step N+1 and launches it: the GPU idles for all of that host work. With asynchronous scheduling
the engine plans and launches N+1 *before* it reads N back, so the host's work of one step runs
while the GPU computes the next. What makes that possible:

- the scheduler plans N+1 with N's tokens "in flight" (`Request.num_inflight_tokens`): they
  count as tokens of their sequences, their positions, slots and blocks are known;
- the runner feeds their ids to N+1 on the device (the plan's `inflight_rows`), from the buffer where N's sampling wrote
  them (`ModelRunner.sampled_ids`, row `Request.inflight_row`);
- each launched step copies its sampled ids into a pinned host buffer and records an event; the
  engine later waits for that event only, never for the whole stream (which already holds N+1).

A request that ends at step N (a stop token or string) may have had a token computed by N+1:
that token is dropped, and the request's blocks, which N+1 may still write, go back to the pool
only once N+1 is read back (`InFlightStep.deferred_frees`). Requests that would end by length
are not scheduled while their last token is in flight, so they waste nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.plan import StepResult
from engine.request import Request
from engine.sampler import SamplerOutput

if TYPE_CHECKING:
    from engine.executor.base import StepHandle


@dataclass(slots=True)
class InFlightStep:
    """A launched step, as the engine core tracks it until it is read back."""

    sampling_requests: list[Request]  # request i's token is row i of the step's result
    request_ids: frozenset[str]  # every request the step computes KV for
    handle: StepHandle
    launched_at_s: float
    hands_off: bool = False  # the step completes prompts whose KV a hand-off hook streams
    deferred_frees: list[str] = field(default_factory=list)  # freed once this step is read
    spec_lens: tuple[int, ...] = ()  # a speculative step: drafts each sampling request verifies
    decode_only: bool = False  # every sequence decodes (or verifies drafts): no prompt chunk
    started_s: float = 0.0  # when the host work of the engine step that launched it began

    def wait(self) -> StepResult:
        """Block until the sampled ids are on the host (the step's only host sync)."""
        return self.handle.wait()


class Readback:
    """Starts device-to-host copies of sampled ids into pinned buffers, used in turn with their
    events: two steps can be unread at once (the one being read and the one just launched),
    never three, so a buffer is reused only after the step that last used it was read."""

    def __init__(self, max_rows: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self._ids = torch.zeros(2, max_rows, dtype=torch.int64, pin_memory=pinned)
        self._logprobs = torch.zeros(2, max_rows, dtype=torch.float32, pin_memory=pinned)
        self._events = [torch.cuda.Event(), torch.cuda.Event()] if pinned else None
        self._turn = 0

    def start(self, sampled: SamplerOutput | None) -> tuple[torch.Tensor | None,
                                                            torch.Tensor | None,
                                                            torch.cuda.Event | None]:
        """Queue the copies behind the step on the current stream; returns (ids, logprobs,
        event). The event is recorded even when the step sampled nothing (a prefill chunk):
        blocks freed after its read-back must not be freed while it still runs."""
        self._turn ^= 1
        ids = logprobs = event = None
        if sampled is not None:
            ids, logprobs = self._copy(sampled)
        if self._events is not None:
            event = self._events[self._turn]
            event.record()
        return ids, logprobs, event

    def _copy(self, sampled: SamplerOutput) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = sampled.token_ids.shape[0]
        if n > self._ids.shape[1]:
            raise ValueError(f"a step sampled {n} tokens; the read-back buffers hold "
                             f"{self._ids.shape[1]}")
        ids = self._ids[self._turn]
        ids[:n].copy_(sampled.token_ids, non_blocking=True)
        logprobs = None
        if sampled.logprobs is not None:
            logprobs = self._logprobs[self._turn]
            logprobs[:n].copy_(sampled.logprobs, non_blocking=True)
        return ids, logprobs
