"""The MoE router's GEMM and its routing in one launch, for decode batches (T <= MAX_TOKENS).

`router_route(x, W, k, renormalize, counts)` returns what `route(F.linear(x, W), k, ...)`
returns (engine/layers/moe.py): router logits x W^T rounded to x's dtype, then softmax, top-k,
renormalisation and the expert-load counters of engine/kernels/moe_route.py. At batch 1 the
router weight (Qwen3-30B-A3B: 128 x 2048 bf16, 0.5 MB) takes well under a microsecond to read,
yet cuBLAS's GEMM and the routing kernel cost ~5 us each (two launches, each a dependent round
trip): this kernel does both in one.

Work split. The grid is (cdiv(E, BLOCK_E), SPLIT_K). Program (p, s) streams the weight rows of
experts [p BLOCK_E, (p+1) BLOCK_E) over the s-th of SPLIT_K column ranges, BLOCK_K columns at
a time with the next strip in flight (as engine/kernels/gemv.py does; the first strip is
loaded before the PDL wait, weights are never written by an earlier kernel), multiplies them
with all T rows of x and keeps a [T, BLOCK_E, BLOCK_K] fp32 partial sum that it reduces once:
a fixed summation order, so the result is deterministic. It stores its fp32 partial logits
to `partials` [SPLIT_K, T, E]. SPLIT_K > 1 only for routers with few experts (Mixtral: 8), so
that enough SMs pull the weight.

Last program routes. Each program then takes a ticket from a per-device int32 counter; the one
that draws the last ticket (num_programs - 1) sums the SPLIT_K partials of every token in
split order, rounds them to x's dtype (F.linear returns its logits in that dtype; HF softmaxes
those in fp32), stores those logits, routes all T tokens with `moe_route.route_tile` (the
routing kernel's own math: ties to the lower expert id, NaN first, renormalisation, one count
atomic per picked expert) and puts the counter back to 0, so the next launch or CUDA-graph
replay finds it clean with no memset. Nobody waits for anybody: the other programs just exit
(no spin lock, no assumption that programs are co-resident).

It routes on a [next_pow2(T), E] tile. The routing kernel's tile ([16, 128] for 128 experts)
would make this serial tail much longer at T = 1 (compiled for sm_90: 6.7k vs 0.8k PTX
instructions, 255 registers with spills vs 56), so the weights may differ from
`moe_route.route`'s on the same logits by an ulp (the softmax sum's order follows the tile's
layout); ids and counts are the same. `RouterTile.routing_rows` = the routing kernel's ROWS
gives its bits exactly (the benchmark times both). Like cuBLAS's, a token's logits may differ
by an ulp between batch sizes (the strip width depends on T).

Memory ordering. (1) A program's partial stores are made by all its threads; `debug_barrier`
(bar.sync) orders them before the ticket, which one thread takes with an acq_rel, gpu-scope
atomic add: its release half publishes, cumulatively, every store the barrier ordered before
it. (2) The counter's increments form one modification order; the program whose add returns
num_programs - 1 comes after all others in it, so its acquire half synchronises with every
other program's release and all partials are visible to it. Triton broadcasts the atomic's
result to the program's threads through shared memory behind a barrier, which orders their
loads after the acquire; the loads also bypass L1 (`.cg`: L1 is not coherent, and lines of
this scratch may be left there by an earlier launch). (3) The reset is a plain store: no
program of this launch touches the counter after its own add, and the next launch's adds come
after this grid completes (stream order; with PDL, each program's atomic comes after its
`gdc_wait`, which returns only once the previous grid has completed and flushed its writes).
Launches that share a device's counter must therefore be ordered on one stream, as the
engine's steps are; a launch killed midway would leave it non-zero.

The block's add + RMSNorm can run here too (`router_route_normed`, ADD_RMS_NORM): before its
strips, every program computes 1/rms of h = x + residual over the whole row (T rows of at most
a few thousand elements, from L2), normalizes each strip as engine/kernels/triton_ops.py's
RMSNorm kernel rounds it, and program (0, 0) stores h and the normalized rows for the experts
and the next layer: the separate add + RMSNorm launch of each MoE layer is gone.

Outputs are sized by (T, k) only and nothing syncs with the host: CUDA-graph capturable. The
counter is allocated on the first eager call on a device (a decode graph's warm-up runs the
step eagerly first); a capture that finds none raises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import moe_route
from engine.kernels.persistent import persistent
from engine.kernels.pdl import launch_options, pdl_wait_and_release

# Past 8 tokens the [T, BLOCK_E, BLOCK_K] partial sum costs registers and the weight is read
# once for more tokens, so cuBLAS's tiles catch up; and the last program routes the whole batch
# alone, work the routing kernel spreads over T / ROWS programs. Decode at small batches is
# where the saved launch matters.
MAX_TOKENS = 8
_ACC_ELEMENTS = 4096  # T_P2 * BLOCK_E * BLOCK_K fp32 partial sums per program (32 per thread)
_TARGET_PROGRAMS = 64  # split K until about this many programs read the weight
_MIN_SPLIT_COLUMNS = 512  # ... but never into ranges narrower than this


@dataclass(frozen=True, slots=True)
class RouterTile:
    """Launch shape of the fused router (benchmarks override the default)."""

    block_e: int  # experts per program
    block_k: int  # weight columns per strip
    split_k: int  # column ranges, one program each
    num_warps: int = moe_route.ROUTING_WARPS  # the routing tile's layout follows it
    # tokens per routing pass of the last program; 0: next_pow2(T), one pass (the routing
    # kernel's ROWS instead gives its weights' bits exactly, at ~8x the instructions)
    routing_rows: int = 0

    def __post_init__(self) -> None:
        for name in ("block_e", "block_k", "num_warps", "routing_rows"):
            value = getattr(self, name)
            if value < 0 or value & (value - 1) or (value == 0 and name != "routing_rows"):
                raise ValueError(f"RouterTile.{name} must be a power of two, got {value}")
        if self.split_k < 1:
            raise ValueError(f"RouterTile.split_k must be >= 1, got {self.split_k}")


@triton.jit
def _h_strip(x_rows, res_rows, k, ok):
    """float32 h = x + residual over columns k, rounded to x's dtype as `x + residual` is."""
    x = tl.load(x_rows + k[None, :], mask=ok, other=0.0)
    r = tl.load(res_rows + k[None, :], mask=ok, other=0.0)
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype).to(tl.float32)


