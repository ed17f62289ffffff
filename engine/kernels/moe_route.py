"""MoE routing in one launch: softmax, top-k, renormalisation and the expert-load counters.

From router logits [T, E] (any float dtype) each token gets, as `select_experts` computes them
in torch (engine/layers/moe.py):
- probabilities: softmax over the E experts in fp32;
- the top-k experts by probability, the largest first; equal probabilities go to the lower
  expert id first (torch.topk leaves the order of ties unspecified and, on the CPU, does not
  follow it; this order is `torch.sort(..., descending=True, stable=True)`'s). NaN ranks above
  everything, as in torch.topk, so a row of NaN still yields k distinct, valid ids;
- fp32 weights, divided by their sum over the k when `renormalize` (summed in slot order);
- ids as int64 (torch.topk's dtype: the layer's hooks, expert maps and `fused_experts` take it);
- optionally, the step's (token, slot) pairs added per expert into `expert_counts` (int64 [E],
  the on-device load counters): each program sums its tokens' picks and issues one atomic add
  per expert it picked, so no memset and no second launch are needed.

It replaces softmax, topk, the renormalising sum and division, and the counter's ones_like and
index_add_ (six or seven launches per MoE layer at decode) with one. No host sync, outputs
sized by (T, k) only: CUDA-graph capturable.

Each program takes ROWS tokens as a [ROWS, E_P2] fp32 tile in registers and picks the k
experts by k rounds of "max, lowest index at the max, mask it out". ROWS and the launch
configuration depend on E only, never on T, so a token's weights are the same bits whatever
batch it is in (the reductions' order is fixed by the tile shape).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, pdl_wait_and_release

MAX_EXPERTS = 512
MAX_TOP_K = 16
_TILE_ELEMENTS = 2048  # ROWS * E_P2 fp32 values held by one program
ROUTING_WARPS = 4  # the tile's layout, hence its reductions' order, follows from it


@triton.jit(do_not_specialize=["num_tokens"])
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, counts_ptr, num_tokens, num_experts,
                  stride_t, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
                  HAS_COUNTS: tl.constexpr, ROWS: tl.constexpr, E_P2: tl.constexpr,
                  K_P2: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    route_rows(logits_ptr, weights_ptr, ids_ptr, counts_ptr, tl.program_id(0) * ROWS,
               num_tokens, num_experts, stride_t, TOP_K, RENORMALIZE, HAS_COUNTS, ROWS, E_P2,
               K_P2)


@triton.jit
def route_rows(logits_ptr, weights_ptr, ids_ptr, counts_ptr, first_row, num_tokens,
               num_experts, stride_t, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr,
               HAS_COUNTS: tl.constexpr, ROWS: tl.constexpr, E_P2: tl.constexpr,
               K_P2: tl.constexpr):
    """Routes tokens first_row .. first_row + ROWS - 1 (those < num_tokens) from logits in
    memory: loads them as `route_tile` takes them."""
    rows = first_row + tl.arange(0, ROWS)
    cols = tl.arange(0, E_P2)
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                mask=(rows < num_tokens)[:, None] & (cols < num_experts)[None, :],
                other=float("-inf")).to(tl.float32)
    route_tile(x, weights_ptr, ids_ptr, counts_ptr, first_row, num_tokens, num_experts,
               TOP_K, RENORMALIZE, HAS_COUNTS, ROWS, E_P2, K_P2)


@triton.jit
def route_tile(x, weights_ptr, ids_ptr, counts_ptr, first_row, num_tokens, num_experts,
               TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_COUNTS: tl.constexpr,
               ROWS: tl.constexpr, E_P2: tl.constexpr, K_P2: tl.constexpr):
    """The routing math, shared with the fused router (engine/kernels/moe_router.py) so that
    tie order, NaN, renormalisation and the counters' atomics are one piece of code.
    x: [ROWS, E_P2] fp32 logits of tokens first_row + i, -inf in the columns past num_experts;
    rows past num_tokens may hold anything (never stored, never counted)."""
    rows = first_row + tl.arange(0, ROWS)
    row_ok = rows < num_tokens
    cols = tl.arange(0, E_P2)
    col_ok = cols < num_experts
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past the batch: finite, never stored
    e = tl.exp(x - tl.max(x, axis=1)[:, None])
    probs = e / tl.sum(e, axis=1)[:, None]
    # the ranking key: probabilities lie in [0, 1], NaN ranks first, padding never wins
    key = tl.where(probs != probs, 2.0, probs)
    key = tl.where(col_ok[None, :], key, -1.0)
    slots = tl.arange(0, K_P2)
    top_w = tl.zeros([ROWS, K_P2], tl.float32)
    top_ids = tl.zeros([ROWS, K_P2], tl.int64)
    total = tl.zeros([ROWS], tl.float32)
    taken = tl.zeros([ROWS, E_P2], tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, axis=1)
        idx = tl.min(tl.where(key == best[:, None], cols[None, :], E_P2), axis=1)
        hit = cols[None, :] == idx[:, None]
        w = tl.sum(tl.where(hit, probs, 0.0), axis=1)
        total += w
        top_w = tl.where(slots[None, :] == j, w[:, None], top_w)
        top_ids = tl.where(slots[None, :] == j, idx.to(tl.int64)[:, None], top_ids)
        key = tl.where(hit, -1.0, key)
        taken += hit.to(tl.int32)
    if RENORMALIZE:
        top_w = top_w / total[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_ok = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=out_ok)
    tl.store(ids_ptr + out, top_ids, mask=out_ok)
    if HAS_COUNTS:
        picked = tl.sum(tl.where(row_ok[:, None], taken, 0), axis=0).to(tl.int64)
        tl.atomic_add(counts_ptr + cols, picked, mask=col_ok & (picked > 0))


def supports(num_experts: int, top_k: int) -> bool:
    """Whether `route` handles this router (the layer falls back to torch otherwise)."""
    return num_experts <= MAX_EXPERTS and top_k <= MAX_TOP_K


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          expert_counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights [T, k], int64 expert ids [T, k]) of each token's top-k experts; adds the
    pairs to `expert_counts` (int64 [E]) when given. See the module docstring."""
    _check_inputs(router_logits, top_k, expert_counts)
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    rows, experts_p2, k_p2 = routing_tile(num_experts, top_k)
    _route_kernel[(triton.cdiv(num_tokens, rows),)](
        logits, weights, ids, expert_counts if expert_counts is not None else ids, num_tokens,
        num_experts, logits.stride(0), TOP_K=top_k, RENORMALIZE=renormalize,
        HAS_COUNTS=expert_counts is not None, ROWS=rows, E_P2=experts_p2, K_P2=k_p2,
        num_warps=ROUTING_WARPS, **launch_options(logits))
    return weights, ids


