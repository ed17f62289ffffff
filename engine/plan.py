"""The step plan: the only thing the engine core sends to the ranks that execute a step.

The core (CPU bookkeeping, one per instance) decides everything about a step; an executor (one
rank in process, or a group of rank processes) only runs it. What crosses between them is a
`StepPlan` of plain ints, strings and tuples — no live `Request` — so it pickles into a few
hundred bytes and every rank of an instance runs exactly the same plan. Back comes a
`StepResult` (sampled ids, logprobs).

Sequences of a plan are in scheduler order, decodes first. Per sequence: its request id, the
first position it computes and how many tokens; token ids travel flat (-1 for the one token in
flight, whose id only the device holds: `inflight_rows` names the row of the previous step's
sampled ids to read it from). Block tables travel as deltas: an executor keeps every running
request's table (`BlockTables`) and a plan names only the blocks appended since the last plan,
or a whole table when it was replaced (freed and allocated again after a preemption), and the
requests whose blocks were freed (their tables are dropped first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

from engine.sampling_params import GREEDY_TEMPERATURE
from engine.scheduler import SchedulerOutput

# Row counts of the captured decode graphs (engine/cuda_graphs.py); a graph step runs the
# smallest bucket that holds its rows (one per token).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def graph_rows(config) -> int:
    """Rows the decode graphs an engine captures at start must hold (`EngineConfig`): a decode
    step's sequences, a speculative step's drafting requests times their k + 1 verified tokens,
    and, with graph prefill on, a step of short prompt chunks (up to the cap or the step's token
    budget, whichever is smaller)."""
    rows = config.scheduler.max_num_seqs
    spec = config.speculative
    if spec.method is not None:
        rows = max(rows, min(rows, spec.max_batch_size) * (spec.num_speculative_tokens + 1))
    if config.graph_prefill_max_context:
        rows = max(rows, min(config.graph_prefill_max_context,
                             config.scheduler.max_num_batched_tokens, BATCH_BUCKETS[-1]))
    return rows


def bucket_for(num_rows: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int | None:
    """The smallest bucket that holds `num_rows` rows; None past the largest."""
    return next((b for b in buckets if b >= num_rows), None)


@dataclass(frozen=True, slots=True)
class BlockTableUpdate:
    """Blocks `block_ids` go at `first_index` of the request's table (0 = a new table)."""

    request_id: str
    first_index: int
    block_ids: tuple[int, ...]


class SamplingRow(NamedTuple):
    """How to sample one sequence's next token: the sampler's options, the request's seed and
    output index (the noise is a function of both), and, when any row of the step has a
    repetition penalty, every token id the request has seen. A named tuple: a decode step
    builds one per sequence, and a tuple is the cheapest typed record to build and pickle."""

    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    logprobs: bool
    seed: int
    step: int
    token_history: tuple[int, ...] | None = None

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE  # as SamplingParams.is_greedy

    @property
    def is_plain_greedy(self) -> bool:
        return self.is_greedy and self.repetition_penalty == 1.0 and not self.logprobs


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One engine step, as every rank of the instance runs it."""

    step_id: int
    request_ids: tuple[str, ...]
    num_decodes: int  # the first num_decodes sequences compute one token each
    starts: tuple[int, ...]  # first position each sequence computes
    query_lens: tuple[int, ...]  # tokens each sequence computes
    token_ids: tuple[int, ...]  # all sequences' tokens, flat; -1: the token in flight
    inflight_rows: tuple[int, ...]  # per sequence: sampled-ids row of its token in flight, or -1
    samples: tuple[bool, ...]  # per sequence: a token is sampled after it
    sampling: tuple[SamplingRow, ...]  # one per sampling sequence, in order
    block_updates: tuple[BlockTableUpdate, ...] = ()
    freed_request_ids: tuple[str, ...] = ()  # tables to drop before applying block_updates
    graph_bucket: int | None = None  # rows of the captured graph that may run the step
    # speculative decoding, per sampling sequence: drafts it verifies (its last tokens), each
    # followed by its own sampling row; () when no sequence of the step has drafts
    spec_lens: tuple[int, ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @property
    def num_sampled(self) -> int:
        return len(self.sampling)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def all_plain_greedy(self) -> bool:
        return all(row.is_plain_greedy for row in self.sampling)

    @property
    def is_empty(self) -> bool:
        return not self.request_ids

    def sample_rows(self) -> list[int]:
        """The token index (= graph row) each sampling row reads its logits from, in sampling
        order: a sequence's last token, or with k drafts its last k + 1 tokens. A prompt chunk
        that ends mid-prompt samples nothing, and neither do the other tokens of a chunk."""
        ends = list(accumulate(self.query_lens))
        sampling = [i for i, samples in enumerate(self.samples) if samples]
        if not self.spec_lens:
            return [ends[i] - 1 for i in sampling]
        return [r for i, k in zip(sampling, self.spec_lens)
                for r in range(ends[i] - 1 - k, ends[i])]


@dataclass(frozen=True, slots=True)
class StepResult:
    """What a step sampled: row i is the plan's i-th sampling sequence."""

    step_id: int
    token_ids: list[int]
    logprobs: list[float] | None = None


