"""Causal prefill attention over packed variable-length chunks, reading keys from the paged cache.

Queries are the new tokens of each sequence (packed, `query_start` delimits them); keys and values
are the sequence's first `context_len` tokens, read through its block table after this step's
K/V were written, so a later chunk of a long prompt attends to all earlier chunks. The query at
local index i sits at position `context_len - query_len + i` and sees keys up to that position.

Flash-attention tiling with an online softmax: one program owns BLOCK_M queries of one head and
streams BLOCK_N keys at a time; key tiles wholly below the diagonal skip the mask. The heaviest
query tiles (last in the sequence) are launched first. An fp8 cache is read as in the decode
kernel (engine/kernels/kv_tiles.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.metadata import SeqGroup
from engine.kernels.kv_tiles import load_fp8_tile
from engine.kv_cache.fp8 import is_fp8

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d,
                 dmask, kv_stride_block, kv_stride_kv, kv_stride_tok, block_size, scale_log2e,
                 head_dim, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    n = n_begin + tl.arange(0, BLOCK_N)
    nmask = n < ctx_len
    block = tl.load(table_row + n // block_size, mask=nmask, other=0).to(tl.int64)
    tok = block * kv_stride_block + (n % block_size) * kv_stride_tok + head_off
    kv_mask = nmask[:, None] & dmask[None, :]
    if FP8:  # e4m3 rows + per-row scales (engine/kernels/kv_tiles.py)
        k8, k_scale = load_fp8_tile(kv_ptr + tok, d, kv_mask, nmask, head_dim)
        v8, v_scale = load_fp8_tile(kv_ptr + kv_stride_kv + tok, d, kv_mask, nmask,
                                    head_dim)
        k = k8.to(q.dtype)
        v = v8.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * (k_scale * scale_log2e)[None, :]
    else:
        k = tl.load(kv_ptr + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + kv_stride_kv + tok[:, None] + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    if MASKED:
        s = tl.where((n[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        pv = (p * v_scale[None, :]).to(v.dtype)
    else:
        pv = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, kv_ptr, tables_ptr, ctx_lens_ptr, query_start_ptr, out_ptr,
                    scale_log2e, q_stride_t, q_stride_h, o_stride_t, o_stride_h, table_stride,
                    kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
                    group, head_dim, block_size,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr):
    m_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first
    head = tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    if m_tile * BLOCK_M < q_len:
        ctx_len = tl.load(ctx_lens_ptr + seq)
        first_pos = ctx_len - q_len  # position of the chunk's first query
        m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        mmask = m < q_len
        dmask = d < head_dim
        rows = (q_begin + m).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * q_stride_t + head * q_stride_h + d[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        q_pos = first_pos + m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = tables_ptr + seq * table_stride
        head_off = (head // group) * kv_stride_h
        # keys before the tile's first query position need no mask
        unmasked_end = (first_pos + m_tile * BLOCK_M) // BLOCK_N * BLOCK_N
        kv_end = tl.minimum(ctx_len, first_pos + (m_tile + 1) * BLOCK_M)
        for n_begin in range(0, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d, dmask,
                kv_stride_block, kv_stride_kv, kv_stride_tok, block_size, scale_log2e,
                head_dim, False, BLOCK_N, DOT_PRECISION, FP8)
        for n_begin in range(unmasked_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d, dmask,
                kv_stride_block, kv_stride_kv, kv_stride_tok, block_size, scale_log2e,
                head_dim, True, BLOCK_N, DOT_PRECISION, FP8)
        o = acc / l_i[:, None]
        tl.store(out_ptr + rows[:, None] * o_stride_t + head * o_stride_h + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def _tile_config(dtype: torch.dtype, head_dim: int) -> dict:
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, DOT_PRECISION="ieee")
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3, DOT_PRECISION="tf32")
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, DOT_PRECISION="tf32")


def prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, group: SeqGroup, scale: float,
                      out: torch.Tensor) -> torch.Tensor:
    """q: [T, Hq, D] packed new tokens of `group`'s sequences; writes and returns out [T, Hq, D]."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return out
    num_kv_heads = kv_layer.shape[3]
    cfg = _tile_config(q.dtype, head_dim)
    grid = (triton.cdiv(group.max_query_len, cfg["BLOCK_M"]), num_heads, group.num_seqs)
    _prefill_kernel[grid](
        q, kv_layer, group.block_tables, group.context_lens, group.query_start, out,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        group.block_tables.stride(0), *kv_layer.stride()[:4], num_heads // num_kv_heads,
        head_dim, kv_layer.shape[2], BLOCK_D=triton.next_power_of_2(head_dim),
        FP8=is_fp8(kv_layer), **cfg)
    return out
