"""Mixture-of-experts: a top-k router and stacked SiLU-gated experts behind one module.

Routing follows HF transformers (Mixtral, Qwen2-MoE, Qwen3-MoE): router logits = x W^T in the
activation dtype, softmax in fp32, top-k, optionally renormalised over the k (Mixtral always,
Qwen only with `norm_topk_prob`). Each chosen expert computes down(silu(gate(x)) * up(x)); the
outputs are weighted by the routing weights and summed (in fp32).

Expert weights are stacked: `w13` [E_local, 2*I_local, H] (expert e's gate rows, then its up
rows: HF's packed `gate_up_proj`) and `w2` [E_local, H, I_local]. `fused_experts_ref` is the
torch reference (CPU, and the oracle for the fused GPU kernel): tokens sorted by expert, each
expert that received tokens runs once on its contiguous slice, so experts without tokens cost
nothing. `_experts` is the one call site of the experts' computation.

Parallelism, over the stage's tensor-parallel ranks (engine/layers/moe_shards.py places the
weights). Attention is tensor parallel and ends in an all-reduce, so every rank enters this
layer with every token's hidden state; the router is replicated, so every rank computes the
same top-k. Each rank then produces a *partial* output and one all-reduce sums them (as the
dense MLP's row-parallel down projection does):

- tensor parallel (ep_size 1): every rank holds every expert, each expert's intermediate
  dimension split tp ways (gate and up rows sliced alike, down's columns); exact, since
  down(silu(g) * u) is a sum over the intermediate dimension.
- expert parallel (ep_size = tp_size, like vLLM's enable-expert-parallel): rank r holds the
  E / ep whole experts [r E/ep, (r+1) E/ep) and computes, for all tokens, only the (token, slot)
  pairs routed to them (`expert_map`: global id -> local index, -1 elsewhere). Because the
  hidden states are already replicated, no all-to-all dispatch is needed: this is the
  all-gather (done by attention's all-reduce) + reduce-scatter family, with the reduce-scatter
  an all-reduce because the next layer's attention wants every token on every rank.

The shared expert (Qwen2-MoE) is a tensor-parallel dense MLP: each rank computes its slice of
it once per token, adds it to the routed partial *before* the all-reduce, so it is counted once
per token, never once per rank. Its sigmoid gate is replicated and scales every rank's partial
alike (sum_r s p_r = s sum_r p_r).

Expert load: every rank counts, on device, the tokens routed to each (global) expert from the
replicated top-k ids (`expert_counts`, no extra communication; rank 0's are read for metrics).

Launches at decode on CUDA: the router's GEMM, one routing kernel (softmax, top-k, renormalise,
count: engine/kernels/moe_route.py) and fused_experts' three or four, or two at decode sizes (at
most 64 (token, slot) pairs: engine/kernels/moe_gemv.py); at most 8 tokens, the router's GEMV
and routing are one launch (engine/kernels/moe_router.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import dispatch
from engine.layers.moe_shards import ExpertShards
from engine.parallel import ParallelContext


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights [T, k], expert ids [T, k]) of each token's top-k experts."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def count_experts(expert_counts: torch.Tensor, topk_ids: torch.Tensor) -> None:
    """Add a step's routed pairs to `expert_counts` on device (no host sync: index_add_, not
    bincount, whose output size needs the max on the host on CUDA)."""
    flat = topk_ids.reshape(-1)
    expert_counts.index_add_(0, flat, torch.ones_like(flat))


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          expert_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_experts`, and the pairs added to `expert_counts` when given: one Triton launch on
    CUDA (engine/kernels/moe_route.py; equal probabilities go to the lower expert id), the torch
    reference elsewhere or with the kernels switched off, as `_experts` chooses."""
    num_experts = router_logits.shape[-1]
    if router_logits.is_cuda and dispatch.triton_enabled():
        from engine.kernels import moe_route

        if moe_route.supports(num_experts, top_k):
            return moe_route.route(router_logits, top_k, renormalize, expert_counts)
    weights, ids = select_experts(router_logits, top_k, renormalize)
    if expert_counts is not None:
        count_experts(expert_counts, ids)
    return weights, ids


