"""Loading a tile of keys or values from the paged cache, in either cache format; rounding to
e4m3 for the fp8 writes.

`row_ptrs` point at each token's row of one KV head ([N] pointers). An fp8 row
(engine/kv_cache/fp8.py) is head_dim e4m3 bytes then a float32 scale; a plain cache row is read
by the attention kernels directly, so their plain path is unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_fp8_tile(row_ptrs, d, mask, nmask, head_dim):
    """([N, BLOCK_D] e4m3 tile, [N] float32 scales) of the fp8 rows at `row_ptrs`; the caller
    converts the tile to its query's dtype (exact; see `fp8_query`) and folds the scales into its scores (keys) or
    probabilities (values), so the tile itself is never rescaled."""
    raw = tl.load(row_ptrs[:, None] + d[None, :], mask=mask, other=0)
    scale = tl.load((row_ptrs + head_dim).to(tl.pointer_type(tl.float32)), mask=nmask,
                    other=0.0)
    return raw.to(tl.float8e4nv, bitcast=True), scale


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
