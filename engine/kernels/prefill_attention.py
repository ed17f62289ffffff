"""Causal prefill attention over packed variable-length chunks, reading keys from the paged cache.

Queries are the new tokens of each sequence (packed, `query_start` delimits them); keys and values
are the sequence's first `context_len` tokens, read through its block table after this step's
K/V were written, so a later chunk of a long prompt attends to all earlier chunks. The query at
local index i sits at position `context_len - query_len + i` and sees keys up to that position.

Flash-attention tiling with an online softmax: one program owns BLOCK_M query rows and streams
BLOCK_N keys at a time; key tiles wholly below the diagonal skip every mask (and their loads are
unpredicated). The heaviest query tiles (last in the sequence) are launched first. A row is one
(query token, head) pair: without GQA packing a program serves BLOCK_M tokens of one head; with
it (PACK = group) BLOCK_M // group tokens of every query head of one KV head, so each K/V tile
is loaded once per group. The grid walks one head's tiles then the next head's, or (heads_first)
every head's heaviest tile before any lighter one. The launch configuration comes from
engine/kernels/prefill_attention_configs.py (swept per GPU). An fp8 cache is read as in the
decode kernel: key rows, transposed value slabs (engine/kernels/kv_tiles.py).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from engine.attention.metadata import SeqGroup
from engine.kernels.kv_tiles import fp8_query, load_fp8_keys, load_fp8_values, values_chunk
from engine.kernels.prefill_attention_configs import PrefillTileConfig, get_config
from engine.kv_cache import fp8
from engine.kv_cache.fp8 import is_fp8

_LOG2E = 1.4426950408889634
# `tl.range(..., warp_specialize=)` exists from Triton 3.4; the interpreter ignores it
_HAS_WARP_SPEC = "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@triton.jit
def _kv_rows(table_row, n, n_begin, ctx_len, kv_stride_block, kv_stride_tok, head_off,
             BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, TABLE_VEC: tl.constexpr,
             MASKED: tl.constexpr):
    """[BLOCK_N] offsets of keys n_begin.. (one KV head's row each) through the block table."""
    if TABLE_VEC:  # BLOCK_N // BLOCK_SIZE block ids, one load, then BLOCK_SIZE rows from each
        b = n_begin // BLOCK_SIZE + tl.arange(0, BLOCK_N // BLOCK_SIZE)
        if MASKED:
            blocks = tl.load(table_row + b, mask=b * BLOCK_SIZE < ctx_len, other=0)
        else:
            blocks = tl.load(table_row + b)
        rows = (blocks.to(tl.int64)[:, None] * kv_stride_block
                + (tl.arange(0, BLOCK_SIZE) * kv_stride_tok)[None, :])
        tok = tl.reshape(rows, [BLOCK_N]) + head_off
    else:
        if MASKED:
            blocks = tl.load(table_row + n // BLOCK_SIZE, mask=n < ctx_len, other=0)
        else:
            blocks = tl.load(table_row + n // BLOCK_SIZE)
        tok = blocks.to(tl.int64) * kv_stride_block + (n % BLOCK_SIZE) * kv_stride_tok + head_off
    return tok


@triton.jit
def _attend_tile(acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d,
                 kv_stride_block, kv_stride_kv, kv_stride_tok, scale_log2e,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TABLE_VEC: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, VALUES_CHUNK: tl.constexpr):
    n = n_begin + tl.arange(0, BLOCK_N)
    nmask = n < ctx_len
    tok = _kv_rows(table_row, n, n_begin, ctx_len, kv_stride_block, kv_stride_tok, head_off,
                   BLOCK_N, BLOCK_SIZE, TABLE_VEC, MASKED)
    k_ptrs = kv_ptr + tok[:, None] + d[None, :]
    if FP8:  # key rows, transposed value slabs (engine/kernels/kv_tiles.py)
        k8, k_scale = load_fp8_keys(kv_ptr + tok, d, nmask, HEAD_DIM, BLOCK_D, MASKED)
        vt8, v_scale = load_fp8_values(kv_ptr, table_row, n_begin, ctx_len, d,
                                       kv_stride_kv + head_off, kv_stride_block, HEAD_DIM,
                                       BLOCK_SIZE, BLOCK_N, BLOCK_D, VALUES_CHUNK, MASKED)
        k = k8.to(q.dtype)
        v = tl.trans(vt8.to(q.dtype))
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = s * (k_scale * scale_log2e)[None, :]
    else:
        if MASKED or BLOCK_D != HEAD_DIM:
            kv_mask = nmask[:, None] & (d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(k_ptrs + kv_stride_kv, mask=kv_mask, other=0.0)
        else:  # every key of the tile is below ctx_len: unpredicated, vectorized loads
            k = tl.load(k_ptrs)
            v = tl.load(k_ptrs + kv_stride_kv)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # scaled below
    if MASKED:
        s = tl.where((n[None, :] <= q_pos[:, None]) & nmask[None, :], s, float("-inf"))
    if FP8:
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
    else:  # the scale (> 0) applied to the row max, then fused into s * scale - max
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * scale_log2e)
        p = tl.exp2(s * scale_log2e - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        pv = (p * v_scale[None, :]).to(v.dtype)
    else:
        pv = p.to(v.dtype)
    acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# table_stride (the block tables' row length) changes from step to step in eager steps: a
# specialization on it (== 1, a multiple of 16, neither) would compile new variants on the
# request path, which the start-up warm-up cannot all foresee (engine/compile_watch.py)
@triton.jit(do_not_specialize=["table_stride"])
def _prefill_kernel(q_ptr, kv_ptr, tables_ptr, ctx_lens_ptr, query_start_ptr, out_ptr,
                    scale_log2e, q_stride_t, q_stride_h, o_stride_t, o_stride_h, table_stride,
                    kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h, group,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACK: tl.constexpr,
                    TABLE_VEC: tl.constexpr, WARP_SPEC: tl.constexpr, HEADS_FIRST: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, VALUES_CHUNK: tl.constexpr):
    BLOCK_Q: tl.constexpr = BLOCK_M // PACK  # query tokens per tile
    if HEADS_FIRST:  # every head's heaviest tile, then every head's next (for the tail)
        m_tile = tl.num_programs(1) - 1 - tl.program_id(1)
        head0 = tl.program_id(0) * PACK
    else:  # one head's tiles, heaviest first, then the next head's
        m_tile = tl.num_programs(0) - 1 - tl.program_id(0)
        head0 = tl.program_id(1) * PACK  # first query head (all of a KV head's if packed)
    seq = tl.program_id(2).to(tl.int64)
    q_begin = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_begin
    if m_tile * BLOCK_Q < q_len:
        ctx_len = tl.load(ctx_lens_ptr + seq).to(tl.int32)  # int32 index math
        first_pos = ctx_len - q_len  # position of the chunk's first query
        r = tl.arange(0, BLOCK_M)
        m = m_tile * BLOCK_Q + r // PACK  # each row's query token, within the chunk
        head = head0 + r % PACK
        d = tl.arange(0, BLOCK_D)
        mmask = (m < q_len) & (r < BLOCK_Q * PACK)
        io_mask = mmask[:, None] & (d < HEAD_DIM)[None, :]
        rows = (q_begin + m).to(tl.int64)
        q = fp8_query(tl.load(q_ptr + (rows * q_stride_t + head * q_stride_h)[:, None]
                              + d[None, :], mask=io_mask, other=0.0), FP8)
        q_pos = first_pos + m
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table_row = tables_ptr + seq * table_stride
        head_off = (head0 // group) * kv_stride_h
        # keys before the tile's first query position need no mask
        unmasked_end = (first_pos + m_tile * BLOCK_Q) // BLOCK_N * BLOCK_N
        kv_end = tl.minimum(ctx_len, first_pos + (m_tile + 1) * BLOCK_Q)
        if WARP_SPEC:
            for n_begin in tl.range(0, unmasked_end, BLOCK_N, warp_specialize=True):
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d,
                    kv_stride_block, kv_stride_kv, kv_stride_tok, scale_log2e, HEAD_DIM,
                    BLOCK_SIZE, False, BLOCK_N, BLOCK_D, TABLE_VEC, DOT_PRECISION, FP8,
                    VALUES_CHUNK)
        else:
            for n_begin in range(0, unmasked_end, BLOCK_N):
                acc, m_i, l_i = _attend_tile(
                    acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d,
                    kv_stride_block, kv_stride_kv, kv_stride_tok, scale_log2e, HEAD_DIM,
                    BLOCK_SIZE, False, BLOCK_N, BLOCK_D, TABLE_VEC, DOT_PRECISION, FP8,
                    VALUES_CHUNK)
        for n_begin in range(unmasked_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kv_ptr, table_row, n_begin, ctx_len, q_pos, head_off, d,
                kv_stride_block, kv_stride_kv, kv_stride_tok, scale_log2e, HEAD_DIM,
                BLOCK_SIZE, True, BLOCK_N, BLOCK_D, TABLE_VEC, DOT_PRECISION, FP8,
                VALUES_CHUNK)
        o = acc / l_i[:, None]
        tl.store(out_ptr + (rows * o_stride_t + head * o_stride_h)[:, None] + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)


def launch_options(cfg: PrefillTileConfig, group: int, block_size: int,
                   interpret: bool | None = None) -> dict:
    """The kernel's constexpr switches and launch options for `cfg` on this shape: a switch
    that cannot apply (packing a group wider than the tile, a vector table read when block_n
    is not a multiple of a power-of-two block size, warp specialization on the interpreter or
    an older Triton) falls back to the plain path."""
    if interpret is None:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
    pack = group if cfg.pack_gqa and 1 < group <= cfg.block_m // 16 else 1
    table_vec = (cfg.table_vec and block_size & (block_size - 1) == 0
                 and cfg.block_n % block_size == 0)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PACK=pack, TABLE_VEC=table_vec,
                HEADS_FIRST=cfg.heads_first, VALUES_CHUNK=values_chunk(cfg.block_n, block_size),
                WARP_SPEC=cfg.warp_specialize and _HAS_WARP_SPEC and not interpret,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def prefill_attention(q: torch.Tensor, kv_layer: torch.Tensor, group: SeqGroup, scale: float,
                      out: torch.Tensor, config: PrefillTileConfig | None = None) -> torch.Tensor:
    """q: [T, Hq, D] packed new tokens of `group`'s sequences; writes and returns out [T, Hq, D].
    `config` overrides the swept tile configuration (tests and the sweep)."""
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return out
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    if is_fp8(kv_layer):
        fp8.check_layout(kv_layer)
    gqa = num_heads // num_kv_heads
    cfg = config or get_config(q.device, q.dtype, head_dim, gqa)
    opts = launch_options(cfg, gqa, block_size)
    grid = (triton.cdiv(group.max_query_len, opts["BLOCK_M"] // opts["PACK"]),
            num_heads // opts["PACK"])
    opts["HEADS_FIRST"] &= grid[0] < 65536  # grid axes 1 and 2 stop at 65535
    grid = (grid[::-1] if opts["HEADS_FIRST"] else grid) + (group.num_seqs,)
    _prefill_kernel[grid](
        q, kv_layer, group.block_tables, group.context_lens, group.query_start, out,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        group.block_tables.stride(0), *kv_layer.stride()[:4], gqa,
        HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8=is_fp8(kv_layer),
        **opts)
    return out
