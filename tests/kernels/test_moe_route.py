"""The one-launch MoE routing kernel (engine/kernels/moe_route.py) against torch: softmax in
fp32, the top-k with ties to the lower expert id, renormalised weights, and the expert-load
counters against a bincount. In Triton's interpreter (fp32, fp16 logits) and on CUDA (also
bf16: the interpreter's bf16 is unreliable, see test_fused_moe.py), over batch sizes 1 to 1000
and (experts, k) pairs including a non-power-of-two expert count; logits with exact ties, -inf
and huge values. On CUDA also: capture in a CUDA graph and replay under new logits, and the MoE
layer's routing with the kernels on against the torch reference path."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

ROUTERS = [(8, 2), (64, 1), (128, 8), (60, 4)]
GPU_ONLY_DTYPES = (torch.bfloat16,)
HUGE = {torch.float32: 1e30, torch.float16: 6e4, torch.bfloat16: 1e30}


def _logits(num_tokens: int, num_experts: int, dtype, device) -> torch.Tensor:
    """Random logits; every 4th row from row 0 integers in {0, 1, 2} (many exact ties), from
    row 1 half the experts at -inf, from row 2 a tie between two huge logits (first and last
    expert), from row 3 a single huge logit (the rest of the probabilities underflow to 0)."""
    x = torch.randn(num_tokens, num_experts) * 3
    x[0::4] = torch.randint(0, 3, x[0::4].shape).float()
    x[1::4, : num_experts // 2] = float("-inf")
    x[2::4, 0] = x[2::4, -1] = HUGE[dtype]
    x[3::4, num_experts // 3] = HUGE[dtype]
    return x.to(dtype).to(device)


def _reference(logits: torch.Tensor, top_k: int, renormalize: bool):
    """torch softmax (fp32) + a stable descending sort (torch.topk's tie order is unspecified:
    on the CPU, topk([.1, .3, .3, .2, .3], 3) gives ids [2, 4, 1])."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = values[:, :top_k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    assert torch.equal(torch.topk(probs, top_k, dim=-1).values, values[:, :top_k])
    return weights, ids[:, :top_k]


def _skip_unsupported(device, dtype) -> None:
    if device == "cpu" and dtype in GPU_ONLY_DTYPES:
        pytest.skip("Triton's interpreter handles bf16 unreliably; bf16 runs on CUDA")


def _check(logits, top_k, renormalize, weights, ids, label: str) -> None:
    ref_weights, ref_ids = _reference(logits.cpu(), top_k, renormalize)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32, label
    assert torch.equal(ids.cpu(), ref_ids), label
    assert not weights.isnan().any(), label
    # tl.exp on CUDA is ex2-based: a few ulps from torch's expf, never a different ranking here
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-7, msg=label)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_experts,top_k", ROUTERS)
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 1000])
def test_route_matches_torch(device, dtype, num_tokens, num_experts, top_k):
    from engine.kernels.moe_route import route

    _skip_unsupported(device, dtype)
    logits = _logits(num_tokens, num_experts, dtype, device)
    start = torch.randint(0, 5, (num_experts,), dtype=torch.int64, device=device)
    counts = start.clone()
    renormalize = top_k > 1 and num_tokens % 2 == 1  # both settings across the batch sizes
    weights, ids = route(logits, top_k, renormalize, counts)
    label = f"T={num_tokens} E={num_experts} k={top_k} {dtype}"
    _check(logits, top_k, renormalize, weights, ids, label)
    recount = torch.bincount(ids.flatten().cpu(), minlength=num_experts)
    assert torch.equal(counts.cpu(), start.cpu() + recount), label


def test_ties_go_to_the_lower_expert_id(device):
    from engine.kernels.moe_route import route

    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, -1.0, 0.0, 0.0]], device=device)
    weights, ids = route(logits, 5, renormalize=False)
    assert ids.tolist() == [[1, 2, 4, 0, 3]]
    assert weights[0, 0] == weights[0, 1] == weights[0, 2] > weights[0, 3] == weights[0, 4]


