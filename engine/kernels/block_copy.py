"""Scattering a packed buffer of KV blocks into a paged cache: the receiving end of a transfer.

`kv_transfer.packing.unpack_blocks` writes a buffer [layers, n, *block] into blocks `block_ids`
of layers [l0, l1) of the cache. torch's `index_copy_` does it at ~30% of the copy bandwidth;
each block of each layer is one contiguous run of bytes on both sides, so this kernel copies
them as such: one program per (layer, block, slice of the block), wide vector loads and stores.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_BLOCK = 4096  # elements per program


@triton.jit
def _scatter_kernel(cache_ptr, ids_ptr, buf_ptr, num_blocks, block_numel, cache_layer_stride,
                    cache_block_stride, layer_offset, BLOCK: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    index = tl.program_id(1)
    part = tl.program_id(2)
    block_id = tl.load(ids_ptr + index).to(tl.int64)
    offs = part * BLOCK + tl.arange(0, BLOCK)
    mask = offs < block_numel
    src = buf_ptr + (layer * num_blocks + index) * block_numel + offs
    dst = (cache_ptr + (layer + layer_offset) * cache_layer_stride
           + block_id * cache_block_stride + offs)
    tl.store(dst, tl.load(src, mask=mask), mask=mask)


def scatter_blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor, layer_start: int,
                   buffer: torch.Tensor) -> None:
    """kv_cache[layer_start + l, block_ids[i]] = buffer[l, i] for every l, i (shapes checked by
    the caller; the cache's blocks and the buffer must be contiguous)."""
    num_layers, num_blocks = buffer.shape[:2]
    block_numel = kv_cache[0, 0].numel()
    if not (buffer.is_contiguous() and kv_cache.stride(1) == block_numel
            and kv_cache[0, 0].is_contiguous()):
        raise ValueError("scatter_blocks needs a contiguous buffer and contiguous cache blocks")
    if num_blocks == 0:
        return
    grid = (num_layers, num_blocks, triton.cdiv(block_numel, _BLOCK))
    # receive threads run this: their current CUDA device need not be the cache's
    with torch.cuda.device(kv_cache.device) if kv_cache.is_cuda else contextlib.nullcontext():
        _scatter_kernel[grid](kv_cache, block_ids, buffer, num_blocks, block_numel,
                              kv_cache.stride(0), kv_cache.stride(1), layer_start, BLOCK=_BLOCK,
                              num_warps=4)
