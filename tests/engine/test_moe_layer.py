"""The MoE layer's torch reference against a naive dense one (every expert for every token,
weighted by the routing), and its checkpoint loading in both expert layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from engine.layers.moe import FusedMoE, fused_experts_ref, select_experts
from engine.parallel import ParallelContext

HIDDEN, INTER, EXPERTS = 32, 19, 8


def dense_reference(x, w13, w2, topk_weights, topk_ids):
    """Every expert on every token; the routing keeps each token's top-k, weighted."""
    gate, up = torch.einsum("th,eih->eti", x, w13).chunk(2, dim=-1)
    per_expert = torch.einsum("eti,ehi->eth", F.silu(gate) * up, w2)  # [E, T, H]
    routing = torch.zeros(x.shape[0], w13.shape[0], dtype=torch.float32)
    routing.scatter_(1, topk_ids, topk_weights)
    return torch.einsum("te,eth->th", routing, per_expert.float()).to(x.dtype)


def random_experts(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) * 0.2
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) * 0.2
    return w13, w2


@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64, 257])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_matches_dense(top_k, num_tokens, renormalize):
    w13, w2 = random_experts()
    x = torch.randn(num_tokens, HIDDEN, generator=torch.Generator().manual_seed(num_tokens))
    logits = torch.randn(num_tokens, EXPERTS, generator=torch.Generator().manual_seed(1))
    weights, ids = select_experts(logits, top_k, renormalize)
    ours = fused_experts_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(ours, dense_reference(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_experts_without_tokens_cost_nothing_and_change_nothing():
    w13, w2 = random_experts()
    x = torch.randn(33, HIDDEN)
    ids = torch.tensor([[1, 6]] * 33)  # experts 0, 2-5 and 7 get no token
    weights = torch.full((33, 2), 0.5)
    poisoned_w13, poisoned_w2 = w13.clone(), w2.clone()
    for unused in (0, 2, 3, 4, 5, 7):
        poisoned_w13[unused] = float("nan")
        poisoned_w2[unused] = float("nan")
    ours = fused_experts_ref(x, poisoned_w13, poisoned_w2, weights, ids)
    torch.testing.assert_close(ours, dense_reference(x, w13, w2, weights, ids),
                               rtol=1e-5, atol=1e-5)


def test_routing_is_softmax_in_fp32_then_topk_then_optional_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.bfloat16)
    weights, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits.float(), dim=-1)
    assert weights.dtype == torch.float32 and ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, probs[:, :2])
    weights, _ = select_experts(logits, 2, renormalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1))


def _layer(**kwargs) -> FusedMoE:
    return FusedMoE(HIDDEN, INTER, EXPERTS, 2, ParallelContext.single(), renormalize=True,
                    **kwargs)


class _SharedMLP(torch.nn.Module):
    """A shared expert shaped as FusedMoE expects (LlamaMLP's gate_up_proj / down_proj)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        single = ParallelContext.single()
        self.gate_up_proj = MergedColumnParallelLinear(HIDDEN, {"gate": size, "up": size}, single)
        self.down_proj = RowParallelLinear(size, HIDDEN, single)
        for linear in (self.gate_up_proj, self.down_proj):
            linear.weight.data.normal_(0.0, 0.2)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def test_layer_forward_matches_dense_with_gated_shared_expert():
    shared = _SharedMLP()
    layer = _layer(shared_expert=shared, shared_expert_gate=True)
    w13, w2 = random_experts()
    layer.w13.data.copy_(w13)
    layer.w2.data.copy_(w2)
    layer.gate.weight.data.normal_()
    layer.shared_expert_gate.weight.data.normal_()
    x = torch.randn(5, HIDDEN)
    weights, ids = select_experts(x @ layer.gate.weight.T, 2, True)
    shared_out = torch.sigmoid(x @ layer.shared_expert_gate.weight.T) * shared(x)
    expected = dense_reference(x, w13, w2, weights, ids) + shared_out
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_per_expert_and_packed_shards_load_the_same_weights():
    w13, w2 = random_experts()
    per_expert, packed = _layer(), _layer()
    loaded = set()
    for e in range(EXPERTS):
        loaded |= set(per_expert.load_shard(per_expert.w13, w13[e, :INTER], f"gate.{e}"))
        loaded |= set(per_expert.load_shard(per_expert.w13, w13[e, INTER:], f"up.{e}"))
        loaded |= set(per_expert.load_shard(per_expert.w2, w2[e], f"down.{e}"))
    assert loaded == set(per_expert.expected_shards("w13") + per_expert.expected_shards("w2"))
    assert set(packed.load_shard(packed.w13, w13, "gate_up")) == set(
        packed.expected_shards("w13"))
    packed.load_shard(packed.w2, w2, "down")
    for layer in (per_expert, packed):
        assert torch.equal(layer.w13, w13) and torch.equal(layer.w2, w2)


def test_bad_shards_and_shapes_are_named():
    layer = _layer()
    with pytest.raises(ValueError, match="unknown expert shard 'gate.8'"):
        layer.load_shard(layer.w13, torch.zeros(INTER, HIDDEN), "gate.8")
    with pytest.raises(ValueError, match="shape mismatch"):
        layer.load_shard(layer.w2, torch.zeros(HIDDEN, INTER + 1), "down.0")


def test_unsplittable_moe_is_refused_clearly():
    with pytest.raises(ValueError, match=r"intermediate_size \(19\) is not divisible by tensor "
                                         "parallel size 2 \\(not padded"):
        FusedMoE(HIDDEN, INTER, EXPERTS, 2, ParallelContext(tp_rank=0, tp_size=2),
                 renormalize=False)
    with pytest.raises(ValueError, match=r"num_experts \(8\) is not divisible by expert "
                                         "parallel size 3"):
        FusedMoE(HIDDEN, INTER, EXPERTS, 2, ParallelContext(tp_rank=0, tp_size=3, ep_size=3),
                 renormalize=False)
    with pytest.raises(ValueError, match="top_k must be between 1 and num_experts"):
        FusedMoE(HIDDEN, INTER, EXPERTS, 9, ParallelContext.single(), renormalize=False)
