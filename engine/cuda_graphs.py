"""CUDA graphs for decode steps: one captured forward (model + LM head) per row bucket.
Speculative verification steps and short prompt chunks run in the same graphs: a sequence's q
tokens (a request's last token and its k drafts, or q tokens of a prompt) become q decode rows
of growing context (`_rows`), so a bucket counts rows, not requests. Every row gets logits;
the model runner samples only the rows the plan samples (`StepPlan.sample_rows`). A short
prompt's prefill is thus one replay instead of ~10 kernel launches per layer from Python; the
plan builder decides which prompt chunks qualify (engine/plan.py `PlanBuilder._bucket`).

A step of B rows runs the graph of the smallest bucket >= B (1, 2, 4, ... 256; eager above).
Graphs read static input buffers that each step overwrites: token ids, positions, cache slots,
context lengths and block tables padded to max_model_len / block_size columns. The padded rows
of a bucket write no KV (slot -1) and attend to one token, and their logits are dropped. Nothing
in the graph depends on host-side lengths (the decode kernel splits each context on the device),
so one capture serves every context length. A token in flight (see engine/inflight.py) has no id
on the host: its row names the row of the runner's `sampled_ids` that holds it, and the graph
reads it from there; the graph also writes its greedy picks there.

Host cost per step is what the GPU waits for between two replays, so it is kept small: the four
per-row inputs travel in one copy from a pinned staging buffer, block tables only when a
row changed, and the graph also computes the greedy argmax so that an all-greedy batch needs no
sampling kernels after the replay.

`LLMEngine` captures every bucket up to `graph_rows(config)` (engine/plan.py: its
`max_num_seqs`, verification rows, short prompts) when it starts (`capture_up_to`), so no
request pays for a capture; a bucket not captured yet is captured the first time a step needs
it. Each capture follows one eager warm-up run that compiles the Triton kernels; all graphs share
one memory pool.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.kernels import dispatch
from engine.models.context import ForwardContext
from engine.plan import BATCH_BUCKETS, StepPlan


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    meta: AttentionMetadata
    logits: torch.Tensor  # [bucket, vocab] float32, written by every replay
    greedy_ids: torch.Tensor  # [bucket] int64 view of sampled_ids: argmax of logits


class DecodeGraphRunner:
    """Captures and replays decode steps of one model against one KV cache tensor."""

    def __init__(self, model, kv_cache: torch.Tensor, backend, block_size: int,
                 max_model_len: int, sampled_ids: torch.Tensor,
                 buckets: Sequence[int] = BATCH_BUCKETS) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.buckets = tuple(sorted(buckets))
        self.max_blocks = -(-max_model_len // block_size)
        n, dev = self.buckets[-1], kv_cache.device
        if sampled_ids.shape[0] < n:
            raise ValueError(f"sampled_ids holds {sampled_ids.shape[0]} rows, the largest bucket {n}")
        self.sampled_ids = sampled_ids
        # rows: token ids, positions, cache slots, context lengths, sampled_ids row of a token
        # in flight or -1 (one host-to-device copy)
        self.token_inputs = torch.zeros(5, n, dtype=torch.int64, device=dev)
        self.context_lens = self.token_inputs[3]
        self._staging = torch.zeros(5, n, dtype=torch.int64, pin_memory=dev.type == "cuda")
        self._staging_np = self._staging.numpy()
        self._copied = torch.cuda.Event() if dev.type == "cuda" else None
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._host_tables: list[list[int] | None] = [None] * n  # what block_tables rows hold
        self.graphs: dict[int, _Captured] = {}
        self._pool = None
        self.num_replays = 0  # steps run by a graph since start (tests, benchmarks)

    def bucket_for(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def can_run(self, plan: StepPlan) -> bool:
        """Steps the core gave a bucket (engine/plan.py `PlanBuilder._bucket`: decodes,
        verifications, short prompt chunks; all within max_blocks_per_seq), while the Triton
        kernels are enabled."""
        return (plan.graph_bucket is not None and plan.graph_bucket in self.buckets
                and dispatch.triton_enabled())

    @torch.inference_mode()
    def run(self, plan: StepPlan, tables: Sequence[list[int]]
            ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Load the step's inputs, replay its bucket's graph; returns (logits [B, V], greedy
        ids [B], metadata) of every row, views of static buffers valid until the next replay."""
        bucket = plan.graph_bucket
        self.load_inputs(plan, tables, bucket)
        captured = self.graphs.get(bucket) or self._capture(bucket)
        captured.graph.replay()
        self.num_replays += 1
        n = plan.num_tokens
        return captured.logits[:n], captured.greedy_ids[:n], captured.meta

    @torch.inference_mode()
    def capture(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Capture ahead of time (largest first, so smaller graphs reuse its pool memory).
        Inputs are the padding rows: no KV is written."""
        for bucket in sorted(batch_sizes or self.buckets, reverse=True):
            if bucket not in self.graphs:
                self.load_inputs(None, [], bucket)
                self._capture(bucket)

    def capture_up_to(self, max_batch_size: int) -> None:
        """Capture every bucket a batch of up to `max_batch_size` sequences can use."""
        top = self.bucket_for(max_batch_size) or self.buckets[-1]
        self.capture([b for b in self.buckets if b <= top])

    def input_views(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) of the last loaded step."""
        return self.token_inputs[0, :batch_size], self.token_inputs[1, :batch_size]

    def load_inputs(self, plan: StepPlan | None, tables: Sequence[list[int]], bucket: int) -> None:
        """Copy a decode step's inputs into the static buffers; rows past its sequences are
        padding (`plan` None: all padding). The whole staging buffer goes over in one copy (a
        few KiB); a graph reads only its bucket's columns."""
        bs = self.block_size
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy has left the staging buffer
        st = self._staging_np
        inflight_rows, positions = (plan.inflight_rows, plan.starts) if plan else ((), ())
        if plan is not None and plan.num_tokens != plan.num_seqs:  # one row per token (_rows)
            tables, positions, inflight_rows = _rows(plan, tables)
        n = len(tables)
        if n:
            st[0, :n] = plan.token_ids
            st[1, :n] = positions
            st[2, :n] = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions)]
            st[3, :n] = st[1, :n] + 1
            st[4, :n] = inflight_rows
        st[:, n:bucket] = [[0], [0], [-1], [1], [-1]]
        self.token_inputs.copy_(self._staging, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        self._load_block_tables(tables)

    # ---- internals ------------------------------------------------------------------------
    def _load_block_tables(self, tables: Sequence[list[int]]) -> None:
        """Upload only the rows whose table changed since the last step: a running batch gains
        a block per sequence every block_size steps, and converting every table each step
        costs more host time than a small model's whole step. A sequence's table goes over
        once, however many rows share it (a prompt chunk's q rows), and is copied to its rows
        on the device. Stale entries past a row's length are never read (the kernels stop at
        the context length)."""
        changed = [i for i, t in enumerate(tables) if self._host_tables[i] != t]
        if not changed:
            return
        width = max(len(tables[i]) for i in changed)
        positions: dict[int, int] = {}  # id of a changed table -> its row in `unique`
        unique: list[list[int]] = []  # a prompt's or verification's rows share one table
        sources = []
        for i in changed:
            table = tables[i]
            k = positions.get(id(table))
            if k is None:
                k = positions[id(table)] = len(unique)
                unique.append(list(table))
            self._host_tables[i] = unique[k]
            sources.append(k)
        m = len(changed)
        index = torch.tensor([changed, sources], dtype=torch.int32)
        rows = torch.tensor([t + [0] * (width - len(t)) for t in unique], dtype=torch.int32)
        packed = torch.cat([index.view(-1), rows.view(-1)]).to(self.block_tables.device,
                                                               non_blocking=True)  # one copy
        index, rows = packed[: 2 * m].long().view(2, m), packed[2 * m:].view(-1, width)
        self.block_tables[:, :width].index_copy_(0, index[0], rows.index_select(0, index[1]))

    def forward_fn(self, bucket: int) -> tuple[Callable[[], tuple[torch.Tensor, torch.Tensor]],
                                                AttentionMetadata]:
        """The step a bucket's graph captures, over the static buffers: (logits [bucket, V],
        greedy ids [bucket]) of the rows `load_inputs` loaded. Eagerly callable too (tests run
        it on the CPU against an eager prefill)."""
        decode = SeqGroup(block_tables=self.block_tables[:bucket],
                          context_lens=self.context_lens[:bucket],
                          query_start=self.query_start[: bucket + 1], max_query_len=1,
                          max_context_len=self.max_blocks * self.block_size)
        meta = AttentionMetadata(self.token_inputs[2, :bucket], bucket, decode, None)
        ctx = ForwardContext(self.kv_cache, meta, self.backend, None)
        ids, positions = self.input_views(bucket)
        fed_rows = self.token_inputs[4, :bucket]
        greedy_ids = self.sampled_ids[:bucket]

        def step() -> tuple[torch.Tensor, torch.Tensor]:
            fed = self.sampled_ids.gather(0, fed_rows.clamp(min=0))
            hidden = self.model(torch.where(fed_rows >= 0, fed, ids), positions, ctx)
            logits = self.model.compute_logits(hidden).float()
            torch.argmax(logits, dim=-1, out=greedy_ids)  # the sampler's greedy pick, bit for bit
            return logits, greedy_ids
        return step, meta

    def _capture(self, bucket: int) -> _Captured:
        step, meta = self.forward_fn(bucket)
        saved = self.sampled_ids.clone()  # the warm-up overwrites ids a step in flight may need
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture: kernel compilation, library handles
        torch.cuda.current_stream().wait_stream(side)
        self.sampled_ids.copy_(saved)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, greedy_ids = step()
        self._pool = graph.pool()
        self.graphs[bucket] = _Captured(graph, meta, logits, greedy_ids)
        return self.graphs[bucket]


def _rows(plan: StepPlan, tables: Sequence[list[int]]
          ) -> tuple[list[list[int]], list[int], list[int]]:
    """A step with multi-token sequences as decode rows: a sequence's q tokens (a verification's
    last token and q - 1 drafts, or a prompt chunk, whose ids the plan carries) become q rows
    sharing its block table, at positions start .. start + q - 1, each attending to the context
    up to itself: the KV of every row is written before any row's attention reads the cache,
    so row j sees the tokens before it, as a causal prefill chunk would. A token in flight is
    always a sequence's last (engine/plan.py). (block table, position, sampled-ids row of a
    token in flight) per row."""
    row_tables, positions, inflight = [], [], []
    for table, start, q, fed in zip(tables, plan.starts, plan.query_lens, plan.inflight_rows):
        row_tables += [table] * q
        positions += range(start, start + q)
        inflight += [-1] * (q - 1) + [fed]
    return row_tables, positions, inflight
