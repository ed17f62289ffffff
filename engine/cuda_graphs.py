"""CUDA graphs for decode-only steps: one captured forward (model + LM head) per batch bucket.

A decode step of B sequences runs the graph of the smallest bucket >= B (1, 2, 4, ... 256;
eager above). Graphs read static input buffers that each step overwrites: token ids, positions,
cache slots, context lengths and block tables padded to max_model_len / block_size columns. The
padded rows of a bucket write no KV (slot -1) and attend to one token, and their logits are
dropped. Nothing in the graph depends on host-side lengths (the decode kernel splits each
context on the device), so one capture serves every context length.

A bucket is captured the first time a step needs it (`capture` can do it ahead of time), after
one eager warm-up run that compiles the Triton kernels; all graphs share one memory pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.kernels import dispatch
from engine.models.context import ForwardContext
from engine.scheduler import ScheduledChunk

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    meta: AttentionMetadata
    logits: torch.Tensor  # [bucket, vocab] float32, written by every replay


class DecodeGraphRunner:
    """Captures and replays decode steps of one model against one KV cache tensor."""

    def __init__(self, model, kv_cache: torch.Tensor, backend, block_size: int,
                 max_model_len: int, buckets: Sequence[int] = BATCH_BUCKETS) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.buckets = tuple(sorted(buckets))
        self.max_blocks = -(-max_model_len // block_size)
        n, dev = self.buckets[-1], kv_cache.device
        self.token_inputs = torch.zeros(3, n, dtype=torch.int64, device=dev)  # ids, positions, slots
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self._host_tables: list[list[int] | None] = [None] * n  # what block_tables rows hold
        self.graphs: dict[int, _Captured] = {}
        self._pool = None

    def bucket_for(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def can_run(self, chunks: Sequence[ScheduledChunk]) -> bool:
        """Decode-only steps that fit a bucket, while the Triton kernels are enabled."""
        return (bool(chunks) and self.bucket_for(len(chunks)) is not None
                and dispatch.triton_enabled()
                and all(c.is_decode and c.samples and len(c.block_table) <= self.max_blocks
                        for c in chunks))

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Load the step's inputs, replay its bucket's graph; returns (logits [B, V], metadata)."""
        bucket = self.bucket_for(len(chunks))
        self.load_inputs(chunks, bucket)
        captured = self.graphs.get(bucket) or self._capture(bucket)
        captured.graph.replay()
        return captured.logits[: len(chunks)], captured.meta

    @torch.inference_mode()
    def capture(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Capture ahead of time (largest first, so smaller graphs reuse its pool memory).
        Inputs are the padding rows: no KV is written."""
        for bucket in sorted(batch_sizes or self.buckets, reverse=True):
            if bucket not in self.graphs:
                self.load_inputs([], bucket)
                self._capture(bucket)

    def input_views(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, positions) of the last loaded step."""
        return self.token_inputs[0, :batch_size], self.token_inputs[1, :batch_size]

    def load_inputs(self, chunks: Sequence[ScheduledChunk], bucket: int) -> None:
        """Copy a step's inputs into the static buffers; rows past len(chunks) are padding."""
        bs = self.block_size
        ids, positions, slots, ctx_lens = [], [], [], []
        for c in chunks:
            pos = c.start
            ids.append(c.request.token_at(pos))
            positions.append(pos)
            slots.append(c.block_table[pos // bs] * bs + pos % bs)
            ctx_lens.append(pos + 1)
        pad = bucket - len(chunks)
        host = torch.tensor([ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad],
                            dtype=torch.int64)
        self.token_inputs[:, :bucket].copy_(host, non_blocking=True)
        self.context_lens[:bucket].copy_(torch.tensor(ctx_lens + [1] * pad, dtype=torch.int32),
                                         non_blocking=True)
        self._load_block_tables(chunks)

    # ---- internals ------------------------------------------------------------------------
    def _load_block_tables(self, chunks: Sequence[ScheduledChunk]) -> None:
        """Upload only the rows whose table changed since the last step: a running batch gains
        a block per sequence every block_size steps, and converting every table each step
        costs more host time than a small model's whole step. Stale entries past a row's
        length are never read (the kernels stop at the context length)."""
        changed = [i for i, c in enumerate(chunks) if self._host_tables[i] != c.block_table]
        if not changed:
            return
        width = max(len(chunks[i].block_table) for i in changed)
        rows = []
        for i in changed:
            table = chunks[i].block_table
            self._host_tables[i] = list(table)
            rows.append(table + [0] * (width - len(table)))
        dev = self.block_tables.device
        index = torch.tensor(changed, dtype=torch.int64).to(dev, non_blocking=True)
        self.block_tables[index, :width] = torch.tensor(rows, dtype=torch.int32).to(
            dev, non_blocking=True)

    def _capture(self, bucket: int) -> _Captured:
        decode = SeqGroup(block_tables=self.block_tables[:bucket],
                          context_lens=self.context_lens[:bucket],
                          query_start=self.query_start[: bucket + 1], max_query_len=1,
                          max_context_len=self.max_blocks * self.block_size)
        meta = AttentionMetadata(self.token_inputs[2, :bucket], bucket, decode, None)
        ctx = ForwardContext(self.kv_cache, meta, self.backend, None)
        ids, positions = self.input_views(bucket)

        def step() -> torch.Tensor:
            hidden = self.model(ids, positions, ctx)
            return self.model.compute_logits(hidden).float()

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up outside the capture: kernel compilation, library handles
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = step()
        self._pool = graph.pool()
        self.graphs[bucket] = _Captured(graph, meta, logits)
        return self.graphs[bucket]
