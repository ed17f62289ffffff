"""The exponential race's noise inside Triton kernels: the counter-based uniforms of
`engine.sampler.uniform_noise`, bit for bit (integer hashing on uint32 lanes), and the race key
logit - log E with E = -log u. Shared by the draw (`sampling.py`) and the top-p draw's first
pass (`top_p_split._row_stats_kernel`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def fmix32(x):
    """Murmur3 finalizer on uint32 lanes (wrapping multiplies), as `sampler._fmix32`."""
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def row_key(seed, step):
    """The hash of a row's (seed, step): the row lane of `uniform_noise`."""
    key = fmix32(seed.to(tl.uint32) ^ 0x9E3779B9)
    key = fmix32(key ^ (seed >> 32).to(tl.uint32))
    return fmix32(key ^ step.to(tl.uint32))


@triton.jit
def race_key(logit, key_of_row, v):
    """logit - log E_v for token ids v of the row whose `row_key` is key_of_row."""
    bits = fmix32(key_of_row ^ fmix32(v.to(tl.uint32) ^ 0x7F4A7C15))
    u = ((bits >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23: u in (0, 1)
    return logit - tl.log(-tl.log(u))


@triton.jit
def race_step(best_key, best_idx, key, v, valid):
    """Per-lane running maximum of the race keys: strict, so each lane keeps its first."""
    better = valid & (key > best_key)
    return tl.where(better, key, best_key), tl.where(better, v, best_idx)


@triton.jit
def race_winner(best_key, best_idx, empty_id):
    """(key, lowest id) of the lanes' maximum; `empty_id` when every key is -inf (as argmax)."""
    top = tl.max(best_key, axis=0)
    first = tl.min(tl.where(best_key == top, best_idx, 2147483647), axis=0)
    return top, tl.where(top == float("-inf"), empty_id, first)
