"""Paged decode attention (one new token per sequence), split along the context.

One program serves all query heads of one KV head (GQA), so each KV byte is read from memory
once; the group's queries form the rows of a small matrix product with each tile of keys.

The context of every sequence is cut into `num_splits` equal parts *on the device*, from its own
`context_lens[b]`: the grid is (kv_heads, batch, num_splits) with `num_splits` a function of the
batch size only, so the launch never depends on host-side lengths and can be captured in a CUDA
graph that serves any context length. With one split the program writes the output directly;
otherwise each split writes its partial output and log-sum-exp (flash-decoding), and either a
second kernel combines them, or (`fused_combine`) the last split to finish does:

Last split reduces. Split s of a sequence has tokens iff s * tiles_per_split < num_tiles, so
`num_active` = cdiv(num_tiles, tiles_per_split) splits have work (at least split 0, which
serves an empty context alone). Only those write partials. After its stores each takes a ticket
from its (sequence, KV head) counter: a CTA barrier (every thread's stores precede it), then an
acq_rel, gpu-scope atomic increment. The program that draws ticket num_active - 1 has acquired
every other split's release, combines (reading the partials past L1), writes the output and
puts the counter back to 0, so the next launch or graph replay finds it clean. The counters
(`_SplitCounters`) are zeroed once per device and never memset per step; launches that share
them must be ordered on one stream, as the engine's steps are.

Both paths combine with one helper, `_combine_splits`, in a fixed split order, so their outputs
are bitwise equal (see there).

Tiles wholly below a sequence's context length are read without masks; only its last tile is
masked. An fp8 cache (engine/kv_cache/fp8.py) is read as e4m3 converted to the queries' dtype:
key rows, and value slabs transposed so the P @ V operand pairs run along the keys; each key's
scale multiplies its column of scores and each value's scale the probabilities (kv_tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.attention.metadata import SeqGroup
from engine.kernels import dispatch
from engine.kernels.device import sm_count
from engine.kernels.kv_tiles import (fp8_query, load_fp8_keys, load_fp8_values,
                                     values_chunk)
from engine.kernels.pdl import launch_options, pdl_wait_and_release
from engine.kv_cache import fp8
from engine.kv_cache.fp8 import is_fp8

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 32
_COMBINE_REGS = 64  # float32 registers per thread for the partials one combine step loads


@triton.jit
def _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, tile, ctx_len, d, head_off, scale_log2e,
                 kv_stride_block, kv_stride_kv, kv_stride_tok, HEAD_DIM: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, FP8: tl.constexpr, VALUES_CHUNK: tl.constexpr,
                 MASKED: tl.constexpr):
    """One tile of BLOCK_N keys folded into the online softmax. Unless MASKED (the sequence's
    last tile, reaching past ctx_len), every key is valid: no masks, unpredicated loads."""
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < ctx_len
    if MASKED:
        block = tl.load(table_row + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
    else:
        block = tl.load(table_row + n // BLOCK_SIZE).to(tl.int64)
    tok = block * kv_stride_block + (n % BLOCK_SIZE) * kv_stride_tok + head_off
    if FP8:  # key rows, transposed value slabs (engine/kernels/kv_tiles.py)
        k8, k_scale = load_fp8_keys(kv_ptr + tok, d, nmask, HEAD_DIM, BLOCK_D, MASKED)
        vt8, v_scale = load_fp8_values(kv_ptr, table_row, tile * BLOCK_N, ctx_len, d,
                                       kv_stride_kv + head_off, kv_stride_block, HEAD_DIM,
                                       BLOCK_SIZE, BLOCK_N, BLOCK_D, VALUES_CHUNK, MASKED)
        s = tl.dot(q, tl.trans(k8.to(q.dtype)), input_precision=DOT_PRECISION)
        s = s * (k_scale * scale_log2e)[None, :]
    else:
        k_ptrs = kv_ptr + tok[:, None] + d[None, :]
        if MASKED or BLOCK_D != HEAD_DIM:
            kv_mask = nmask[:, None] & (d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(k_ptrs + kv_stride_kv, mask=kv_mask, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(k_ptrs + kv_stride_kv)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e
    if MASKED:
        s = tl.where(nmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if FP8:
        pv = (p * v_scale[None, :]).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, tl.trans(vt8.to(q.dtype)),
                                            input_precision=DOT_PRECISION)
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# table_stride (the block tables' row length) changes from step to step in eager steps: a
# specialization on it (== 1, a multiple of 16, neither) would compile new variants on the
# request path, which the start-up warm-up cannot all foresee (engine/compile_watch.py)
@triton.jit(do_not_specialize=["table_stride"])
def _decode_kernel(q_ptr, kv_ptr, tables_ptr, ctx_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                   counters_ptr, scale_log2e, q_stride_t, q_stride_h, o_stride_t, o_stride_h,
                   table_stride, kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
                   group, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
                   VALUES_CHUNK: tl.constexpr, FUSED_COMBINE: tl.constexpr,
                   GROUP_POW2: tl.constexpr, COMBINE_CHUNK: tl.constexpr,
                   USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    kv_head = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    ctx_len = tl.load(ctx_lens_ptr + seq).to(tl.int32)  # int32 index math (lengths may be int64)
    tile_begin, tile_end, num_active = _split_tiles(ctx_len, split, BLOCK_N, NUM_SPLITS)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    gmask = g < group
    dmask = d < HEAD_DIM
    q = fp8_query(tl.load(q_ptr + seq * q_stride_t + heads[:, None] * q_stride_h + d[None, :],
                          mask=gmask[:, None] & dmask[None, :], other=0.0), FP8)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], tl.float32)
    table_row = tables_ptr + seq * table_stride
    head_off = kv_head * kv_stride_h
    # fp8: the tiles wholly below ctx_len unmasked, then at most one reaching past it (the
    # sequence's last; a split without tiles runs neither). bf16 keeps one masked loop: peeled,
    # its kernel needs 142 registers instead of 106 (ptxas, sm_90), a program fewer per SM.
    if FP8:
        full_end = tl.maximum(tl.minimum(tile_end, ctx_len // BLOCK_N), tile_begin)
        for tile in range(tile_begin, full_end):
            m_i, l_i, acc = _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, tile, ctx_len, d,
                                         head_off, scale_log2e, kv_stride_block, kv_stride_kv,
                                         kv_stride_tok, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D,
                                         DOT_PRECISION, FP8, VALUES_CHUNK, False)
        if full_end < tile_end:
            m_i, l_i, acc = _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, full_end, ctx_len,
                                         d, head_off, scale_log2e, kv_stride_block,
                                         kv_stride_kv, kv_stride_tok, HEAD_DIM, BLOCK_SIZE,
                                         BLOCK_N, BLOCK_D, DOT_PRECISION, FP8, VALUES_CHUNK,
                                         True)
    else:
        for tile in range(tile_begin, tile_end):
            m_i, l_i, acc = _decode_tile(q, m_i, l_i, acc, kv_ptr, table_row, tile, ctx_len, d,
                                         head_off, scale_log2e, kv_stride_block, kv_stride_kv,
                                         kv_stride_tok, HEAD_DIM, BLOCK_SIZE, BLOCK_N, BLOCK_D,
                                         DOT_PRECISION, FP8, VALUES_CHUNK, True)

    out_mask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        o = out_ptr + seq * o_stride_t + heads[:, None] * o_stride_h + d[None, :]
        tl.store(o, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    elif not FUSED_COMBINE or split < num_active:
        # partial buffers: [B, Hq, NUM_SPLITS, BLOCK_D] and [B, Hq, NUM_SPLITS]
        first_row = (seq * (tl.num_programs(0) * group) + heads) * NUM_SPLITS
        _store_partial(part_out_ptr, part_lse_ptr, first_row + split, d, gmask, out_mask,
                       acc, m_i, l_i, BLOCK_D)
        if FUSED_COMBINE:
            counter = counters_ptr + seq * tl.num_programs(0) + kv_head
            tl.debug_barrier()  # all of this program's partial stores precede its release
            ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if ticket == num_active - 1:  # every other active split has released its partial
                r = tl.arange(0, GROUP_POW2)  # the group's heads only, not the dot's padding
                rows = kv_head * group + r
                o = _combine_splits(part_out_ptr, part_lse_ptr,
                                    (seq * (tl.num_programs(0) * group) + rows) * NUM_SPLITS,
                                    r < group, num_active, d, dmask, NUM_SPLITS, BLOCK_D,
                                    COMBINE_CHUNK)
                tl.store(out_ptr + seq * o_stride_t + rows[:, None] * o_stride_h + d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=(r < group)[:, None] & dmask)
                tl.store(counter, 0)  # clean for the next launch (kernel end orders it)


@triton.jit
def _split_tiles(ctx_len, split, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(first tile, end tile) of this split and how many splits of the sequence have tiles."""
    num_tiles = tl.cdiv(ctx_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    num_active = tl.maximum(tl.cdiv(num_tiles, tl.maximum(tiles_per_split, 1)), 1)
    return tile_begin, tile_end, num_active


@triton.jit
def _store_partial(part_out_ptr, part_lse_ptr, rows, d, gmask, out_mask, acc, m_i, l_i,
                   BLOCK_D: tl.constexpr):
    """One split's normalized output and log2-sum-exp per head (lse -inf, zeros when empty)."""
    empty = l_i == 0.0
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(part_out_ptr + rows[:, None] * BLOCK_D + d[None, :], o, mask=out_mask)
    tl.store(part_lse_ptr + rows, lse, mask=gmask)


@triton.jit
def _combine_splits(part_out_ptr, part_lse_ptr, first_rows, rmask, num_splits, d, dmask,
                    NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr):
    """[R, BLOCK_D] float32: the partials of rows first_rows + s, s < num_splits, weighted by
    exp2(lse - max lse). The max is exact in any order; the sums run one split after another
    (no `tl.sum`, whose order follows the layout the compiler picks), so the two paths agree
    bit for bit: the fused one stops at its active splits, the second kernel also adds the
    empty ones, whose stored (lse -inf, zeros) add exactly nothing. Loads are issued CHUNK
    splits at a time (`_combine_chunk`: all at once, the fused kernel spilled) and bypass L1
    (`.cg`): in the fused path other SMs wrote these lines during this launch."""
    splits_of_row = tl.where(rmask, num_splits, 0)  # [R]: masked rows read nothing
    s_all = tl.arange(0, NUM_SPLITS)
    lse_all = tl.load(part_lse_ptr + first_rows[:, None] + s_all[None, :],
                      mask=s_all[None, :] < splits_of_row[:, None], other=float("-inf"),
                      cache_modifier=".cg")
    m = tl.max(lse_all, axis=1)
    num = tl.zeros([first_rows.shape[0], BLOCK_D], tl.float32)
    den = tl.zeros(first_rows.shape, tl.float32)
    for first in range(0, num_splits, CHUNK):
        for j in tl.static_range(CHUNK):
            live = splits_of_row > first + j
            lse = tl.load(part_lse_ptr + first_rows + first + j, mask=live, other=float("-inf"),
                          cache_modifier=".cg")
            part = tl.load(part_out_ptr + (first_rows + first + j)[:, None] * BLOCK_D + d[None, :],
                           mask=live[:, None] & dmask[None, :], other=0.0, cache_modifier=".cg")
            weight = tl.exp2(lse - m)
            num = num + part * weight[:, None]
            den = den + weight
    return num / den[:, None]


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, o_stride_t, o_stride_h, num_heads,
                    head_dim, NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) + tl.arange(0, 1)  # one row, the shape `_combine_splits` takes
    d = tl.arange(0, BLOCK_D)
    dmask = d < head_dim
    first_row = (seq * num_heads + head) * NUM_SPLITS
    o = _combine_splits(part_out_ptr, part_lse_ptr, first_row, head < num_heads, NUM_SPLITS,
                        d, dmask, NUM_SPLITS, BLOCK_D, NUM_SPLITS)  # one row: every load at once
    tl.store(out_ptr + seq * o_stride_t + head[:, None] * o_stride_h + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=dmask[None, :])


