"""The hand-off's gather and scatter (kv_transfer/packing.py) over an fp8 cache, whose memory is
head-major inside each block with transposed value slabs (engine/kv_cache/fp8.py) while its
shape is the usual one."""

from __future__ import annotations

import torch

from kv_transfer import pack_blocks, unpack_blocks


def test_pack_and_unpack_an_fp8_cache_over_head_major_memory():
    """The gather and scatter move whole (block, K or V, head) slabs, all heads or a slice of
    them (heterogeneous TP), so the receiver holds the sender's keys and values, value slabs
    included: read back as plain rows, the moved blocks are the sender's."""
    from engine.kv_cache.cache_tensor import allocate_kv_cache
    from engine.kv_cache.fp8 import cache_from_rows, quantize_rows, rows_from_cache
    from engine.models.config import ModelConfig

    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=128)
    rows = quantize_rows(torch.randn(3, 6, 2, 16, 2, 32))
    src = cache_from_rows(rows)
    dst = allocate_kv_cache(cfg, 8, 16, torch.float16, "cpu", kv_cache_dtype="fp8_e4m3")
    ids, into = torch.tensor([4, 0, 2]), torch.tensor([7, 1, 3])
    unpack_blocks(dst, into, slice(0, 3), pack_blocks(src, ids, slice(0, 3)))
    assert torch.equal(rows_from_cache(dst)[:, into], rows[:, ids])
    others = torch.ones(8, dtype=torch.bool)
    others[into] = False
    assert (dst[:, others] == 0).all()
    part = allocate_kv_cache(cfg, 8, 16, torch.float16, "cpu", num_kv_heads=1,
                             kv_cache_dtype="fp8_e4m3")
    packed = pack_blocks(src, ids, slice(1, 3), heads=slice(1, 2))
    unpack_blocks(part, into, slice(1, 3), packed)
    assert torch.equal(rows_from_cache(part)[1:3, into], rows[1:3, ids][:, :, :, :, 1:2])
