"""The fused MoE router (engine/kernels/moe_router.py: the router's GEMV and the routing in one
launch, the last program to finish routes) against what the layer computed before it,
`route(F.linear(x, W), ...)`.

Inputs are dyadic (x in eighths, W in 256ths, few bits each), so x W^T is exact in fp32 in
any summation order: the kernel's logits must equal F.linear's bit for bit. The routing is
checked against a torch oracle (fp32 softmax, stable descending sort: ties to the lower expert
id), against the routing kernel (`moe_route.route`) on those logits (ids and counts equal,
weights bit for bit in the interpreter, within an ulp on CUDA: the fused kernel routes on a
smaller tile), and the counters against a bincount. Batch sizes 1 to 8; 8 (K split over
programs), 60, 64 and 128 experts; top-k 1, 2 and 8; hidden sizes off the strip width; a NaN
row; repeated launches (the ticket counter back at 0). In Triton's interpreter with fp16 (its
bf16 is unreliable, see test_fused_moe.py) and on CUDA with bf16 too; on CUDA also random
inputs against the fp32 product (an ulp at most), capture and replay in a CUDA graph, and the
MoE layer's router."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

# (tokens, experts, hidden, top_k, renormalize, with counts)
CASES = [
    (1, 128, 2048, 8, True, True),  # Qwen3-30B-A3B at batch 1
    (2, 128, 200, 8, False, False),
    (3, 60, 136, 2, True, True),
    (4, 60, 1000, 8, False, True),
    (5, 64, 72, 1, False, True),
    (8, 8, 4096, 2, True, True),  # Mixtral at batch 8: K split over 8 programs per expert
    (7, 8, 300, 1, True, False),
    (6, 64, 520, 2, True, True),
]


def _dyadic(num_tokens: int, num_experts: int, hidden: int, dtype, device):
    x = (torch.randint(-8, 9, (num_tokens, hidden)) / 8).to(dtype).to(device)
    w = (torch.randint(-16, 17, (num_experts, hidden)) / 256).to(dtype).to(device)
    return x, w


def _oracle(logits: torch.Tensor, top_k: int, renormalize: bool):
    """fp32 softmax and a stable descending sort (torch.topk's tie order is unspecified)."""
    probs = torch.softmax(logits.cpu(), dim=-1, dtype=torch.float32)
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = values[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids[:, :top_k]


def _skip_unsupported(device, dtype) -> None:
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter handles bf16 unreliably; bf16 runs on CUDA")


def _check_against_route(x, w, top_k, renormalize, with_counts, label):
    """Fused router vs route(F.linear(x, w)) on the same inputs; returns the fused outputs."""
    from engine.kernels import moe_route
    from engine.kernels.moe_router import router_route_with_logits

    num_experts = w.shape[0]
    start = torch.randint(0, 5, (num_experts,), dtype=torch.int64, device=x.device)
    counts = start.clone() if with_counts else None
    weights, ids, logits = router_route_with_logits(x, w, top_k, renormalize, counts)
    ref_logits = F.linear(x.float(), w.float()).to(x.dtype)  # exact: see the module docstring
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0, equal_nan=True, msg=label)
    ref_counts = start.clone() if with_counts else None
    ref_weights, ref_ids = moe_route.route(ref_logits, top_k, renormalize, ref_counts)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32, label
    assert torch.equal(ids, ref_ids), label
    # the same code on a smaller tile: bit for bit in the interpreter (numpy reduces each row
    # alike); on CUDA the softmax sum's order follows the tile's layout, so an ulp is allowed
    exact = x.device.type == "cpu"
    torch.testing.assert_close(weights, ref_weights, rtol=0 if exact else 1e-6,
                               atol=0 if exact else 1e-9, equal_nan=True, msg=label)
    if with_counts:
        assert torch.equal(counts, ref_counts), label
    return weights, ids, logits, counts, start


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_tokens,num_experts,hidden,top_k,renormalize,with_counts", CASES)
def test_router_matches_route_of_the_linear(device, dtype, num_tokens, num_experts, hidden,
                                            top_k, renormalize, with_counts):
    _skip_unsupported(device, dtype)
    x, w = _dyadic(num_tokens, num_experts, hidden, dtype, device)
    label = f"T={num_tokens} E={num_experts} H={hidden} k={top_k} {dtype}"
    weights, ids, logits, counts, start = _check_against_route(x, w, top_k, renormalize,
                                                               with_counts, label)
    oracle_weights, oracle_ids = _oracle(logits, top_k, renormalize)
    assert torch.equal(ids.cpu(), oracle_ids), label
    torch.testing.assert_close(weights.cpu(), oracle_weights, rtol=1e-5, atol=1e-7, msg=label)
    if with_counts:
        recount = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
        assert torch.equal(counts.cpu(), start.cpu() + recount), label


def test_nan_row_routes_like_route(device):
    """A NaN in one token's hidden state: that token's logits are all NaN, its ids 0..k-1 and
    weights NaN, as `route` gives; the other tokens are untouched, the counts stay in range."""
    from engine.kernels.moe_router import _TICKETS

    x, w = _dyadic(3, 60, 136, torch.float16, device)
    x[1, 17] = float("nan")
    weights, ids, logits, counts, _ = _check_against_route(x, w, 8, True, True, "NaN row")
    assert logits[1].isnan().all() and not logits[[0, 2]].isnan().any()
    assert ids[1].tolist() == list(range(8))
    assert weights[1].isnan().all() and not weights[[0, 2]].isnan().any()
    assert _TICKETS.get(x.device).item() == 0


def test_repeated_launches_reset_the_ticket_counter(device):
    """Each launch's last program puts the counter back to 0: launch after launch (other
    shapes and grids in between) routes correctly."""
    from engine.kernels.moe_router import _TICKETS

    for i, (num_tokens, num_experts, hidden, top_k) in enumerate(
            [(2, 64, 96, 2), (1, 8, 1100, 2), (2, 64, 96, 2), (8, 60, 40, 8)]):
        x, w = _dyadic(num_tokens, num_experts, hidden, torch.float16, device)
        _check_against_route(x, w, top_k, i % 2 == 0, True, f"launch {i}")
        assert _TICKETS.get(x.device).item() == 0, f"launch {i}"


@pytest.mark.parametrize("tile", [(2, 64, 2, 4, 1), (1, 32, 4, 8, 16)], ids=str)
def test_other_tiles_route_alike(device, tile):
    """Launch shapes the benchmark sweeps (experts per program, strip, K splits, warps,
    routing rows): the same logits and ids, weights within an ulp."""
    from engine.kernels.moe_router import RouterTile, router_route_with_logits

    x, w = _dyadic(3, 60, 136, torch.float16, device)
    weights, ids, logits = router_route_with_logits(x, w, 8, True, tile=RouterTile(*tile))
    ref_weights, ref_ids, ref_logits = router_route_with_logits(x, w, 8, True)
    assert torch.equal(logits, ref_logits) and torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-9)


