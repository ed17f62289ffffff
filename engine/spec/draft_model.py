"""The draft-model proposer, engine-core side: a small model of the target's vocabulary drafts
k tokens per request, one batched forward per draft position.

`propose` only reserves: k placeholders per request (fewer near max_tokens, the target's context
or the draft's), so the scheduler fits them and allocates each request's k + 1 verification
slots. `fill`, after scheduling, builds a drafting round for every scheduled chunk with
placeholders and has the executor's `DraftRunner` (engine/spec/draft_runner.py) run it:

- one catch-up forward over what the draft has not seen of each sequence, ending at its last
  token (position n - 1): the whole prompt and outputs on first use — a request that arrived
  with its KV from a prefill instance, one recomputed after preemption, or one whose prefix the
  target found cached — else the accepted drafts and the bonus token of its last verification;
  its last row samples draft d_0;
- then k - 1 single-token forwards: d_{j-1} at position n + j - 1 samples d_j, read from the
  draft runner's sampled ids on the device (no host round trip in between).

The draft writes KV at positions up to n + k - 2, inside the slots the scheduler allocated
(up to n + k - 1), in the draft cache's copy of the request's own blocks. Each draft is sampled
with the request's own options, seed and output index — the same counter-based noise the
verifier's draw at that position uses (without repetition penalty, whose history would need
the drafts on the host) — so a draft close to the target drafts what the target will sample,
greedy or not; drafts are point masses and the output stays plain decoding's (proposer.py).

Catch-up is bounded: at most `max_catch_up_tokens` per round (the scheduler's
max_num_batched_tokens unless SpeculativeConfig.max_catch_up_tokens says otherwise), granted
smallest need first, so requests already caught up (1 or 2 tokens after a verification) keep
drafting while a long prompt waits its turn. A chunk whose catch-up does not fit whole drafts
nothing this step: it becomes a plain decode (its placeholders dropped, the blocks past its
last token returned) and the draft computes the part of its catch-up that fits, without
sampling; it drafts once its catch-up completes. `CatchUpStats` counts the tokens per round.

Progress: `Request.num_draft_computed_tokens`, the tokens whose draft KV was computed. A
verification keeps only the target's accepted prefix, so the valid part is
min(num_draft_computed_tokens, num_computed_tokens) (rejected drafts' slots are overwritten
later); preemption resets it to 0 with the target's progress (engine/scheduler.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from engine.kv_cache.block_table import KVCacheManager
from engine.plan import PlanBuilder, SamplingRow, StepPlan
from engine.request import Request
from engine.scheduler import ScheduledChunk, SchedulerOutput
from engine.spec.proposer import PENDING

RunDraft = Callable[[Sequence[StepPlan]], list[int]]  # DraftRunner.run: plans -> flat ids


@dataclass(slots=True)
class CatchUpStats:
    """The draft's catch-up forwards since start."""

    num_tokens: int = 0  # catch-up tokens computed
    last_step_tokens: int = 0  # in the latest drafting round
    max_step_tokens: int = 0  # in any one round (at most max_catch_up_tokens)
    num_deferred: int = 0  # request-steps that decoded plainly: catch-up not complete

    def record(self, num_tokens: int, num_deferred: int) -> None:
        self.num_tokens += num_tokens
        self.last_step_tokens = num_tokens
        self.max_step_tokens = max(self.max_step_tokens, num_tokens)
        self.num_deferred += num_deferred


