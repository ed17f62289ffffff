"""A request's state inside one engine, and the lifecycle it moves through.

Lifecycle (every transition happens in `Scheduler`, except FINISHED_* set by `finish()`):

    WAITING ──schedule──> RUNNING ──sampled stop / length──> FINISHED_STOPPED | FINISHED_LENGTH
       ^                    │
       └──── preempt ───────┘      (blocks freed, KV recomputed from scratch later)
    any non-finished state ──abort──> FINISHED_ABORTED

Progress is one number: `num_computed_tokens`, how many of the sequence's tokens have KV in the
cache. A step computes tokens [num_computed_tokens, num_computed_tokens + n); when that reaches
`num_tokens`, the step also samples the next token. Prefill, chunked prefill, decode and
recompute after preemption are all this same rule. A resumed request (a migrated one: its
client already has some outputs) starts with those in `output_token_ids` and nothing computed,
exactly like a preempted request: its first step computes prompt + outputs.

With asynchronous scheduling a sampled token can be *in flight*: the step that samples it is
launched but the host has not read it back yet. It already counts in `num_tokens` (the next step
computes its KV, taking its id from the device), but not in `output_token_ids`; at most one token
per request is in flight when the scheduler plans a step.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}
_FINISH_REASONS = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                   RequestStatus.FINISHED_ABORTED: "abort"}


@dataclass(eq=False)
class Request:
    """One generation: its tokens, sampling parameters and progress through the KV cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the user's seed, or a random one: sampling noise is a function of (seed, step)
    max_model_len: int  # generation stops with "length" when the sequence reaches this
    arrival_time_s: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    first_scheduled_time_s: float | None = None
    first_token_time_s: float | None = None
    num_inflight_tokens: int = 0  # sampled on the device, not yet read back (0 or 1 when planning)
    inflight_row: int = -1  # row of the last launched step's sampled ids holding that token
    cache_salt: str = ""  # prefix caching: only requests with the same salt share KV blocks
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first admitted
    spec_token_ids: list[int] = field(default_factory=list)  # drafts the next step verifies
    # draft-model speculative decoding: tokens whose KV the draft model computed (valid up to
    # num_computed_tokens; 0 again after preemption: engine/spec/draft_model.py)
    num_draft_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the sequence, the one in flight included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host holds: prompt and outputs read back so far."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_sampled_tokens(self) -> int:
        """Output tokens sampled so far, the one in flight included: the output index (and so
        the sampling noise) of the next token is this number."""
        return len(self.output_token_ids) + self.num_inflight_tokens

    @property
    def length_capped(self) -> bool:
        """The tokens sampled so far already end the request by length: sampling another one
        would be wasted (only possible while one is in flight; otherwise it has finished)."""
        return (self.num_sampled_tokens >= self.params.max_tokens
                or self.num_tokens >= self.max_model_len)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not yet computed (the whole prompt for a new request, 1 in decode)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_at(self, position: int) -> int:
        """The id at `position`; -1 for the token in flight (its id is on the device only)."""
        n = len(self.prompt_token_ids)
        if position < n:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - n] if position < self.num_known_tokens else -1

    def new_token_ids(self, start: int, count: int) -> list[int]:
        """Token ids for positions [start, start + count); -1 for the token in flight."""
        n = len(self.prompt_token_ids)
        if start + count <= n:
            return self.prompt_token_ids[start:start + count]
        ids = self.prompt_token_ids[start:] if start < n else []
        ids += self.output_token_ids[max(start - n, 0):start + count - n]  # no whole-list copy
        return ids + [-1] * (count - len(ids))