def test_supports_and_bad_inputs(device):
    from engine.kernels.moe_router import MAX_TOKENS, router_route, supports

    x, w = _dyadic(2, 8, 64, torch.float16, device)
    assert supports(x, w, 2)
    assert not supports(x.float(), w.float(), 2)  # fp32 routers stay with cuBLAS
    assert not supports(torch.zeros(MAX_TOKENS + 1, 64, dtype=x.dtype, device=device), w, 2)
    assert not supports(x, w.to(torch.bfloat16), 2)
    assert not supports(torch.zeros(64, 2, dtype=x.dtype, device=device).t(), w, 2)
    with pytest.raises(ValueError, match="x must be"):
        router_route(torch.zeros(MAX_TOKENS + 1, 64, dtype=x.dtype, device=device), w, 2, True)
    with pytest.raises(ValueError, match="top_k"):
        router_route(x, w, 9, True)
    with pytest.raises(ValueError, match="expert_counts"):
        router_route(x, w, 2, True, torch.zeros(8, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="router_weight"):
        router_route(x, w[:, :32], 2, True)
    with pytest.raises(ValueError, match="router_weight"):
        router_route(x.float(), w.float(), 2, True)


@pytest.mark.parametrize("num_tokens,num_experts,hidden,top_k", [(1, 128, 2048, 8),
                                                                 (8, 8, 4096, 2)])
def test_random_inputs_within_an_ulp_of_the_fp32_product(cuda, num_tokens, num_experts, hidden, top_k):
    """Gaussian bf16 inputs: the fixed-order fp32 sum, rounded, lands within an ulp of the fp32
    product (cuBLAS's bf16 GEMM itself may round differently, reduced-precision split-K
    included), and the tokens are routed as the routing kernel routes those logits."""
    from engine.kernels import moe_route
    from engine.kernels.moe_router import router_route_with_logits

    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(num_experts, hidden, device="cuda", dtype=torch.bfloat16) * hidden ** -0.5
    weights, ids, logits = router_route_with_logits(x, w, top_k, True)
    ref = F.linear(x.float(), w.float())
    # an ulp, plus the fp32 sums' own rounding where the logit is a near-cancellation
    ulp = torch.finfo(torch.bfloat16).eps * ref.abs() + 1e-6 * F.linear(x.float().abs(),
                                                                         w.float().abs())
    assert ((logits.float() - ref).abs() <= ulp).all()
    ref_weights, ref_ids = moe_route.route(logits, top_k, True)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-9)


