"""Where a request goes: the `RoutingPolicy` of the disaggregated backend.

    decode   the READY instance with the most free KV blocks (fewest running requests on a tie),
             counting the blocks of reservations still in flight as taken, so that a burst
             spreads instead of landing on whichever instance looked emptiest when it began;
             free blocks are learnt from each instance's step outputs and reserve replies
    prefill  the READY instance with the fewest prompt tokens outstanding (sent, not answered)

The policy only reads the supervisor's lifecycle states; it never changes them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cluster.lifecycle import Supervisor
from cluster.pools import Pools, Worker
from protos.pdserve.v1 import generation_pb2, worker_pb2


class RoutingPolicy:
    """Load bookkeeping per instance and the choice of instances for one attempt."""

    def __init__(self, pools: Pools, supervisor: Supervisor) -> None:
        self._pools = pools
        self._supervisor = supervisor
        self._prefill_tokens = {w.spec.instance_id: 0 for w in pools.prefill}
        self._decode_state: dict[str, generation_pb2.InstanceState] = {}
        self._reserving_blocks: dict[str, int] = {}  # per decode instance, reserves in flight

    def follow(self, worker: Worker, state: generation_pb2.InstanceState | None = None) -> None:
        """Start tracking a (new) instance; a decode instance's first known state."""
        self._prefill_tokens.setdefault(worker.spec.instance_id, 0)
        if state is not None:
            self._decode_state[worker.spec.instance_id] = state

    def observe(self, outputs: worker_pb2.DecodeOutputs) -> None:
        """A decode instance's step outputs carry its state (free blocks, running requests)."""
        self._decode_state[outputs.instance_id] = outputs.state

    # ---- decode ---------------------------------------------------------------------------
    def decode_order(self) -> list[Worker]:
        """READY decode instances, the least loaded first."""
        def load(w: Worker):
            state = self._decode_state.get(w.spec.instance_id)
            pending = self._reserving_blocks.get(w.spec.instance_id, 0)
            if state is None:
                return pending, 0
            return pending - state.free_kv_blocks, state.num_running_requests
        return sorted(self._supervisor.ready(self._pools.decode), key=load)

    @contextmanager
    def reserving(self, worker: Worker, num_tokens: int) -> Iterator[None]:
        """Count a reservation of `num_tokens` tokens' blocks on `worker` while it is asked."""
        wid = worker.spec.instance_id
        blocks = -(-num_tokens // worker.spec.engine.cache.block_size)
        self._reserving_blocks[wid] = self._reserving_blocks.get(wid, 0) + blocks
        try:
            yield
        finally:
            self._reserving_blocks[wid] -= blocks

    def reserved(self, worker: Worker, reply: worker_pb2.ReserveReply) -> None:
        """An accepted reservation tells how many blocks the instance has left."""
        state = self._decode_state.get(worker.spec.instance_id)
        if state is not None and reply.accepted:
            state.free_kv_blocks = reply.num_free_blocks

    # ---- prefill --------------------------------------------------------------------------
    def pick_prefill(self) -> Worker | None:
        """The READY prefill instance with the least outstanding work; None if none is."""
        live = self._supervisor.ready(self._pools.prefill)
        return min(live, key=lambda w: self._prefill_tokens[w.spec.instance_id], default=None)

    @contextmanager
    def prefilling(self, worker: Worker, num_tokens: int) -> Iterator[None]:
        """Count `num_tokens` prompt tokens as outstanding on `worker` while it prefills."""
        pid = worker.spec.instance_id
        self._prefill_tokens[pid] += num_tokens
        try:
            yield
        finally:
            self._prefill_tokens[pid] -= num_tokens
