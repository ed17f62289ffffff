"""Matrix-vector product y = W f(x) (+ b) for one token: the weight read of decode at batch 1.

At batch 1 a decode step is nothing but reading every weight once, so each projection must
stream its weight at the memory's full speed. cuBLAS reaches 79-90% of the copy bandwidth on the
smaller Llama-3-8B projections at M=1 (q/k/v, o) and splits K into a second reduce kernel
for some; this kernel gives each program BLOCK_N whole rows, reads them in BLOCK_K-wide
strips with many loads in flight, keeps a [BLOCK_N, BLOCK_K] float32 partial sum in registers
and reduces it once at the end: one kernel, one pass over W, a fixed summation order
(deterministic).

The element-wise op that produces x can run inside the kernel (`Prologue`), which removes a
launch and a round trip through memory per projection at batch 1:
- SILU_MUL: x = silu(gate) * up from the gate/up projection's output (the MLP's down projection);
- RMS_NORM / ADD_RMS_NORM: x = rms_norm(h) * g with h = x or x + residual (the attention's
  q/k/v projection). The norm is a scalar per row, so the kernel computes W (g * h) and the
  sum of squares of h in the same pass and divides by rms(h) at the end: no extra pass, no
  wait before the first weight load. Program 0 also stores h, the new residual (rounded to the
  dtype like `x + residual`); g * h / rms(h) is not rounded to the dtype as the unfused norm
  kernel rounds it, so the two differ by that rounding.
SiLU-and-mul rounds its output to the dtype as the unfused kernel does.

Used for bf16/fp16 on CUDA when the input is a single row and the weight is one of the sizes
where it wins (`supports`); everything else stays with cuBLAS.

Tiles: `gemv_configs.json` (beside this file, read-only here), written by
`benchmarks/gemv_sweep.py --shapes ... --write-configs` on the GPU it names. Keys name a GPU,
prologue and weight shape, "gpu=NVIDIA H100 80GB HBM3,prologue=rms_norm,N=5120,K=2048"
(prologue: plain, rms_norm (with or without the residual add) or silu_mul; N, K: this rank's
weight), values are [BLOCK_N, BLOCK_K, num_warps, num_stages]. A shape never swept on this GPU
(or no file) gets the prologue's constant below, chosen on the Llama-3-8B shapes. The lookup
is cached per (prologue, N, K, device): after the first call of a shape, one dict lookup.
"""

from __future__ import annotations

import enum
import functools
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

from engine.kernels.pdl import launch_options, pdl_wait_and_release
from engine.kernels.prefill_attention_configs import device_name

CONFIG_PATH = Path(__file__).with_name("gemv_configs.json")
GemvConfig = tuple[int, int, int, int]  # BLOCK_N, BLOCK_K, num_warps, num_stages


class Prologue(enum.IntEnum):
    NONE = 0
    SILU_MUL = 1
    RMS_NORM = 2
    ADD_RMS_NORM = 3


