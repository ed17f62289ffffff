"""Triton compilations on the request path, counted and named once the engine is ready.

The start-up warm-up (engine/warmup.py) compiles every kernel variant the engine expects to
use before the instance reports ready. A compilation after that means a request waited for it:
hundreds of milliseconds to seconds on a fresh compile cache (on an H100, turn 4 of the first
multi-turn replay in a process took 1.0 s to its first token against 0.1 s warm, a variant
the warm-up had missed). `CompileWatch.arm` installs Triton's JIT cache hook
(`triton.knobs.runtime.jit_cache_hook`, which Triton calls for every specialization it does not
hold in memory yet, before compiling or loading it from disk); from then on each call is
counted and the first `MAX_LOGGED` are logged at WARNING with the kernel, its launch options and
argument specialization, and the arguments in which it differs from the closest variant
compiled before (`record`, called before the warm-up, installs the hook early so the warm-up's
variants are known): an integer argument that varies from step to step (a block table's row
stride) shows up as `n: i32/16 (was n: i32)`, and belongs in the kernel's `do_not_specialize`. The count is
`CoreStats.triton_compiles_after_ready` and the metric `pdserve:triton_compiles_after_ready`.

Process-wide, as Triton's hook and kernel caches are: `WATCH` is armed by the first engine of
the process that finishes its warm-up (on CUDA) and counts compilations by any engine of the
process from then on. A hook installed before (another tool's) is still called, and the hook
never vetoes a compilation. In Triton's interpreter (TRITON_INTERPRET=1) nothing is compiled,
so the count stays 0.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque

log = logging.getLogger(__name__)

MAX_LOGGED = 20  # warnings per process; later compilations are only counted
_MAX_VARIANTS = 64  # variants remembered per kernel (to name what a new one changes)


def describe(call: dict) -> tuple[str, tuple[str, ...]]:
    """(kernel name, one "name: type[spec]" per argument) of a call to Triton's JIT cache hook:
    `/16` marks an argument specialized as divisible by 16, `=v` a constexpr or an integer
    specialized to its value (1). Falls back to Triton's own repr where the hook's keyword
    arguments have another shape (its repr mangles the arguments in Triton 3.6-3.9)."""
    text = str(call.get("repr", "?"))
    name = getattr(call.get("fn"), "name", None) or text.split("[", 1)[0]
    try:
        comp = call["compile"]
        sig, constants = comp["signature"], comp.get("constants") or {}
        attrs = (comp.get("configs") or [{}])[0] or {}
        args = []
        for i, (arg, ty) in enumerate(sig.items()):
            if (i,) in constants:
                args.append(f"{arg}={constants[(i,)]!r}")
            elif any(a and a[0] == "tt.divisibility" for a in attrs.get((i,), ())):
                args.append(f"{arg}: {ty}/16")
            else:
                args.append(f"{arg}: {ty}")
        return name, tuple(args)
    except (KeyError, TypeError, AttributeError, IndexError):
        return name, (text[:400],)


def _difference(args: tuple[str, ...], known: list[tuple[str, ...]]) -> str:
    """The arguments in which `args` differs from the closest variant in `known`."""
    if not known:
        return "no variant of this kernel was compiled before"
    closest = min(known, key=lambda k: sum(a != b for a, b in zip(args, k)) + abs(len(args) - len(k)))
    changed = [f"{a} (was {b})" for a, b in zip(args, closest) if a != b]
    return "differs from the closest earlier variant in: " + (", ".join(changed) or "options")


class CompileWatch:
    """Counts Triton JIT compilations after `arm` (thread-safe: Triton calls the hook from
    whichever thread launches the kernel). Installed earlier by `record` (before the warm-up),
    it also remembers the variants compiled until then, so a later one is named by the
    arguments it changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.recent: deque[str] = deque(maxlen=16)  # the latest compiled specializations
        self._variants: dict[str, list[tuple[str, ...]]] = {}
        self._installed = False
        self._armed = False
        self._paused = 0  # warm-ups in progress (another engine of the process starting)
        self._previous = None

    @property
    def armed(self) -> bool:
        return self._armed

    def record(self) -> bool:
        """Install the hook without counting: variants compiled from now on (the warm-up's)
        are remembered. False where this Triton has no JIT cache hook."""
        with self._lock:
            return self._install()

    def arm(self) -> bool:
        """Start counting (idempotent). False where this Triton has no JIT cache hook."""
        with self._lock:
            self._armed = self._install()
            return self._armed

    @contextlib.contextmanager
    def paused(self):
        """Compilations inside are not counted (they are still remembered): a later engine of
        the process warming up while the watch is armed. A compilation that another engine's
        request causes meanwhile goes uncounted too."""
        with self._lock:
            self._paused += 1
        try:
            yield
        finally:
            with self._lock:
                self._paused -= 1

    def _install(self) -> bool:
        if self._installed:
            return True
        try:
            from triton import knobs

            runtime = knobs.runtime
            self._previous = runtime.jit_cache_hook
            runtime.jit_cache_hook = self._hook
        except (ImportError, AttributeError):
            return False
        self._installed = True
        return True

    def _hook(self, *args, **kwargs):
        """Triton's jit_cache_hook: a truthy return would skip the compilation, so this
        returns only what a previously installed hook returns."""
        name, spec = describe(kwargs)
        shown = spec[0] if len(spec) == 1 and spec[0].startswith(name) else \
            f"{name}({', '.join(spec)})"
        with self._lock:
            known = self._variants.setdefault(name, [])
            why = _difference(spec, known)
            if len(known) < _MAX_VARIANTS:
                known.append(spec)
            counted = self._armed and not self._paused
            if counted:
                self.count += 1
                self.recent.append(shown)
            number = self.count
        if counted and number <= MAX_LOGGED:
            log.warning("Triton compiled a kernel after start-up, on the request path "
                        "(#%d; the warm-up misses this variant): %s; %s", number, shown, why)
        previous = self._previous
        return previous(*args, **kwargs) if previous is not None else None


WATCH = CompileWatch()
