"""The fp8 KV cache format: e4m3 keys and values with a scale per (token, KV head), inline.

A cache with `kv_cache_dtype: fp8_e4m3` is a uint8 tensor of the usual layout
`[layers, blocks, 2, block_size, kv_heads, head_dim + 16]`: each (token, head) row of K (and of
V) is `head_dim` e4m3 bytes followed by a 16-byte tail holding its float32 scale (then 12 zero
bytes). The tail keeps every row 16-byte aligned (head_dim is a multiple of 16), so the
attention kernels load rows as 16-byte vectors; with a 4-byte tail (132-byte rows at
head_dim 128) only byte loads were provably aligned and decode over fp8 ran 2.1x slower than
over bf16 on an H100. The scale is amax(|x|) / 448 of that row (448 is
e4m3's largest finite value; an all-zero row stores scale 1), so every row uses e4m3's whole
range and no calibration is needed; the stored value is e4m3(x * (448 / amax)), dequantized as
e4m3 * scale.

Keeping the scales inside the rows means a block is still one contiguous slab: the KV hand-off
gathers, sends and scatters fp8 blocks exactly as it does bf16 ones, scales included, at
(head_dim + 16) / (2 * head_dim) of a bf16 cache's bytes (56.25% at head_dim 128). The torch functions here
are the reference (CPU, and the oracle of the Triton kernels that write and read the format).
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_BYTES = 4  # the float32 scale, first in the row's tail
TAIL_BYTES = 16  # scale + zero padding: rows stay 16-byte aligned
KV_CACHE_DTYPES = ("auto", "fp8_e4m3")


def is_fp8(kv: torch.Tensor) -> bool:
    """Whether a cache tensor (or layer of one) holds the fp8 format."""
    return kv.dtype == torch.uint8


def stored_head_dim(head_dim: int, kv_cache_dtype: str) -> int:
    """The last dimension of the cache tensor for a model head_dim."""
    if kv_cache_dtype == "auto":
        return head_dim
    if head_dim % TAIL_BYTES:
        raise ValueError(f"an fp8 KV cache needs head_dim divisible by {TAIL_BYTES}, "
                         f"got {head_dim}")
    return head_dim + TAIL_BYTES


def head_dim_of(kv: torch.Tensor) -> int:
    """The model head_dim a cache tensor stores."""
    return kv.shape[-1] - TAIL_BYTES if is_fp8(kv) else kv.shape[-1]


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., D] float -> [..., D + 16] uint8: e4m3 bytes of x * (448 / amax), the scale, zeros."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    amax = torch.where(amax > 0, amax, torch.full_like(amax, FP8_MAX))  # zero row: scale 1
    values = (xf * (FP8_MAX / amax)).to(torch.float8_e4m3fn).view(torch.uint8)
    scale = (amax / FP8_MAX).contiguous().view(torch.uint8)  # [..., 4] little-endian bytes
    pad = values.new_zeros(*values.shape[:-1], TAIL_BYTES - SCALE_BYTES)
    return torch.cat([values, scale, pad], dim=-1)


def dequantize_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., D + 16] uint8 -> [..., D] `dtype`: e4m3 value * its row's scale (in float32)."""
    head_dim = rows.shape[-1] - TAIL_BYTES
    values = rows[..., :head_dim].contiguous().view(torch.float8_e4m3fn).float()
    scale = rows[..., head_dim:head_dim + SCALE_BYTES].contiguous().view(torch.float32)
    return (values * scale).to(dtype)
