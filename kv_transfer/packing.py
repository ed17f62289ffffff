"""Gathering a request's KV blocks into one contiguous buffer, and scattering it back.

A request's KV for layers [l0, l1) is `kv_cache[l0:l1, block_ids]`: one index_select along the
block dimension packs it as [l1 - l0, len(block_ids), 2, block_size, num_kv_heads, head_dim],
and one index_copy_ writes such a buffer into (other) block ids of another cache. A KV shard
(heads [h0, h1) of those layers) is the same single gather on the strided view
`kv_cache[l0:l1, ..., h0:h1, :]` into a contiguous [.., h1 - h0, head_dim] buffer, and the same
single scatter back into such a view of the receiver's cache. Never one copy or one message per
block or per head. Both work on CPU and CUDA (on the caller's current stream).
"""

from __future__ import annotations

import torch


def packed_shape(kv_cache: torch.Tensor, num_blocks: int, layers: slice,
                 heads: slice | None = None) -> tuple[int, ...]:
    """Shape of the buffer holding `num_blocks` blocks of `layers` (and `heads`; all: None)."""
    view = _view(kv_cache, layers, heads)
    return (view.shape[0], num_blocks, *view.shape[2:])


def pack_blocks(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layers: slice,
    out: torch.Tensor | None = None,
    heads: slice | None = None,
) -> torch.Tensor:
    """Gather blocks `block_ids` of `layers` (and KV `heads`) into a contiguous buffer (or
    into `out`): one index_select."""
    _check_block_ids(kv_cache, block_ids)
    source = _view(kv_cache, layers, heads)
    if out is None:
        return torch.index_select(source, 1, block_ids)
    _check_buffer(out, packed_shape(kv_cache, block_ids.numel(), layers, heads), kv_cache, "out")
    return torch.index_select(source, 1, block_ids, out=out)


def unpack_blocks(
    kv_cache: torch.Tensor,
    block_ids: torch.Tensor,
    layers: slice,
    buffer: torch.Tensor,
    heads: slice | None = None,
) -> None:
    """Scatter a packed `buffer` into blocks `block_ids` of `layers` (and KV `heads`), in place:
    one index_copy_ (through a strided view when `heads` is a part of the cache's)."""
    _check_block_ids(kv_cache, block_ids)
    _check_buffer(buffer, packed_shape(kv_cache, block_ids.numel(), layers, heads), kv_cache,
                  "buffer")
    _view(kv_cache, layers, heads).index_copy_(1, block_ids, buffer)


def _view(kv_cache: torch.Tensor, layers: slice, heads: slice | None) -> torch.Tensor:
    """kv_cache[layers, :, :, :, heads] without a copy."""
    start, stop = _layer_bounds(kv_cache, layers)
    view = kv_cache[start:stop]
    if heads is None:
        return view
    if heads.step not in (None, 1):
        raise ValueError(f"heads must be a contiguous slice, got step {heads.step}")
    first, end, _ = heads.indices(kv_cache.shape[4])
    if end <= first:
        raise ValueError(f"heads {heads} selects no head of a cache of {kv_cache.shape[4]} "
                         "KV heads")
    return view[:, :, :, :, first:end]


def _layer_bounds(kv_cache: torch.Tensor, layers: slice) -> tuple[int, int]:
    if layers.step not in (None, 1):
        raise ValueError(f"layers must be a contiguous slice, got step {layers.step}")
    start, stop, _ = layers.indices(kv_cache.shape[0])
    if stop <= start:
        raise ValueError(f"layers {layers} selects no layer of a {kv_cache.shape[0]}-layer cache")
    return start, stop


def _check_block_ids(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    if block_ids.dim() != 1 or block_ids.dtype != torch.int64:
        raise ValueError(
            f"block_ids must be a 1-D int64 tensor, got {block_ids.dim()}-D {block_ids.dtype}"
        )
    if block_ids.device != kv_cache.device:
        raise ValueError(
            f"block_ids are on {block_ids.device} but kv_cache is on {kv_cache.device}"
        )


def _check_buffer(
    buffer: torch.Tensor, shape: tuple[int, ...], kv_cache: torch.Tensor, name: str
) -> None:
    if tuple(buffer.shape) != shape or buffer.dtype != kv_cache.dtype:
        raise ValueError(
            f"{name} must be {kv_cache.dtype} of shape {shape}, "
            f"got {buffer.dtype} of shape {tuple(buffer.shape)}"
        )
    if buffer.device != kv_cache.device:
        raise ValueError(f"{name} is on {buffer.device} but kv_cache is on {kv_cache.device}")
