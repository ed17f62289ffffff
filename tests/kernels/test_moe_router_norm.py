"""The MoE router with the block's add + RMSNorm inside its launch
(`moe_router.router_route_normed`, used by `FusedMoE.forward_normed` at decode sizes on CUDA)
against the two steps it replaces: h = x + residual and RMSNorm(h) (the torch reference), then
the same fused router on RMSNorm(h).

Inputs are dyadic (x and the residual in eighths), so the sum of squares is exact in float32 in
any order: 1/rms, h and the normalized rows must equal the reference's bit for bit, and routing
them gives the plain router's logits, weights, ids and counts bit for bit. In Triton's
interpreter with fp16 and on CUDA with bf16 too; on CUDA also an engine-level check that the
MoE layer's normed forward equals the unfused one."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.test_moe_router import CASES, _skip_unsupported

pytestmark = pytest.mark.gpu


def _inputs(num_tokens: int, num_experts: int, hidden: int, dtype, device):
    def dyadic(*shape, scale):
        return (torch.randint(-8, 9, shape) / scale).to(dtype).to(device)

    x, residual = dyadic(num_tokens, hidden, scale=8), dyadic(num_tokens, hidden, scale=8)
    norm_w = dyadic(hidden, scale=4)
    router_w = dyadic(num_experts, hidden, scale=256)
    return x, residual, norm_w, router_w


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,hidden,top_k,renormalize,with_counts",
                         [CASES[0], CASES[2], CASES[5], CASES[7]])
def test_normed_router_equals_norm_then_router(device, dtype, num_tokens, num_experts, hidden,
                                               top_k, renormalize, with_counts):
    from engine.kernels.moe_router import router_route_normed, router_route_with_logits
    from engine.layers.norm import rms_norm

    _skip_unsupported(device, dtype)
    x, residual, norm_w, router_w = _inputs(num_tokens, num_experts, hidden, dtype, device)
    eps = 1e-6
    h_ref = (x.float() + residual.float()).to(dtype)
    normed_ref = rms_norm(h_ref, norm_w, eps)
    start = torch.randint(0, 5, (num_experts,), dtype=torch.int64, device=device)
    counts = start.clone() if with_counts else None
    weights, ids, normed, h = router_route_normed(x, residual, norm_w, eps, router_w, top_k,
                                                  renormalize, counts)
    assert torch.equal(h, h_ref) and torch.equal(normed, normed_ref)
    ref_counts = start.clone() if with_counts else None
    ref_weights, ref_ids, _ = router_route_with_logits(normed_ref, router_w, top_k, renormalize,
                                                       ref_counts)
    assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights)
    if with_counts:
        assert torch.equal(counts, ref_counts)


def test_normed_router_checks_its_inputs(device):
    from engine.kernels.moe_router import router_route_normed

    x, residual, norm_w, router_w = _inputs(2, 8, 64, torch.float16, device)
    with pytest.raises(ValueError, match="residual"):
        router_route_normed(x, residual[:1], norm_w, 1e-6, router_w, 2, True)
    with pytest.raises(ValueError, match="norm_weight"):
        router_route_normed(x, residual, norm_w[:32], 1e-6, router_w, 2, True)


def test_moe_layer_normed_forward_equals_unfused(cuda):
    """FusedMoE.forward_normed (the fused launch) against norm then forward on the same layer:
    with dyadic x and residual both normalize to the same bits, so h and the output are equal."""
    from engine.layers.moe import FusedMoE
    from engine.layers.norm import RMSNorm
    from engine.parallel import ParallelContext

    torch.manual_seed(0)
    layer = FusedMoE(256, 96, 16, 4, ParallelContext.single(), renormalize=True).cuda()
    for p in layer.parameters():
        p.data = (torch.randn_like(p, dtype=torch.float32) * 0.05).to(torch.bfloat16)
    norm = RMSNorm(256, 1e-6).cuda().to(torch.bfloat16)
    norm.weight.data = (torch.rand(256, device="cuda") + 0.5).to(torch.bfloat16)
    x, residual, _, _ = _inputs(2, 1, 256, torch.bfloat16, "cuda")
    out, h = layer.forward_normed(x, residual, norm)
    normed_ref, h_ref = norm(x, residual)
    assert torch.equal(h, h_ref)
    torch.testing.assert_close(out, layer(normed_ref), rtol=0, atol=0)