def routing_tile(num_experts: int, top_k: int) -> tuple[int, int, int]:
    """(ROWS, E_P2, K_P2) of `route_tile`: a function of the router only, never of T."""
    experts_p2 = max(16, triton.next_power_of_2(num_experts))
    return (max(1, _TILE_ELEMENTS // experts_p2), experts_p2,
            max(2, triton.next_power_of_2(top_k)))


def _check_inputs(logits: torch.Tensor, top_k: int, counts: torch.Tensor | None) -> None:
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"router_logits must be a float [T, E] tensor, got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    check_routing(logits.shape[1], top_k, counts, logits.device)


def check_routing(num_experts: int, top_k: int, counts: torch.Tensor | None,
                  device: torch.device) -> None:
    """ValueError unless the kernels route this router: the expert count, top_k's range and
    `counts` (a contiguous int64 [E] tensor on `device`, or None)."""
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"router_logits has {num_experts} experts; 1 to {MAX_EXPERTS} "
                         f"are supported")
    if not 1 <= top_k <= min(num_experts, MAX_TOP_K):
        raise ValueError(f"top_k must be between 1 and min(num_experts, {MAX_TOP_K}) = "
                         f"{min(num_experts, MAX_TOP_K)}, got {top_k}")
    if counts is not None and (counts.dtype != torch.int64 or tuple(counts.shape) != (
            num_experts,) or not counts.is_contiguous() or counts.device != device):
        raise ValueError(f"expert_counts must be a contiguous int64 [{num_experts}] tensor on "
                         f"{device}, got {counts.dtype} {tuple(counts.shape)} on "
                         f"{counts.device}")
