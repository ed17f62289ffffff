"""Block-hash events: what an instance's prefix cache named (stored) and forgot (evicted), for
the router's KV-aware routing (router/prefix_index.py keeps one view per instance).

The prefix cache reports each change here as it happens (engine thread). The worker drains the
buffer into a `KVEventBatch` when it answers the router anyway (a prefill instance: its
`PrefillResult`), so the events cost no message of their own. Protocol, per instance:

    epoch    a random id of this buffer, i.e. of this incarnation of the instance: a router that
             sees a new epoch throws its old view of the instance away
    seq      batches (empty ones too) and snapshots are numbered 1, 2, ...; a router that sees
             a gap (a batch lost with a cancelled call, or reordered) asks for a snapshot
    dropped  the buffer is bounded: past `capacity` pending changes the oldest is dropped and
             counted; a batch with `num_dropped > 0` cannot be applied and the router resyncs
    snapshot every block hash cached now, taken on the engine thread together with the batch
             number it supersedes (`snapshot()`): the router's view becomes exactly that

Within a batch, only the last change of each hash is kept (stored then evicted = evicted), so a
batch's stored and evicted hashes are disjoint and can be applied in any order.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

DEFAULT_CAPACITY = 65536  # pending changes kept between two drains


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """The changes since the previous batch (or, with `is_snapshot`, the whole cache)."""

    epoch: str
    seq: int
    stored: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()
    num_dropped: int = 0  # changes lost to the bound since the previous batch
    is_snapshot: bool = False


class KVEventBuffer:
    """Bounded, compacting buffer of one prefix cache's changes (engine thread only)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.epoch = uuid.uuid4().hex
        self._pending: OrderedDict[int, bool] = OrderedDict()  # hash -> stored (False: evicted)
        self._seq = 0
        self._num_dropped = 0  # since the last drain
        self.num_dropped_total = 0

    def __len__(self) -> int:
        return len(self._pending)

    def stored(self, block_hash: int) -> None:
        self._record(block_hash, True)

    def evicted(self, block_hash: int) -> None:
        self._record(block_hash, False)

    def _record(self, block_hash: int, stored: bool) -> None:
        self._pending.pop(block_hash, None)  # the last change wins, at the newest position
        self._pending[block_hash] = stored
        if len(self._pending) > self.capacity:
            self._pending.popitem(last=False)
            self._num_dropped += 1
            self.num_dropped_total += 1

    def drain(self) -> KVEventBatch:
        """The pending changes as the next batch. An empty one is numbered too: a router that
        missed a snapshot (which takes a number) must see the gap."""
        self._seq += 1
        batch = KVEventBatch(self.epoch, self._seq,
                             tuple(h for h, s in self._pending.items() if s),
                             tuple(h for h, s in self._pending.items() if not s),
                             self._num_dropped)
        self._pending.clear()
        self._num_dropped = 0
        return batch

    def snapshot(self, cached_hashes: Iterable[int]) -> KVEventBatch:
        """Every cached hash now; supersedes every batch up to its `seq` (pending changes are
        in it already, so they are discarded)."""
        self._pending.clear()
        self._num_dropped = 0
        self._seq += 1
        return KVEventBatch(self.epoch, self._seq, tuple(cached_hashes), is_snapshot=True)
