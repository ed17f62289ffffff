"""Chooses, per op, between the Triton kernels (CUDA) and the torch reference (CPU, oracle).

Layers call these functions and never import a backend directly. `use_triton(False)` forces the
reference path everywhere, which is how the tests compare the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers.activation import silu_and_mul as _silu_and_mul_ref

_triton_enabled = True


def use_triton(enabled: bool) -> None:
    """Enable or disable the Triton kernels in this process (the reference path is the oracle)."""
    global _triton_enabled  # process-wide switch, like torch.backends flags
    _triton_enabled = enabled


def triton_enabled() -> bool:
    return _triton_enabled


_fused_decode_combine = False  # off until measured on a GPU (benchmarks/profile_decode.py)


def use_fused_decode_combine(enabled: bool) -> None:
    """Split-K decode attention: the last split to finish combines the partials (True) or a
    second kernel does (False). Same bits either way; read at launch, so a captured CUDA graph
    keeps the path it was captured with."""
    global _fused_decode_combine  # process-wide switch, like use_triton
    _fused_decode_combine = enabled


def fused_decode_combine_enabled() -> bool:
    return _fused_decode_combine


def _triton_ops(x: torch.Tensor):
    if not (_triton_enabled and x.is_cuda):
        return None
    try:
        from engine.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def _gemv_module(x: torch.Tensor):
    """The one-token GEMV kernels when x is a single row on CUDA with Triton enabled."""
    if not (_triton_enabled and x.is_cuda and x.dim() == 2 and x.shape[0] == 1):
        return None
    try:
        from engine.kernels import gemv
    except ImportError:
        return None
    return gemv


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear; a single bf16/fp16 row on CUDA (decode at batch 1) takes the Triton GEMV,
    which streams the weight faster than cuBLAS does at that shape."""
    gemv = _gemv_module(x)
    if gemv is not None and gemv.supports(x, weight):
        return gemv.gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def silu_and_mul_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """linear(silu_and_mul(x), weight): one kernel for a single bf16/fp16 row on CUDA."""
    gemv = _gemv_module(x)
    if gemv is not None and gemv.supports(x, weight, gemv.MAX_FUSED_SILU_ELEMENTS):
        return gemv.silu_and_mul_gemv(x, weight)
    return linear(silu_and_mul(x), weight)


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                    eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(h), weight, bias), h) with h = x + residual (x when residual is None):
    one kernel for a single bf16/fp16 row on CUDA."""
    gemv = _gemv_module(x)
    if gemv is not None and gemv.supports(x, weight):
        return gemv.rms_norm_gemv(x, residual, norm_weight, eps, weight, bias)
    if residual is None:
        return linear(rms_norm(x, norm_weight, eps), weight, bias), x
    normed, residual = add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight, bias), residual


def sample_race(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
                temperatures: torch.Tensor | None = None) -> torch.Tensor:
    """The sampler's random draw, argmax(logits - log E) with E from the counter-based noise:
    one fused Triton pass on CUDA, torch ops (`engine.sampler.sample_race_ref`) elsewhere.
    `temperatures`: draw from `logits / temperatures[:, None]` (divided in the pass on CUDA).
    `bounds`: a top-p cut (`engine/kernels/top_p.py`, of the tempered rows), applied as the race
    reads the row."""
    if _triton_enabled and logits.is_cuda:
        try:
            from engine.kernels.sampling import sample_race as fused
        except ImportError:
            fused = None
        if fused is not None:
            return fused(logits, seeds, steps, bounds, temperatures)
    from engine.sampler import sample_race_ref

    if temperatures is not None:
        logits = logits.float() / temperatures[:, None]
    if bounds is not None:
        from engine.kernels.top_p import apply_cut

        logits = apply_cut(logits.float(), *bounds)
    return sample_race_ref(logits, seeds, steps)


def sample_top_p(logits: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor,
                 top_ps: torch.Tensor, temperatures: torch.Tensor | None = None
                 ) -> torch.Tensor | None:
    """Draws from each row's nucleus (of `logits / temperatures[:, None]` where given) on CUDA:
    the race over the whole row first, the sort-free cut only for rows whose winner is not
    surely in the nucleus (`engine/kernels/top_p_race.py`); None elsewhere (the caller masks
    with the sorting reference)."""
    if not (_triton_enabled and logits.is_cuda):
        return None
    from engine.kernels.top_p_race import sample_top_p as fused

    return fused(logits, seeds, steps, top_ps, temperatures)


def apply_top_p(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """The nucleus mask: on CUDA a sort-free Triton search for each row's boundary
    (`engine/kernels/top_p.py`), elsewhere the sorting reference `engine.sampler.apply_top_p`."""
    if _triton_enabled and logits.is_cuda:
        from engine.kernels.top_p import apply_top_p as fused

        return fused(logits, top_ps)
    from engine.sampler import apply_top_p as reference

    return reference(logits, top_ps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    ops = _triton_ops(x)
    if ops is not None:
        return ops.rms_norm(x, weight, eps)
    from engine.layers.norm import rms_norm as ref

    return ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    ops = _triton_ops(x)
    if ops is not None:
        return ops.add_rms_norm(x, residual, weight, eps)
    from engine.layers.norm import rms_norm as ref

    residual = x + residual
    return ref(residual, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    ops = _triton_ops(x)
    return ops.silu_and_mul(x) if ops is not None else _silu_and_mul_ref(x)


def apply_rope(q, k, cos, sin, positions):
    ops = _triton_ops(q)
    if ops is not None:
        return ops.apply_rope(q, k, cos, sin, positions)
    from engine.layers.rotary import apply_rope_ref

    return apply_rope_ref(q, k, cos, sin, positions)


def rope_and_write_kv(q, k, v, cos, sin, positions, kv_layer, slot_mapping,
                      qk_norm=None) -> torch.Tensor:
    """Rotate q and k by position and store the rotated k and v in the paged cache `kv_layer`
    at `slot_mapping` (one fused kernel on CUDA); returns the rotated q [T, Hq, D].
    `qk_norm` = (q weight, k weight, eps): a per-head RMSNorm of q and k before the rotation
    (Qwen3), inside the same kernel on CUDA."""
    ops = _triton_ops(q)
    if ops is not None:
        return ops.rope_and_write_kv(q, k, v, cos, sin, positions, kv_layer, slot_mapping,
                                     qk_norm)
    from engine.attention.torch_ref import write_kv
    from engine.layers.norm import rms_norm
    from engine.layers.rotary import apply_rope_ref

    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        q, k = rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)
    q, k = apply_rope_ref(q, k, cos, sin, positions)
    write_kv(kv_layer, k, v, slot_mapping)
    return q
