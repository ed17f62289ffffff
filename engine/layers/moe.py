"""Mixture-of-experts: a top-k router and stacked SiLU-gated experts behind one module.

Routing follows HF transformers (Mixtral, Qwen2-MoE, Qwen3-MoE): router logits = x W^T in the
activation dtype, softmax in fp32, top-k, optionally renormalised over the k (Mixtral always,
Qwen only with `norm_topk_prob`). Each chosen expert computes down(silu(gate(x)) * up(x)); the
outputs are weighted by the routing weights and summed (in fp32).

Expert weights are stacked: `w13` [E, 2*I, H] (expert e's gate rows, then its up rows: HF's
packed `gate_up_proj`) and `w2` [E, H, I]. `fused_experts_ref` is the torch reference (CPU, and
the oracle for a fused GPU kernel): tokens sorted by expert, each expert that received tokens
runs once on its contiguous slice, so experts without tokens cost nothing. It loops over those
experts in Python; a grouped-GEMM kernel replaces the loop on CUDA.

Parallelism: the layer takes the instance's `ParallelContext` like the linear layers; only one
tensor rank is supported for now (expert and tensor parallel MoE come later).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.parallel import ParallelContext

_EXPERT_SHARD = re.compile(r"(gate|up|down)\.(\d+)")


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights [T, k], expert ids [T, k]) of each token's top-k experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t.

    The (token, slot) pairs are sorted by expert; each expert that received tokens runs on its
    contiguous slice (a Python loop over those experts only), and the weighted outputs are
    scatter-added in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    token_ids = order // top_k  # the token of each sorted pair
    counts = torch.bincount(flat_ids, minlength=w13.shape[0])
    ends = torch.cumsum(counts, 0)
    bounds = list(zip((ends - counts).tolist(), ends.tolist()))  # each expert's slice
    sorted_x = x[token_ids]
    outputs = torch.empty(order.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
    for expert in counts.nonzero().flatten().tolist():
        start, end = bounds[expert]
        gate, up = F.linear(sorted_x[start:end], w13[expert]).chunk(2, dim=-1)
        outputs[start:end] = F.linear(F.silu(gate) * up, w2[expert])
    weighted = outputs.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_ids, weighted).to(x.dtype)


class TopKRouter(nn.Module):
    """The router ("gate"): returns (fp32 routing weights [T, k], expert ids [T, k])."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), "
                             f"got {top_k}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select_experts(F.linear(x, self.weight), self.top_k, self.renormalize)


class FusedMoE(nn.Module):
    """A sparse MoE block: router, experts and, optionally, a shared expert every token runs.

    `shared_expert` (e.g. a dense MLP) is added to the routed output; with
    `shared_expert_gate` it is first scaled by sigmoid(x w_gate) (Qwen2-MoE).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 parallel: ParallelContext, *, renormalize: bool,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False) -> None:
        super().__init__()
        if parallel.tp_size != 1:
            raise ValueError(f"mixture-of-experts layers support tensor parallel size 1 only "
                             f"for now, got {parallel.tp_size}")
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate needs a shared_expert")
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size),
                               requires_grad=False)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False).requires_grad_(False)
                                   if shared_expert_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        out = fused_experts_ref(x, self.w13, self.w2, topk_weights, topk_ids)
        if self.shared_expert is None:
            return out
        shared = self.shared_expert(x)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return out + shared

    # Checkpoint loading (engine.models.weights): per-expert tensors arrive as shards
    # "gate.{e}" / "up.{e}" / "down.{e}" ([I, H] or [H, I]), packed ones as "gate_up" / "down"
    # ([E, 2I, H] / [E, H, I]), GGUF's as "gate" / "up" ([E, I, H] each) and "down".
    def expected_shards(self, param_name: str) -> tuple[str, ...]:
        """Every shard `param_name` needs before it is fully loaded."""
        kinds = ("gate", "up") if param_name == "w13" else ("down",)
        return tuple(f"{kind}.{e}" for e in range(self.num_experts) for kind in kinds)

    def load_shard(self, param: nn.Parameter, loaded, shard: str) -> tuple[str, ...]:
        """Copy one checkpoint tensor into `param`; returns the shards it covered."""
        if shard in ("gate_up", "down"):
            _copy_whole(param.data, loaded)
            return self.expected_shards("w13" if param is self.w13 else "w2")
        if shard in ("gate", "up"):
            size = self.intermediate_size
            _copy_whole(param.data.narrow(1, 0 if shard == "gate" else size, size), loaded)
            return tuple(f"{shard}.{e}" for e in range(self.num_experts))
        match = _EXPERT_SHARD.fullmatch(shard)
        if match is None or int(match[2]) >= self.num_experts:
            raise ValueError(f"unknown expert shard {shard!r} (experts 0..{self.num_experts - 1})")
        kind, expert = match[1], int(match[2])
        size = self.intermediate_size
        target = param.data[expert]
        if kind != "down":
            target = target.narrow(0, 0 if kind == "gate" else size, size)
        _copy_whole(target, loaded)
        return (shard,)


def _copy_whole(target: torch.Tensor, loaded) -> None:
    if tuple(target.shape) != tuple(loaded.shape):
        raise ValueError(f"expert weight shape mismatch: parameter {tuple(target.shape)} vs "
                         f"checkpoint {tuple(loaded.shape)}")
    target.copy_(loaded if isinstance(loaded, torch.Tensor) else
                 loaded.narrow(0, 0, loaded.shape[0]))
