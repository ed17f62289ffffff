"""The one-token GEMV kernel against F.linear in float32, its fused prologues (SiLU-and-mul;
RMSNorm with and without the residual add) against the unfused torch ops, and the dispatch rules
that decide where it replaces cuBLAS."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import assert_close

pytestmark = pytest.mark.gpu
# In Triton's interpreter the cost grows with the number of programs (BLOCK_N rows each), not with
# what the kernel does differently: the model-sized row counts run on CUDA only; the interpreter
# takes fewer rows at the same K (the same number of BLOCK_K strips, the same prologue).
MODEL_ROWS = os.environ.get("TRITON_INTERPRET") != "1"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1536 if MODEL_ROWS else 96, 4096), (37, 100), (5, 1030),
                                   (513, 576)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_matches_linear(device, dtype, shape, bias):
    from engine.kernels.gemv import gemv

    n, k = shape
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert_close(gemv(x, w, b), ref, dtype, f"gemv {shape}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(260, 3584), (37, 100), (513, 1030)])
def test_silu_and_mul_gemv(device, dtype, shape):
    from engine.kernels.gemv import silu_and_mul_gemv
    from engine.layers.activation import silu_and_mul

    n, k = shape
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x = (2 * torch.randn(1, 2 * k, device=device)).to(dtype)
    ref = F.linear(silu_and_mul(x.float()), w.float())
    assert_close(silu_and_mul_gemv(x, w), ref, dtype, f"silu_and_mul_gemv {shape}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(388 if MODEL_ROWS else 68, 4096), (37, 100), (513, 576)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
def test_rms_norm_gemv(device, dtype, shape, with_residual):
    from engine.kernels.gemv import rms_norm_gemv
    from engine.layers.norm import rms_norm

    n, k = shape
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    g = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
    x = (3 * torch.randn(1, k, device=device)).to(dtype)
    res = torch.randn(1, k, device=device).to(dtype) if with_residual else None
    h = x.float() + res.float() if with_residual else x.float()
    ref = F.linear(rms_norm(h, g.float(), 1e-5), w.float(), b.float())
    out, new_res = rms_norm_gemv(x, res, g, 1e-5, w, b)
    assert_close(out, ref, dtype, f"rms_norm_gemv {shape}")
    assert new_res.dtype == dtype
    assert_close(new_res, h, dtype, "new residual")  # rounded once to the dtype
    if device == "cuda":  # round-to-nearest-even like torch (the interpreter truncates)
        assert torch.equal(new_res, h.to(dtype))


def test_fused_gemv_close_to_unfused_kernels(device):
    """The fused prologues round where the unfused ops store: results agree to bf16 rounding."""
    from engine.kernels import dispatch

    dtype, n, k = torch.bfloat16, 96, 512
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    g = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
    x, res = torch.randn(2, 1, k, device=device).to(dtype)
    fused, fused_res = dispatch.rms_norm_linear(x, res, g, 1e-6, w)
    unfused = F.linear(dispatch.add_rms_norm(x, res, g, 1e-6)[0], w)
    assert torch.equal(fused_res, dispatch.add_rms_norm(x, res, g, 1e-6)[1])
    assert_close(fused, unfused.float(), dtype, "norm prologue vs add_rms_norm + linear")
    gate_up = torch.randn(1, 2 * k, device=device).to(dtype)
    w_down = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    assert_close(dispatch.silu_and_mul_linear(gate_up, w_down),
                 F.linear(dispatch.silu_and_mul(gate_up), w_down).float(), dtype,
                 "silu prologue vs silu_and_mul + linear")


def test_gemv_rejects_mismatched_features(device):
    from engine.kernels.gemv import gemv, silu_and_mul_gemv

    w = torch.randn(8, 16, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        gemv(torch.randn(1, 15, device=device).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="features"):
        silu_and_mul_gemv(torch.randn(1, 30, device=device).to(torch.bfloat16), w)
    with pytest.raises(ValueError, match="even"):
        silu_and_mul_gemv(torch.randn(1, 33, device=device).to(torch.bfloat16), w)


def test_dispatch_uses_gemv_only_where_it_wins(device):
    from engine.kernels.gemv import MAX_FUSED_SILU_ELEMENTS, MAX_WEIGHT_ELEMENTS, supports

    bf16 = torch.bfloat16
    small = torch.empty(4096, 4096, dtype=bf16, device=device)
    assert supports(torch.empty(1, 4096, dtype=bf16, device=device), small)
    assert not supports(torch.empty(2, 4096, dtype=bf16, device=device), small)  # batch > 1
    assert not supports(torch.empty(1, 4096, device=device), small.float())  # fp32: cuBLAS
    big = torch.empty(MAX_WEIGHT_ELEMENTS // 4096 + 1, 4096, dtype=bf16, device=device)
    assert not supports(torch.empty(1, 4096, dtype=bf16, device=device), big)
    down = torch.empty(4096, 14336, dtype=bf16, device=device)  # Llama-3-8B's down projection
    assert not supports(torch.empty(1, 14336, dtype=bf16, device=device), down)
    assert supports(torch.empty(1, 14336, dtype=bf16, device=device), down,
                    MAX_FUSED_SILU_ELEMENTS)
