"""The fused MoE experts on CUDA: sum_k w[t, k] * down(silu(gate(x_t)) * up(x_t)) per token.

Same contract as `engine.layers.moe.fused_experts_ref` (w13 [E, 2I, H], gate rows then up rows;
w2 [E, H, I]; fp32 routing weights [T, k]; expert ids [T, k]), plus `expert_map`: global expert
id -> index in w13/w2, or -1 where this rank does not hold the expert (those pairs add zero).

Four launches, no host sync, every buffer sized by an upper bound (CUDA-graph capturable):
1. `align_by_expert` (engine/kernels/moe_align.py): the (token, slot) pairs sorted by expert
   into BLOCK_M-row blocks, each block one expert's.
2. gate/up grouped GEMM: program (block, N tile) multiplies its rows of x by the gate and the up
   rows of its expert's w13 in two fp32 accumulators and stores silu(gate) * up once, in the
   activation dtype, at the block's sorted positions (so the next GEMM reads contiguous rows).
3. down grouped GEMM: the same over w2, scaled by the pair's routing weight in fp32 in the
   epilogue, stored at the pair's row of a per-slot buffer [T * k, H].
4. combine: out[t] = the fp32 sum of its k slots (skipping pairs the expert map drops), in slot
   order, rounded once.
Programs whose block lies past the used blocks return at once, so experts without tokens cost
one early exit. Per-slot rows plus a combine, rather than fp32 atomics into a zeroed output:
the sum is deterministic (same bits for the same batch), no memset launch is needed, and the
extra traffic, T * k * H * 2 bytes twice, is small next to the expert weights at decode. With
top_k == 1 and no expert map the down GEMM writes the output directly and step 4 is skipped.
Tile configurations: engine/kernels/moe_tile_configs.py.

At decode sizes (at most `GEMV_MAX_PAIRS` (token, slot) pairs) `fused_experts` takes the GEMV
path instead (engine/kernels/moe_gemv.py): two launches, no alignment and no combine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.moe_align import ExpertBlocks, align_by_expert
from engine.kernels.moe_gemv import get_config as moe_gemv_config, moe_gemv_experts
from engine.kernels.moe_tile_configs import GemmTile, MoETileConfig, get_config
from engine.kernels.pdl import launch_options, pdl_wait_and_release

# Batches of at most this many (token, slot) pairs take the two-launch GEMV path: decode up to
# 8 tokens at top-8. Above it the grouped GEMMs share each expert's weight tile across its rows.
GEMV_MAX_PAIRS = 64


@triton.jit(do_not_specialize=["num_pairs", "num_blocks_m"])
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr,
                     weights_ptr, N, K, num_pairs, top_k, num_blocks_m, stride_am, stride_we,
                     stride_wn, stride_om, GATE_UP: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """GATE_UP: out[pos] = silu(a[token] W_gate^T) * (a[token] W_up^T), W = w13[e] rows [0, N)
    and [N, 2N). Otherwise: out[pair] = weight[pair] * (a[pos] W^T), W = w2[e]."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n  # M blocks walked together share each weight tile in L2
    first_m = (pid // per_group) * GROUP_M
    group_size = min(num_blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    pdl_wait_and_release(USE_PDL)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return  # past the last expert's blocks
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ptr + pos)
    valid = pairs < num_pairs
    a_rows = pairs // top_k if GATE_UP else pos
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    b_ptrs = w_ptr + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        if GATE_UP:
            b_up = tl.load(b_ptrs + N * stride_wn, mask=k_mask[:, None] & col_mask[None, :],
                           other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    mask = valid[:, None] & col_mask[None, :]
    if GATE_UP:
        out = acc / (1.0 + tl.exp(-acc)) * acc_up
        out_rows = pos
    else:
        out = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        out_rows = pairs
    tl.store(out_ptr + out_rows.to(tl.int64)[:, None] * stride_om + cols[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _combine_kernel(slots_ptr, ids_ptr, map_ptr, out_ptr, H, top_k, HAS_MAP: tl.constexpr,
                    BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
    """out[t] = sum over slots j of slots[t * top_k + j] (fp32, in slot order)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < H
    pdl_wait_and_release(USE_PDL)
    acc = tl.zeros([BLOCK_H], tl.float32)
    for j in range(top_k):
        pair = token * top_k + j
        mask = col_mask
        if HAS_MAP:  # a pair dropped by the map has no row: it adds zero
            expert = tl.load(ids_ptr + pair + cols * 0)  # broadcast to the row's columns
            mask = mask & (tl.load(map_ptr + expert) >= 0)
        acc += tl.load(slots_ptr + pair * H + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  expert_map: torch.Tensor | None = None,
                  config: MoETileConfig | None = None,
                  use_gemv: bool | None = None) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t; [T, H].
    `use_gemv`: force the GEMV path (True) or the grouped GEMMs (False); None picks by
    `GEMV_MAX_PAIRS`. `config` tiles the grouped GEMMs only."""
    _check_inputs(x, w13, w2, topk_weights, topk_ids, expert_map)
    if use_gemv is None:
        use_gemv = takes_gemv_path(*topk_ids.shape)
    if use_gemv:
        return moe_gemv_experts(x, w13, w2, topk_weights, topk_ids, expert_map)
    num_tokens, top_k = topk_ids.shape
    num_experts, two_i, hidden = w13.shape
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if config is None:
        config = get_config(num_tokens, num_experts, hidden, two_i // 2, top_k, x.dtype)
    blocks = align_by_expert(topk_ids, num_experts, config.block_m, expert_map)
    inter = torch.empty(blocks.sorted_pair_ids.numel(), two_i // 2, dtype=x.dtype,
                        device=x.device)
    _grouped_gemm(x, w13, inter, blocks, topk_weights, top_k, config.gate_up, gate_up=True)
    direct = top_k == 1 and expert_map is None
    slots = out if direct else torch.empty(num_tokens * top_k, hidden, dtype=x.dtype,
                                           device=x.device)
    _grouped_gemm(inter, w2, slots, blocks, topk_weights, top_k, config.down, gate_up=False)
    if not direct:
        _combine(slots, topk_ids, expert_map, out, top_k)
    return out


def _grouped_gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, blocks: ExpertBlocks,
                  topk_weights: torch.Tensor, top_k: int, tile: GemmTile, gate_up: bool) -> None:
    n = w.shape[1] // 2 if gate_up else w.shape[1]
    k = w.shape[2]
    num_blocks_m = blocks.max_blocks
    grid = (num_blocks_m * triton.cdiv(n, tile.block_n),)
    _moe_gemm_kernel[grid](
        a, w, out, blocks.sorted_pair_ids, blocks.block_expert_ids, blocks.num_padded,
        topk_weights, n, k, topk_weights.numel(), top_k, num_blocks_m, a.stride(0), w.stride(0),
        w.stride(1), out.stride(0), GATE_UP=gate_up, BLOCK_M=blocks.block_m,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=tile.num_warps, num_stages=tile.num_stages, **launch_options(a))


def _combine(slots: torch.Tensor, topk_ids: torch.Tensor, expert_map: torch.Tensor | None,
             out: torch.Tensor, top_k: int) -> None:
    hidden = out.shape[1]
    block_h = min(1024, triton.next_power_of_2(hidden))
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    _combine_kernel[(out.shape[0], triton.cdiv(hidden, block_h))](
        slots, ids, expert_map if expert_map is not None else ids, out, hidden, top_k,
        HAS_MAP=expert_map is not None, BLOCK_H=block_h, num_warps=4, **launch_options(out))


def _check_inputs(x, w13, w2, topk_weights, topk_ids, expert_map) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"x must be [T, H] and w13/w2 [E, 2I, H]/[E, H, I], got "
                         f"{tuple(x.shape)}, {tuple(w13.shape)}, {tuple(w2.shape)}")
    num_experts, two_i, hidden = w13.shape
    if x.shape[1] != hidden or tuple(w2.shape) != (num_experts, hidden, two_i // 2) or two_i % 2:
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not fit x "
                         f"{tuple(x.shape)}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise ValueError(f"topk_ids must be [T={x.shape[0]}, k], got {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be float32 {tuple(topk_ids.shape)}, got "
                         f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    if not topk_weights.is_contiguous():
        raise ValueError("topk_weights must be contiguous")
    if x.dtype != w13.dtype or x.dtype != w2.dtype:
        raise ValueError(f"x, w13 and w2 must share a dtype, got {x.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride in its last dimension")
    if expert_map is not None and expert_map.dtype != torch.int32:
        raise ValueError(f"expert_map must be int32, got {expert_map.dtype}")


def takes_gemv_path(num_tokens: int, top_k: int) -> bool:
    """Whether `fused_experts` serves this many tokens by the GEMV path (decode sizes)."""
    return num_tokens * top_k <= GEMV_MAX_PAIRS


def kernel_variant(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int,
                   top_k: int, dtype: torch.dtype) -> tuple[str, object]:
    """The path and tile configuration `fused_experts` takes for `num_tokens` tokens (equal
    values: the same compiled kernels)."""
    if takes_gemv_path(num_tokens, top_k):
        return "gemv", moe_gemv_config(num_tokens, num_experts, hidden_size, intermediate_size,
                                       top_k, dtype)
    return "gemm", get_config(num_tokens, num_experts, hidden_size, intermediate_size, top_k,
                              dtype)


def variant_token_counts(num_experts: int, hidden_size: int, intermediate_size: int,
                         top_k: int, dtype: torch.dtype, max_tokens: int) -> list[int]:
    """The smallest token count of each `kernel_variant` that a step of 1..`max_tokens` tokens
    selects, for one rank's experts: the prompt lengths the start-up warm-up runs alone so
    that no request compiles a tile variant (engine/warmup.py)."""
    firsts: dict[tuple[str, object], int] = {}
    for num_tokens in range(1, max_tokens + 1):
        firsts.setdefault(kernel_variant(num_tokens, num_experts, hidden_size,
                                         intermediate_size, top_k, dtype), num_tokens)
    return sorted(firsts.values())
