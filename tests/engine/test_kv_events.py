"""Block-hash events of the prefix cache (engine/kv_cache/kv_events.py): what it names and evicts
reaches the buffer in order, batches are numbered and compacted, the bound drops the oldest and
says so, and a snapshot equals the cache; the router's hash chain equals the engine's."""

from __future__ import annotations

import pytest

from engine.kv_cache.block_table import KVCacheManager
from engine.kv_cache.kv_events import KVEventBuffer
from router.prefix_index import request_block_hashes

BS = 4


def _tokens(n: int, offset: int = 0) -> list[int]:
    return [3 + (offset + 7 * i) % 500 for i in range(n)]


def _commit(kv: KVCacheManager, rid: str, tokens: list[int]) -> None:
    kv.grow(rid, len(tokens))
    kv.commit(rid, len(tokens), lambda start, count: tokens[start:start + count])


def test_named_blocks_are_stored_events_with_the_routers_hashes():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    tokens = _tokens(13)  # 3 full blocks named
    _commit(kv, "a", tokens)
    batch = kv.prefix_cache.events.drain()
    assert batch.seq == 1 and batch.evicted == () and batch.num_dropped == 0
    # the router names a request's blocks before its last token: 13 tokens -> 3 blocks
    assert batch.stored == request_block_hashes(tokens, BS)
    assert request_block_hashes(tokens, BS, "tenant") != batch.stored  # a salt renames them
    empty = kv.prefix_cache.events.drain()  # nothing new: numbered all the same
    assert empty.seq == 2 and empty.stored == empty.evicted == ()
    kv.free("a")
    assert kv.is_idle()


def test_evictions_are_events_and_a_batch_keeps_each_hashs_last_change():
    kv = KVCacheManager(4, BS, enable_prefix_caching=True)
    first = _tokens(8)
    _commit(kv, "a", first)
    kv.free("a")  # 2 cached, evictable
    kv.prefix_cache.events.drain()
    kv.grow("b", 4 * BS)  # takes the 2 plain free blocks, then evicts both cached ones
    batch = kv.prefix_cache.events.drain()
    assert batch.seq == 2 and set(batch.evicted) == set(request_block_hashes(first + [1], BS))
    kv.free("b")
    _commit(kv, "c", first)  # recomputed: stored again ...
    kv.free("c")
    kv.grow("d", 4 * BS)  # ... and evicted again before the next drain: only the eviction
    batch = kv.prefix_cache.events.drain()
    assert batch.seq == 3 and batch.stored == ()
    assert set(batch.evicted) == set(request_block_hashes(first + [1], BS))
    kv.free("d")
    assert kv.is_idle()


def test_stored_then_evicted_in_one_batch_is_evicted():
    events = KVEventBuffer()
    events.stored(1)
    events.stored(2)
    events.evicted(1)
    batch = events.drain()
    assert batch.stored == (2,) and batch.evicted == (1,)


def test_the_bound_drops_the_oldest_and_counts_it():
    events = KVEventBuffer(capacity=3)
    for name in range(5):
        events.stored(name)
    assert len(events) == 3
    batch = events.drain()
    assert batch.stored == (2, 3, 4) and batch.num_dropped == 2
    assert events.num_dropped_total == 2 and events.drain().num_dropped == 0
    with pytest.raises(ValueError, match="capacity"):
        KVEventBuffer(capacity=0)


def test_a_snapshot_is_the_whole_cache_and_supersedes_pending_changes():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    _commit(kv, "a", _tokens(9))
    kv.prefix_cache.events.drain()  # batch 1, as if lost on the way
    _commit(kv, "b", _tokens(9, 50))  # pending: 2 more
    snap = kv.prefix_cache.events.snapshot(kv.prefix_cache.cached_hashes())
    assert snap.is_snapshot and snap.seq == 2 and len(snap.stored) == 4
    assert set(snap.stored) == set(request_block_hashes(_tokens(9), BS)) | set(
        request_block_hashes(_tokens(9, 50), BS))
    assert len(kv.prefix_cache.events) == 0 and kv.prefix_cache.events.drain().seq == 3
    kv.free("a")
    kv.free("b")
    assert kv.is_idle()
