"""Turns a step's plan into tensors, runs the model and samples.

No policy lives here: the engine core decided what runs (engine/plan.py); the runner only
executes it. All per-sequence work is building small index lists on the host; the model step
itself is a fixed sequence of batched kernels over the packed tokens. The runner keeps the
block tables of scheduled requests (`BlockTables`), kept up to date by each plan's deltas.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup
from engine.cuda_graphs import DecodeGraphRunner
from engine.models.context import ForwardContext
from engine.parallel import ParallelContext
from engine.plan import BATCH_BUCKETS, BlockTables, StepPlan
from engine.sampler import Sampler, SamplerOutput, SamplingTensors
from engine.spec.rejection import draft_rows, packed_positions, verify
from engine.tp_sampler import sample_vocab_parallel


@dataclass(slots=True)
class PendingSample:
    """Rank 0 of a pipeline: a step's sampled ids on their way from the last stage."""

    out: SamplerOutput  # filled once `works` completed (ParallelContext.wait_result)
    works: list


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] row of each sampling sequence's last token
    num_sampled: int
    greedy_ids: torch.Tensor | None = None  # [S] argmax of the logits, when a graph made it


class ModelRunner:
    """Executes steps of one model on one device against one KV cache tensor."""

    def __init__(self, model, kv_cache: torch.Tensor, backend, block_size: int,
                 vocab_size: int, device: str, use_cuda_graphs: bool = True,
                 max_model_len: int | None = None, max_num_seqs: int = BATCH_BUCKETS[-1],
                 parallel: ParallelContext | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.backend = backend
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.sampler = Sampler()
        self.parallel = parallel or ParallelContext.single()
        self.tables = BlockTables()
        if self.parallel.tp_size > 1 and self.parallel.is_last_stage:
            model.lm_head.gather_logits = False  # _sample takes each rank's vocab slice
        # Every step's sampled ids, row i = sampling chunk i, kept on the device: the next step
        # reads the ids the host has not seen yet (tokens in flight) from here. Fixed size:
        # captured graphs write into it.
        self.sampled_ids = torch.zeros(max(max_num_seqs, BATCH_BUCKETS[-1]), dtype=torch.int64,
                                       device=self.device)
        # Steps the plan gave a bucket (decodes, verifications, short prompt chunks) replay
        # captured CUDA graphs (CUDA + a graph-safe backend and model only: the MoE torch
        # reference syncs with the host).
        self.decode_graphs: DecodeGraphRunner | None = None
        if (use_cuda_graphs and self.device.type == "cuda"
                and getattr(backend, "supports_cuda_graphs", False)
                and getattr(model, "supports_cuda_graphs", True)):
            self.decode_graphs = DecodeGraphRunner(
                model, kv_cache, backend, block_size,
                max_model_len or model.config.max_position_embeddings, self.sampled_ids)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, on_layer_done: Callable[[int], None] | None = None
                ) -> SamplerOutput | PendingSample | None:
        """Run one step; returns sampled tokens for the sequences that sample, as device
        tensors (nothing waits for the GPU here); one rank also has them in `sampled_ids`.
        Rank 0 of a pipeline gets a `PendingSample` instead (see `_share_sampled`)."""
        logits, inputs = self.forward_logits(plan, on_layer_done)
        if not plan.num_sampled:
            return None
        out = None
        if logits is not None:  # a pipeline's last stage, or the only one
            out = self._sample(plan, logits, inputs)
        if self.parallel.pp_size > 1:  # rank 0 (the engine core's) needs the ids
            return self._share_sampled(plan, out)
        return out

    def _sample(self, plan: StepPlan, logits: torch.Tensor, inputs: StepInputs) -> SamplerOutput:
        """Every tensor rank samples the same ids: one rank from the whole vocabulary's logits;
        a tensor-parallel stage from its vocab slice, gathering the slices only for a step
        whose options need the whole row (engine/tp_sampler.py)."""
        if plan.spec_lens:
            return self._verify(plan, logits)
        if self.parallel.tp_size > 1:
            out = sample_vocab_parallel(logits, plan.sampling, self.vocab_size, self.parallel)
        elif inputs.greedy_ids is not None and plan.all_plain_greedy:
            return SamplerOutput(token_ids=inputs.greedy_ids, logprobs=None)  # in sampled_ids
        else:
            tensors = SamplingTensors.from_rows(plan.sampling, self.vocab_size, self.device)
            out = self.sampler(logits, tensors)
        self.sampled_ids[: out.token_ids.shape[0]].copy_(out.token_ids)
        return out

    def _verify(self, plan: StepPlan, logits: torch.Tensor) -> SamplerOutput:
        """A speculative step (engine/spec/rejection.py): per sampling sequence, its kept drafts
        and one more token, then -1 up to its k + 1 rows (one per sampling row of the plan, in
        order). Tensor ranks gather the vocabulary first and all verify alike."""
        if self.parallel.tp_size > 1:
            logits = self.parallel.all_gather_last_dim(logits)[:, : self.vocab_size]
        tensors = SamplingTensors.from_rows(plan.sampling, self.vocab_size, self.device)
        drafts = torch.tensor(draft_rows(plan), dtype=torch.int64).to(self.device,
                                                                       non_blocking=True)
        out = verify(logits, tensors, drafts, plan.spec_lens)
        seq, pos = (torch.tensor(x).to(self.device, non_blocking=True)
                    for x in packed_positions(plan.spec_lens))
        logprobs = out.logprobs[seq, pos] if out.logprobs is not None else None
        return SamplerOutput(token_ids=out.token_ids[seq, pos], logprobs=logprobs)

    def _share_sampled(self, plan: StepPlan, out: SamplerOutput | None
                       ) -> SamplerOutput | PendingSample | None:
        """Pipeline: the last stage's tp_rank 0 sends the step's ids (and logprobs) to rank 0,
        which posts the receives and returns at once (a `PendingSample` its executor waits for
        when the core reads the step back), so the first stage moves on to the next
        micro-batch. Other ranks need no ids: micro-batches never feed a token in flight."""
        par = self.parallel
        logprobs = any(row.logprobs for row in plan.sampling)
        if par.rank == par.result_rank:
            par.send_result([out.token_ids] + ([out.logprobs] if logprobs else []))
            return out
        if par.rank != 0:
            return None
        n = plan.num_sampled
        received = SamplerOutput(
            token_ids=torch.empty(n, dtype=torch.int64, device=self.device),
            logprobs=torch.empty(n, dtype=torch.float32, device=self.device) if logprobs else None)
        tensors = [received.token_ids] + ([received.logprobs] if logprobs else [])
        return PendingSample(received, par.recv_result(tensors))

    @torch.inference_mode()
    def forward_logits(self, plan: StepPlan,
                       on_layer_done: Callable[[int], None] | None = None):
        """Write the step's KV and return (logits of the sampling rows or None, inputs).
        Logits of a replayed decode graph live in its static buffer until the next step. A
        replayed step reports its layers to `on_layer_done` after the replay."""
        self.tables.apply(plan)
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(plan):
            out = self._replay_decode(graphs, plan)
            if on_layer_done is not None:
                self._report_layers_done(on_layer_done)
            return out
        inputs = self.prepare(plan)
        ctx = ForwardContext(self.kv_cache, inputs.attn_meta, self.backend, on_layer_done)
        hidden = self.model(inputs.input_ids, inputs.positions, ctx)
        if not inputs.num_sampled or hidden is None:  # None: not the pipeline's last stage
            return None, inputs
        return self.model.compute_logits(hidden[inputs.sample_rows]).float(), inputs

    def _replay_decode(self, graphs: DecodeGraphRunner, plan: StepPlan):
        """Replay the step's graph: one row per token. In a decode or verification step every
        row samples and the graph's argmax already sits in `sampled_ids` row for row; a step
        with prompt rows samples only each completed prompt's last row, so its logits and greedy
        ids are gathered to sampling order (device-side, no sync), as the sampler expects."""
        logits, greedy_ids, meta = graphs.run(plan, self.tables.of(plan))
        input_ids, positions = graphs.input_views(plan.num_tokens)
        num_sampled = plan.num_sampled
        if num_sampled == plan.num_tokens:
            rows = graphs.query_start[:num_sampled]
        else:
            rows = torch.tensor(plan.sample_rows(), dtype=torch.int64).to(self.device,
                                                                           non_blocking=True)
            logits = logits.index_select(0, rows)
            self.sampled_ids[:num_sampled].copy_(greedy_ids.index_select(0, rows))
            greedy_ids = self.sampled_ids[:num_sampled]
        return logits, StepInputs(input_ids, positions, meta, rows, num_sampled, greedy_ids)

    def _report_layers_done(self, on_layer_done: Callable[[int], None]) -> None:
        """A replayed step reports every layer at once, in order, after the replay. Correct: a
        listener (a prefill instance streaming KV, kv_transfer/sender.py `send_layers`) orders
        its reads after the work queued so far on the current stream (an event it records
        there, kv_transfer/streams.py), and the replay queued there has written every layer's
        KV. The per-layer overlap of an eager prefill is lost, but a step small enough for a
        graph is one replay of a few ms, while running it eagerly for the overlap would bring
        back the ~10 launches per layer that graph prefill removes from a short prompt's TTFT."""
        for layer in range(self.kv_cache.shape[0]):  # stage-local, like the eager forward's
            on_layer_done(layer)

    def prepare(self, plan: StepPlan) -> StepInputs:
        num_decode, n = plan.num_decodes, plan.num_seqs
        positions = [p for start, q in zip(plan.starts, plan.query_lens)
                     for p in range(start, start + q)]
        ends = [end - 1 for end in accumulate(plan.query_lens)]  # each sequence's last token
        fed = [(ends[i], row) for i, row in enumerate(plan.inflight_rows) if row >= 0]
        tables = self._block_tables(self.tables.of(plan))
        decode = self._seq_group(plan, 0, num_decode, tables) if num_decode else None
        prefill = self._seq_group(plan, num_decode, n, tables) if num_decode < n else None
        pos = torch.tensor(positions, dtype=torch.int64)
        slots = self._slot_mapping(plan, tables, pos)
        meta = AttentionMetadata(slots.to(self.device, non_blocking=True), num_decode, decode, prefill)
        rows = plan.sample_rows()  # with k drafts, each of a sequence's last k + 1 tokens
        input_ids = torch.tensor(plan.token_ids, dtype=torch.int64).to(self.device, non_blocking=True)
        if fed:
            self._feed_inflight(input_ids, fed)
        return StepInputs(
            input_ids=input_ids,
            positions=pos.to(self.device, non_blocking=True),
            attn_meta=meta,
            sample_rows=torch.tensor(rows).to(self.device, non_blocking=True),
            num_sampled=len(rows),
        )

    def _feed_inflight(self, input_ids: torch.Tensor, fed: list[tuple[int, int]]) -> None:
        """Put the ids of tokens in flight, sampled by the previous step, into `input_ids`."""
        index, rows = torch.tensor(fed, dtype=torch.int64).T.to(self.device, non_blocking=True)
        input_ids[index] = self.sampled_ids[rows]

    @staticmethod
    def _block_tables(tables: list[list[int]]) -> torch.Tensor:
        """Block tables of all sequences, zero-padded to the longest: [num_seqs, max_blocks]."""
        max_blocks = max(len(t) for t in tables)
        return torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int64)

    def _seq_group(self, plan: StepPlan, first: int, end: int, tables: torch.Tensor) -> SeqGroup:
        q_lens = plan.query_lens[first:end]
        ctx_lens = [s + q for s, q in zip(plan.starts[first:end], q_lens)]
        query_start = torch.zeros(end - first + 1, dtype=torch.int32)
        query_start[1:] = torch.tensor(q_lens).cumsum(0)
        return SeqGroup(
            block_tables=tables[first:end].to(self.device, dtype=torch.int32, non_blocking=True),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int64).to(self.device, non_blocking=True),
            query_start=query_start.to(self.device, non_blocking=True),
            max_query_len=max(q_lens), max_context_len=max(ctx_lens))

    def _slot_mapping(self, plan: StepPlan, tables: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """slot = table[pos // bs] * bs + pos % bs, computed for all tokens at once."""
        seq_of_token = torch.repeat_interleave(torch.arange(plan.num_seqs),
                                               torch.tensor(plan.query_lens))
        blocks = tables[seq_of_token, positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size
