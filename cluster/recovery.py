"""Refilling a dead instance's slot (the `Recovery` the supervisor drives, cluster/lifecycle.py).

    start:  the dead actor's placement group is removed (its CPUs/GPUs are the new one's), a new
            group "{name}-{role}-{index}-r{incarnation}" is reserved, a new actor created in it
            with the slot's spec, and its model loaded (bounded by START_TIMEOUT_S)
    join:   the new actor pairs with every READY instance of the other pool, each pair under its
            next channel generation (the peer's old link to the slot is replaced, which fails
            whatever was still on it), the backend starts following it (its output stream, its
            load), and it takes the dead one's place in its pool; only then is it READY

Nothing else restarts: the other instances keep serving throughout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from cluster.config import ClusterConfig
from cluster.placement import create_instance_placement
from cluster.pools import Worker, await_started, create_worker, release

log = logging.getLogger(__name__)
START_TIMEOUT_S = 600.0  # a new instance must have loaded its model within this


class PoolRecovery:
    """Starts new incarnations of dead slots for one `DisaggregatedBackend`."""

    def __init__(self, config: ClusterConfig, backend=None) -> None:
        self.config = config
        self.backend = backend  # set by the serving cluster once the backend exists

    async def start(self, old: Worker, incarnation: int) -> Worker:
        placement = old.placement
        release(old)
        new_placement = None
        if placement is not None:
            pool = self.config.prefill if old.spec.role == "prefill" else self.config.decode
            new_placement = await asyncio.to_thread(
                create_instance_placement, pool, placement.instance_index,
                self.config.placement_timeout_s, self.config.name, incarnation)
        spec = dataclasses.replace(old.spec, fail_after_steps=0)  # an injected fault: once
        worker = create_worker(spec, new_placement, incarnation)
        try:
            await asyncio.wait_for(await_started(worker), START_TIMEOUT_S)
        except BaseException:
            release(worker)
            raise
        log.info("%s incarnation %d started", old.spec.instance_id, incarnation)
        return worker

    async def join(self, new: Worker, old: Worker) -> None:
        backend = self.backend
        await backend.channels.pair_with_live_peers(new)
        await backend.adopt(new)
        pool = backend.pools.prefill if new.spec.role == "prefill" else backend.pools.decode
        slot = new.spec.instance_id
        pool[next(i for i, w in enumerate(pool) if w.spec.instance_id == slot)] = new

    def release(self, worker: Worker) -> None:
        release(worker)
