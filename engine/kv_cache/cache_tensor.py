"""The KV cache tensor of one engine rank, and how big it may be.

Layout `[num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim]` ("LBKVHD"): a block of
one layer holds its K then its V contiguously, and a request's KV for a layer (or a range of
layers) is `kv_cache[l0:l1, block_ids]` — a single gather packs it for transfer and a single
indexed copy unpacks it into other block ids on the receiver.

With `kv_cache_dtype: fp8_e4m3` the tensor is uint8 and its last dimension head_dim + 16
(engine/kv_cache/fp8.py). Its memory is head-major inside a block (`[..., 2, kv_heads,
block_size, head_dim + 16]`, one contiguous slab per (block, K or V, head), the value slabs
transposed) and the tensor is a transposed view of it with the same logical shape as above, so
the hand-off's gathers move whole slabs as before; the kernels read through strides and
`fp8.check_layout`. A bf16 row (2 x head_dim bytes) keeps the plain layout.

With tensor/pipeline parallelism a rank's cache holds its pipeline stage's layers only (layer
axis stage-local) and its tensor rank's KV heads only; `num_layers` / `num_kv_heads` say so.
"""

from __future__ import annotations

import torch

from engine.config import CacheConfig
from engine.kv_cache.fp8 import stored_head_dim
from engine.models.config import ModelConfig

KV_LAYOUT = "LBKVHD"


def storage_dtype(dtype: torch.dtype, kv_cache_dtype: str) -> torch.dtype:
    """The cache tensor's dtype: the model's ("auto"), or uint8 bytes for fp8 rows."""
    return dtype if kv_cache_dtype == "auto" else torch.uint8


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype,
                    num_layers: int | None = None, num_kv_heads: int | None = None,
                    kv_cache_dtype: str = "auto") -> int:
    """Bytes of one block over `num_layers` layers of `num_kv_heads` heads (default: all)."""
    elem = torch.tensor([], dtype=storage_dtype(dtype, kv_cache_dtype)).element_size()
    layers = num_layers or cfg.num_layers
    heads = num_kv_heads or cfg.num_kv_heads
    return layers * 2 * block_size * heads * stored_head_dim(cfg.head_dim, kv_cache_dtype) * elem


def num_blocks_to_allocate(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype,
                           device: str, kv_heads_per_rank: int | None = None,
                           num_layers: int | None = None) -> int:
    """Fixed count if configured; else a share of free GPU memory, or `cpu_kv_cache_bytes`.

    `kv_heads_per_rank` / `num_layers` size a block of one rank (its heads, its stage's layers).
    """
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = bytes_per_block(cfg, cache.block_size, dtype, num_layers, kv_heads_per_rank,
                                cache.kv_cache_dtype)
    if device == "cuda":
        free_bytes, total_bytes = torch.cuda.mem_get_info()
        budget = free_bytes - (1 - cache.gpu_memory_utilization) * total_bytes
    else:
        budget = cache.cpu_kv_cache_bytes
    num_blocks = int(budget // per_block)
    if num_blocks < 1:
        raise ValueError(
            f"no room for a single KV block ({per_block} bytes); lower the model size or "
            "raise gpu_memory_utilization / cpu_kv_cache_bytes")
    return num_blocks


def allocate_kv_cache(cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: str, num_kv_heads: int | None = None,
                      num_layers: int | None = None, kv_cache_dtype: str = "auto"
                      ) -> torch.Tensor:
    """Zero-filled, so padded reads of unused slots never see NaN bit patterns (an fp8 row of
    zeros is value 0 with scale 0)."""
    heads = num_kv_heads or cfg.num_kv_heads
    layers = num_layers or cfg.num_layers
    row = stored_head_dim(cfg.head_dim, kv_cache_dtype)
    kind = storage_dtype(dtype, kv_cache_dtype)
    if kv_cache_dtype == "auto":
        return torch.zeros(layers, num_blocks, 2, block_size, heads, row, dtype=kind,
                           device=device)
    head_major = torch.zeros(layers, num_blocks, 2, heads, block_size, row, dtype=kind,
                             device=device)
    return head_major.transpose(3, 4)  # the LBKVHD shape over head-major memory

