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
2. down + combine, grid (token, H tile, slot group): dot[t, j, n] = w2[e_j, n, :] . h[t*k + j]
   in fp32, then out[t, n] = sum over j in slot order of fma(w[t, j], dot[t, j, n], acc),
   dropped pairs skipped; rounded once. Deterministic (fixed order), no memset.
   The program walks (slot, strip) as one loop so that the prefetch of the next strip runs
   across slot boundaries: with top-8 a per-slot loop would expose one memory latency per slot.
   - No split (`slots_per_program` 0 or >= k: one group): the program walks all k slots and
     sums them itself, as before the split existed.
   - Split (`slots_per_program` s < k: ceil(k / s) groups): at one token the unsplit grid has
     only H / BLOCK_N programs, each streaming k strips of w2 in turn, too few to keep the
     copy bandwidth's worth of loads in flight. Each program then computes only its s slots'
     dots and stores them, fp32, into a scratch [T * k, H]; the last program of a (token,
     H tile) to arrive sums the k dots exactly as the unsplit program does (same per-slot code,
     same fma in the same order: bitwise the same output for the same tile), writes out[t]
     and resets its counter to 0, so the next launch (or graph replay) needs no memset.
     Memory order (PTX model): a program's threads store their dots; `debug_barrier` (bar.sync)
     orders those stores before the ticket, an `atom.add.acq_rel.gpu` by one thread (a scalar
     atomic runs once per program). Release is cumulative, so every dot the program stored is
     visible at GPU scope to whoever acquires the counter after it; the last arriver's
     acq_rel ticket is that acquire, Triton broadcasts its result through shared memory behind
     a barrier (so all its threads are ordered after the acquire), and it reads the dots with
     `.cg` loads (from L2, the coherence point, never a stale L1 line). Nobody waits for
     anybody: the programs that are not last simply exit. The counter's reset reaches the
     next launch through the stream order (with PDL: its `gdc_wait` returns only after this
     grid completed), before which it touches no counter.
   Both variants add a dot with an explicit `tl.fma`: left to the compiler, `acc + w * dot`
   may or may not be contracted (Triton's FP-fusion default is changing), and the two kernels
   must round alike to agree bit for bit.

Both kernels read the routing written by the kernel before them, so they wait (PDL) before
their first load; every buffer is sized by the shapes alone (CUDA-graph capturable, no host
sync). Loads are strips of BLOCK_K contiguous elements per weight row (16-byte vectors), the
next strip in flight while the current one is summed.

Split workspace (`_split_workspace`): scratch and counters are allocated once per device and
(token bucket, k, H, H tiles), zeroed, and never freed (a captured graph holds their raw
addresses); calls and graph replays reuse them. The first call of a shape must come before any
capture that uses it (the model runner's warm-up does; a capture that would allocate raises).
They are not keyed by stream (the model runner warms a graph up on a side stream and captures
it on another, so a per-stream workspace would be first made inside the capture): two split
launches of the same key must not run concurrently (on two streams, or two graphs replayed at
once) -- they would overwrite each other's dots and draw each other's tickets. A decode engine
runs its steps on one stream at a time, which is what this assumes.

Tiles: `moe_gemv_configs.json` (beside this file), written by `benchmarks/moe_gemv_bench.py
--sweep`, keyed like fused_moe_configs.json (`moe_tile_configs.shape_key`) with token
buckets inside; the nearest bucket by ratio is used, `DEFAULT_CONFIG` for shapes never swept.
An entry without `slots_per_program` (all before the split existed) means no split.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine.kernels.moe_tile_configs import clear_cache  # noqa: F401 (one cache for both files)
from engine.kernels.moe_tile_configs import load_buckets, nearest_bucket, shape_key
from engine.kernels.persistent import persistent
from engine.kernels.pdl import launch_options, pdl_wait_and_release

CONFIG_PATH = Path(__file__).with_name("moe_gemv_configs.json")


@dataclass(frozen=True, slots=True)
class GemvTile:
    """One GEMV kernel's tile: BLOCK_N output rows per program, BLOCK_K-wide strips of K.
    `slots_per_program` (down launch only): a token's slots per program, 0 = all of them (no
    split); below k the slots are split over ceil(k / s) programs (module docstring)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    slots_per_program: int = 0

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.slots_per_program < 0:
            raise ValueError(f"slots_per_program must be >= 0, got {self.slots_per_program}")

    def num_slot_groups(self, top_k: int) -> int:
        """Programs sharing one token's slots (1: no split)."""
        slots = self.slots_per_program
        return 1 if slots == 0 or slots >= top_k else triton.cdiv(top_k, slots)


@dataclass(frozen=True, slots=True)
class MoEGemvConfig:
    """Tiles of the two launches. The defaults keep enough programs for ~132 SMs at one token
    (Qwen3-30B-A3B: 8 pairs x 768 / 8 = 768 gate/up programs, 2048 / 4 = 512 down programs)
    while each load is still a [BLOCK_N, BLOCK_K] strip of 16-byte vectors. At one token the
    down kernel's bytes in flight are H * BLOCK_K * 4 whatever BLOCK_N (two strips of every
    row), hence its wider strips. sm_90 (ptxas): 94 / 80 registers a thread, no spills."""

    gate_up: GemvTile = GemvTile(8, 256)
    down: GemvTile = GemvTile(4, 512)

    def __post_init__(self) -> None:
        if self.gate_up.slots_per_program:
            raise ValueError("gate_up.slots_per_program must be 0 (one pair per program), "
                             f"got {self.gate_up.slots_per_program}")

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
def _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, num_slots, it, num_strips, w_cols,
                row_mask, inter, stride_we, HAS_MAP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Strip `it` of the program's (slot, strip) walk over w2 ([BLOCK_N, BLOCK_K], zeros past
    the walk's end and for a dropped pair) and its pair's local expert."""
    pair = first_pair + tl.minimum(it // num_strips, num_slots - 1)  # ids stay in bounds
    expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
    k = (it % num_strips) * BLOCK_K + tl.arange(0, BLOCK_K)
    # scalar conditions folded into a bound (the interpreter cannot mask with tensor & scalar)
    k_end = tl.where((it < num_slots * num_strips) & (expert >= 0), inter, 0)
    mask = row_mask[:, None] & (k < k_end)[None, :]
    w = tl.load(w_ptr + tl.maximum(expert, 0) * stride_we + w_cols + k[None, :], mask=mask,
                other=0.0)
    return w, expert


@triton.jit
def _down_kernel(h_ptr, w_ptr, ids_ptr, map_ptr, weights_ptr, out_ptr, dots_ptr, counts_ptr,
                 hidden, inter, slots, stride_ht, stride_we, stride_wn, stride_ot,
                 TOP_K: tl.constexpr, SPLIT: tl.constexpr, HAS_MAP: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    """One walk over the program's (slot, strip) pairs (all k slots of the token, or `slots`
    of them when SPLIT), the next strip (of the same or the next slot) in flight while the
    current one is summed, so a slot boundary exposes no latency."""
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < hidden
    w_cols = rows.to(tl.int64)[:, None] * stride_wn
    num_strips = tl.cdiv(inter, BLOCK_K)
    first_slot = tl.program_id(2) * slots
    num_slots = tl.minimum(slots, TOP_K - first_slot)
    first_pair = token * TOP_K + first_slot
    pdl_wait_and_release(USE_PDL)  # h comes from the gate/up kernel, ids from the router
    w_next, expert_next = _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, num_slots, 0,
                                      num_strips, w_cols, row_mask, inter, stride_we, HAS_MAP,
                                      BLOCK_K)
    part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)  # the current slot's dot, per K lane
    acc = tl.zeros([BLOCK_N], tl.float32)
    for it in range(0, num_slots * num_strips):
        w, expert = w_next, expert_next
        w_next, expert_next = _down_strip(w_ptr, ids_ptr, map_ptr, first_pair, num_slots,
                                          it + 1, num_strips, w_cols, row_mask, inter,
                                          stride_we, HAS_MAP, BLOCK_K)
        pair = first_pair + it // num_strips
        k = (it % num_strips) * BLOCK_K + tl.arange(0, BLOCK_K)
        # a dropped pair's h row was never written (may be NaN): not read
        hk = tl.load(h_ptr + pair * stride_ht + k, mask=k < tl.where(expert >= 0, inter, 0),
                     other=0.0)
        part += w.to(tl.float32) * hk.to(tl.float32)[None, :]
        if it % num_strips == num_strips - 1:  # the slot's dot is complete
            dot = tl.sum(part, axis=1)
            if SPLIT:  # stored for the last arriver (a dropped pair's dot is 0, never read)
                tl.store(dots_ptr + pair * hidden + rows, dot, mask=row_mask)
            else:  # added in slot order, as `_sum_dots_if_last` does
                if expert >= 0:
                    acc = tl.fma(tl.load(weights_ptr + pair).to(tl.float32), dot, acc)
            part = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    out_row = out_ptr + token * stride_ot + rows
    if SPLIT:
        _sum_dots_if_last(dots_ptr, counts_ptr, ids_ptr, map_ptr, weights_ptr, out_row, token,
                          rows, row_mask, hidden, TOP_K, HAS_MAP, BLOCK_N)
    else:
        tl.store(out_row, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _sum_dots_if_last(dots_ptr, counts_ptr, ids_ptr, map_ptr, weights_ptr, out_row, token,
                      rows, row_mask, hidden, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """Draw a ticket for the (token, H tile); the last of its slot groups sums the k dots in
    slot order (the unsplit kernel's fma chain), writes the row, resets the counter."""
    counter = counts_ptr + token * tl.num_programs(1) + tl.program_id(1)
    tl.debug_barrier()  # every thread's dot stores precede the release (module docstring)
    ticket = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(2) - 1:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for j in tl.static_range(TOP_K):  # unrolled: the k loads are all in flight at once
            pair = token * TOP_K + j
            expert = _local_expert(ids_ptr, map_ptr, pair, HAS_MAP)
            dot = tl.load(dots_ptr + pair * hidden + rows, mask=row_mask, other=0.0,
                          cache_modifier=".cg")
            weight = tl.load(weights_ptr + pair).to(tl.float32)
            acc = tl.where(expert >= 0, tl.fma(weight, dot, acc), acc)
        tl.store(out_row, acc.to(out_row.dtype.element_ty), mask=row_mask)
        tl.store(counter, 0)  # every group has drawn: nobody touches it again this launch


# (device, token bucket, k, H, H tiles) -> (dots, counters): the split down launch's workspace,
# made once per key and never freed (a captured graph holds the raw addresses); module docstring
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device: torch.device, token_bucket: int, top_k: int, hidden: int,
                     num_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dots [bucket * k, H] fp32, counters [bucket, H tiles] int32, zero between launches)."""
    return persistent(
        _WORKSPACES, (device, token_bucket, top_k, hidden, num_tiles), device,
        lambda: (torch.empty(token_bucket * top_k, hidden, dtype=torch.float32, device=device),
                 torch.zeros(token_bucket, num_tiles, dtype=torch.int32, device=device)),
        f"moe_gemv's split down workspace ({token_bucket} tokens, top-k {top_k}, H {hidden})")


def launch_gate_up(x: torch.Tensor, w13: torch.Tensor, ids: torch.Tensor, h: torch.Tensor,
                   tile: GemvTile, expert_map: torch.Tensor | None = None) -> None:
    """Launch 1: h[pair] = silu(gate) * up for every (token, slot) pair of contiguous `ids`."""
    inter, hidden = h.shape[1], x.shape[1]
    _gate_up_kernel[(ids.numel(), triton.cdiv(inter, tile.block_n))](
        x, w13, ids, ids if expert_map is None else expert_map, h, inter, hidden, ids.shape[1],
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0), HAS_MAP=expert_map is not None,
        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps, num_stages=1,
        **launch_options(x))


def launch_down(h: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                out: torch.Tensor, tile: GemvTile,
                expert_map: torch.Tensor | None = None) -> None:
    """Launch 2: out[t] = sum_j weights[t, j] * (w2[e_j] @ h[t * k + j]), split over slot
    groups when `tile.slots_per_program` < k."""
    num_tokens, top_k = ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    num_tiles, groups = triton.cdiv(hidden, tile.block_n), tile.num_slot_groups(top_k)
    if groups > 1:
        dots, counts = _split_workspace(out.device, triton.next_power_of_2(num_tokens), top_k,
                                        hidden, num_tiles)
    else:
        dots = counts = out  # unread
    _down_kernel[(num_tokens, num_tiles, groups)](
        h, w2, ids, ids if expert_map is None else expert_map, weights, out, dots, counts,
        hidden, inter, top_k if groups == 1 else tile.slots_per_program, h.stride(0),
        w2.stride(0), w2.stride(1), out.stride(0), TOP_K=top_k, SPLIT=groups > 1,
        HAS_MAP=expert_map is not None, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.num_warps, num_stages=1, **launch_options(out))


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
    h = torch.empty(ids.numel(), inter, dtype=x.dtype, device=x.device)
    launch_gate_up(x, w13, ids, h, config.gate_up, expert_map)
    launch_down(h, w2, ids, topk_weights, out, config.down, expert_map)
    return out