@triton.jit
def _normed_strip(h, inv_rms, norm_w_ptr, k, k_ok, dtype: tl.constexpr):
    """RMSNorm's output over columns k, rounded as engine/kernels/triton_ops.py's kernel rounds
    it: (h / rms).to(dtype) * weight, then to dtype."""
    w = tl.load(norm_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    return ((h * inv_rms[:, None]).to(dtype).to(tl.float32) * w[None, :]).to(dtype)


@triton.jit
def _norm_prologue(x_rows, res_rows, norm_w_ptr, res_out_rows, normed_rows, token_ok, hidden,
                   eps, is_first, T_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    """[T_P2] 1 / rms(h) of each token's h = x + residual (one pass over the row); the program
    `is_first` also stores h and the normalized rows, which the experts read after this launch."""
    strip = tl.arange(0, BLOCK_K)
    sum_sq = tl.zeros([T_P2, BLOCK_K], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k = k0 + strip
        h = _h_strip(x_rows, res_rows, k, token_ok[:, None] & (k < hidden)[None, :])
        sum_sq += h * h
    inv_rms = tl.rsqrt(tl.sum(sum_sq, axis=1) / hidden + eps)
    if is_first:
        dtype = x_rows.dtype.element_ty
        for k0 in range(0, hidden, BLOCK_K):
            k = k0 + strip
            ok = token_ok[:, None] & (k < hidden)[None, :]
            h = _h_strip(x_rows, res_rows, k, ok)
            tl.store(res_out_rows + k[None, :], h.to(dtype), mask=ok)
            tl.store(normed_rows + k[None, :],
                     _normed_strip(h, inv_rms, norm_w_ptr, k, k < hidden, dtype), mask=ok)
    return inv_rms


@triton.jit(do_not_specialize=["num_tokens"])
def _router_kernel(x_ptr, w_ptr, partial_ptr, logits_ptr, ticket_ptr, weights_ptr, ids_ptr,
                   counts_ptr, res_ptr, norm_w_ptr, res_out_ptr, normed_ptr, eps, num_tokens,
                   num_experts, hidden, x_stride, res_stride, w_stride, split_columns,
                   TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_COUNTS: tl.constexpr,
                   ADD_RMS_NORM: tl.constexpr, T_P2: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, ROWS: tl.constexpr,
                   E_P2: tl.constexpr, K_P2: tl.constexpr, USE_PDL: tl.constexpr):
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    expert_ok = experts < num_experts
    split = tl.program_id(1)
    k_begin = split * split_columns
    k_end = tl.minimum(k_begin + split_columns, hidden)
    w_rows = w_ptr + experts.to(tl.int64)[:, None] * w_stride
    strip = tl.arange(0, BLOCK_K)
    w_next = tl.load(w_rows + (k_begin + strip)[None, :],
                     mask=expert_ok[:, None] & (k_begin + strip < k_end)[None, :], other=0.0,
                     eviction_policy="evict_first")
    pdl_wait_and_release(USE_PDL)  # x is the previous kernel's output
    tokens = tl.arange(0, T_P2)
    token_ok = tokens < num_tokens
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * x_stride
    res_rows = res_ptr + tokens.to(tl.int64)[:, None] * res_stride
    inv_rms = tl.zeros([T_P2], tl.float32)
    if ADD_RMS_NORM:  # the input is RMSNorm(x + residual), computed here (one launch fewer)
        out_rows = tokens.to(tl.int64)[:, None] * hidden
        inv_rms = _norm_prologue(x_rows, res_rows, norm_w_ptr, res_out_ptr + out_rows,
                                 normed_ptr + out_rows, token_ok, hidden, eps,
                                 (tl.program_id(0) == 0) & (split == 0), T_P2, BLOCK_K)
    acc = tl.zeros([T_P2, BLOCK_E, BLOCK_K], tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        w = w_next
        kn = k0 + BLOCK_K + strip
        w_next = tl.load(w_rows + kn[None, :], mask=expert_ok[:, None] & (kn < k_end)[None, :],
                         other=0.0, eviction_policy="evict_first")
        k = k0 + strip
        ok = token_ok[:, None] & (k < k_end)[None, :]
        if ADD_RMS_NORM:
            x = _normed_strip(_h_strip(x_rows, res_rows, k, ok), inv_rms, norm_w_ptr, k,
                              k < k_end, x_ptr.dtype.element_ty).to(tl.float32)
        else:
            x = tl.load(x_rows + k[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += x[:, None, :] * w.to(tl.float32)[None, :, :]
    partial = tl.sum(acc, axis=2)  # [T_P2, BLOCK_E]
    rows = split * num_tokens + tokens
    tl.store(partial_ptr + rows.to(tl.int64)[:, None] * num_experts + experts[None, :], partial,
             mask=token_ok[:, None] & expert_ok[None, :])
    tl.debug_barrier()  # every thread's partial stores precede the release below
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:  # all partials released
        for first_row in range(0, num_tokens, ROWS):
            logits = _logits_tile(partial_ptr, logits_ptr, first_row, num_tokens, num_experts,
                                  SPLIT_K, ROWS, E_P2)
            moe_route.route_tile(logits, weights_ptr, ids_ptr, counts_ptr, first_row,
                                 num_tokens, num_experts, TOP_K, RENORMALIZE, HAS_COUNTS,
                                 ROWS, E_P2, K_P2)
        tl.store(ticket_ptr, 0)  # clean for the next launch (see the module docstring)


@triton.jit
def _logits_tile(partial_ptr, logits_ptr, first_row, num_tokens, num_experts,
                 SPLIT_K: tl.constexpr, ROWS: tl.constexpr, E_P2: tl.constexpr):
    """[ROWS, E_P2] fp32: the partials summed in split order, rounded to the logits' dtype
    (stored there too), -inf in the padding columns as `route_tile` takes them."""
    rows = first_row + tl.arange(0, ROWS)
    cols = tl.arange(0, E_P2)
    ok = (rows < num_tokens)[:, None] & (cols < num_experts)[None, :]
    offsets = rows.to(tl.int64)[:, None] * num_experts + cols[None, :]
    acc = tl.load(partial_ptr + offsets, mask=ok, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + s * num_tokens * num_experts + offsets, mask=ok, other=0.0,
                       cache_modifier=".cg")
    rounded = acc.to(logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + offsets, rounded, mask=ok)
    return tl.where(cols[None, :] < num_experts, rounded.to(tl.float32), float("-inf"))


class _Tickets:
    """One int32 arrival counter per device: zeroed when allocated (on the first eager call),
    put back to 0 by each launch's last program, never memset per step, never freed (captured
    graphs point at it: engine/kernels/persistent.py)."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device) -> torch.Tensor:
        return persistent(self._by_device, device, device,
                          lambda: torch.zeros(1, dtype=torch.int32, device=device),
                          "the fused MoE router's ticket counter")


_TICKETS = _Tickets()  # process-wide, like the kernels' compile caches


def supports(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> bool:
    """Whether `router_route` serves this call: 1 to MAX_TOKENS bf16/fp16 rows on CUDA (or the
    interpreter's CPU) against a row-major weight of the same dtype, a router `route` takes."""
    return (x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS
            and x.dtype in (torch.bfloat16, torch.float16) and router_weight.dtype == x.dtype
            and router_weight.dim() == 2 and router_weight.shape[1] == x.shape[1]
            and x.stride(1) == 1 and router_weight.stride(1) == 1
            and x.device == router_weight.device
            and moe_route.supports(router_weight.shape[0], top_k))


def router_route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
                 expert_counts: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 weights [T, k], int64 expert ids [T, k]) = route(F.linear(x, router_weight), ...),
    the pairs added to `expert_counts` (int64 [E]) when given. x: [T, H], T <= MAX_TOKENS."""
    weights, ids, _ = router_route_with_logits(x, router_weight, top_k, renormalize,
                                               expert_counts)
    return weights, ids


def router_route_normed(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                        eps: float, router_weight: torch.Tensor, top_k: int, renormalize: bool,
                        expert_counts: torch.Tensor | None = None):
    """`router_route(rms_norm(h), ...)` with h = x + residual, the add + RMSNorm done inside
    the router's launch (rounded as `dispatch.add_rms_norm` rounds them; its 1/rms may differ
    by an ulp, the sum of squares running in another order). Returns (weights, ids, the
    normalized rows, h): the experts and the next layer read them."""
    if (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1
            or norm_weight.shape != (x.shape[1],)):
        raise ValueError(f"residual must be like x {tuple(x.shape)} {x.dtype} (row-major) and "
                         f"norm_weight [{x.shape[1]}]; got {tuple(residual.shape)} "
                         f"{residual.dtype}, {tuple(norm_weight.shape)}")
    normed, h = torch.empty_like(x), torch.empty_like(x)
    weights, ids, _ = router_route_with_logits(x, router_weight, top_k, renormalize,
                                               expert_counts,
                                               norm=(residual, norm_weight, eps, normed, h))
    return weights, ids, normed, h


def router_route_with_logits(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                             renormalize: bool, expert_counts: torch.Tensor | None = None,
                             tile: RouterTile | None = None, norm: tuple | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`router_route` plus the router logits [T, E] in x's dtype it routed (for tests and
    benchmarks); `tile` overrides the launch shape; `norm` = (residual, norm weight, eps,
    normalized rows out, h out): route RMSNorm(x + residual) (`router_route_normed`)."""
    _check_inputs(x, router_weight, top_k, expert_counts)
    num_tokens, hidden = x.shape
    num_experts = router_weight.shape[0]
    tile = tile or default_tile(num_tokens, num_experts, hidden)
    split_columns = triton.cdiv(triton.cdiv(hidden, tile.split_k), tile.block_k) * tile.block_k
    device = x.device
    partials = torch.empty(tile.split_k, num_tokens, num_experts, dtype=torch.float32,
                           device=device)
    logits = torch.empty(num_tokens, num_experts, dtype=x.dtype, device=device)
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
    _, experts_p2, k_p2 = moe_route.routing_tile(num_experts, top_k)
    rows = tile.routing_rows or triton.next_power_of_2(num_tokens)
    grid = (triton.cdiv(num_experts, tile.block_e), triton.cdiv(hidden, split_columns))
    residual, norm_weight, eps, normed, h = norm if norm is not None else (x, x, 0.0, x, x)
    _router_kernel[grid](
        x, router_weight, partials, logits, _TICKETS.get(device), weights, ids,
        expert_counts if expert_counts is not None else ids, residual, norm_weight, h, normed,
        float(eps), num_tokens, num_experts, hidden, x.stride(0), residual.stride(0),
        router_weight.stride(0), split_columns, TOP_K=top_k,
        RENORMALIZE=renormalize, HAS_COUNTS=expert_counts is not None,
        ADD_RMS_NORM=norm is not None,
        T_P2=triton.next_power_of_2(num_tokens), BLOCK_E=tile.block_e, BLOCK_K=tile.block_k,
        SPLIT_K=grid[1], ROWS=rows, E_P2=experts_p2, K_P2=k_p2, num_warps=tile.num_warps,
        **launch_options(x))
    return weights, ids, logits


def default_tile(num_tokens: int, num_experts: int, hidden: int) -> RouterTile:
    """One expert per program; K split until about _TARGET_PROGRAMS programs read the weight
    (1 split for 64+ experts); the widest strip the partial sum's registers allow."""
    split_k = 1
    while (num_experts * split_k * 2 <= _TARGET_PROGRAMS
           and hidden // (split_k * 2) >= _MIN_SPLIT_COLUMNS):
        split_k *= 2
    block_k = min(triton.next_power_of_2(triton.cdiv(hidden, split_k)),
                  _ACC_ELEMENTS // triton.next_power_of_2(num_tokens))
    return RouterTile(block_e=1, block_k=max(16, block_k), split_k=split_k)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, top_k: int,
                  counts: torch.Tensor | None) -> None:
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_TOKENS:
        raise ValueError(f"x must be [T, H] with 1 <= T <= {MAX_TOKENS}, got {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"router_weight must be [E, H], got {tuple(weight.shape)}")
    moe_route.check_routing(weight.shape[0], top_k, counts, x.device)
    if not supports(x, weight, top_k):
        raise ValueError(f"router_weight must be a row-major [E, {x.shape[1]}] tensor of x's "
                         f"dtype (bf16 or fp16) on {x.device}, x row-major; got x {x.dtype} "
                         f"stride {x.stride()}, router_weight {weight.dtype} "
                         f"{tuple(weight.shape)} stride {weight.stride()} on {weight.device}")
