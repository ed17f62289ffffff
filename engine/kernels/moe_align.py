"""Sorting a batch's (token, slot) pairs by expert into BLOCK_M-row blocks, on the device.

The fused MoE GEMMs (engine/kernels/fused_moe.py) give each program one BLOCK_M-row block of
pairs that all go to the same expert. This module builds that layout without the host ever
seeing a count, so the whole MoE layer can be captured in a CUDA graph:

- `sorted_pair_ids` [max_padded]: pair ids (token * top_k + slot) grouped by expert, in pair
  order within an expert (deterministic), each expert's group padded up to a multiple of BLOCK_M
  with the sentinel `num_pairs`;
- `block_expert_ids` [max_blocks]: the (local) expert of each block, -1 past the last one;
- `num_padded` [1]: the number of used slots (a multiple of BLOCK_M), read by the GEMMs'
  programs, which return at once when their block lies beyond it.

Every size is an upper bound fixed by (num_pairs, num_experts, BLOCK_M): at most
min(num_pairs, num_experts) experts receive pairs, each wastes at most BLOCK_M - 1 padding
slots. Pairs whose expert `expert_map` sends to -1 (held by another rank) are not placed at all.

Two kernels: `_count_kernel` counts each chunk's pairs per expert (one row per chunk, no
atomics); `_place_kernel` derives from those rows every expert's padded start and each pair's
rank within its expert (a prefix sum over the one-hot [CHUNK, experts] matrix), and writes the
pair to its slot. A batch that fits one chunk (every decode step up to a few hundred pairs)
skips the first kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, pdl_wait_and_release

_ONEHOT_ELEMENTS = 8192  # [CHUNK, experts] int32 one-hot held by one program


@dataclass(frozen=True, slots=True)
class ExpertBlocks:
    """A batch's pairs laid out by expert (see the module docstring); device tensors only."""

    sorted_pair_ids: torch.Tensor  # int32 [max_padded]; entries past num_padded are garbage
    block_expert_ids: torch.Tensor  # int32 [max_blocks]; -1 for unused blocks
    num_padded: torch.Tensor  # int32 [1]
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert_ids.numel()


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the padded slots: every expert that gets pairs wastes < BLOCK_M slots."""
    padded = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(padded, block_m) * block_m


@triton.jit
def _chunk_onehot(ids_ptr, map_ptr, chunk, num_pairs, HAS_MAP: tl.constexpr,
                  CHUNK: tl.constexpr, EXPERTS_P2: tl.constexpr):
    """(pair ids, local expert ids or -1, one-hot int32 [CHUNK, EXPERTS_P2]) of one chunk."""
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    in_range = pairs < num_pairs
    experts = tl.load(ids_ptr + pairs, mask=in_range, other=-1).to(tl.int32)
    if HAS_MAP:
        experts = tl.load(map_ptr + experts, mask=in_range & (experts >= 0), other=-1)
        experts = experts.to(tl.int32)
    onehot = (experts[:, None] == tl.arange(0, EXPERTS_P2)[None, :]).to(tl.int32)
    return pairs, experts, onehot


@triton.jit(do_not_specialize=["num_pairs"])
def _count_kernel(ids_ptr, map_ptr, counts_ptr, num_pairs, HAS_MAP: tl.constexpr,
                  CHUNK: tl.constexpr, EXPERTS_P2: tl.constexpr, USE_PDL: tl.constexpr):
    chunk = tl.program_id(0)
    pdl_wait_and_release(USE_PDL)
    _, _, onehot = _chunk_onehot(ids_ptr, map_ptr, chunk, num_pairs, HAS_MAP, CHUNK, EXPERTS_P2)
    tl.store(counts_ptr + chunk * EXPERTS_P2 + tl.arange(0, EXPERTS_P2), tl.sum(onehot, axis=0))


@triton.jit(do_not_specialize=["num_pairs", "num_chunks", "max_blocks"])
def _place_kernel(ids_ptr, map_ptr, counts_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                  num_pairs, num_chunks, max_blocks, HAS_MAP: tl.constexpr,
                  SINGLE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                  EXPERTS_P2: tl.constexpr, ROWS: tl.constexpr, USE_PDL: tl.constexpr):
    chunk = tl.program_id(0)
    pdl_wait_and_release(USE_PDL)
    pairs, experts, onehot = _chunk_onehot(ids_ptr, map_ptr, chunk, num_pairs, HAS_MAP, CHUNK,
                                           EXPERTS_P2)
    cols = tl.arange(0, EXPERTS_P2)
    if SINGLE_CHUNK:
        total = tl.sum(onehot, axis=0)
        before = tl.zeros([EXPERTS_P2], tl.int32)
    else:  # this chunk's start within each expert: the counts of the chunks before it
        total = tl.zeros([EXPERTS_P2], tl.int32)
        before = tl.zeros([EXPERTS_P2], tl.int32)
        for r0 in range(0, num_chunks, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            block = tl.load(counts_ptr + rows[:, None] * EXPERTS_P2 + cols[None, :],
                            mask=(rows < num_chunks)[:, None], other=0)
            total += tl.sum(block, axis=0)
            before += tl.sum(tl.where((rows < chunk)[:, None], block, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    rank = tl.cumsum(onehot, axis=0) - onehot  # earlier pairs of the same expert in this chunk
    slot = tl.sum(onehot * (rank + (starts + before)[None, :]), axis=1)
    tl.store(sorted_ptr + slot, pairs, mask=(pairs < num_pairs) & (experts >= 0))
    if chunk == 0:
        _write_blocks(sorted_ptr, block_expert_ptr, num_padded_ptr, total, padded, starts, ends,
                      num_pairs, max_blocks, BLOCK_M, EXPERTS_P2)


@triton.jit
def _write_blocks(sorted_ptr, block_expert_ptr, num_padded_ptr, total, padded, starts, ends,
                  num_pairs, max_blocks, BLOCK_M: tl.constexpr, EXPERTS_P2: tl.constexpr):
    """Padding sentinels after each expert's pairs, every block's expert, the used slots."""
    j = tl.arange(0, BLOCK_M)
    pad_at = (starts + total)[:, None] + j[None, :]
    tl.store(sorted_ptr + pad_at, tl.zeros([EXPERTS_P2, BLOCK_M], tl.int32) + num_pairs,
             mask=j[None, :] < (padded - total)[:, None])
    num_padded = tl.sum(padded, axis=0)
    tl.store(num_padded_ptr, num_padded)
    for b0 in range(0, max_blocks, 64):
        blocks = b0 + tl.arange(0, 64)
        first = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        expert = tl.where(first < num_padded, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                    expert_map: torch.Tensor | None = None) -> ExpertBlocks:
    """Lay out topk_ids' pairs ([T, k] global expert ids) by local expert in BLOCK_M blocks.

    `num_experts` is the local expert count (w13.shape[0]); with `expert_map` ([global experts],
    local index or -1) pairs mapped to -1 are dropped.
    """
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    ids = topk_ids.reshape(-1)
    if ids.stride(0) != 1:
        ids = ids.contiguous()
    num_pairs = ids.numel()
    experts_p2 = max(16, triton.next_power_of_2(num_experts))
    chunk = max(16, min(1024, _ONEHOT_ELEMENTS // experts_p2,
                        triton.next_power_of_2(max(num_pairs, 1))))
    num_chunks = max(1, triton.cdiv(num_pairs, chunk))
    max_padded = max_padded_pairs(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max(max_padded, 1), dtype=torch.int32, device=device)
    block_experts = torch.empty(max(max_padded // block_m, 1), dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    map_arg = expert_map if expert_map is not None else ids
    single = num_chunks == 1
    counts = ids if single else torch.empty(num_chunks, experts_p2, dtype=torch.int32,
                                            device=device)
    opts = launch_options(topk_ids)
    if not single:
        _count_kernel[(num_chunks,)](ids, map_arg, counts, num_pairs,
                                     HAS_MAP=expert_map is not None, CHUNK=chunk,
                                     EXPERTS_P2=experts_p2, num_warps=4, **opts)
    _place_kernel[(num_chunks,)](
        ids, map_arg, counts, sorted_ids, block_experts, num_padded, num_pairs, num_chunks,
        block_experts.numel(), HAS_MAP=expert_map is not None, SINGLE_CHUNK=single,
        BLOCK_M=block_m, CHUNK=chunk, EXPERTS_P2=experts_p2,
        ROWS=max(1, _ONEHOT_ELEMENTS // experts_p2), num_warps=4, **opts)
    return ExpertBlocks(sorted_ids, block_experts, num_padded, block_m)
