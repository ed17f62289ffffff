"""The fp8 KV cache format: e4m3 keys and values with a scale per (token, KV head).

A cache with `kv_cache_dtype: fp8_e4m3` is a uint8 tensor of the usual logical shape
`[layers, blocks, 2, block_size, kv_heads, head_dim + 16]` over head-major memory
(`[layers, blocks, 2, kv_heads, block_size * (head_dim + 16)]`: one contiguous slab per
(block, K or V, head); engine/kv_cache/cache_tensor.py). Inside the slabs:

- a key slab is block_size rows, each `head_dim` e4m3 bytes then a 16-byte tail holding the
  row's float32 scale (then 12 zero bytes). The tail keeps rows 16-byte aligned (head_dim is a
  multiple of 16), so kernels load them as 16-byte vectors.
- a value slab is transposed: `head_dim` runs of block_size e4m3 bytes (value element d of
  every slot), then block_size float32 scales, then zeros, the same bytes as block_size rows.
  Why: the attention kernels' P @ V product takes each thread's operand pairs along the keys;
  from value rows (head_dim contiguous) an 8-bit tile is read from shared memory one byte at a
  time (ldmatrix cannot transpose 8-bit data on sm_90): 1,100 instructions per 128-key decode
  tile at 211 registers, against 692 at 180 over transposed slabs (ptxas for sm_90,
  benchmarks/fp8_vt_decode.py).

Each scale is amax(|x|) / 448 of its (token, head) (448 is e4m3's largest finite value; an
all-zero row stores scale 1), so every row uses e4m3's whole range and no calibration is needed;
the stored value is e4m3(x * (448 / amax)), dequantized as e4m3 * scale.

Blocks stay contiguous slabs: the KV hand-off gathers, sends and scatters fp8 blocks exactly as
it does bf16 ones (scales included), at (head_dim + 16) / (2 * head_dim) of a bf16 cache's
bytes (56.25% at head_dim 128); both ends hold this format (the handshake compares the KV
dtype). "Rows" below are the plain per-(token, head) form, `head_dim` e4m3 bytes then the
16-byte tail, for keys and values alike: what `quantize_rows` makes and tests compare. The
torch functions here are the reference (CPU, and the oracle of the Triton kernels that write
and read the format).
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


def check_layout(kv: torch.Tensor) -> None:
    """Raise ValueError unless `kv` ([..., blocks, 2, block_size, kv_heads, D + 16] uint8) lies
    over head-major memory, as `allocate_kv_cache` and `cache_from_rows` lay it out: a token's
    row follows the previous token's, a head's slab the previous head's. Called on every
    attention and KV-write launch over fp8, so only the three strides that tell it apart."""
    bs, heads, row = kv.shape[-3:]
    if (kv.stride(-1) != 1 or (bs > 1 and kv.stride(-3) != row)
            or (heads > 1 and kv.stride(-2) != bs * row)):
        raise ValueError(f"an fp8 KV cache must be head-major with transposed value slabs "
                         f"(token stride {row}, head stride {bs * row}), got strides "
                         f"{tuple(kv.stride())}; build it with allocate_kv_cache or "
                         "fp8.cache_from_rows")


def value_slabs(kv: torch.Tensor) -> torch.Tensor:
    """[..., blocks, kv_heads, block_size * (D + 16)]: a view of the value slabs of `kv`."""
    check_layout(kv)
    v = kv.select(-4, 1).transpose(-3, -2)  # [..., blocks, heads, block_size, row]
    return v.reshape(*v.shape[:-2], v.shape[-2] * v.shape[-1])


def rows_to_slabs(rows: torch.Tensor) -> torch.Tensor:
    """[..., block_size, kv_heads, D + 16] value rows -> [..., kv_heads, block_size * (D + 16)]
    transposed slabs (values d-major, then the scales, then zeros)."""
    bs, heads, row = rows.shape[-3:]
    dim = row - TAIL_BYTES
    per_head = rows.transpose(-3, -2)  # [..., heads, bs, row]
    lead = per_head.shape[:-2]
    values = per_head[..., :dim].transpose(-1, -2).reshape(*lead, dim * bs)
    scales = per_head[..., dim:dim + SCALE_BYTES].reshape(*lead, SCALE_BYTES * bs)
    pad = rows.new_zeros(*lead, (TAIL_BYTES - SCALE_BYTES) * bs)
    return torch.cat([values, scales, pad], dim=-1)


def slabs_to_rows(slabs: torch.Tensor, block_size: int) -> torch.Tensor:
    """The inverse of `rows_to_slabs`: [..., kv_heads, block_size * (D + 16)] ->
    [..., block_size, kv_heads, D + 16] value rows."""
    lead, heads = slabs.shape[:-2], slabs.shape[-2]
    dim = slabs.shape[-1] // block_size - TAIL_BYTES
    values = slabs[..., :dim * block_size].unflatten(-1, (dim, block_size)).transpose(-1, -2)
    scales = slabs[..., dim * block_size:(dim + SCALE_BYTES) * block_size].unflatten(
        -1, (block_size, SCALE_BYTES))
    pad = slabs.new_zeros(*lead, heads, block_size, TAIL_BYTES - SCALE_BYTES)
    return torch.cat([values, scales, pad], dim=-1).transpose(-3, -2)


def cache_from_rows(rows: torch.Tensor) -> torch.Tensor:
    """[..., blocks, 2, block_size, kv_heads, D + 16] rows (keys and values alike) -> a cache
    of the same logical shape in this format (head-major memory, transposed value slabs)."""
    out = rows.transpose(-3, -2).contiguous()  # [..., blocks, 2, heads, bs, row]
    v_rows = rows.select(-4, 1)
    out.select(-4, 1).copy_(rows_to_slabs(v_rows).view(out.select(-4, 1).shape))
    return out.transpose(-3, -2)


def rows_from_cache(kv: torch.Tensor) -> torch.Tensor:
    """The inverse of `cache_from_rows`: plain rows, contiguous (token-major)."""
    rows = kv.contiguous()
    rows.select(-4, 1).copy_(slabs_to_rows(value_slabs(kv), kv.shape[-3]))
    return rows


def write_rows(kv_layer: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
               k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
    """Store [T, kv_heads, D + 16] key and value rows at slots (blocks[t], offsets[t]) of one
    layer ([blocks, 2, block_size, kv_heads, D + 16]); the slots must be distinct."""
    slabs = value_slabs(kv_layer)
    bs, heads, row = kv_layer.shape[-3:]
    dim = row - TAIL_BYTES
    kv_layer[blocks, 0, offsets] = k_rows
    b, h = blocks[:, None, None], torch.arange(heads, device=blocks.device)[None, :, None]
    cols = (torch.arange(dim, device=blocks.device) * bs)[None, None, :] + offsets[:, None, None]
    slabs[b, h, cols] = v_rows[..., :dim]
    first = dim * bs + offsets * SCALE_BYTES
    scale_cols = first[:, None, None] + torch.arange(SCALE_BYTES, device=blocks.device)
    slabs[b, h, scale_cols] = v_rows[..., dim:dim + SCALE_BYTES]
