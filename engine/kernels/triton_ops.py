"""Fused elementwise and row kernels in Triton: RMSNorm, add+RMSNorm, SiLU-and-mul, RoPE, and
RoPE fused with the paged KV-cache write.

Every kernel reads its inputs once and writes its outputs once (these ops are memory-bound);
arithmetic is float32 and each output is rounded once to the input dtype. The torch versions in
`engine.layers` are the oracles (`tests/kernels/`).

KV-cache slots follow `engine.attention.metadata`: slot = block * block_size + offset, and a
negative slot means "write nothing" (the padded rows of a CUDA-graph batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.kv_tiles import round_to_e4m3
from engine.kernels.pdl import launch_options, pdl_wait_and_release
from engine.kv_cache import fp8
from engine.kv_cache.fp8 import is_fp8


def _row_warps(block: int) -> int:
    return max(1, min(16, block // 256))


# ---------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, x_stride, res_stride,
                     out_stride, res_out_stride, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like `x + residual`
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / rms(x) over the last dim."""
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, x2, weight, out, out, x2.stride(0), 0, out.stride(0), 0, x2.shape[1], eps,
            HAS_RESIDUAL=False, BLOCK=block, num_warps=_row_warps(block),
            **launch_options(x2))
    return out.view(x.shape)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """Returns (rms_norm(x + residual), x + residual) in one pass."""
    x2, r2 = _rows(x), _rows(residual)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = triton.next_power_of_2(x2.shape[1])
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, new_res, x2.stride(0), r2.stride(0), out.stride(0),
            new_res.stride(0), x2.shape[1], eps, HAS_RESIDUAL=True, BLOCK=block,
            num_warps=_row_warps(block),
            **launch_options(x2))
    return out.view(x.shape), new_res.view(x.shape)


