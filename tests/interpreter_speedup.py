"""Triton's interpreter (TRITON_INTERPRET=1, how CI checks our kernels without a GPU), without
its per-call re-patching of `triton.language`.

Every call of a `@triton.jit` helper from inside a kernel runs `_patch_lang` again (Triton
3.9: `InterpretedFunction.__call__`), which walks every member of `tl`, `tl.core`, `tl.math`
and `tl.tensor` with `inspect.getmembers` (~2.5 ms a call). The kernel's own launch
(`GridExecutor.__call__`) has already patched those same module objects for the whole grid and
restores them at its end, and a second patch finds nothing left to wrap (a patched member is
no longer a builtin), so inside a launch the call does nothing but cost: in the MoE GEMV's
interpreter tests it was a third of the time. `install()` skips it there and only there; a
helper called outside any launch is patched as before. Tests only: the product never runs the
interpreter. Does nothing (returns False) when Triton's interpreter no longer has this shape.
Also: `_get_np_dtype`'s answers are cached (`_cache_np_dtypes`).
"""

from __future__ import annotations

import functools
import threading

_state = threading.local()


def _langs(fn) -> frozenset[int]:
    """The `triton.language` modules a jit function's globals hold (the ones `_patch_lang`
    patches for it), by id."""
    import triton.language as tl

    return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)


def install() -> bool:
    try:
        from triton.runtime import interpreter as ti
    except ImportError:
        return False
    grid_call = getattr(ti.GridExecutor, "__call__", None)
    helper_call = getattr(ti.InterpretedFunction, "__call__", None)
    if (grid_call is None or helper_call is None or not hasattr(ti, "_patch_lang")
            or getattr(helper_call, "_pdserve_fast", False)
            or not hasattr(ti.InterpretedFunction, "rewrite")):
        return False

    @functools.wraps(grid_call)
    def launch(self, *args, **kwargs):
        outer = getattr(_state, "patched", None)
        _state.patched = set(_langs(self.fn))  # the launch patches these first, for its whole grid
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            _state.patched = outer

    @functools.wraps(helper_call)
    def call_helper(self, *args, **kwargs):
        patched = getattr(_state, "patched", None)
        langs = _langs(self.fn)
        if patched is None or not langs <= patched:  # outside a launch, or a module not yet
            if patched is not None:                  # patched in it: patch as Triton does
                patched |= langs
            return helper_call(self, *args, **kwargs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise ti.InterpreterError(repr(e)) from e

    call_helper._pdserve_fast = True
    ti.GridExecutor.__call__ = launch
    ti.InterpretedFunction.__call__ = call_helper
    _cache_np_dtypes(ti)
    return True


def _cache_np_dtypes(ti) -> None:
    """`_get_np_dtype` builds its 18-entry table on every call (tens of thousands of calls per
    launch); the answer depends on the dtype alone, so it is remembered per dtype."""
    original = getattr(ti, "_get_np_dtype", None)
    if original is None:
        return
    cache: dict = {}

    def get_np_dtype(tt_dtype):
        try:
            return cache[tt_dtype]
        except KeyError:
            found = cache[tt_dtype] = original(tt_dtype)
            return found
        except TypeError:  # an unhashable type: ask Triton each time
            return original(tt_dtype)

    ti._get_np_dtype = get_np_dtype
