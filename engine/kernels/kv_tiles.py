"""Loading a tile of keys or values from the paged cache, in either cache format; rounding to
e4m3 for the fp8 writes.

`row_ptrs` point at each token's row of one KV head ([N] pointers). A plain cache row is
head_dim values of the model dtype; an fp8 row (engine/kv_cache/fp8.py) is head_dim e4m3 bytes
then a float32 scale. The tile comes back in `dtype` (e4m3 converts to bf16/fp16/fp32 exactly)
with a per-token scale (ones for a plain cache) that the attention kernels fold into the scores
(keys) or the probabilities (values), so the tile itself is never rescaled.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(row_ptrs, d, mask, nmask, head_dim, dtype: tl.constexpr, FP8: tl.constexpr):
    """([N, BLOCK_D] tile in `dtype`, [N] float32 scales) of the rows at `row_ptrs`."""
    ptrs = row_ptrs[:, None] + d[None, :]
    if FP8:
        raw = tl.load(ptrs, mask=mask, other=0)
        tile = raw.to(tl.float8e4nv, bitcast=True).to(dtype)
        scale = tl.load((row_ptrs + head_dim).to(tl.pointer_type(tl.float32)), mask=nmask,
                        other=0.0)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
        scale = tl.full(nmask.shape, 1.0, tl.float32)
    return tile, scale


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