def _combine_chunk(group: int, block_d: int, num_splits: int, num_warps: int = 4) -> int:
    """Splits whose partials the fused reducer loads together: as many as _COMBINE_REGS
    registers per thread hold (16 for GQA 4 at head_dim 128: two rounds for 32 splits)."""
    per_split = triton.next_power_of_2(group) * block_d // (32 * num_warps)
    return max(1, min(num_splits, _COMBINE_REGS // max(per_split, 1)))


def default_tile(dtype: torch.dtype, fp8: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of the decode kernel for a query dtype and cache
    format. An fp8 tile of 64 keys carries half a bf16 tile's bytes: on an H100 the sweep
    (benchmarks/decode_attention_sweep.py) found 128 keys, 2 stages 1.23-1.24x faster over fp8
    at 64 x 4k and 256 x 1k (64% of the copy bandwidth against 52%), no better for bf16."""
    if dtype == torch.float32:
        return 32, 4, 2
    if fp8:
        return 128, 4, 2
    return 64, 4, 3


def num_splits_for(batch_size: int, num_kv_heads: int) -> int:
    """Splits per sequence so that the grid holds about 4 programs per SM, rounded *down* to a
    power of two (the combine kernel loads them as one tile). On an H200, batch 8, 32 and 64
    at 1k context run fastest with 8, 2 and 1 splits (512 programs); rounding up to 16, 4 and
    2 cost 10-30%. Depends on the batch shape only."""
    per_sequence = 4 * sm_count() // (batch_size * num_kv_heads)
    if per_sequence < 2:
        return 1
    return min(_MAX_SPLITS, 1 << (per_sequence.bit_length() - 1))


class _SplitCounters:
    """The fused combine's arrival counters, one int32 per (sequence, KV head), per device:
    zeroed when allocated, put back to 0 by each launch's reducing programs, never memset per
    step. Sized for the largest batch x KV heads that splits at all (`num_splits_for` gives 1
    split past 2 rows per SM), grown outside graph capture when an explicit `num_splits` asks
    for more (a decode graph's eager warm-up runs the same shape first). A replaced buffer is
    kept, never freed: graphs captured earlier still point at it."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}
        self._retired: list[torch.Tensor] = []

    def get(self, device: torch.device, num_rows: int) -> torch.Tensor:
        counters = self._by_device.get(device)
        if counters is None or counters.numel() < num_rows:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"decode attention needs {num_rows} split counters on "
                                   f"{device} during graph capture; run the shape eagerly first")
            if counters is not None:
                self._retired.append(counters)
            size = triton.next_power_of_2(max(num_rows, 2 * sm_count(device)))
            counters = torch.zeros(size, dtype=torch.int32, device=device)
            self._by_device[device] = counters
        return counters


_COUNTERS = _SplitCounters()  # process-wide, like the kernels' compile caches


def decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, group: SeqGroup, scale: float,
                     out: torch.Tensor, num_splits: int | None = None,
                     fused_combine: bool | None = None,
                     tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """q: [B, Hq, D] (one token per sequence of `group`); writes and returns out [B, Hq, D].
    fused_combine: the last split combines (True) or a second kernel does (False); None takes
    `dispatch.fused_decode_combine_enabled()`. Both give the same bits.
    tile: (BLOCK_N, num_warps, num_stages) instead of `default_tile` (the sweep,
    benchmarks/decode_attention_sweep.py)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_layer.shape[3], kv_layer.shape[2]
    if is_fp8(kv_layer):
        fp8.check_layout(kv_layer)
    gsize = num_heads // num_kv_heads
    if batch == 0:
        return out
    splits = num_splits or num_splits_for(batch, num_kv_heads)
    if fused_combine is None:
        fused_combine = dispatch.fused_decode_combine_enabled()
    fused = fused_combine and splits > 1
    block_d = triton.next_power_of_2(head_dim)
    part_out = part_lse = counters = out  # placeholders when unused
    if splits > 1:
        part_out = torch.empty(batch, num_heads, splits, block_d, dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    if fused:
        counters = _COUNTERS.get(q.device, batch * num_kv_heads)
    is_fp32 = q.dtype == torch.float32
    block_n, num_warps, num_stages = tile or default_tile(q.dtype, is_fp8(kv_layer))
    launch = launch_options(q)
    _decode_kernel[(num_kv_heads, batch, splits)](
        q, kv_layer, group.block_tables, group.context_lens, out, part_out, part_lse, counters,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        group.block_tables.stride(0), *kv_layer.stride()[:4], gsize, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, NUM_SPLITS=splits,
        GROUP_PAD=max(16, triton.next_power_of_2(gsize)), BLOCK_D=block_d,
        BLOCK_N=block_n, DOT_PRECISION="ieee" if is_fp32 else "tf32",
        FP8=is_fp8(kv_layer), VALUES_CHUNK=values_chunk(block_n, block_size),
        FUSED_COMBINE=fused, GROUP_POW2=triton.next_power_of_2(gsize),
        COMBINE_CHUNK=_combine_chunk(gsize, block_d, splits, num_warps), num_warps=num_warps,
        num_stages=num_stages, **launch)
    if splits > 1 and not fused:
        _combine_kernel[(batch, num_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_heads, head_dim,
            NUM_SPLITS=splits, BLOCK_D=block_d, num_warps=4,
            **launch)
    return out
