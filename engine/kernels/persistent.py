"""Device buffers that live as long as the process: made once per key on the first (eager)
call, never freed, because CUDA graphs captured later hold their raw addresses. Used for the
scratch and arrival counters of kernels whose last program reduces and puts its counters back
to 0 (engine/kernels/moe_router.py, moe_gemv.py), so no launch needs a memset.

A buffer first needed while a graph is being captured cannot be made there (zeroing it would
be captured too, and the allocation comes from the graph's pool): that raises, naming it, and
the fix is an eager run of the same call first, as the engines' warm-ups do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, MutableMapping
from typing import TypeVar

import torch

T = TypeVar("T")


def persistent(store: MutableMapping[Hashable, T], key: Hashable, device: torch.device,
               make: Callable[[], T], what: str) -> T:
    """`store[key]`, made by `make()` the first time it is asked for (outside capture). Each
    kernel module keeps its own process-wide `store`."""
    if key not in store:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{what} on {device} is first needed inside a CUDA-graph capture: "
                               "run the same call once eagerly before capturing (warm-up)")
        store[key] = make()
    return store[key]
