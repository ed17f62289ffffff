"""Speculative decoding on the engine core's side: drafting before a step, and turning a
verification step's rows back into per-request tokens.

Before each step the core asks `propose` to draft for the running requests that decode next
(their last token known on the host, nothing in flight), through the proposer (proposer.py:
n-gram, or a draft model, whose drafts are placeholders until `fill` runs it after scheduling).
The scheduler schedules each request's last token plus its drafts as one chunk
(engine/scheduler.py), the plan gives the chunk one sampling row per position (engine/plan.py),
and the runner verifies them in the same forward pass (engine/spec/rejection.py), returning for
each request its kept drafts and one more token, in its k + 1 rows padded with -1. The core
appends those tokens one at a time (stop checks apply to each), counts the kept drafts' KV as
computed, and returns the blocks past the sequence (rejected drafts' slots) to the pool.

Verification steps run synchronously, with asynchronous scheduling on too: a step in flight is
read back before a drafting step is planned (drafts are made from every token on the host: the
n-gram lookup searches the history, the draft model catches up on it), and a verification step
is read back before the next step is planned (engine/core.py `EngineCore._can_overlap`), because
how many drafts it keeps, 0 to k, decides the next step's positions, slots and the blocks
trimmed. Plain decode steps in between (drafting paused) still overlap.

On CUDA a verification step replays the decode CUDA graphs when the plan builder gives it a
bucket (engine/plan.py `PlanBuilder._bucket`): each sequence's last token and k drafts become
k + 1 decode rows sharing its block table at consecutive positions, each attending to the context
up to itself (engine/cuda_graphs.py `_rows`); the executor captures, at start, buckets of up to
`graph_rows(config)` rows, which counts max_batch_size * (k + 1) verification rows
(engine/executor/local.py). Only the forward is replayed: rejection sampling
(engine/spec/rejection.py) runs eagerly on the logits of every row. A step past the largest
captured bucket, with a block table wider than the graphs' or a prompt chunk past
`graph_prefill_max_context`, or without the Triton kernels runs eagerly (as every step on the
CPU does), where a sequence's k + 1 tokens take the prefill attention path. A draft model's
runner replays its own decode graphs for its single-token draft steps (and for a catch-up round
of single tokens); a catch-up round with more than one token for some sequence runs eagerly
(engine/spec/draft_model.py).

Speculation needs a single pipeline stage. Drafting pauses while more than `max_batch_size`
requests run, and wherever it measured slower than plain decoding at that batch size
(engine/spec/payoff.py): verification costs k + 1 tokens of compute per request, which is free
only while decoding is bandwidth-bound. While it pauses, host-only proposers keep drafting
without verifying (engine/spec/shadow.py), so that `Payoff` probes drafting only when those
drafts would now be kept more often.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import SpeculativeConfig
from engine.request import Request
from engine.scheduler import SchedulerOutput
from engine.spec.ngram import NgramConfig, NgramProposer
from engine.spec.payoff import Payoff
from engine.spec.proposer import PENDING, Proposer, has_pending
from engine.spec.shadow import ShadowDrafts


@dataclass(slots=True)
class SpecStats:
    """Since start: verification rows, drafted and accepted tokens (metrics)."""

    num_verified_requests: int = 0  # request-steps that verified at least one draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_core_stats(self) -> dict[str, int]:
        return {"spec_drafts": self.num_verified_requests,
                "spec_draft_tokens": self.num_draft_tokens,
                "spec_accepted_tokens": self.num_accepted_tokens}

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class SpecDecoding:
    """The proposer and the bookkeeping of one engine core's speculative decoding."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer | None = None) -> None:
        """`proposer`: None -> n-gram (the one a "draft_model" config needs is built with the
        executor's draft runner: engine/core.py)."""
        self.config = config
        self.proposer: Proposer = proposer or NgramProposer(NgramConfig(
            num_speculative_tokens=config.num_speculative_tokens, max_ngram=config.max_ngram,
            min_ngram=config.min_ngram))
        self.stats = SpecStats()
        self.payoff = Payoff()
        self.shadow = ShadowDrafts(self._room) if config.adaptive else None

    def wants_drafts(self, running: Sequence[Request]) -> bool:
        """Whether this step drafts: a batch within `max_batch_size` where drafting measured
        faster (or is being probed). Called once per step."""
        if not 0 < len(running) <= self.config.max_batch_size:
            return False
        if not self.config.adaptive:
            return True
        return self.payoff.wants_drafts(len(running), from_shadow=self._shadowed)

    @property
    def _shadowed(self) -> bool:
        """Whether plain steps draft in the shadow (a host-only proposer, adaptive)."""
        return self.shadow is not None and hasattr(self.proposer, "shadow_propose")

    def before_schedule(self, running: Sequence[Request], drafting: bool) -> None:
        """Drafts for the step about to be scheduled, or (a plain step) shadow drafts."""
        if drafting:
            self.propose(running)
        elif self._shadowed and 0 < len(running) <= self.config.max_batch_size:
            drafted, accepted = self.shadow.step(running, self.proposer.shadow_propose,
                                                 eager=self.payoff.needs_shadow(len(running)))
            self.payoff.record_acceptance(len(running), drafted, accepted, shadow=True)

    def propose(self, running: Sequence[Request]) -> None:
        """Set `spec_token_ids` of each running request that decodes next, within its
        max_tokens and context (every kept draft and the extra token must fit)."""
        for request in running:
            if (request.num_inflight_tokens or request.num_pending_tokens != 1
                    or not request.params.speculative):
                continue
            room = self._room(request)
            if room > 0:
                request.spec_token_ids = self.proposer.propose(request.all_token_ids, room)

    @staticmethod
    def _room(request: Request) -> int:
        """Drafts that fit the request's max_tokens and context after its next token."""
        return min(request.params.max_tokens - len(request.output_token_ids),
                   request.max_model_len - request.num_tokens) - 1

    def fill(self, scheduled: SchedulerOutput, running: Sequence[Request]) -> float:
        """After scheduling: the proposer turns scheduled placeholder drafts into tokens, and
        unscheduled requests drop theirs (a placeholder never outlives its step). Returns
        the seconds it took (a verification step's cost includes its drafting)."""
        for request in running:
            if request.spec_token_ids and request.spec_token_ids[0] == PENDING:
                request.spec_token_ids = []
        pending = [c for c in scheduled.chunks if has_pending(c)]
        if not pending:
            return 0.0
        started_s = time.monotonic()
        self.proposer.fill(pending)
        # a chunk the proposer left without drafts is a decode now: decodes first (SchedulerOutput)
        scheduled.chunks.sort(key=lambda c: not c.is_decode)
        return time.monotonic() - started_s

    def split(self, token_ids: list[int], logprobs: list[float] | None,
              spec_lens: Sequence[int]) -> list[tuple[list[int], list[float] | None]]:
        """Per request of a verification step: its emitted tokens (and logprobs). Request i
        owns spec_lens[i] + 1 rows: its tokens, then -1."""
        out = []
        start = 0
        drafted = accepted = 0
        for k in spec_lens:
            row = token_ids[start:start + k + 1]
            n = next((j for j, t in enumerate(row) if t < 0), k + 1)
            lps = logprobs[start:start + n] if logprobs is not None else None
            out.append((row[:n], lps))
            start += k + 1
            if k:
                self.stats.num_verified_requests += 1
                drafted += k
                accepted += n - 1
        self.stats.num_draft_tokens += drafted
        self.stats.num_accepted_tokens += accepted
        self.payoff.record_acceptance(len(spec_lens), drafted, accepted, shadow=False)
        return out


def build_spec_decoding(config: SpeculativeConfig, executor, kv_manager,
                        max_blocks_per_seq: int) -> SpecDecoding:
    """The engine core's speculative decoding for `config`: n-gram, or the draft model the
    executor loaded (one-rank executors only: engine/executor/local.py)."""
    if config.method != "draft_model":
        return SpecDecoding(config)
    from engine.spec.draft_model import DraftModelProposer

    drafter = getattr(executor, "drafter", None)
    if drafter is None:
        raise ValueError("speculative method 'draft_model' needs a one-rank instance "
                         "(tensor_parallel_size and pipeline_parallel_size 1)")
    return SpecDecoding(config, DraftModelProposer(
        config.num_speculative_tokens, drafter.run, drafter.max_model_len, kv_manager,
        max_blocks_per_seq, max_catch_up_tokens=drafter.max_catch_up_tokens,
        graph_rows=drafter.graph_rows))
