"""On a GPU: a kernel specialization first launched after `CompileWatch.arm` is counted once
and named; launching it again compiles nothing (engine/compile_watch.py)."""

from __future__ import annotations

import os

import pytest
import torch


def test_a_new_specialization_is_counted_once(cuda):
    import triton
    import triton.language as tl
    from triton import knobs

    from engine.compile_watch import CompileWatch

    @triton.jit
    def _watch_probe_kernel(x_ptr, SCALE: tl.constexpr):
        tl.store(x_ptr, tl.load(x_ptr) * SCALE)

    saved = knobs.runtime.jit_cache_hook
    try:
        watch = CompileWatch()
        watch.arm()
        x = torch.ones(1, device="cuda")
        # a specialization not yet in this process; scale**2 < 2**24, exact in float32 (a
        # larger random scale made the product check below fail on rounding, not on the watch)
        scale = 2 + int.from_bytes(os.urandom(2), "little") % 4000
        _watch_probe_kernel[(1,)](x, SCALE=scale)
        assert watch.count == 1 and "_watch_probe_kernel" in watch.recent[-1]
        _watch_probe_kernel[(1,)](x, SCALE=scale)
        torch.cuda.synchronize()
        assert watch.count == 1 and x.item() == scale * scale
    finally:
        knobs.runtime.jit_cache_hook = saved
