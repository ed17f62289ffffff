"""The MoE experts at decode sizes: two GEMV-style launches, no alignment, no combine.

Same contract as `engine.kernels.fused_moe.fused_experts` (which calls `moe_gemv_experts` when a
batch has at most `fused_moe.GEMV_MAX_PAIRS` (token, slot) pairs). At decode a pair is one row
against one expert, so the grouped GEMMs' machinery (sorting pairs into BLOCK_M-row blocks,
padding, a combine) costs more launches than the work it organises; here each program finds its
expert by reading `topk_ids` itself:

1. gate/up, grid (pair, I tile): h[pair, n] = silu(x[t] . w13[e, n]) * (x[t] . w13[e, I + n])
   with e the pair's (local) expert, two fp32 [BLOCK_N, BLOCK_K] partial sums reduced once at
   the end (as engine/kernels/gemv.py), rounded once into the activation dtype. A pair whose
   expert the map sends to -1 writes nothing (its row is never read).
2. down + combine, grid (token, H tile): for the token's slots j in order,
   acc += w[t, j] * (w2[e_j, n tile, :] . h[t * k + j, :]) in fp32, dropped pairs skipped;
   out[t] is written once, rounded once. Deterministic (fixed order, no atomics), no memset.
   The program walks (slot, strip) as one loop so that the prefetch of the next strip runs
   across slot boundaries: with top-8 a per-slot loop would expose one memory latency per slot.

Both kernels read the routing written by the kernel before them, so they wait (PDL) before
their first load; every buffer is sized by the shapes alone (CUDA-graph capturable, no host
sync). Loads are strips of BLOCK_K contiguous elements per weight row (16-byte vectors), the
next strip in flight while the current one is summed.

Tiles: `moe_gemv_configs.json` (beside this file), written by `benchmarks/moe_kernel_bench.py
--gemv-sweep`, keyed like fused_moe_configs.json (`moe_tile_configs.shape_key`) with token
buckets inside; the nearest bucket by ratio is used, `DEFAULT_CONFIG` for shapes never swept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine.kernels.moe_tile_configs import clear_cache  # noqa: F401 (one cache for both files)
from engine.kernels.moe_tile_configs import load_buckets, nearest_bucket, shape_key
from engine.kernels.pdl import launch_options, pdl_wait_and_release

CONFIG_PATH = Path(__file__).with_name("moe_gemv_configs.json")


@dataclass(frozen=True, slots=True)
class GemvTile:
    """One GEMV kernel's tile: BLOCK_N output rows per program, BLOCK_K-wide strips of K."""

    block_n: int
    block_k: int
    num_warps: int = 4

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")


@dataclass(frozen=True, slots=True)
class MoEGemvConfig:
    """Tiles of the two launches. The defaults keep enough programs for ~132 SMs at one token
    (Qwen3-30B-A3B: 8 pairs x 768 / 8 = 768 gate/up programs, 2048 / 4 = 512 down programs)
    while each load is still a [BLOCK_N, BLOCK_K] strip of 16-byte vectors. At one token the
    down kernel's bytes in flight are H * BLOCK_K * 4 whatever BLOCK_N (two strips of every
    row), hence its wider strips. sm_90 (ptxas): 94 / 80 registers a thread, no spills."""

    gate_up: GemvTile = GemvTile(8, 256)
    down: GemvTile = GemvTile(4, 512)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict) -> MoEGemvConfig:
        return cls(GemvTile(**raw["gate_up"]), GemvTile(**raw["down"]))


DEFAULT_CONFIG = MoEGemvConfig()


def get_config(num_tokens: int, num_experts: int, hidden_size: int, intermediate_size: int,
               top_k: int, dtype: torch.dtype, path: Path | None = None) -> MoEGemvConfig:
    """The swept tiles of the nearest token bucket (by ratio), else `DEFAULT_CONFIG`."""
    key = shape_key(num_experts, hidden_size, intermediate_size, top_k, dtype)
    buckets = load_buckets(path or CONFIG_PATH, MoEGemvConfig.from_json).get(key)
    return nearest_bucket(buckets, num_tokens) if buckets else DEFAULT_CONFIG


