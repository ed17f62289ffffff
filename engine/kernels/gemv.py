"""Matrix-vector product y = W x (+ b) for one token: the weight read of decode at batch 1.

At batch 1 a decode step is nothing but reading every weight once, so each projection must
stream its weight at the memory's full speed. cuBLAS reaches 79-90% of the copy bandwidth on the
smaller Llama-3-8B projections at M=1 (q/k/v, o) and splits K into a second reduce kernel
for some; this kernel gives each program BLOCK_N whole rows, reads them in BLOCK_K-wide
strips with many loads in flight, keeps a [BLOCK_N, BLOCK_K] float32 partial sum in registers
and reduces it once at the end: one kernel, one pass over W, a fixed summation order
(deterministic). Used for bf16/fp16 on CUDA when the input is a single row and the weight is
one of the sizes where it wins (`supports`); everything else stays with cuBLAS.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_cols, w_stride,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < n_cols
        x = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(out_ptr.dtype.element_ty), mask=row_mask)


# BLOCK_N, BLOCK_K, num_warps, num_stages: the best single configuration of
# benchmarks/gemv_sweep.py on an H200 (results/gemv_sweep_NVIDIA-H200.json).
DEFAULT_CONFIG = (4, 512, 4, 1)
# Where it beats cuBLAS there: q/k/v (25M weights, 76.6% vs 71.7% of the copy bandwidth) and o
# (16.8M, 71.2% vs 64.3%). On gate/up (117M), down (59M) and the LM head (525M) cuBLAS is as
# fast or faster (90-104%), so larger weights stay with it.
MAX_WEIGHT_ELEMENTS = 32 << 20


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row of bf16/fp16 input against a row-major weight of the same dtype, small enough
    that the kernel beats cuBLAS."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.stride(1) == 1 and x.stride(1) == 1
            and weight.numel() <= MAX_WEIGHT_ELEMENTS)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int, int] = DEFAULT_CONFIG) -> torch.Tensor:
    """x: [1, K], weight: [N, K], bias: [N] or None -> [1, N] (F.linear for one row)."""
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {k}")
    block_n, block_k, warps, stages = config
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    return out
