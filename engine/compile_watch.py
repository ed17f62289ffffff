"""Triton compilations on the request path, counted and named once the engine is ready.

The start-up warm-up (engine/warmup.py) compiles every kernel variant the engine expects to
use before the instance reports ready. A compilation after that means a request waited for it:
hundreds of milliseconds to seconds on a fresh compile cache (on an H100, turn 4 of the first
multi-turn replay in a process took 1.0 s to its first token against 0.1 s warm, a variant
the warm-up had missed). `CompileWatch.arm` installs Triton's JIT cache hook
(`triton.knobs.runtime.jit_cache_hook`, which Triton calls for every specialization it does not
hold in memory yet, before compiling or loading it from disk); from then on each call is
counted and the first `MAX_LOGGED` are logged at WARNING with the kernel, its launch options and
argument specialization, so the variant the warm-up should cover can be named. The count is
`CoreStats.triton_compiles_after_ready` and the metric `pdserve:triton_compiles_after_ready`.

Process-wide, as Triton's hook and kernel caches are: `WATCH` is armed by the first engine of
the process that finishes its warm-up (on CUDA) and counts compilations by any engine of the
process from then on. A hook installed before (another tool's) is still called, and the hook
never vetoes a compilation. In Triton's interpreter (TRITON_INTERPRET=1) nothing is compiled,
so the count stays 0.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

log = logging.getLogger(__name__)

MAX_LOGGED = 20  # warnings per process; later compilations are only counted


class CompileWatch:
    """Counts Triton JIT compilations after `arm` (thread-safe: Triton calls the hook from
    whichever thread launches the kernel)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0
        self.recent: deque[str] = deque(maxlen=16)  # the latest compiled specializations
        self._armed = False
        self._previous = None

    @property
    def armed(self) -> bool:
        return self._armed

    def arm(self) -> bool:
        """Start counting (idempotent). False where this Triton has no JIT cache hook."""
        with self._lock:
            if self._armed:
                return True
            try:
                from triton import knobs

                runtime = knobs.runtime
                self._previous = runtime.jit_cache_hook
                runtime.jit_cache_hook = self._hook
            except (ImportError, AttributeError):
                return False
            self._armed = True
            return True

    def _hook(self, *args, **kwargs):
        """Triton's jit_cache_hook: a truthy return would skip the compilation, so this
        returns only what a previously installed hook returns."""
        spec = str(kwargs.get("repr", "?"))[:400]
        with self._lock:
            self.count += 1
            self.recent.append(spec)
            number = self.count
        if number <= MAX_LOGGED:
            log.warning("Triton compiled a kernel after start-up, on the request path "
                        "(#%d; the warm-up misses this variant): %s", number, spec)
        previous = self._previous
        return previous(*args, **kwargs) if previous is not None else None


WATCH = CompileWatch()
