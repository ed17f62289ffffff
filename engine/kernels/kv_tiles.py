"""Loading tiles of keys and values from an fp8 paged cache; rounding to e4m3 for its writes.

The format (engine/kv_cache/fp8.py): a key is a row of head_dim e4m3 bytes then its float32
scale; the values of one (block, head) are a transposed slab, head_dim runs of block_size bytes
then the block_size scales. A plain cache is read by the attention kernels directly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_fp8_keys(row_ptrs, d, nmask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  MASKED: tl.constexpr):
    """([N, BLOCK_D] e4m3 tile, [N] float32 scales) of the key rows at `row_ptrs` ([N] pointers,
    one KV head's row of each key; MASKED: rows outside `nmask` read as zeros, otherwise every
    row is valid and only head_dim's padding is masked, if any); the caller converts the tile
    to its query's dtype (exact; see `fp8_query`) and folds the scales into its scores, so the
    tile is never rescaled."""
    ptrs = row_ptrs[:, None] + d[None, :]
    scale_ptrs = (row_ptrs + HEAD_DIM).to(tl.pointer_type(tl.float32))
    if MASKED:
        raw = tl.load(ptrs, mask=nmask[:, None] & (d < HEAD_DIM)[None, :], other=0)
        scale = tl.load(scale_ptrs, mask=nmask, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:  # a full tile of whole rows: unpredicated loads
            raw = tl.load(ptrs)
        else:
            raw = tl.load(ptrs, mask=(d < HEAD_DIM)[None, :], other=0)
        scale = tl.load(scale_ptrs)
    return raw.to(tl.float8e4nv, bitcast=True), scale


@triton.jit
def load_fp8_values(kv_ptr, table_row, n_begin, ctx_len, d, slab_off, kv_stride_block,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr):
    """([BLOCK_D, BLOCK_N] e4m3 tile of the values of keys n_begin.. transposed, [BLOCK_N]
    float32 scales) for the P @ V product as `tl.dot(p, tl.trans(tile))`: each thread's operand
    pairs run along the keys, as the slabs store them. `slab_off` is kv_stride_kv plus the KV
    head's offset. Keys come in runs of CHUNK (a power of two dividing BLOCK_N and block_size,
    n_begin a multiple of it) that share a block, so every load is CHUNK bytes wide. MASKED
    (a tile reaching past ctx_len): whole blocks are loaded, then the slots past the end are
    zeroed, so stale bytes of a reused block (NaN patterns included) never reach the product."""
    NC: tl.constexpr = BLOCK_N // CHUNK
    first = n_begin + tl.arange(0, NC) * CHUNK  # each run's first key
    j = tl.arange(0, CHUNK)
    if MASKED:
        live = first < ctx_len
        blocks = tl.load(table_row + first // BLOCK_SIZE, mask=live, other=0)
    else:
        blocks = tl.load(table_row + first // BLOCK_SIZE)
    slab = kv_ptr + blocks.to(tl.int64) * kv_stride_block + slab_off  # [NC]
    slot = (first % BLOCK_SIZE)[:, None] + j[None, :]  # [NC, CHUNK]
    ptrs = slab[None, :, None] + (d * BLOCK_SIZE)[:, None, None] + slot[None, :, :]
    scale_ptrs = (slab[:, None] + HEAD_DIM * BLOCK_SIZE + slot * 4).to(
        tl.pointer_type(tl.float32))
    dmask = (d < HEAD_DIM)[:, None, None]
    if MASKED:
        valid = first[:, None] + j[None, :] < ctx_len
        raw = tl.load(ptrs, mask=dmask & live[None, :, None], other=0)
        raw = tl.where(valid[None, :, :], raw, 0)
        scale = tl.load(scale_ptrs, mask=valid, other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            raw = tl.load(ptrs)
        else:
            raw = tl.load(ptrs, mask=dmask, other=0)
        scale = tl.load(scale_ptrs)
    tile = tl.reshape(raw, [BLOCK_D, BLOCK_N]).to(tl.float8e4nv, bitcast=True)
    return tile, tl.reshape(scale, [BLOCK_N])


def values_chunk(block_n: int, block_size: int) -> int:
    """CHUNK of `load_fp8_values`: the largest power of two dividing both."""
    g = block_n & -block_n
    return min(g, block_size & -block_size)


@triton.jit
def fp8_query(q, FP8: tl.constexpr):
    """The query in the dtype an fp8 cache's tiles are converted to: fp16 for a 16-bit query
    (e4m3 -> fp16 is one native cvt per pair on sm_89+, where e4m3 -> bf16 takes several
    integer ops per element; e4m3 values, and bf16 values within fp16's range, are exact in
    fp16, whose 10-bit mantissa also carries p * v_scale better than bf16's 7), saturated to
    fp16's finite range; unchanged for a float32 query or a plain cache."""
    if FP8 and q.dtype != tl.float32:  # static: one branch is compiled, one return type
        out = tl.minimum(tl.maximum(q.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
    else:
        out = q
    return out


@triton.jit
def round_to_e4m3(x):
    """float32 x (saturated to +-448) rounded to the nearest e4m3 value, ties to even, still
    float32: the later `.to(tl.float8e4nv)` is then exact on every backend. (The Triton
    interpreter's own fp32 -> e4m3 conversion halves values whose rounding carries into the
    exponent; the GPU's cvt is right, and this makes both agree with torch.)"""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    bits = x.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1  # e4m3 keeps 3 of float32's 23 mantissa bits
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23: adding it rounds to an integer, ties to even
    tiny = ((tl.abs(x) * 512.0 + magic) - magic) * 0.001953125  # steps of 2**-9 below 2**-6
    subnormal = tl.where(x < 0.0, -tiny, tiny)  # keeps the sign of a zero, as torch does
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)