@triton.jit
def _input_strip(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, k, k_mask, n_cols, is_first,
                 PROLOGUE: tl.constexpr):
    """Columns k of the GEMV's input vector in float32 (for the norms: h * g, and h)."""
    if PROLOGUE == 1:
        gate = tl.load(x_ptr + k, mask=k_mask, other=0.0)
        up = tl.load(x_ptr + n_cols + k, mask=k_mask, other=0.0).to(tl.float32)
        gf = gate.to(tl.float32)
        x = (gf / (1.0 + tl.exp(-gf)) * up).to(gate.dtype).to(tl.float32)
        h = x
    else:
        h = tl.load(x_ptr + k, mask=k_mask, other=0.0)
        if PROLOGUE == 3:
            r = tl.load(res_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            h = (h.to(tl.float32) + r).to(h.dtype)  # rounded like `x + residual`
            if is_first:
                tl.store(res_out_ptr + k, h, mask=k_mask)
        h = h.to(tl.float32)
        x = h
        if PROLOGUE >= 2:
            x = h * tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
    return x, h


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, res_ptr, norm_w_ptr, res_out_ptr, eps,
                 n_rows, n_cols, w_stride, HAS_BIAS: tl.constexpr, PROLOGUE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * w_stride
    strip = tl.arange(0, BLOCK_K)
    # strips of W are double-buffered in registers: strip i+1 is in flight while i is summed.
    # The first is loaded before waiting for the previous kernel (weights are never written).
    w_next = tl.load(w_rows + strip[None, :], mask=row_mask[:, None] & (strip < n_cols)[None, :],
                     other=0.0, eviction_policy="evict_first")
    pdl_wait_and_release(USE_PDL)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    sum_sq = tl.zeros([BLOCK_K], tl.float32)  # RMSNorm: the row's sum of squares, on the way
    for k0 in range(0, n_cols, BLOCK_K):
        w = w_next
        kn = k0 + BLOCK_K + strip
        w_next = tl.load(w_rows + kn[None, :], mask=row_mask[:, None] & (kn < n_cols)[None, :],
                         other=0.0, eviction_policy="evict_first")
        k = k0 + strip
        k_mask = k < n_cols
        x, h = _input_strip(x_ptr, res_ptr, norm_w_ptr, res_out_ptr, k, k_mask, n_cols,
                            pid == 0, PROLOGUE)
        acc += w.to(tl.float32) * x[None, :]
        if PROLOGUE >= 2:
            sum_sq += h * h
    y = tl.sum(acc, axis=1)
    if PROLOGUE >= 2:  # W (g * h / rms(h)) = (W (g * h)) / rms(h)
        y = y * tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
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
# With SiLU-and-mul fused in, the kernel also saves two launches (the activation and cuBLAS's
# split-K reduce): at the down projection (59M) it takes 28.3 us (97.6% of the copy bandwidth)
# where SiLU + cuBLAS take 31.2 us; add+RMSNorm fused into q/k/v: 15.7 us, unfused 17.3 us
# (`gemv_sweep.py`, `fused` section, with PDL). Their best configurations:
MAX_FUSED_SILU_ELEMENTS = 64 << 20
SILU_CONFIG = (8, 1024, 4, 1)
NORM_CONFIG = (4, 256, 4, 1)


PROLOGUE_NAMES = {Prologue.NONE: "plain", Prologue.SILU_MUL: "silu_mul",
                  Prologue.RMS_NORM: "rms_norm", Prologue.ADD_RMS_NORM: "rms_norm"}
DEFAULT_CONFIGS: dict[str, GemvConfig] = {"plain": DEFAULT_CONFIG, "rms_norm": NORM_CONFIG,
                                          "silu_mul": SILU_CONFIG}
_KEY = re.compile(r"gpu=[^,]+,prologue=(plain|rms_norm|silu_mul),N=[1-9][0-9]*,K=[1-9][0-9]*")


def shape_key(gpu: str, prologue: str, n: int, k: int) -> str:
    return f"gpu={gpu},prologue={prologue},N={n},K={k}"


def get_config(prologue: str, n: int, k: int, device: torch.device | str,
               path: Path | None = None) -> GemvConfig:
    """The swept tile of this GPU, prologue and [N, K] weight, else the prologue's constant."""
    return _lookup(prologue, n, k, device, path or CONFIG_PATH)


@functools.lru_cache(maxsize=None)
def _lookup(prologue: str, n: int, k: int, device: torch.device | str,
            path: Path) -> GemvConfig:
    if prologue not in DEFAULT_CONFIGS:
        raise ValueError(f"prologue must be one of {sorted(DEFAULT_CONFIGS)}, got {prologue!r}")
    key = shape_key(device_name(torch.device(device)), prologue, n, k)
    return _swept(path).get(key, DEFAULT_CONFIGS[prologue])


@functools.lru_cache(maxsize=None)
def _swept(path: Path) -> dict[str, GemvConfig]:
    """The JSON's configs, checked: a malformed file is an error naming it, not a silent
    fallback (it is checked in, and a fallback would hide the slowdown it exists to fix)."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        configs = raw["configs"]
        if not isinstance(configs, dict):
            raise ValueError(f"'configs' must be an object, got {type(configs).__name__}")
        return {key: _checked(key, value) for key, value in configs.items()}
    except (ValueError, KeyError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"malformed GEMV tile configs in {path}: {exc!r}") from exc


def _checked(key: str, value) -> GemvConfig:
    if not _KEY.fullmatch(key):
        raise ValueError(f"key {key!r} is not 'gpu=...,prologue=plain|rms_norm|silu_mul,N=..,K=..'")
    if (not isinstance(value, list) or len(value) != 4
            or not all(type(v) is int and v > 0 for v in value)):
        raise ValueError(f"{key}: value must be [BLOCK_N, BLOCK_K, num_warps, num_stages] "
                         f"of positive ints, got {value!r}")
    block_n, block_k, warps, stages = value
    for name, v in (("BLOCK_N", block_n), ("BLOCK_K", block_k), ("num_warps", warps)):
        if v & (v - 1):
            raise ValueError(f"{key}: {name} must be a power of two, got {v}")
    if stages > 8:
        raise ValueError(f"{key}: num_stages must be in 1..8, got {stages}")
    return block_n, block_k, warps, stages


def write_configs(configs: dict[str, GemvConfig], note: str, path: Path | None = None) -> None:
    """Merge `configs` into the JSON (other keys kept) and forget the loaded copy. For the
    sweep only: serving reads the file, never writes it."""
    path = path or CONFIG_PATH
    _swept.cache_clear()  # merge with the file as it is now
    merged = dict(_swept(path))
    merged.update({key: _checked(key, list(cfg)) for key, cfg in configs.items()})
    payload = {"note": note, "configs": {key: list(merged[key]) for key in sorted(merged)}}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    clear_cache()


def clear_cache() -> None:
    """Forget the loaded JSON and the lookups (after a sweep rewrote it)."""
    _swept.cache_clear()
    _lookup.cache_clear()


def supports(x: torch.Tensor, weight: torch.Tensor,
             max_elements: int = MAX_WEIGHT_ELEMENTS) -> bool:
    """One row of bf16/fp16 input against a row-major weight of the same dtype, small enough
    that the kernel beats cuBLAS."""
    return (x.dim() == 2 and x.shape[0] == 1 and x.dtype in (torch.bfloat16, torch.float16)
            and weight.dtype == x.dtype and weight.stride(1) == 1 and x.stride(1) == 1
            and weight.numel() <= max_elements)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x: [1, K], weight: [N, K], bias: [N] or None -> [1, N] (F.linear for one row).
    `config` (all three functions): the tile; None looks it up (`get_config`)."""
    _check_features(x.shape[-1], weight)
    return _launch(x, weight, bias, Prologue.NONE, config=config)


def silu_and_mul_gemv(x: torch.Tensor, weight: torch.Tensor,
                      config: GemvConfig | None = None) -> torch.Tensor:
    """x: [1, 2K] = [gate | up], weight: [N, K] -> F.linear(silu(gate) * up, weight)."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even number of features, got {x.shape[-1]}")
    _check_features(x.shape[-1] // 2, weight)
    return _launch(x, weight, None, Prologue.SILU_MUL, config=config)


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                  eps: float, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemvConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(h) * norm_weight, weight, bias), h) with h = x (+ residual):
    x, residual: [1, K]; weight: [N, K]."""
    _check_features(x.shape[-1], weight)
    if residual is None:
        return _launch(x, weight, bias, Prologue.RMS_NORM, norm_weight, eps, config=config), x
    if residual.shape != x.shape or residual.stride(-1) != 1:
        raise ValueError(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
    new_residual = torch.empty_like(x)
    y = _launch(x, weight, bias, Prologue.ADD_RMS_NORM, norm_weight, eps, residual,
                new_residual, config)
    return y, new_residual


def _check_features(k: int, weight: torch.Tensor) -> None:
    if k != weight.shape[1]:
        raise ValueError(f"x has {k} features, weight expects {weight.shape[1]}")


def _launch(x, weight, bias, prologue: Prologue, norm_weight=None, eps: float = 0.0,
            residual=None, res_out=None, config: GemvConfig | None = None) -> torch.Tensor:
    n, k = weight.shape
    if config is None:
        config = get_config(PROLOGUE_NAMES[prologue], n, k, x.device)
    block_n, block_k, warps, stages = config
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else weight, out,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else weight,
        res_out if res_out is not None else out, eps, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, PROLOGUE=int(prologue),
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
        **launch_options(x))
    return out