def route_hidden(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
                 expert_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route(F.linear(x, router_weight), ...)`: at decode sizes on CUDA (at most
    moe_router.MAX_TOKENS bf16/fp16 tokens) the router's GEMV and the routing are one Triton
    launch (engine/kernels/moe_router.py: logits summed in a fixed order, so a logit may round
    an ulp away from cuBLAS's; routed exactly as `route` routes them), otherwise cuBLAS and
    `route`. The router weight is replicated and the kernel deterministic: ranks route alike."""
    if x.is_cuda and dispatch.triton_enabled():
        from engine.kernels import moe_router

        if moe_router.supports(x, router_weight, top_k):
            return moe_router.router_route(x, router_weight, top_k, renormalize, expert_counts)
    return route(F.linear(x, router_weight), top_k, renormalize, expert_counts)


def route_hidden_normed(x: torch.Tensor, residual: torch.Tensor, norm, router_weight:
                        torch.Tensor, top_k: int, renormalize: bool,
                        expert_counts: torch.Tensor | None = None):
    """(weights, ids, normed, h): `route_hidden(norm(h), ...)` with h = x + residual and
    normed = norm(h) (`norm`: an RMSNorm module). At decode sizes on CUDA the add + RMSNorm run
    inside the router's launch (`moe_router.router_route_normed`: one launch fewer per layer);
    otherwise `dispatch.add_rms_norm` first."""
    if x.is_cuda and dispatch.triton_enabled():
        from engine.kernels import moe_router

        if moe_router.supports(x, router_weight, top_k) and residual.is_contiguous():
            return moe_router.router_route_normed(x, residual, norm.weight, norm.eps,
                                                  router_weight, top_k, renormalize,
                                                  expert_counts)
    normed, h = norm(x, residual)
    weights, ids = route_hidden(normed, router_weight, top_k, renormalize, expert_counts)
    return weights, ids, normed, h


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t.

    `expert_map` (int32 [E_global]) maps a global expert id to its index in `w13` / `w2`, or
    -1 for an expert held elsewhere: such pairs contribute zero. The (token, slot) pairs are
    sorted by local expert (the -1 pairs first, skipped); each expert that received tokens runs
    on its contiguous slice (a Python loop over those experts only), and the weighted outputs
    are scatter-added in fp32.
    """
    num_tokens, top_k = topk_ids.shape
    num_local = w13.shape[0]
    flat_ids = topk_ids.reshape(-1)
    if expert_map is not None:
        flat_ids = expert_map[flat_ids].long()
    order = torch.argsort(flat_ids, stable=True)
    token_ids = order // top_k  # the token of each sorted pair
    counts = torch.bincount(flat_ids + 1, minlength=num_local + 1)  # bucket 0: remote pairs
    ends = torch.cumsum(counts, 0)[1:]
    bounds = list(zip((ends - counts[1:]).tolist(), ends.tolist()))  # each expert's slice
    sorted_x = x[token_ids]
    outputs = torch.zeros(order.numel(), w2.shape[1], dtype=x.dtype, device=x.device)
    for expert in counts[1:].nonzero().flatten().tolist():
        start, end = bounds[expert]
        gate, up = F.linear(sorted_x[start:end], w13[expert]).chunk(2, dim=-1)
        outputs[start:end] = F.linear(F.silu(gate) * up, w2[expert])
    weighted = outputs.float() * topk_weights.reshape(-1)[order, None]
    out = torch.zeros(num_tokens, w2.shape[1], dtype=torch.float32, device=x.device)
    return out.index_add_(0, token_ids, weighted).to(x.dtype)


def _experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, expert_map: torch.Tensor | None) -> torch.Tensor:
    """The routed experts' (partial) output: the fused Triton kernel on CUDA
    (engine/kernels/fused_moe.py, the same contract, no host sync), the torch reference
    elsewhere or with the kernels switched off (`dispatch.use_triton(False)`)."""
    if x.is_cuda and dispatch.triton_enabled():
        from engine.kernels.fused_moe import fused_experts

        return fused_experts(x, w13, w2, topk_weights, topk_ids, expert_map)
    return fused_experts_ref(x, w13, w2, topk_weights, topk_ids, expert_map)


class TopKRouter(nn.Module):
    """The router ("gate"): returns (fp32 routing weights [T, k], expert ids [T, k], ...); with
    `expert_counts` it also adds the pairs to that on-device counter (see `route`). Forward
    hooks see every routing (output[1]: the ids), the fused add + RMSNorm path's too."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts ({num_experts}), "
                             f"got {top_k}")
        self.top_k = top_k
        self.renormalize = renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, expert_counts: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, norm=None) -> tuple:
        """(weights, ids); with `residual` and `norm` (the block's RMSNorm) it routes
        norm(x + residual) and returns (weights, ids, normed rows, x + residual)."""
        if residual is None:
            return route_hidden(x, self.weight, self.top_k, self.renormalize, expert_counts)
        return route_hidden_normed(x, residual, norm, self.weight, self.top_k, self.renormalize,
                                   expert_counts)


class FusedMoE(ExpertShards, nn.Module):
    """A sparse MoE block: router, experts and, optionally, a shared expert every token runs.

    `shared_expert` is a tensor-parallel dense MLP (LlamaMLP: `gate_up_proj`, `down_proj`) over
    the same ranks; with `shared_expert_gate` it is first scaled by sigmoid(x w_gate)
    (Qwen2-MoE). The block's output is all-reduced once over the tensor group. Checkpoint
    loading (this rank's experts and slices only) is `ExpertShards`'.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 parallel: ParallelContext, *, renormalize: bool,
                 shared_expert: nn.Module | None = None, shared_expert_gate: bool = False) -> None:
        nn.Module.__init__(self)
        if shared_expert_gate and shared_expert is None:
            raise ValueError("shared_expert_gate needs a shared_expert")
        ExpertShards.__init__(self, num_experts, intermediate_size, parallel)
        self.parallel = parallel
        self.gate = TopKRouter(hidden_size, num_experts, top_k, renormalize)
        self.w13 = nn.Parameter(torch.empty(self.num_local_experts, 2 * self.local_intermediate,
                                            hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local_experts, hidden_size,
                                           self.local_intermediate), requires_grad=False)
        self.register_buffer("expert_map", self.make_expert_map(), persistent=False)
        # tokens routed to each global expert since start (or the last reset), on device
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64),
                             persistent=False)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (nn.Linear(hidden_size, 1, bias=False).requires_grad_(False)
                                   if shared_expert_gate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x, self.expert_counts)
        return self._experts_out(x, topk_weights, topk_ids)

    def forward_normed(self, x: torch.Tensor, residual: torch.Tensor, norm
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h)), h) with h = x + residual: the add + RMSNorm before the block, fused
        into the router's launch at decode sizes on CUDA (`route_hidden_normed`)."""
        topk_weights, topk_ids, normed, residual = self.gate(x, self.expert_counts, residual,
                                                             norm)
        return self._experts_out(normed, topk_weights, topk_ids), residual

    def _experts_out(self, x: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
        out = _experts(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)
        if self.shared_expert is not None:
            out = out + self._shared_partial(x)
        return self.parallel.all_reduce(out)

    def _shared_partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the (gated) shared expert, not yet all-reduced: it joins the
        routed partial in the block's one all-reduce."""
        mlp = self.shared_expert
        shared = dispatch.silu_and_mul_linear(mlp.gate_up_proj(x), mlp.down_proj.weight)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return shared