def test_graph_replay_routes_new_inputs(cuda):
    """Captured once (after an eager warm-up, as decode graphs are), replayed under new hidden
    states: right ids and weights each time, the counters summed, the ticket back at 0."""
    from engine.kernels.moe_router import _TICKETS, router_route

    x, w = _dyadic(4, 128, 2048, torch.bfloat16, "cuda")
    counts = torch.zeros(128, dtype=torch.int64, device="cuda")
    router_route(x, w, 8, True, counts)  # compile and allocate the counter outside the capture
    counts.zero_()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = router_route(x, w, 8, True, counts)
    assert counts.sum().item() == 0  # capture runs nothing
    recount = torch.zeros(128, dtype=torch.int64)
    for replay in range(3):
        x.copy_(_dyadic(4, 128, 2048, torch.bfloat16, "cuda")[0])
        graph.replay()
        ref_weights, ref_ids = _oracle(F.linear(x.float(), w.float()).to(x.dtype), 8, True)
        assert torch.equal(ids.cpu(), ref_ids), f"replay {replay}"
        torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-7)
        recount += torch.bincount(ids.flatten().cpu(), minlength=128)
        assert _TICKETS.get(x.device).item() == 0
    assert torch.equal(counts.cpu(), recount)


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_layer_router_takes_the_fused_kernel(cuda, num_tokens):
    """FusedMoE's gate on CUDA at decode sizes: the same ids, weights and counters as the path
    it replaced, route(F.linear(x, W))."""
    from engine.kernels import moe_router
    from engine.layers.moe import FusedMoE, route
    from engine.parallel import ParallelContext

    layer = FusedMoE(64, 32, 60, 4, ParallelContext(), renormalize=True)
    layer = layer.to(device="cuda", dtype=torch.bfloat16)
    x, w = _dyadic(num_tokens, 60, 64, torch.bfloat16, "cuda")
    layer.gate.weight.data.copy_(w)
    assert moe_router.supports(x, layer.gate.weight, 4)  # the layer takes the fused kernel
    weights, ids = layer.gate(x, layer.expert_counts)
    ref_counts = torch.zeros_like(layer.expert_counts)
    ref_weights, ref_ids = route(F.linear(x, w), 4, True, ref_counts)
    assert torch.equal(ids, ref_ids) and torch.equal(layer.expert_counts, ref_counts)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-9)
