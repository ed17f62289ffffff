"""The one-token GEMV kernel against F.linear in float32, and the dispatch rule that decides
where it replaces cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import assert_close

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1536, 4096), (37, 100), (5, 1030), (513, 576)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_gemv_matches_linear(device, dtype, shape, bias):
    from engine.kernels.gemv import gemv

    n, k = shape
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    x = torch.randn(1, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert_close(gemv(x, w, b), ref, dtype, f"gemv {shape}")


def test_gemv_rejects_mismatched_features(device):
    from engine.kernels.gemv import gemv

    w = torch.randn(8, 16, device=device).to(torch.bfloat16)
    with pytest.raises(ValueError, match="features"):
        gemv(torch.randn(1, 15, device=device).to(torch.bfloat16), w)


def test_dispatch_uses_gemv_only_where_it_wins(device):
    from engine.kernels.gemv import MAX_WEIGHT_ELEMENTS, supports

    bf16 = torch.bfloat16
    small = torch.empty(4096, 4096, dtype=bf16, device=device)
    assert supports(torch.empty(1, 4096, dtype=bf16, device=device), small)
    assert not supports(torch.empty(2, 4096, dtype=bf16, device=device), small)  # batch > 1
    assert not supports(torch.empty(1, 4096, device=device), small.float())  # fp32: cuBLAS
    big = torch.empty(MAX_WEIGHT_ELEMENTS // 4096 + 1, 4096, dtype=bf16, device=device)
    assert not supports(torch.empty(1, 4096, dtype=bf16, device=device), big)