# ---------------------------------------------------------------- SiLU and mul


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, n_cols, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] along the last dim; returns silu(gate) * up."""
    x2 = _rows(x)
    n = x2.shape[1] // 2
    out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = min(2048, triton.next_power_of_2(n))
        grid = (x2.shape[0], triton.cdiv(n, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block,
                                   num_warps=_row_warps(block),
                                   **launch_options(x2))
    return out.view(*x.shape[:-1], n)


# ---------------------------------------------------------------- RoPE (+ KV-cache write)


@triton.jit
def _rotate(x_ptr, row_stride, heads, num_heads, half, cos1, sin1, cos2, sin2, norm_w_ptr, eps,
            QK_NORM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Load [heads, 2*half] at x_ptr and return the rotated halves (float32). QK_NORM: each
    head is first RMS-normalized and scaled by `norm_w_ptr` (Qwen3's q/k norm), rounded to the
    input dtype twice as `engine.layers.norm.rms_norm`'s output would be."""
    d = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (d[None, :] < half)
    ptrs = x_ptr + heads[:, None] * row_stride + d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + half, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        dt = x_ptr.dtype.element_ty
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        w1 = tl.load(norm_w_ptr + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_w_ptr + half + d, mask=d < half, other=0.0).to(tl.float32)[None, :]
        x1 = ((x1 * inv[:, None]).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
        x2 = ((x2 * inv[:, None]).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
    return x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2, mask


@triton.jit
def _quantize_fp8(x1, x2):
    """[heads, 2*half] float32 (two halves) -> e4m3 bytes of x * 448 / amax per head (two
    halves) and each head's scale amax / 448 (engine/kv_cache/fp8.py)."""
    amax = tl.maximum(tl.max(tl.abs(x1), axis=1), tl.max(tl.abs(x2), axis=1))
    amax = tl.where(amax > 0.0, amax, 448.0)  # an all-zero row: scale 1
    inv = (448.0 / amax)[:, None]
    e1 = round_to_e4m3(x1 * inv).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    e2 = round_to_e4m3(x2 * inv).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
    return e1, e2, amax / 448.0


@triton.jit
def _store_fp8_key(row_ptrs, d, x1, x2, mask, hmask, half):
    """A key row per head at `row_ptrs`: its e4m3 bytes, then its float32 scale."""
    e1, e2, scale = _quantize_fp8(x1, x2)
    rows = row_ptrs[:, None] + d[None, :]
    tl.store(rows, e1, mask=mask)
    tl.store(rows + half, e2, mask=mask)
    tl.store((row_ptrs + 2 * half).to(tl.pointer_type(tl.float32)), scale, mask=hmask)


@triton.jit
def _store_fp8_value(slab_ptrs, offset, d, x1, x2, mask, hmask, half, block_size):
    """A value per head into its transposed slab at `slab_ptrs` (slot `offset` of the block):
    element j at j * block_size + offset, the float32 scale after all values."""
    e1, e2, scale = _quantize_fp8(x1, x2)
    cols = slab_ptrs[:, None] + d[None, :] * block_size + offset
    tl.store(cols, e1, mask=mask)
    tl.store(cols + half * block_size, e2, mask=mask)
    scale_ptrs = slab_ptrs + 2 * half * block_size + offset * 4
    tl.store(scale_ptrs.to(tl.pointer_type(tl.float32)), scale, mask=hmask)


@triton.jit
def _rope_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                 kv_ptr, slot_ptr, q_norm_ptr, k_norm_ptr, norm_eps,
                 q_stride_t, q_stride_h, k_stride_t, k_stride_h, v_stride_t, v_stride_h,
                 qo_stride_t, qo_stride_h, ko_stride_t, ko_stride_h, cos_stride,
                 kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
                 num_q_heads, num_kv_heads, half, block_size,
                 WRITE_CACHE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, FP8: tl.constexpr, QK_NORM: tl.constexpr,
                 USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    dmask = d < half
    cos1 = tl.load(cos_ptr + pos * cos_stride + d, mask=dmask, other=0.0)[None, :]
    sin1 = tl.load(sin_ptr + pos * cos_stride + d, mask=dmask, other=0.0)[None, :]
    cos2 = tl.load(cos_ptr + pos * cos_stride + half + d, mask=dmask, other=0.0)[None, :]
    sin2 = tl.load(sin_ptr + pos * cos_stride + half + d, mask=dmask, other=0.0)[None, :]

    hq = tl.arange(0, BLOCK_HQ)
    q1, q2, qmask = _rotate(q_ptr + t * q_stride_t, q_stride_h, hq, num_q_heads, half,
                            cos1, sin1, cos2, sin2, q_norm_ptr, norm_eps, QK_NORM, BLOCK_HALF)
    qo = q_out_ptr + t * qo_stride_t + hq[:, None] * qo_stride_h + d[None, :]
    tl.store(qo, q1.to(q_out_ptr.dtype.element_ty), mask=qmask)
    tl.store(qo + half, q2.to(q_out_ptr.dtype.element_ty), mask=qmask)

    hk = tl.arange(0, BLOCK_HK)
    k1, k2, kmask = _rotate(k_ptr + t * k_stride_t, k_stride_h, hk, num_kv_heads, half,
                            cos1, sin1, cos2, sin2, k_norm_ptr, norm_eps, QK_NORM, BLOCK_HALF)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            offset = slot % block_size
            block_base = kv_ptr + (slot // block_size) * kv_stride_block
            base = block_base + offset * kv_stride_tok
            ko = base + hk[:, None] * kv_stride_h + d[None, :]
            vi = v_ptr + t * v_stride_t + hk[:, None] * v_stride_h + d[None, :]
            vo = base + kv_stride_kv + hk[:, None] * kv_stride_h + d[None, :]
            if FP8:  # a key row, a value into its slab (engine/kv_cache/fp8.py)
                dt = k_ptr.dtype.element_ty  # quantize what the reference stores: k in model dtype
                hmask = hk < num_kv_heads
                _store_fp8_key(base + hk * kv_stride_h, d, k1.to(dt).to(tl.float32),
                               k2.to(dt).to(tl.float32), kmask, hmask, half)
                v1 = tl.load(vi, mask=kmask, other=0.0).to(tl.float32)
                v2 = tl.load(vi + half, mask=kmask, other=0.0).to(tl.float32)
                _store_fp8_value(block_base + kv_stride_kv + hk * kv_stride_h, offset, d, v1, v2,
                                 kmask, hmask, half, block_size)
            else:
                tl.store(ko, k1.to(kv_ptr.dtype.element_ty), mask=kmask)
                tl.store(ko + half, k2.to(kv_ptr.dtype.element_ty), mask=kmask)
                tl.store(vo, tl.load(vi, mask=kmask), mask=kmask)
                tl.store(vo + half, tl.load(vi + half, mask=kmask), mask=kmask)
    else:
        ko = k_out_ptr + t * ko_stride_t + hk[:, None] * ko_stride_h + d[None, :]
        tl.store(ko, k1.to(k_out_ptr.dtype.element_ty), mask=kmask)
        tl.store(ko + half, k2.to(k_out_ptr.dtype.element_ty), mask=kmask)


def _check_rope_inputs(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> None:
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be contiguous along head_dim")
    if q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1]:
        raise ValueError(f"head_dim must be even and match cos ({q.shape[-1]} vs {cos.shape[-1]})")


def _launch_rope(q, k, v, cos, sin, positions, q_out, k_out, kv_layer, slot_mapping,
                 write_cache: bool, qk_norm: tuple | None = None) -> None:
    _check_rope_inputs(q, k, cos)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_tokens == 0:
        return
    half = head_dim // 2
    kv_strides = kv_layer.stride()[:4] if write_cache else (0, 0, 0, 0)
    block_size = kv_layer.shape[2] if write_cache else 1
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (cos, cos, 0.0)
    _rope_kernel[(num_tokens,)](
        q, k, v, positions, cos, sin, q_out, k_out, kv_layer, slot_mapping, q_norm, k_norm,
        float(eps), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        cos.stride(0), *kv_strides, num_q_heads, num_kv_heads, half, block_size,
        WRITE_CACHE=write_cache, BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(half), FP8=write_cache and is_fp8(kv_layer),
        QK_NORM=qk_norm is not None, num_warps=4,
        **launch_options(q))


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-rotation RoPE. q: [T, Hq, D], k: [T, Hkv, D], cos/sin: [max_pos, D] float32."""
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch_rope(q, k, k, cos, sin, positions, q_out, k_out, q_out, positions, write_cache=False)
    return q_out, k_out


def rope_and_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                      slot_mapping: torch.Tensor, qk_norm: tuple | None = None) -> torch.Tensor:
    """Rotate q and k, store the rotated k and v at `slot_mapping` in `kv_layer`
    ([num_blocks, 2, block_size, Hkv, D]); returns the rotated q as a new [T, Hq, D] tensor.
    `qk_norm` = (q weight [D], k weight [D], eps): RMS-normalize each q and k head first (in
    the same kernel: Qwen3's q/k norm without two more launches)."""
    if kv_layer.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("kv_layer and v must be contiguous along head_dim")
    if is_fp8(kv_layer):
        fp8.check_layout(kv_layer)
    if qk_norm is not None and any(w.shape != (q.shape[-1],) or not w.is_contiguous()
                                   for w in qk_norm[:2]):
        raise ValueError(f"q/k norm weights must be contiguous [{q.shape[-1]}]")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch_rope(q, k, v, cos, sin, positions, q_out, q_out, kv_layer, slot_mapping,
                 write_cache=True, qk_norm=qk_norm)
    return q_out


# ---------------------------------------------------------------- plain KV-cache write


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, kv_ptr, slot_ptr, k_stride_t, k_stride_h, v_stride_t,
                     v_stride_h, kv_stride_block, kv_stride_kv, kv_stride_tok, kv_stride_h,
                     num_kv_heads, head_dim, block_size,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                     USE_PDL: tl.constexpr):
    pdl_wait_and_release(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < num_kv_heads) & (d < head_dim)
        base = kv_ptr + (slot // block_size) * kv_stride_block + (slot % block_size) * kv_stride_tok
        k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
        tl.store(base + h * kv_stride_h + d, k.to(kv_ptr.dtype.element_ty), mask=mask)
        tl.store(base + kv_stride_kv + h * kv_stride_h + d, v.to(kv_ptr.dtype.element_ty), mask=mask)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store k, v ([T, Hkv, D]) at `slot_mapping` in kv_layer; negative slots are skipped.
    An fp8 cache takes the torch reference write (the fused RoPE write is the fast path)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if is_fp8(kv_layer):
        from engine.attention.torch_ref import write_kv as write_kv_ref

        keep = slot_mapping >= 0
        write_kv_ref(kv_layer, k[keep], v[keep], slot_mapping[keep])
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_layer, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *kv_layer.stride()[:4], num_kv_heads, head_dim, kv_layer.shape[2],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=2,
        **launch_options(k))
