"""The KV pair channels of a running cluster and their generations.

Every (prefill, decode) pair has one channel; each rebuild of it (a failed transfer, or a
replacement instance joining) gets the pair's next generation, so the ends never mix messages of
an old channel with the new one. `PairChannels` owns those numbers after startup (which built
every pair under generation 0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

from cluster.lifecycle import Supervisor
from cluster.pools import Pools, Worker, pair

log = logging.getLogger(__name__)
# Failures reported this soon after a pair's rebuild are taken for failures of the generation it
# replaced (closing the old channel fails what was still on it): no second rebuild for them.
REPAIR_COOLDOWN_S = 2.0


class PairChannels:
    """Builds and rebuilds pair channels under fresh generations."""

    def __init__(self, pools: Pools, supervisor: Supervisor,
                 spawn: Callable[[Coroutine], None]) -> None:
        self._pools = pools
        self._supervisor = supervisor
        self._spawn = spawn  # runs a background coroutine the backend keeps track of
        self._generations = {(p.spec.instance_id, d.spec.instance_id): 0
                             for p in pools.prefill for d in pools.decode}
        self._repairing: set[tuple[str, str]] = set()
        self._repaired_at_s: dict[tuple[str, str], float] = {}

    def _next_generation(self, prefill: Worker, decode: Worker) -> int:
        key = (prefill.spec.instance_id, decode.spec.instance_id)
        self._generations[key] = self._generations.get(key, -1) + 1
        return self._generations[key]

    async def pair_with_live_peers(self, worker: Worker) -> None:
        """Build `worker`'s channel to every READY instance of the other pool (a replacement
        joining), each under its pair's next generation."""
        ready = self._supervisor.ready
        if worker.spec.role == "prefill":
            pairs = [(worker, d) for d in ready(self._pools.decode)]
        else:
            pairs = [(p, worker) for p in ready(self._pools.prefill)]
        await asyncio.gather(*(pair(p, d, self._next_generation(p, d)) for p, d in pairs))

    def is_repairing(self, prefill: Worker | None, decode: Worker | None) -> bool:
        if prefill is None or decode is None:
            return False
        return (prefill.spec.instance_id, decode.spec.instance_id) in self._repairing

    def repair(self, prefill: Worker, decode: Worker) -> None:
        """Rebuild a failed channel under the next generation, in the background (once at a
        time per pair, not again within REPAIR_COOLDOWN_S, only between READY instances)."""
        key = (prefill.spec.instance_id, decode.spec.instance_id)
        ready = self._supervisor.is_ready
        recent = time.monotonic() - self._repaired_at_s.get(key, -REPAIR_COOLDOWN_S)
        if (key in self._repairing or recent < REPAIR_COOLDOWN_S
                or not (ready(prefill) and ready(decode))):
            return
        self._repairing.add(key)
        generation = self._next_generation(prefill, decode)

        async def rebuild() -> None:
            try:
                await pair(prefill, decode, generation)
                log.info("KV channel %s -> %s rebuilt (generation %d)", *key, generation)
            except Exception:
                log.exception("rebuilding KV channel %s -> %s failed", *key)
            finally:
                self._repairing.discard(key)
                self._repaired_at_s[key] = time.monotonic()

        self._spawn(rebuild())
