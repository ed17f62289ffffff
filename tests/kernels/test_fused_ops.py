"""Triton RMSNorm, add+RMSNorm, SiLU-and-mul, RoPE and RoPE + KV-cache write against the torch
reference ops, computed in float32."""

from __future__ import annotations

import pytest
import torch

from engine.attention.torch_ref import write_kv
from engine.layers.activation import silu_and_mul as silu_and_mul_ref
from engine.layers.norm import rms_norm as rms_norm_ref
from engine.layers.rotary import RotaryEmbedding, apply_rope_ref
from tests.kernels.helpers import assert_close

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 4096), (37, 576), (5, 1000)])
def test_rms_norm_and_add_rms_norm(device, dtype, shape):
    from engine.kernels import triton_ops

    x = torch.randn(shape, device=device).to(dtype)
    res = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    assert_close(triton_ops.rms_norm(x, w, 1e-5), rms_norm_ref(x.float(), w.float(), 1e-5),
                 dtype, "rms_norm")
    normed, new_res = triton_ops.add_rms_norm(x, res, w, 1e-5)
    summed = x.float() + res.float()
    assert_close(new_res, summed, dtype, "add_rms_norm residual")
    assert_close(normed, rms_norm_ref(summed, w.float(), 1e-5), dtype, "add_rms_norm")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 2 * 14336), (37, 2 * 1536), (3, 2 * 1000)])
def test_silu_and_mul(device, dtype, shape):
    from engine.kernels import triton_ops

    x = torch.randn(shape, device=device).to(dtype)
    assert_close(triton_ops.silu_and_mul(x), silu_and_mul_ref(x.float()), dtype, "silu_and_mul")


def _qkv(num_tokens, hq, hkv, d, dtype, device):
    """q, k, v as strided views of one fused projection output, like the model's."""
    qkv = torch.randn(num_tokens, (hq + 2 * hkv) * d, device=device).to(dtype)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    return q.view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, d)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64), (5, 5, 80)])
def test_rope(device, dtype, heads):
    from engine.kernels import triton_ops

    hq, hkv, d = heads
    rope = RotaryEmbedding(d, 8192, 500000.0).to(device)
    q, k, _ = _qkv(23, hq, hkv, d, dtype, device)
    positions = torch.randint(0, 8192, (23,), device=device)
    q_out, k_out = triton_ops.apply_rope(q, k, rope.cos, rope.sin, positions)
    q_ref, k_ref = apply_rope_ref(q.float(), k.float(), rope.cos, rope.sin, positions)
    assert_close(q_out, q_ref, dtype, "rope q")
    assert_close(k_out, k_ref, dtype, "rope k")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(32, 8, 128), (9, 3, 64)])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_rope_and_write_kv(device, dtype, heads, qk_norm):
    """Rotated k and raw v land at their slots, negative slots write nothing, every other
    slot keeps its old contents; with `qk_norm` (Qwen3) q and k are RMS-normalized per head
    before the rotation, in the same kernel."""
    from engine.kernels import triton_ops

    hq, hkv, d = heads
    num_tokens, num_blocks, block_size = 40, 9, 16
    rope = RotaryEmbedding(d, 4096, 10000.0).to(device)
    q, k, v = _qkv(num_tokens, hq, hkv, d, dtype, device)
    q, k = 3 * q, k / 3  # a norm that changes the scale
    positions = torch.randint(0, 4096, (num_tokens,), device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::7] = -1
    kv = torch.randn(num_blocks, 2, block_size, hkv, d, device=device).to(dtype)
    expected = kv.clone()
    norms = None
    q_in, k_in = q.float(), k.float()
    if qk_norm:
        norms = tuple((1 + 0.2 * torch.randn(d, device=device)).to(dtype) for _ in range(2))
        norms = (*norms, 1e-6)
        q_in, k_in = (rms_norm_ref(x, w.float(), 1e-6) for x, w in ((q_in, norms[0]),
                                                                     (k_in, norms[1])))
    q_ref, k_ref = apply_rope_ref(q_in, k_in, rope.cos, rope.sin, positions)
    keep = slots >= 0
    write_kv(expected, k_ref[keep].to(dtype), v[keep], slots[keep])
    q_out = triton_ops.rope_and_write_kv(q, k, v, rope.cos, rope.sin, positions, kv, slots,
                                         norms)
    assert_close(q_out, q_ref, dtype, "fused rope q")
    assert_close(kv, expected, dtype, "cache after fused write")
    blk, off = slots[keep] // block_size, slots[keep] % block_size
    assert torch.equal(kv[blk, 1, off], v[keep])
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[slots[keep]] = False
    flat, flat_exp = kv.transpose(1, 2).reshape(-1, 2 * hkv * d), expected.transpose(1, 2).reshape(-1, 2 * hkv * d)
    assert torch.equal(flat[untouched], flat_exp[untouched])