@triton.jit
def _local_expert(ids_ptr, map_ptr, pair, HAS_MAP: tl.constexpr):
    """The pair's index into w13 / w2 (int64), or -1 when the expert map drops it."""
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert).to(tl.int64)
    return expert


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ids_ptr, map_ptr, h_ptr, inter, hidden, top_k, stride_xt,
                    stride_we, stride_wn, stride_ht, HAS_MAP: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < inter
    pdl_wait_and_release(USE_PDL)  # the expert id comes from the routing kernel
    expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
    if expert < 0:
        return
    x_row = x_ptr + (pair // top_k) * stride_xt
    gate_rows = w_ptr + expert * stride_we + rows.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + inter * stride_wn
    strip = tl.arange(0, BLOCK_K)
    mask = row_mask[:, None] & (strip < hidden)[None, :]
    gate_next = tl.load(gate_rows + strip[None, :], mask=mask, other=0.0)
    up_next = tl.load(up_rows + strip[None, :], mask=mask, other=0.0)
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        gate_w, up_w = gate_next, up_next
        kn = k0 + BLOCK_K + strip
        mask = row_mask[:, None] & (kn < hidden)[None, :]
        gate_next = tl.load(gate_rows + kn[None, :], mask=mask, other=0.0)
        up_next = tl.load(up_rows + kn[None, :], mask=mask, other=0.0)
        k = k0 + strip
        xk = tl.load(x_row + k, mask=k < hidden, other=0.0).to(tl.float32)[None, :]
        acc_gate += gate_w.to(tl.float32) * xk
        acc_up += up_w.to(tl.float32) * xk
    gate = tl.sum(acc_gate, axis=1)
    up = tl.sum(acc_up, axis=1)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + pair * stride_ht + rows, h.to(h_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, top_k, it, num_strips, w_cols, row_mask,
                inter, stride_we, HAS_MAP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Strip `it` of the token's (slot, strip) walk over w2 ([BLOCK_N, BLOCK_K], zeros past
    the walk's end and for a dropped pair) and its pair's local expert."""
    pair = first_pair + tl.minimum(it // num_strips, top_k - 1)  # ids stay in bounds
    expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
    k = (it % num_strips) * BLOCK_K + tl.arange(0, BLOCK_K)
    # scalar conditions folded into a bound (the interpreter cannot mask with tensor & scalar)
    k_end = tl.where((it < top_k * num_strips) & (expert >= 0), inter, 0)
    mask = row_mask[:, None] & (k < k_end)[None, :]
    w = tl.load(w_ptr + tl.maximum(expert, 0) * stride_we + w_cols + k[None, :], mask=mask,
                other=0.0)
    return w, expert


@triton.jit
def _down_combine_kernel(h_ptr, w_ptr, ids_ptr, map_ptr, weights_ptr, out_ptr, hidden, inter,
                         top_k, stride_ht, stride_we, stride_wn, stride_ot,
                         HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """One walk over the token's (slot, strip) pairs, the next strip (of the same or the next
    slot) in flight while the current one is summed, so a slot boundary exposes no latency."""
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < hidden
    w_cols = rows.to(tl.int64)[:, None] * stride_wn
    num_strips = tl.cdiv(inter, BLOCK_K)
    first_pair = token * top_k
    pdl_wait_and_release(USE_PDL)  # h comes from the gate/up kernel, ids from the router
    w_next, expert_next = _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, top_k, 0,
                                      num_strips, w_cols, row_mask, inter, stride_we, HAS_MAP,
                                      BLOCK_K)
    part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # the current slot's dot, per K lane
    acc = tl.zeros([BLOCK_N], tl.float32)
    for it in range(0, top_k * num_strips):
        w, expert = w_next, expert_next
        w_next, expert_next = _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, top_k, it + 1,
                                          num_strips, w_cols, row_mask, inter, stride_we,
                                          HAS_MAP, BLOCK_K)
        pair = first_pair + it // num_strips
        k = (it % num_strips) * BLOCK_K + tl.arange(0, BLOCK_K)
        # a dropped pair's h row was never written (may be NaN): not read
        hk = tl.load(h_ptr + pair * stride_ht + k, mask=k < tl.where(expert >= 0, inter, 0),
                     other=0.0)
        part += w.to(tl.float32) * hk.to(tl.float32)[None, :]
        if it % num_strips == num_strips - 1:  # the slot's dot is complete: add it, in order
            if expert >= 0:
                acc += tl.load(weights_ptr + pair) * tl.sum(part, axis=1)
            part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    tl.store(out_ptr + token * stride_ot + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


def moe_gemv_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                     topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     expert_map: torch.Tensor | None = None,
                     config: MoEGemvConfig | None = None) -> torch.Tensor:
    """`fused_experts` in two launches (inputs already checked by it); [T, H]. `config`
    defaults to `get_config`'s."""
    num_tokens, top_k = topk_ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    if config is None:
        config = get_config(num_tokens, w13.shape[0], hidden, inter, top_k, x.dtype)
    ids = topk_ids if topk_ids.is_contiguous() else topk_ids.contiguous()
    id_map = expert_map if expert_map is not None else ids  # unread without a map
    h = torch.empty(ids.numel(), inter, dtype=x.dtype, device=x.device)
    up, down = config.gate_up, config.down
    _gate_up_kernel[(ids.numel(), triton.cdiv(inter, up.block_n))](
        x, w13, ids, id_map, h, inter, hidden, top_k, x.stride(0), w13.stride(0),
        w13.stride(1), h.stride(0), HAS_MAP=expert_map is not None, BLOCK_N=up.block_n,
        BLOCK_K=up.block_k, num_warps=up.num_warps, num_stages=1, **launch_options(x))
    _down_combine_kernel[(num_tokens, triton.cdiv(hidden, down.block_n))](
        h, w2, ids, id_map, topk_weights, out, hidden, inter, top_k, h.stride(0),
        w2.stride(0), w2.stride(1), out.stride(0), HAS_MAP=expert_map is not None,
        BLOCK_N=down.block_n, BLOCK_K=down.block_k, num_warps=down.num_warps, num_stages=1,
        **launch_options(x))
    return out