class BlockTables:
    """An executor's copy of every scheduled request's block table, kept by plan deltas."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def apply(self, plan: StepPlan) -> None:
        for request_id in plan.freed_request_ids:
            self._tables.pop(request_id, None)
        for update in plan.block_updates:
            table = self._tables.setdefault(update.request_id, [])
            del table[update.first_index:]
            table.extend(update.block_ids)

    def of(self, plan: StepPlan) -> list[list[int]]:
        """The tables of the plan's sequences, in order."""
        return [self._tables[request_id] for request_id in plan.request_ids]

    def __len__(self) -> int:
        return len(self._tables)


class PlanBuilder:
    """Turns the scheduler's output into a `StepPlan` (core side): remembers which blocks each
    request's table had when it was last sent, so a plan carries only what changed.

    `graph_prefill_max_context` (0: off) lets steps with prompt chunks ending at or before it run
    in the decode graphs, if their rows fit `graph_prefill_max_rows` (the largest bucket the
    executor captured at start: no request pays for a capture)."""

    def __init__(self, max_blocks_per_seq: int | None = None,
                 buckets: Sequence[int] = BATCH_BUCKETS, graph_prefill_max_context: int = 0,
                 graph_prefill_max_rows: int | None = None,
                 graph_chunk_max_tokens: int = 0) -> None:
        self.max_blocks_per_seq = max_blocks_per_seq
        self.buckets = tuple(sorted(buckets))
        self.graph_prefill_max_context = graph_prefill_max_context
        # chunks of at most this many tokens run as rows at any context, as a verification's
        # k + 1 rows do (the draft model's catch-up: accepted drafts plus the bonus token)
        self.graph_chunk_max_tokens = graph_chunk_max_tokens
        self.graph_prefill_max_rows = min(graph_prefill_max_rows or self.buckets[-1],
                                          self.buckets[-1])
        self._sent: dict[str, tuple[list[int], int]] = {}  # table object, its length when sent
        self._next_step_id = 0

    @classmethod
    def for_engine(cls, config, max_blocks_per_seq: int) -> PlanBuilder:
        """The engine core's builder for an `EngineConfig`: graph prefill as configured (off
        without CUDA graphs), up to the buckets its executor captures (`graph_rows`)."""
        cap = config.graph_prefill_max_context if config.use_cuda_graphs else 0
        return cls(max_blocks_per_seq, graph_prefill_max_context=cap,
                   graph_prefill_max_rows=bucket_for(graph_rows(config)))

    def build(self, out: SchedulerOutput, freed_request_ids: Sequence[str] = ()) -> StepPlan:
        """Plan one step. `freed_request_ids`: requests whose blocks went back to the pool
        since the last plan (their tables are dropped by the executor, and resent in full)."""
        for request_id in freed_request_ids:
            self._sent.pop(request_id, None)
        chunks = out.chunks
        request_ids, starts, query_lens, samples, token_ids = [], [], [], [], []
        inflight_rows, updates, sampling, spec_lens = [], [], [], []
        # with any repetition penalty in the batch, every row carries its history (seen mask)
        histories = any(c.samples and c.request.params.repetition_penalty != 1.0 for c in chunks)
        num_decodes = 0
        for c in chunks:  # one pass: a decode step of a large batch is host-bound here
            request, start, count = c.request, c.start, c.num_tokens
            if c.spec_token_ids:  # the last real token, then the drafts to verify
                last = request.token_at(start)
                token_ids += (last, *c.spec_token_ids)
            elif count == 1:
                last = request.token_at(start)
                token_ids.append(last)
                # the leading run only: the eager runner's decode group is the plan's first
                # num_decodes sequences, and a decode may follow a verification (a request
                # without drafts this step); a later one runs as a 1-token chunk
                num_decodes += start > 0 and num_decodes == len(request_ids)
            else:
                ids = request.new_token_ids(start, count)
                token_ids += ids
                last = ids[-1]
            inflight_rows.append(request.inflight_row if last < 0 else -1)
            request_ids.append(request.request_id)
            starts.append(start)
            query_lens.append(count)
            samples.append(c.samples)
            if (update := self._update(request.request_id, c.block_table)) is not None:
                updates.append(update)
            if c.samples:
                sampling += [_sampling_row(request, histories, c.spec_token_ids[:j])
                             for j in range(c.num_spec + 1)]
                spec_lens.append(c.num_spec)
        plan = StepPlan(
            step_id=self._next_step_id,
            request_ids=tuple(request_ids),
            num_decodes=num_decodes,
            starts=tuple(starts),
            query_lens=tuple(query_lens),
            token_ids=tuple(token_ids),
            inflight_rows=tuple(inflight_rows),
            samples=tuple(samples),
            sampling=tuple(sampling),
            block_updates=tuple(updates),
            freed_request_ids=tuple(freed_request_ids),
            graph_bucket=self._bucket(chunks, len(token_ids)),
            spec_lens=tuple(spec_lens) if any(spec_lens) else ())
        self._next_step_id += 1
        return plan

    def _update(self, request_id: str, table: list[int]) -> BlockTableUpdate | None:
        sent = self._sent.get(request_id)
        if sent is not None and sent[0] is table:  # the same table, perhaps grown
            if len(table) == sent[1]:
                return None
            first = sent[1]
        else:
            first = 0
        self._sent[request_id] = (table, len(table))
        return BlockTableUpdate(request_id, first, tuple(table[first:]))

    def _bucket(self, chunks, num_rows: int) -> int | None:
        """The decode-graph bucket of a step, or None to run it eagerly. In a graph every token
        is a decode row attending to the context up to itself (engine/cuda_graphs.py): a decode
        is one row, a verification (last token + k drafts) and a prompt chunk are rows of
        growing context, and only rows that sample are sampled.

        Prompt chunks qualify only up to `graph_prefill_max_context`, on their context end
        (start + length), not their length: the decode kernel serves each row on its own, so
        every row of a chunk re-reads the whole context before it, quadratic in the chunk's
        context end. For short contexts those reads are cheap (and hit L2), and one replay
        replaces an eager prefill's ~10 launches per layer; for long ones the prefill kernel,
        which reads each KV block once per query tile, wins."""
        if not chunks:
            return None
        limit = self.buckets[-1]
        prompt = [c for c in chunks if not c.spec_token_ids
                  and not (c.num_tokens == 1 and c.start > 0 and c.samples)]
        if prompt:
            ends = [c.start + c.num_tokens for c in prompt
                    if c.num_tokens > self.graph_chunk_max_tokens]
            if ends and max(ends) > self.graph_prefill_max_context:  # also: 0 = off
                return None
            limit = self.graph_prefill_max_rows
        if num_rows > limit:
            return None
        if self.max_blocks_per_seq is not None and max(
                len(c.block_table) for c in chunks) > self.max_blocks_per_seq:
            return None
        return bucket_for(num_rows, self.buckets)


def _sampling_row(request, with_history: bool, drafts: tuple[int, ...] = ()) -> SamplingRow:
    """The row that samples the request's next token, or (`drafts`) the token after those
    drafted tokens: its output index and seen tokens count them as if sampled."""
    p = request.params
    history = tuple(request.all_token_ids) + drafts if with_history else None
    return SamplingRow(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty,
                       p.logprobs, request.seed,
                       len(request.output_token_ids) + request.num_inflight_tokens + len(drafts),
                       history)