def test_nan_logits_still_give_valid_distinct_ids(device):
    """NaN ranks first as in torch.topk: the ids stay in range (the counters' atomics too)."""
    from engine.kernels.moe_route import route

    logits = torch.full((2, 8), float("nan"), device=device)
    logits[1] = torch.arange(8.0)
    counts = torch.zeros(8, dtype=torch.int64, device=device)
    weights, ids = route(logits, 3, True, counts)
    assert ids.tolist() == [[0, 1, 2], [7, 6, 5]]
    assert weights[0].isnan().all() and not weights[1].isnan().any()
    assert counts.tolist() == [1, 1, 1, 0, 0, 1, 1, 1]


def test_weights_do_not_depend_on_the_batch(device):
    """A token routed alone and inside a batch of 300 gets the same bits."""
    from engine.kernels.moe_route import route

    logits = _logits(300, 128, torch.float32, device)
    weights, ids = route(logits, 8, True)
    for t in (0, 5, 299):
        alone_w, alone_ids = route(logits[t:t + 1].clone(), 8, True)
        assert torch.equal(alone_w[0], weights[t]) and torch.equal(alone_ids[0], ids[t])


def test_bad_inputs_raise_value_errors_naming_the_field():
    pytest.importorskip("triton")
    from engine.kernels.moe_route import route

    with pytest.raises(ValueError, match="top_k"):
        route(torch.zeros(2, 8), 9, True)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.zeros(2, 64), 17, True)
    with pytest.raises(ValueError, match="experts"):
        route(torch.zeros(2, 513), 2, True)
    with pytest.raises(ValueError, match="router_logits"):
        route(torch.zeros(2, 8, dtype=torch.int64), 2, True)
    with pytest.raises(ValueError, match="expert_counts"):
        route(torch.zeros(2, 8), 2, True, torch.zeros(8, dtype=torch.int32))


def test_graph_replay_routes_new_logits(cuda):
    from engine.kernels.moe_route import route

    static = _logits(64, 128, torch.bfloat16, "cuda")
    counts = torch.zeros(128, dtype=torch.int64, device="cuda")
    route(static, 8, True, counts)  # compile outside the capture
    counts.zero_()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        weights, ids = route(static, 8, True, counts)
    assert counts.sum().item() == 0  # capture runs nothing
    recount = torch.zeros(128, dtype=torch.int64)
    for _ in range(3):
        static.copy_(_logits(64, 128, torch.bfloat16, "cuda"))
        graph.replay()
        _check(static, 8, True, weights, ids, "graph replay")
        recount += torch.bincount(ids.flatten().cpu(), minlength=128)
    assert torch.equal(counts.cpu(), recount)


@pytest.mark.parametrize("num_tokens", [1, 33])
def test_layer_routing_matches_the_reference_path(cuda, num_tokens):
    """FusedMoE on CUDA: the kernel's routing (ids, counters, output) against the torch path
    with the kernels switched off."""
    from engine.kernels import dispatch
    from engine.layers.moe import FusedMoE
    from engine.parallel import ParallelContext

    layer = FusedMoE(64, 32, 60, 4, ParallelContext(), renormalize=True).to("cuda")
    for p in (layer.gate.weight, layer.w13, layer.w2):
        p.data.normal_(std=0.2)
    x = torch.randn(num_tokens, 64, device="cuda")
    routed = []
    layer.gate.register_forward_hook(lambda _m, _i, out: routed.append(out))
    out = layer(x)
    kernel_counts = layer.expert_counts.clone()
    layer.expert_counts.zero_()
    dispatch.use_triton(False)
    try:
        ref = layer(x)
    finally:
        dispatch.use_triton(True)
    assert torch.equal(routed[0][1], routed[1][1])
    torch.testing.assert_close(routed[0][0], routed[1][0], rtol=1e-5, atol=1e-7)
    assert torch.equal(kernel_counts, layer.expert_counts)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
