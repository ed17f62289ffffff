"""The fp8 KV cache (engine/kv_cache/fp8.py) through the Triton kernels: the fused RoPE + KV
write stores the reference's bytes, and decode / prefill attention over an fp8 cache match the
torch backend over the same cache (poisoned outside the live rows, so a stray read shows up:
the stale slots of a sequence's last block hold NaN bytes and NaN scales). The format helpers
(head-major memory, transposed value slabs) are checked against plain rows."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache import fp8
from engine.kv_cache.fp8 import FP8_MAX, dequantize_rows, quantize_rows
from tests.kernels.helpers import assert_close, paged_batch, reference_attention, split_groups
from tests.kernels.test_attention import HEADS, _meta, _skip_interpreted_bf16

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _fp8_layer(kv_poisoned: torch.Tensor, kv_clean: torch.Tensor) -> torch.Tensor:
    """The clean cache quantized, with every row the original poisoned as all-0xFF (NaN values,
    NaN scale), in the cache format."""
    rows = quantize_rows(kv_clean.float())
    rows[torch.isnan(kv_poisoned.float()).any(dim=-1)] = 0xFF
    return fp8.cache_from_rows(rows)


def test_quantized_rows_round_trip_within_e4m3_precision():
    x = torch.randn(64, 4, 128) * torch.logspace(-3, 3, 64)[:, None, None]
    x[0] = 0.0
    rows = quantize_rows(x)
    assert rows.dtype == torch.uint8 and rows.shape == (64, 4, 144)
    back = dequantize_rows(rows, torch.float32)
    assert torch.equal(back[0], x[0])
    rel = ((back - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)).amax()
    assert rel <= 2.0 ** -4, f"e4m3 keeps 3 mantissa bits; worst relative error {rel:.3g}"
    assert dequantize_rows(rows, torch.float32).abs().amax(-1).sub(
        x.abs().amax(-1)).abs().max() <= x.abs().amax() * 1e-6  # the max of a row is exact


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_write_stores_the_reference_bytes(device, dtype):
    from engine.attention.torch_ref import write_kv
    from engine.kernels.triton_ops import apply_rope, rope_and_write_kv
    from engine.layers.rotary import RotaryEmbedding

    _skip_interpreted_bf16(device, dtype)
    tokens, hq, hkv, d, bs = 37, 8, 2, 64, 16
    rope = RotaryEmbedding(d, 4096, 10000.0).to(device)
    cos, sin = rope.cos, rope.sin
    q = torch.randn(tokens, hq, d, device=device).to(dtype)
    k = (torch.randn(tokens, hkv, d, device=device) * 3).to(dtype)
    v = torch.randn(tokens, hkv, d, device=device).to(dtype)
    positions = torch.randint(0, 4000, (tokens,), device=device)
    slots = torch.randperm(8 * bs, device=device)[:tokens]
    slots[3] = -1  # a padded row writes nothing
    layer = fp8.cache_from_rows(torch.zeros(8, 2, bs, hkv, d + 16, dtype=torch.uint8,
                                            device=device))
    rope_and_write_kv(q, k, v, cos, sin, positions, layer, slots)
    _, k_rot = apply_rope(q, k, cos, sin, positions)
    want = torch.zeros_like(layer)
    keep = slots >= 0
    write_kv(want, k_rot[keep], v[keep], slots[keep])
    got, want = fp8.rows_from_cache(layer.cpu()), fp8.rows_from_cache(want.cpu())
    same = (got == want).float().mean().item()
    assert same > 0.999, f"only {same:.4f} of the bytes equal the reference's"
    assert_close(dequantize_rows(got, torch.float32), dequantize_rows(want, torch.float32),
                 torch.float16, "fp8 rows")
    written = torch.zeros(8, bs, dtype=torch.bool)
    written.view(-1)[slots[keep].cpu()] = True
    assert (got[~written.unsqueeze(1).expand(8, 2, bs)] == 0).all()  # nothing else


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", HEADS[:2] + HEADS[3:], ids=str)
def test_decode_over_fp8_matches_reference(device, dtype, heads):
    from engine.kernels.decode_attention import decode_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = heads
    ctx_lens = [16, 17, 1, 33, 700]
    batch = paged_batch([1] * len(ctx_lens), ctx_lens, hkv, d, 16, dtype, device)
    layer = _fp8_layer(batch.kv_layer, batch.kv_clean)
    q = torch.randn(len(ctx_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, len(ctx_lens))
    out = torch.full_like(q, float("nan"))
    decode_attention(q, layer, meta.decode, d ** -0.5, out)
    clean = dequantize_rows(quantize_rows(batch.kv_clean.float()), torch.float32)
    ref = reference_attention(q, clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"fp8 decode {heads}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_over_fp8_matches_reference(device, dtype):
    from engine.kernels.prefill_attention import prefill_attention

    _skip_interpreted_bf16(device, dtype)
    hq, hkv, d = 8, 2, 64
    q_lens, cached = [1, 17, 100, 129], [0, 5, 17, 300]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, 16, dtype, device)
    layer = _fp8_layer(batch.kv_layer, batch.kv_clean)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 0)
    out = torch.full_like(q, float("nan"))
    prefill_attention(q, layer, meta.prefill, d ** -0.5, out)
    clean = dequantize_rows(quantize_rows(batch.kv_clean.float()), torch.float32)
    ref = reference_attention(q, clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, "fp8 prefill")
    assert FP8_MAX == 448.0


@pytest.mark.parametrize("block_size", [8, 24, 64])
def test_value_runs_at_other_block_sizes(device, block_size):
    """The value loads take runs of keys that share a block (kv_tiles.values_chunk): 8 keys at
    block 8 and at 24 (not a power of two), and whole 64-key tiles inside one block of 64 (a
    tile smaller than the block: runs start mid-block); decode and prefill, partial last
    blocks poisoned."""
    from engine.kernels.decode_attention import decode_attention
    from engine.kernels.prefill_attention import prefill_attention

    dtype, hq, hkv, d = torch.float16, 8, 2, 64
    q_lens, cached = [1, 1, 40, 17], [16, 100, 0, 130]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, block_size, dtype, device)
    layer = _fp8_layer(batch.kv_layer, batch.kv_clean)
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 2)
    out = torch.full_like(q, float("nan"))
    decode_attention(q[:2], layer, meta.decode, d ** -0.5, out[:2], tile=(64, 4, 2))
    prefill_attention(q[2:], layer, meta.prefill, d ** -0.5, out[2:])
    clean = dequantize_rows(quantize_rows(batch.kv_clean.float()), torch.float32)
    ref = reference_attention(q, clean, meta, d ** -0.5)
    assert_close(out, ref, dtype, f"fp8 at block size {block_size}")


def test_fp8_cache_is_allocated_head_major_with_the_plain_shape():
    from engine.kv_cache.cache_tensor import allocate_kv_cache
    from engine.models.config import ModelConfig

    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=128)
    cache = allocate_kv_cache(cfg, 5, 16, torch.float16, "cpu", kv_cache_dtype="fp8_e4m3")
    plain = allocate_kv_cache(cfg, 5, 16, torch.float16, "cpu")
    assert cache.shape == (3, 5, 2, 16, 2, 48) and plain.shape == (3, 5, 2, 16, 2, 32)
    assert plain.is_contiguous() and not cache.is_contiguous()
    assert cache.transpose(3, 4).is_contiguous()  # one slab per (block, K or V, head)
    assert cache.stride(3) == 48 and cache.stride(4) == 16 * 48
    fp8.check_layout(cache)
    assert fp8.cache_from_rows(cache.contiguous()).stride() == cache.stride()


def test_value_slabs_are_transposed_rows_and_round_trip():
    """Value element d of slot t at d * block_size + t of its slab, the scales after the
    values; keys stay rows; rows -> cache -> rows is exact, and write_rows stores what
    cache_from_rows lays out."""
    bs, heads, d = 16, 3, 32
    rows = quantize_rows(torch.randn(2, 5, 2, bs, heads, d))  # [layers, blocks, 2, bs, H, D+16]
    cache = fp8.cache_from_rows(rows)
    fp8.check_layout(cache)
    assert cache.shape == rows.shape and torch.equal(fp8.rows_from_cache(cache), rows)
    slabs = fp8.value_slabs(cache[1])  # [blocks, heads, bs * (D + 16)]
    assert slabs.shape == (5, heads, bs * (d + 16))
    assert torch.equal(slabs[2, 1, 7 * bs + 5], rows[1, 2, 1, 5, 1, 7])
    assert torch.equal(slabs[2, 1, d * bs + 4 * 5:d * bs + 4 * 6], rows[1, 2, 1, 5, 1, d:d + 4])
    assert (slabs[..., (d + 4) * bs:] == 0).all()
    assert torch.equal(cache[1, 2, 0, 5, 1], rows[1, 2, 0, 5, 1])  # keys: plain rows
    layer = fp8.cache_from_rows(torch.zeros_like(rows[0]))
    blocks, offsets = torch.tensor([0, 4, 4, 2]), torch.tensor([3, 0, 15, 9])
    fp8.write_rows(layer, blocks, offsets, rows[0, blocks, 0, offsets], rows[0, blocks, 1, offsets])
    want = torch.zeros_like(rows[0])
    want[blocks, :, offsets] = rows[0, blocks, :, offsets]
    assert torch.equal(layer, fp8.cache_from_rows(want))


def test_token_major_fp8_memory_is_refused():
    """Rows laid out token-major are not the cache format: the kernels and the reference
    refuse them instead of reading values as rows."""
    from engine.attention.torch_ref import write_kv
    from engine.kernels.decode_attention import decode_attention

    batch = paged_batch([1], [20], 2, 32, 16, torch.float32, "cpu")
    rows = quantize_rows(batch.kv_clean.float())
    q = torch.randn(1, 4, 32)
    with pytest.raises(ValueError, match="head-major"):
        decode_attention(q, rows, _meta(batch, 1).decode, 1.0, torch.empty_like(q))
    with pytest.raises(ValueError, match="head-major"):
        write_kv(rows, torch.randn(2, 2, 32), torch.randn(2, 2, 32), torch.tensor([0, 1]))
