"""Turns a step's plan into tensors, runs the model and samples.

No policy lives here: the scheduler decided what runs; the runner only executes it. All
per-request work is building small index lists on the host; the model step itself is a fixed
sequence of batched kernels over the packed tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.cuda_graphs import BATCH_BUCKETS, DecodeGraphRunner
from engine.models.context import ForwardContext
from engine.sampler import Sampler, SamplerOutput, SamplingTensors
from engine.scheduler import ScheduledChunk, SchedulerOutput


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] row of each sampling chunk's last token
    sampling_chunks: list[ScheduledChunk]
    greedy_ids: torch.Tensor | None = None  # [S] argmax of the logits, when a graph made it


class ModelRunner:
    """Executes steps of one model on one device against one KV cache tensor."""

    def __init__(self, model, kv_cache: torch.Tensor, backend, block_size: int,
                 vocab_size: int, device: str, use_cuda_graphs: bool = True,
                 max_model_len: int | None = None, max_num_seqs: int = BATCH_BUCKETS[-1]) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.sampler = Sampler()
        # Every step's sampled ids, row i = sampling chunk i, kept on the device: the next step
        # reads the ids the host has not seen yet (tokens in flight) from here. Fixed size:
        # captured graphs write into it.
        self.sampled_ids = torch.zeros(max(max_num_seqs, BATCH_BUCKETS[-1]), dtype=torch.int64,
                                       device=self.device)
        # Decode-only steps replay captured CUDA graphs (CUDA + a graph-safe backend only).
        self.decode_graphs: DecodeGraphRunner | None = None
        if (use_cuda_graphs and self.device.type == "cuda"
                and getattr(backend, "supports_cuda_graphs", False)):
            self.decode_graphs = DecodeGraphRunner(
                model, kv_cache, backend, block_size,
                max_model_len or model.config.max_position_embeddings, self.sampled_ids)

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput,
                on_layer_done: Callable[[int], None] | None = None) -> SamplerOutput | None:
        """Run one step; returns sampled tokens for the chunks that complete a sequence, as
        device tensors (nothing waits for the GPU here). They also land in `sampled_ids`."""
        logits, inputs = self.forward_logits(plan, on_layer_done)
        if logits is None:
            return None
        if inputs.greedy_ids is not None and all(
                c.request.params.is_plain_greedy for c in inputs.sampling_chunks):
            return SamplerOutput(token_ids=inputs.greedy_ids, logprobs=None)  # in sampled_ids
        out = self.sampler(logits, self._sampling_tensors(inputs.sampling_chunks))
        self.sampled_ids[: out.token_ids.shape[0]].copy_(out.token_ids)
        return out

    @torch.inference_mode()
    def forward_logits(self, plan: SchedulerOutput,
                       on_layer_done: Callable[[int], None] | None = None):
        """Write the step's KV and return (logits of the sampling rows or None, inputs).
        Logits of a replayed decode graph live in its static buffer until the next step."""
        graphs = self.decode_graphs
        if graphs is not None and on_layer_done is None and graphs.can_run(plan.chunks):
            return self._replay_decode(graphs, plan)
        inputs = self.prepare(plan)
        ctx = ForwardContext(self.kv_cache, inputs.attn_meta, self.backend, on_layer_done)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if not inputs.sampling_chunks:
            return None, inputs
        return self.model.compute_logits(hidden[inputs.sample_rows]).float(), inputs

    def _replay_decode(self, graphs: DecodeGraphRunner, plan: SchedulerOutput):
        logits, greedy_ids, meta = graphs.run(plan.chunks)
        num_seqs = len(plan.chunks)
        input_ids, positions = graphs.input_views(num_seqs)
        rows = graphs.query_start[:num_seqs]  # row i samples sequence i
        return logits, StepInputs(input_ids, positions, meta, rows, list(plan.chunks), greedy_ids)

    def prepare(self, plan: SchedulerOutput) -> StepInputs:
        chunks = plan.chunks
        num_decode = sum(1 for c in chunks if c.is_decode)
        token_ids: list[int] = []
        positions: list[int] = []
        fed: list[tuple[int, int]] = []  # (token index, sampled_ids row) of tokens in flight
        for c in chunks:
            ids = c.request.new_token_ids(c.start, c.num_tokens)
            if ids[-1] < 0:  # only a sequence's last token can be in flight
                fed.append((len(token_ids) + len(ids) - 1, c.request.inflight_row))
            token_ids += ids
            positions += range(c.start, c.start + c.num_tokens)
        tables = self._block_tables(chunks)
        decode = self._seq_group(chunks[:num_decode], tables[:num_decode]) if num_decode else None
        prefill = (self._seq_group(chunks[num_decode:], tables[num_decode:])
                   if num_decode < len(chunks) else None)
        pos = torch.tensor(positions, dtype=torch.int64)
        slots = self._slot_mapping(chunks, tables, pos)
        meta = AttentionMetadata(slots.to(self.device, non_blocking=True), num_decode, decode, prefill)
        ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        input_ids = torch.tensor(token_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        if fed:
            self._feed_inflight(input_ids, fed)
        return StepInputs(
            input_ids=input_ids,
            positions=pos.to(self.device, non_blocking=True),
            attn_meta=meta,
            sample_rows=ends[sampling].to(self.device, non_blocking=True),
            sampling_chunks=[chunks[i] for i in sampling],
        )

    def _feed_inflight(self, input_ids: torch.Tensor, fed: list[tuple[int, int]]) -> None:
        """Put the ids of tokens in flight, sampled by the previous step, into `input_ids`."""
        index, rows = torch.tensor(fed, dtype=torch.int64).T.to(self.device, non_blocking=True)
        input_ids[index] = self.sampled_ids[rows]

    @staticmethod
    def _block_tables(chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Block tables of all chunks, zero-padded to the longest: [num_chunks, max_blocks]."""
        max_blocks = max(len(c.block_table) for c in chunks)
        tables = torch.zeros(len(chunks), max_blocks, dtype=torch.int64)
        for i, c in enumerate(chunks):
            tables[i, : len(c.block_table)] = torch.tensor(c.block_table)
        return tables

    def _seq_group(self, chunks: list[ScheduledChunk], tables: torch.Tensor) -> SeqGroup:
        q_lens = [c.num_tokens for c in chunks]
        ctx_lens = [c.start + c.num_tokens for c in chunks]
        query_start = torch.zeros(len(chunks) + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(q_lens).cumsum(0)
        return SeqGroup(
            block_tables=tables.to(self.device, dtype=torch.int32, non_blocking=True),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(self.device, non_blocking=True),
            query_start=query_start.to(self.device, non_blocking=True),
            max_query_len=max(q_lens), max_context_len=max(ctx_lens))

    def _slot_mapping(self, chunks: list[ScheduledChunk], tables: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """slot = table[pos // bs] * bs + pos % bs, computed for all tokens at once."""
        seq_of_token = torch.repeat_interleave(
            torch.arange(len(chunks)), torch.tensor([c.num_tokens for c in chunks]))
        blocks = tables[seq_of_token, positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def _sampling_tensors(self, chunks: list[ScheduledChunk]) -> SamplingTensors:
        requests = [c.request for c in chunks]
        params = [r.params for r in requests]
        needs_history = any(p.repetition_penalty != 1.0 for p in params)
        return SamplingTensors.from_params(
            params=params,
            seeds=[r.seed for r in requests],
            steps=[r.num_sampled_tokens for r in requests],
            token_histories=[r.all_token_ids for r in requests] if needs_history else None,
            vocab_size=self.vocab_size,
            device=self.device,
        )
