"""The fp8 KV cache (engine/kv_cache/fp8.py) through the Triton kernels: the fused RoPE + KV
write stores the reference's bytes, and decode / prefill attention over an fp8 cache match the
torch backend over the same cache (poisoned outside the live rows, so a stray read shows up)."""

from __future__ import annotations

import pytest
import torch

from engine.kv_cache.fp8 import FP8_MAX, dequantize_rows, quantize_rows
from tests.kernels.helpers import assert_close, paged_batch, reference_attention, split_groups
from tests.kernels.test_attention import HEADS, _meta, _skip_interpreted_bf16

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _fp8_layer(kv_poisoned: torch.Tensor, kv_clean: torch.Tensor) -> torch.Tensor:
    """The clean cache quantized, with every row the original poisoned as all-0xFF (NaN)."""
    layer = quantize_rows(kv_clean.float())
    dead = torch.isnan(kv_poisoned.float()).any(dim=-1)
    layer[dead] = 0xFF
    return layer


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
    layer = torch.zeros(8, 2, bs, hkv, d + 16, dtype=torch.uint8, device=device)
    rope_and_write_kv(q, k, v, cos, sin, positions, layer, slots)
    _, k_rot = apply_rope(q, k, cos, sin, positions)
    want = torch.zeros_like(layer)
    keep = slots >= 0
    write_kv(want, k_rot[keep], v[keep], slots[keep])
    got, want = layer.cpu(), want.cpu()
    same = (got == want).float().mean().item()
    assert same > 0.999, f"only {same:.4f} of the bytes equal the reference's"
    assert_close(dequantize_rows(got, torch.float32), dequantize_rows(want, torch.float32),
                 torch.float16, "fp8 rows")


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


def test_fp8_cache_is_allocated_head_major_with_the_plain_shape():
    from engine.kv_cache.cache_tensor import allocate_kv_cache, head_major_copy
    from engine.models.config import ModelConfig

    cfg = ModelConfig("llama", vocab_size=64, hidden_size=64, intermediate_size=128,
                      num_layers=3, num_heads=4, num_kv_heads=2, head_dim=32,
                      max_position_embeddings=128)
    fp8 = allocate_kv_cache(cfg, 5, 16, torch.float16, "cpu", kv_cache_dtype="fp8_e4m3")
    plain = allocate_kv_cache(cfg, 5, 16, torch.float16, "cpu")
    assert fp8.shape == (3, 5, 2, 16, 2, 48) and plain.shape == (3, 5, 2, 16, 2, 32)
    assert plain.is_contiguous() and not fp8.is_contiguous()
    assert fp8.transpose(3, 4).is_contiguous()  # a head's 16 rows of a block are contiguous
    assert fp8.stride(3) == 48 and fp8.stride(4) == 16 * 48
    assert head_major_copy(fp8.contiguous()).stride() == fp8.stride()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_head_major_fp8_cache_reads_and_writes_like_token_major(device, dtype):
    """The kernels address the cache through its strides: over head-major memory, decode and
    prefill attention give the same bits, and the fused RoPE write stores the same rows."""
    from engine.kernels.decode_attention import decode_attention
    from engine.kernels.prefill_attention import prefill_attention
    from engine.kernels.triton_ops import rope_and_write_kv
    from engine.kv_cache.cache_tensor import head_major_copy
    from engine.layers.rotary import RotaryEmbedding

    hq, hkv, d = 8, 2, 64
    q_lens, cached = [1, 1, 40, 17], [16, 33, 0, 20]
    ctx_lens = [q + c for q, c in zip(q_lens, cached)]
    batch = paged_batch(q_lens, ctx_lens, hkv, d, 16, dtype, device)
    token_major = _fp8_layer(batch.kv_layer, batch.kv_clean)
    head_major = head_major_copy(token_major)
    assert torch.equal(head_major, token_major) and head_major.stride() != token_major.stride()
    q = torch.randn(sum(q_lens), hq, d, device=device).to(dtype)
    meta = _meta(batch, 2)
    outs = []
    for layer in (token_major, head_major):
        dec = torch.full_like(q[:2], float("nan"))
        decode_attention(q[:2], layer, meta.decode, d ** -0.5, dec)
        pre = torch.full_like(q[2:], float("nan"))
        prefill_attention(q[2:], layer, meta.prefill, d ** -0.5, pre)
        outs.append((dec, pre))
    assert not outs[0][0].isnan().any() and not outs[0][1].isnan().any()
    assert torch.equal(outs[0][0], outs[1][0]), "decode differs over head-major memory"
    assert torch.equal(outs[0][1], outs[1][1]), "prefill differs over head-major memory"
    rope = RotaryEmbedding(d, 4096, 10000.0).to(device)
    k = torch.randn(9, hkv, d, device=device).to(dtype)
    v = torch.randn(9, hkv, d, device=device).to(dtype)
    positions = torch.arange(9, device=device)
    slots = torch.randperm(token_major.shape[0] * 16, device=device)[:9]
    written = []
    for layer in (torch.zeros_like(token_major), head_major_copy(torch.zeros_like(token_major))):
        rope_and_write_kv(q[:9], k, v, rope.cos, rope.sin, positions, layer, slots)
        written.append(layer)
    assert torch.equal(written[0], written[1])
