"""Triton paged attention (decode, prefill, mixed steps) against the torch backend in float32."""

from __future__ import annotations

import pytest
import torch

from engine.attention.metadata import AttentionMetadata
from tests.kernels.helpers import assert_close, paged_batch, reference_attention, split_groups

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (query heads, kv heads, head_dim): GQA groups of 4, 7 and 1, an odd head count, head_dim 80
HEADS = [(8, 2, 64), (14, 2, 128), (7, 7, 32), (12, 3, 80)]


def _skip_interpreted_bf16(device: str, dtype: torch.dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gets bf16 tl.dot wrong (checked on CUDA only)")


def _meta(batch, num_decode: int) -> AttentionMetadata:
    decode, prefill = split_groups(batch.group, num_decode)
    return AttentionMetadata(batch.slot_mapping, num_decode, decode, prefill)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_decode_matches_reference(device, dtype, heads, num_splits):
    from engine.kernels.decode_attention import decode_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = heads
    block_size = 16
    # on and just after block boundaries, a single token, and many blocks
    ctx_lens = [16, 17, 32, 33, 1, 15, 700, 1025]
    batch = paged_batch([1] * len(ctx_lens), ctx_lens, hkv, d, block_size, dtype, device)
    q = torch.randn(len(ctx_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, len(ctx_lens))
    out = torch.full_like(q, float("nan"))
    decode_attention(q, batch.kv_layer, meta.decode, d ** -0.5, out, num_splits=num_splits)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"decode {heads} splits={num_splits}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_with_cached_context_matches_reference(device, dtype, heads, block_size):
    from engine.kernels.prefill_attention import prefill_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = heads
    # chunks after 0, 5, a block, a block + 1 and many cached tokens; lengths across tiles
    q_lens = [1, 17, 16, 100, 300, 129]
    cached = [0, 5, 16, 17, 700, 0]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, block_size, dtype, device)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 0)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, batch.kv_layer, meta.prefill, d ** -0.5, out)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"prefill {heads} bs={block_size}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_backend_mixed_step_writes_kv_and_matches_reference(device, dtype):
    """Decodes then prefill chunks in one step through the backend: `forward` stores K/V at the
    slots (NaN there before) and attends over them."""
    from engine.kernels.attention_backend import TritonAttentionBackend

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = 8, 2, 64
    q_lens = [1, 1, 1, 40, 7]
    ctx_lens = [33, 16, 200, 40, 90]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, 16, dtype, device)
    num_tokens = sum(q_lens)
    blk, off = batch.slot_mapping // 16, batch.slot_mapping % 16
    k = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    v = torch.randn(num_tokens, hkv, d, device=device).to(dtype)
    batch.kv_layer[blk, 0, off] = float("nan")
    batch.kv_layer[blk, 1, off] = float("nan")
    batch.kv_clean[blk, 0, off] = k
    batch.kv_clean[blk, 1, off] = v
    q = torch.randn(num_tokens, hq, d, device=device).to(dtype)
    meta = _meta(batch, 3)
    out = TritonAttentionBackend().forward(q, k, v, batch.kv_layer, meta, d ** -0.5)
    assert torch.equal(batch.kv_layer[blk, 0, off], k) and torch.equal(batch.kv_layer[blk, 1, off], v)
    ref = reference_attention(q, batch.kv_clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, "mixed step")
