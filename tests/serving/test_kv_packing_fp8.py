"""The hand-off's gather and scatter (kv_transfer/packing.py) over an fp8 cache, whose memory is
head-major inside each block (engine/kv_cache/cache_tensor.py) while its shape is the usual one."""

from __future__ import annotations

import torch

from kv_transfer import pack_blocks, unpack_blocks


def test_pack_and_unpack_an_fp8_cache_over_head_major_memory():
    """An fp8 cache is a transposed view of head-major memory (allocate_kv_cache): the
    hand-off's gather and scatter move its logical blocks, all heads or a slice of them, into
    a cache of either memory order."""
    from engine.kv_cache.cache_tensor import allocate_kv_cache
    from engine.models.config import ModelConfig

    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=128)
    src = allocate_kv_cache(cfg, 6, 16, torch.float16, "cpu", kv_cache_dtype="fp8_e4m3")
    src.copy_(torch.randint(0, 255, src.shape, dtype=torch.uint8))
    dst = allocate_kv_cache(cfg, 8, 16, torch.float16, "cpu", kv_cache_dtype="fp8_e4m3")
    plain = dst.contiguous().zero_()  # token-major memory, the same logical shape
    ids, into = torch.tensor([4, 0, 2]), torch.tensor([7, 1, 3])
    for cache in (dst, plain):
        unpack_blocks(cache, into, slice(0, 3), pack_blocks(src, ids, slice(0, 3)))
        assert torch.equal(cache[:, into], src[:, ids])
    part = allocate_kv_cache(cfg, 8, 16, torch.float16, "cpu", num_kv_heads=1,
                             kv_cache_dtype="fp8_e4m3")
    packed = pack_blocks(src, ids, slice(1, 3), heads=slice(1, 2))
    unpack_blocks(part, into, slice(1, 3), packed)
    assert torch.equal(part[1:3, into], src[1:3, ids][:, :, :, :, 1:2])