class DraftModelProposer:
    """Drafting rounds for a `DraftRunner`; block tables reach it as plan deltas, like the
    target's runner (its own `PlanBuilder`: the two runners hold separate copies)."""

    def __init__(self, num_speculative_tokens: int, run: RunDraft, max_model_len: int,
                 kv_manager: KVCacheManager, max_blocks_per_seq: int,
                 max_catch_up_tokens: int | None = None, graph_rows: int = 0) -> None:
        """`max_catch_up_tokens`: catch-up tokens per round (None: unbounded). `graph_rows`: rows
        the draft runner captured decode graphs for (0: none); catch-ups of at most k + 1 tokens
        per sequence replay them as rows instead of running eagerly."""
        if max_catch_up_tokens is not None and max_catch_up_tokens < 2:
            raise ValueError(f"max_catch_up_tokens must be >= 2, got {max_catch_up_tokens}")
        self.k = num_speculative_tokens
        self.run = run
        self.max_model_len = max_model_len  # the draft's context (within the target's)
        self.kv = kv_manager
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_catch_up_tokens = max_catch_up_tokens
        self.stats = CatchUpStats()
        self._planner = PlanBuilder(max_blocks_per_seq, graph_prefill_max_rows=graph_rows or None,
                                    graph_chunk_max_tokens=num_speculative_tokens + 1
                                    if graph_rows else 0)
        self._known: set[str] = set()  # requests whose table the draft runner holds

    def propose(self, token_ids: Sequence[int], max_tokens: int | None = None) -> list[int]:
        """k placeholders, fewer where the draft's last input (position n + k - 2) would pass
        its context."""
        limit = min(self.k, self.max_model_len - len(token_ids) + 1)
        if max_tokens is not None:
            limit = min(limit, max_tokens)
        return [PENDING] * max(0, limit)

    def fill(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Draft the placeholders of scheduled decode chunks (each at its last real token,
        position `start`, with `num_spec` slots after it) whose catch-up fits this round's
        budget; the others decode plainly and catch up as far as the budget goes."""
        catch_up = [_catch_up_chunk(c) for c in chunks]
        grants = _grant(self.max_catch_up_tokens, [c.num_tokens for c in catch_up])
        rounds: list[tuple[ScheduledChunk | None, ScheduledChunk]] = []  # (drafting, catch-up)
        for chunk, full, granted in zip(chunks, catch_up, grants):
            if granted == full.num_tokens:
                rounds.append((chunk, full))
                continue
            self._decode_plainly(chunk)
            if granted:  # part of the catch-up, nothing sampled
                rounds.append((None, replace(full, num_tokens=granted, samples=False,
                                             block_table=chunk.block_table)))
        num_drafting = sum(chunk is not None for chunk, _ in rounds)
        self.stats.record(sum(grants), len(chunks) - num_drafting)
        if not rounds:
            return
        rounds.sort(key=lambda r: not r[1].is_decode)  # single-token catch-ups first (plans)
        plans, owners = self._plans([c for _, c in rounds],
                                    [d.num_spec if d is not None else 0 for d, _ in rounds])
        drafts: list[list[int]] = [[] for _ in rounds]
        for owner, token_id in zip(owners, self.run(plans)):
            drafts[owner].append(token_id)
        for (chunk, part), tokens in zip(rounds, drafts):
            if chunk is None:
                part.request.num_draft_computed_tokens = part.start + part.num_tokens
            else:
                chunk.spec_token_ids = tuple(tokens)
                chunk.request.num_draft_computed_tokens = chunk.start + chunk.num_spec

    def _decode_plainly(self, chunk: ScheduledChunk) -> None:
        """No drafts for this chunk this step: its last token alone, and the verification
        slots the scheduler allocated for the drafts back to the pool."""
        request_id = chunk.request.request_id
        chunk.spec_token_ids = ()
        chunk.num_tokens = 1
        self.kv.trim(request_id, chunk.start + 1)
        chunk.block_table = self.kv.block_table(request_id)

    def _plans(self, catch_up: list[ScheduledChunk], num_drafts: list[int]
               ) -> tuple[list[StepPlan], list[int]]:
        """The round's plans, and which chunk owns each sampled id (in plan order)."""
        gone = [rid for rid in self._known if not self.kv.block_table(rid)]
        self._known.difference_update(gone)
        self._known.update(c.request.request_id for c in catch_up)
        first = self._planner.build(SchedulerOutput(catch_up), gone)
        requests = [c.request for c in catch_up]
        sampled = [i for i, c in enumerate(catch_up) if c.samples]  # drafting sequences
        first = replace(first, sampling=_draft_rows(requests, sampled, 0))
        plans, owners = [first], list(sampled)
        ends = [c.start + c.num_tokens for c in catch_up]  # n: the first draft's position
        widest = max(len(c.block_table) for c in catch_up)
        previous = list(sampled)
        for j in range(1, max(num_drafts)):
            seqs = [i for i in previous if num_drafts[i] > j]
            row_of = {i: row for row, i in enumerate(previous)}
            plans.append(self._single_token_plan(first, requests, seqs, row_of, ends, j,
                                                 widest))
            owners += seqs
            previous = seqs
        return plans, owners

    def _single_token_plan(self, first: StepPlan, requests: list[Request], seqs: list[int],
                           row_of: dict[int, int], ends: list[int], j: int,
                           widest: int) -> StepPlan:
        """Draft step j: d_{j-1} (the previous plan's sampled id, row `row_of[i]`) at
        position n + j - 1 of each sequence i in `seqs`."""
        m = len(seqs)
        bucket = None
        if widest <= self.max_blocks_per_seq:
            bucket = next((b for b in self._planner.buckets if b >= m), None)
        return StepPlan(
            step_id=first.step_id, request_ids=tuple(first.request_ids[i] for i in seqs),
            num_decodes=m, starts=tuple(ends[i] + j - 1 for i in seqs), query_lens=(1,) * m,
            token_ids=(-1,) * m, inflight_rows=tuple(row_of[i] for i in seqs),
            samples=(True,) * m, sampling=_draft_rows(requests, seqs, j), graph_bucket=bucket)


def _catch_up_chunk(chunk: ScheduledChunk) -> ScheduledChunk:
    """What the draft has not seen of the chunk's sequence, through its last real token. Its
    KV is valid up to the target's: `start` (n - 1) counts the accepted drafts only."""
    request = chunk.request
    start = min(request.num_draft_computed_tokens, chunk.start)
    return ScheduledChunk(request, start, chunk.start + 1 - start, chunk.block_table,
                          samples=True)


def _grant(budget: int | None, needs: list[int]) -> list[int]:
    """Catch-up tokens granted to each need within `budget` (None: all), smallest need first
    (caught-up sequences keep drafting; a long prompt takes what is left)."""
    if budget is None:
        return list(needs)
    grants = [0] * len(needs)
    for i in sorted(range(len(needs)), key=needs.__getitem__):
        grants[i] = min(needs[i], budget)
        budget -= grants[i]
    return grants


def _draft_rows(requests: list[Request], seqs, j: int) -> tuple[SamplingRow, ...]:
    """Draft j of each sequence: the request's options, seed and output index (the verifier's
    noise at that position), no repetition penalty and no logprobs."""
    rows = []
    for i in seqs:
        request = requests[i]
        p = request.params
        rows.append(SamplingRow(p.temperature, p.top_k, p.top_p, p.min_p, 1.0, False,
                                request.seed, len(request.output_token_ids) + j))
    return tuple(rows)
