"""The router's view of which KV blocks each instance caches, rebuilt from its block-hash events.

A request's blocks are named exactly as the engine names them (engine/kv_cache/prefix_cache.py
`block_hash` over (parent, token ids, salt)), from the token ids the router already has: its
prompt (tokenized by the router) plus any tokens already streamed (a migrated request). The
predicted hit on an instance is the longest run of the request's leading block hashes that the
instance's view holds, which is what the engine's lookup will find unless the view is stale
(an eviction not reported yet: a prediction, never a correctness matter).

Per instance the view follows its event batches (engine/kv_cache/kv_events.py):

    UNKNOWN --batch seq 1 of a new epoch--> SYNCED --next seq--> SYNCED
       ^         \\--any other batch--> RESYNC (snapshot asked) --snapshot--> SYNCED
       |                  SYNCED --gap in seq / dropped events / new epoch--> RESYNC
       +-- forget(): the instance died or was replaced (its new incarnation starts UNKNOWN)

While an instance needs a resync its view still predicts (it is only missing some changes);
batches newer than the snapshot's number are applied after it; older ones are ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_cache.prefix_cache import ROOT_HASH, block_hash, salt_key
from protos.pdserve.v1 import worker_pb2

MAX_HELD_BATCHES = 64  # out-of-order batches held per instance while waiting for a snapshot


def request_block_hashes(token_ids: Sequence[int], block_size: int,
                         cache_salt: str = "") -> tuple[int, ...]:
    """The names of the request's full blocks that a cache hit may cover: every full block
    before its last token (the engine never serves the last token from its cache)."""
    salt, parent, hashes = salt_key(cache_salt), ROOT_HASH, []
    for index in range((len(token_ids) - 1) // block_size):
        parent = block_hash(parent, tuple(token_ids[index * block_size:(index + 1) * block_size]),
                            salt)
        hashes.append(parent)
    return tuple(hashes)


@dataclass(slots=True)
class InstanceView:
    """What the router knows of one instance's cache."""

    epoch: str = ""
    seq: int = 0  # the last batch applied
    hashes: set[int] = field(default_factory=set)
    needs_resync: bool = False
    held: dict[int, worker_pb2.KVEvents] = field(default_factory=dict)  # seq -> batch, past a gap


class PrefixIndex:
    """One `InstanceView` per instance; the router's event loop only."""

    def __init__(self) -> None:
        self._views: dict[str, InstanceView] = {}

    def forget(self, instance_id: str) -> None:
        """Drop an instance's view (it died, or a new incarnation takes its slot)."""
        self._views.pop(instance_id, None)

    def num_cached_blocks(self, instance_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the instance is believed to cache."""
        view = self._views.get(instance_id)
        if view is None:
            return 0
        count = 0
        for name in hashes:
            if name not in view.hashes:
                break
            count += 1
        return count

    def num_hashes(self, instance_id: str) -> int:
        view = self._views.get(instance_id)
        return len(view.hashes) if view is not None else 0

    def needs_resync(self, instance_id: str) -> bool:
        view = self._views.get(instance_id)
        return view is not None and view.needs_resync

    def apply(self, instance_id: str, batch: worker_pb2.KVEvents) -> bool:
        """Take one batch (or snapshot) of the instance's events; True when the view cannot
        follow it without a snapshot (the caller asks for one)."""
        if not batch.epoch:  # prefix caching off there, or an old worker: nothing to learn
            return False
        view = self._views.get(instance_id)
        if view is None or view.epoch != batch.epoch:
            view = self._views[instance_id] = InstanceView(epoch=batch.epoch,
                                                           needs_resync=batch.seq > 1)
        if batch.is_snapshot:
            self._take_snapshot(view, batch)
        elif batch.seq == view.seq + 1 and not view.needs_resync:
            if batch.num_dropped:
                view.needs_resync = True  # applied, but the dropped changes are unknown
            self._apply_changes(view, batch)
        elif batch.seq > view.seq:  # past a gap (lost or reordered): hold it for the snapshot
            view.needs_resync = True
            if len(view.held) < MAX_HELD_BATCHES and batch.seq not in view.held:
                view.held[batch.seq] = batch
        return view.needs_resync

    def _take_snapshot(self, view: InstanceView, snapshot: worker_pb2.KVEvents) -> None:
        if snapshot.seq < view.seq:
            return  # an older snapshot than what is applied
        view.hashes = set(snapshot.stored)
        view.seq = snapshot.seq
        view.needs_resync = False
        for seq in sorted(view.held):  # batches numbered after the snapshot, in order
            batch = view.held.pop(seq)
            if seq == view.seq + 1 and not view.needs_resync:
                self._apply_changes(view, batch)
                view.needs_resync = bool(batch.num_dropped)
            elif seq > view.seq:
                view.needs_resync = True  # another gap: ask again

    @staticmethod
    def _apply_changes(view: InstanceView, batch: worker_pb2.KVEvents) -> None:
        view.hashes.difference_update(batch.evicted)
        view.hashes.update(batch.stored)
        view.seq = batch.seq

