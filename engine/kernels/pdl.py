"""Programmatic dependent launch (PDL, Hopper and later): a kernel may start while the one before
it in the stream is still running, and waits (`gdc_wait`) only where it reads what that kernel
wrote.

A decode step at batch 1 is ~260 short kernels; without PDL each one starts only after the
previous has fully drained, and the GPU idles for the launch latency in between. With it:
- every Triton kernel of a captured step is launched with the PDL attribute and, first thing,
  waits for its predecessor and lets its own successor launch (`pdl_wait_and_release`);
- the one-token GEMV loads its first strip of weights *before* waiting, since weights are never
  written by an earlier kernel: the weight stream starts under the tail of the previous kernel.
Memory order stays exact: `gdc_wait` returns only when the previous grid has completed and its
writes are visible, and a kernel writes nothing before it. Kernels from other libraries
(cuBLAS, torch) are launched normally; the next PDL kernel then simply starts after them.

Used for kernels captured into CUDA graphs (the decode steps; captured as programmatic edges).
Off for eager launches, on the CPU, under the Triton interpreter, before Hopper, and when
PDSERVE_PDL=0.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def pdl_wait_and_release(USE_PDL: tl.constexpr):
    """Wait until the previous kernel's writes are visible; allow the next kernel to launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(t: torch.Tensor) -> dict:
    """Keyword arguments for a Triton launch whose kernel takes `USE_PDL: tl.constexpr`: PDL
    while a CUDA graph is being captured (the decode steps), plain launches otherwise: eager
    steps are bound by the host's launch rate, which PDL cannot help, and graphs are where it
    was measured (H200, batch-1 decode replay 4.60 -> 4.49 ms)."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing() and _enabled(t.get_device()):
        return _PDL
    return _PLAIN


_PLAIN = {"USE_PDL": False}  # shared, read-only: unpacked into each launch's keywords
_PDL = {"USE_PDL": True, "launch_pdl": True}


@functools.lru_cache(maxsize=None)
def _enabled(device_index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or os.environ.get("PDSERVE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9 and _triton_has_pdl()


def _triton_has_pdl() -> bool:
    """The Triton in use can emit griddepcontrol and launch with the PDL attribute."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return (hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
            and "launch_pdl" in CUDAOptions.__dataclass_fields__)
