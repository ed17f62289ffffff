"""The Triton block scatter (the receiving end of a KV transfer) against torch's index_copy_:
a copy, so bit-identical; only the named blocks of the named layers change."""

from __future__ import annotations

import pytest
import torch

from engine.kernels.block_copy import scatter_blocks

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("layers,ids", [((0, 4), [3, 0, 7]), ((1, 3), [5]), ((2, 3), list(range(9)))])
def test_scatter_equals_index_copy(device, dtype, layers, ids):
    # [layers, blocks, 2, block_size, kv_heads, head_dim]; 2*16*3*40 = 3840 elements a block
    cache = torch.randn(4, 9, 2, 16, 3, 40, device=device).to(dtype)
    block_ids = torch.tensor(ids, device=device)
    start, stop = layers
    buffer = torch.randn(stop - start, len(ids), 2, 16, 3, 40, device=device).to(dtype)
    want = cache.clone()
    want[start:stop].index_copy_(1, block_ids, buffer)
    scatter_blocks(cache, block_ids, start, buffer)
    assert torch.equal(cache, want)


def test_block_larger_than_one_program(device):
    cache = torch.zeros(2, 4, 2, 16, 8, 128, device=device, dtype=torch.bfloat16)  # 32k a block
    buffer = torch.randn(2, 2, 2, 16, 8, 128, device=device).to(torch.bfloat16)
    scatter_blocks(cache, torch.tensor([2, 1], device=device), 0, buffer)
    assert torch.equal(cache[:, 2], buffer[:, 0]) and torch.equal(cache[:, 1], buffer[:, 1])
    assert not cache[:, 0].any() and not cache[:, 3].any()
