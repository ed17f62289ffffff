"""Runs a tiny model's steps on one rank of a tensor x pipeline parallel instance (test helper).

`run_steps` drives a model through a fixed two-step scenario with a real paged KV cache: a
prefill of three sequences, then a mixed step (their decodes + a new sequence's prefill).
Decode inputs are the ids the last stage sampled (argmax), broadcast to every rank the way the
engine will. `rank_main` is the spawned process: it builds its groups from a TCPStore, loads its
slice of each scenario's model and saves what it saw for the test process to compare.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from engine.attention import AttentionMetadata, SeqGroup, TorchAttentionBackend
from engine.builder import build_model
from engine.kv_cache.cache_tensor import allocate_kv_cache
from engine.loader.source import open_model
from engine.models.context import ForwardContext
from engine.models.weights import load_weights
from engine.parallel import ParallelContext, init_parallel_context, kv_heads_of_rank

BLOCK_SIZE = 4
NUM_BLOCKS = 32
PROMPTS = ([1, 5, 9, 200, 7], list(range(300, 309)), [42, 43, 44])
LATE_PROMPT = [11, 12, 13, 14]  # joins in the second step, beside the decodes
TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """One model split one way: `tp * pp` ranks of the spawned ones take part."""

    name: str
    model_path: str
    tp: int
    pp: int


@dataclass(slots=True)
class _Seq:
    token_ids: list[int]
    block_ids: list[int]
    num_cached: int = 0


def _seq_group(seqs: list[_Seq], num_new: list[int]) -> SeqGroup:
    max_blocks = max(len(s.block_ids) for s in seqs)
    tables = torch.tensor([s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs],
                          dtype=torch.int32)
    context = [s.num_cached + n for s, n in zip(seqs, num_new)]
    starts = torch.tensor([0] + num_new).cumsum(0).to(torch.int32)
    return SeqGroup(tables, torch.tensor(context, dtype=torch.int32), starts, max(num_new),
                    max(context))


def _step_inputs(decodes: list[_Seq], prefills: list[_Seq]):
    """(input_ids, positions, metadata, rows to sample) for decodes first, then prefills."""
    seqs = decodes + prefills
    num_new = [1] * len(decodes) + [len(s.token_ids) - s.num_cached for s in prefills]
    ids, positions, slots = [], [], []
    for s, n in zip(seqs, num_new):
        for pos in range(s.num_cached, s.num_cached + n):
            ids.append(s.token_ids[pos])
            positions.append(pos)
            slots.append(s.block_ids[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
    meta = AttentionMetadata(
        torch.tensor(slots, dtype=torch.int64), len(decodes),
        _seq_group(decodes, num_new[: len(decodes)]) if decodes else None,
        _seq_group(prefills, num_new[len(decodes):]) if prefills else None)
    rows = torch.tensor(num_new).cumsum(0) - 1
    return torch.tensor(ids), torch.tensor(positions), meta, rows


def _forward(model, parallel: ParallelContext, kv_cache, decodes, prefills, done: list[int]):
    """One step; returns (logits on the last stage else None, the broadcast sampled ids)."""
    input_ids, positions, meta, rows = _step_inputs(decodes, prefills)
    ctx = ForwardContext(kv_cache, meta, TorchAttentionBackend(), done.append)
    hidden = model(input_ids, positions, ctx)
    logits = model.compute_logits(hidden[rows]) if parallel.is_last_stage else None
    sampled = logits.argmax(-1) if logits is not None else torch.zeros(len(rows), dtype=torch.int64)
    return logits, parallel.broadcast_from_last_stage(sampled)


def _blocks(first: int, num_tokens: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // BLOCK_SIZE)))


@torch.inference_mode()
def run_steps(model, parallel: ParallelContext, kv_cache: torch.Tensor) -> dict:
    """The two-step scenario; returns logits, sampled ids and the on_layer_done indices."""
    seqs = [_Seq(list(p), _blocks(8 * i, len(p) + 1)) for i, p in enumerate(PROMPTS)]
    done: list[int] = []
    logits1, ids1 = _forward(model, parallel, kv_cache, [], seqs, done)
    for s, token_id in zip(seqs, ids1.tolist()):
        s.num_cached = len(s.token_ids)
        s.token_ids.append(token_id)
    late = _Seq(list(LATE_PROMPT), _blocks(24, len(LATE_PROMPT)))
    logits2, ids2 = _forward(model, parallel, kv_cache, seqs, [late], done)
    return dict(logits=[logits1, logits2], ids=[ids1, ids2], layers_done=done)


def load_stage(model_path: str, parallel: ParallelContext):
    """This rank's model slice, fp32 on CPU, and its KV cache (its layers, its KV heads)."""
    source = open_model(model_path)
    cfg = source.config
    model = build_model(cfg, torch.float32, "cpu", parallel)
    load_weights(model, source.iter_lazy_weights())
    start, end = parallel.stage_layers(cfg.num_layers)
    heads = kv_heads_of_rank(cfg.num_kv_heads, parallel)[1]
    kv_cache = allocate_kv_cache(cfg, NUM_BLOCKS, BLOCK_SIZE, torch.float32, "cpu",
                                 num_kv_heads=heads, num_layers=end - start)
    return model, kv_cache


def rank_main(rank: int, port: int, scenarios: list[Scenario], out_dir: str) -> None:
    """Spawned rank: run every scenario this rank takes part in, save its results."""
    torch.set_num_threads(1)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False,
                                       timeout=timedelta(seconds=TIMEOUT_S))
    for i, sc in enumerate(scenarios):
        if rank >= sc.tp * sc.pp:
            continue
        prefixed = torch.distributed.PrefixStore(f"scenario{i}", store)
        cfg = open_model(sc.model_path).config
        parallel = init_parallel_context(prefixed, rank, sc.tp, sc.pp, cfg.num_layers, "cpu",
                                         TIMEOUT_S)
        model, kv_cache = load_stage(sc.model_path, parallel)
        result = run_steps(model, parallel, kv_cache)
        result.update(layer_range=model.layer_range, kv_shape=tuple(kv_cache.shape),
                      is_last_stage=parallel.is_last_stage)
        torch.save(result, Path(out_dir) / f"{sc.name}-rank{rank}.pt")
