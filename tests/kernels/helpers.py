"""Builders for kernel tests: paged KV caches poisoned outside the live tokens, packed metadata,
and the relative-error check every kernel test uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.metadata import AttentionMetadata, SeqGroup

# ‖out − ref‖ / ‖ref‖ bounds against a float32 reference
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert rel < TOLERANCE[dtype], f"{what}: relative error {rel:.2e} >= {TOLERANCE[dtype]:.0e}"


@dataclass
class PagedBatch:
    """One layer's cache and the metadata of a batch of sequences over it."""

    kv_layer: torch.Tensor  # [num_blocks, 2, bs, Hkv, D]; NaN in every slot no sequence owns
    kv_clean: torch.Tensor  # the same with zeros instead of NaN (for the torch oracle)
    group: SeqGroup
    slot_mapping: torch.Tensor  # [T] slots of the new tokens, packed


def paged_batch(q_lens: list[int], ctx_lens: list[int], num_kv_heads: int, head_dim: int,
                block_size: int, dtype: torch.dtype, device: str) -> PagedBatch:
    """Random K/V for each sequence's `ctx_lens[b]` tokens in randomly permuted blocks; table
    padding points at a NaN block so that any read past a sequence's table shows up."""
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks - 1)
    poison_block = num_blocks - 1
    width = max(blocks_per_seq)
    tables = torch.full((len(ctx_lens), width), poison_block, dtype=torch.int32)
    kv = torch.full((num_blocks, 2, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    slots, used = [], 0
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        ids = perm[used: used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        tables[b, : len(ids)] = ids.to(torch.int32)
        pos = torch.arange(ctx)
        blk, off = ids[pos // block_size], pos % block_size
        kv[blk, :, off] = torch.randn(ctx, 2, num_kv_heads, head_dim).to(dtype)
        slots.append(blk[ctx - q_len:] * block_size + off[ctx - q_len:])
    query_start = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    query_start[1:] = torch.tensor(q_lens).cumsum(0)
    group = SeqGroup(tables.to(device), torch.tensor(ctx_lens, dtype=torch.int32, device=device),
                     query_start.to(device), max(q_lens), max(ctx_lens))
    return PagedBatch(kv.to(device), torch.nan_to_num(kv, nan=0.0).to(device), group,
                      torch.cat(slots).to(device))


def reference_attention(q: torch.Tensor, kv_clean: torch.Tensor, meta: AttentionMetadata,
                        scale: float) -> torch.Tensor:
    """The torch backend in float32 over the clean cache."""
    from engine.attention.torch_ref import TorchAttentionBackend

    for g in (meta.decode, meta.prefill):
        if g is not None:
            g.cache.clear()
    return TorchAttentionBackend().attend(q.float(), kv_clean.float(), meta, scale)


def split_groups(group: SeqGroup, num_decode: int) -> tuple[SeqGroup | None, SeqGroup | None]:
    """The first `num_decode` sequences (one new token each) as the decode group, the rest as
    the prefill group, as the runner packs a mixed step."""
    def part(lo: int, hi: int) -> SeqGroup | None:
        if lo == hi:
            return None
        qs = group.query_start[lo: hi + 1]
        ctx = group.context_lens[lo:hi]
        q_lens = (qs[1:] - qs[:-1]).tolist()
        return SeqGroup(group.block_tables[lo:hi], ctx, qs - qs[0], max(q_lens),
                        int(ctx.max().item()))
    return part(0, num_decode), part(num_decode, group.num_seqs)
