"""Prefix caching: full KV blocks named by a hash chain, found again by later requests.

A full block (block_size tokens whose KV is written and whose ids the host knows) is named by
hash((parent's hash, its token ids, the request's cache salt)): the chain makes the name stand
for the whole prefix up to and including the block, and the salt keeps tenants that must not
share a cache apart (different salts never meet). A lookup walks a new request's tokens block
by block and stops at the first miss; a hit is confirmed by comparing the stored token ids and
parent, never by the hash alone, so a collision can cost a miss but never a wrong block.

Ownership: `BlockPool` keeps the reference counts; a block whose count drops to zero while it is
cached keeps its content and goes to the pool's eviction order (least recently freed first,
and a sequence's tail before its head) instead of the free list, and is taken (evicted: `evict`
forgets its name) only when the pool has no plain free block left.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

from engine.kv_cache.kv_events import KVEventBuffer

ROOT_HASH = 0  # the parent of a sequence's first block


def salt_key(cache_salt: str) -> int:
    """A stable integer for a salt string ("" = no salt): `hash(str)` differs per process."""
    if not cache_salt:
        return 0
    return int.from_bytes(hashlib.sha256(cache_salt.encode()).digest()[:8], "little")


def block_hash(parent: int, token_ids: tuple[int, ...], salt: int) -> int:
    """The name of a block (tuples of ints hash the same in every process)."""
    return hash((parent, token_ids, salt))


@dataclass(frozen=True, slots=True)
class CachedBlock:
    block_hash: int
    parent: int
    token_ids: tuple[int, ...]
    salt: int


@dataclass(slots=True)
class PrefixCacheStats:
    queried_tokens: int = 0  # tokens of admitted requests that could have hit
    hit_tokens: int = 0
    evictions: int = 0


class PrefixCache:
    """Hash -> block for full blocks, and what each cached block holds."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._by_hash: dict[int, int] = {}
        self._blocks: dict[int, CachedBlock] = {}
        self.stats = PrefixCacheStats()
        self.events = KVEventBuffer()  # stored / evicted hashes, for the router (kv_events.py)

    def __len__(self) -> int:
        return len(self._blocks)

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._blocks

    def hash_of(self, block_id: int) -> int:
        return self._blocks[block_id].block_hash

    def cached_hashes(self) -> list[int]:
        """Every block hash cached now (a snapshot for the router)."""
        return list(self._by_hash)

    def lookup(self, token_ids: Sequence[int], salt: int, max_blocks: int) -> list[int]:
        """The cached blocks holding the longest prefix of `token_ids` (at most `max_blocks`)."""
        bs, parent, found = self.block_size, ROOT_HASH, []
        for index in range(max_blocks):
            tokens = tuple(token_ids[index * bs:(index + 1) * bs])
            name = block_hash(parent, tokens, salt)
            block_id = self._by_hash.get(name)
            if block_id is None:
                break
            cached = self._blocks[block_id]
            if cached.token_ids != tokens or cached.parent != parent or cached.salt != salt:
                break  # a hash collision: a miss, never a wrong block
            found.append(block_id)
            parent = name
        return found

    def insert(self, block_id: int, parent: int, token_ids: tuple[int, ...], salt: int) -> int:
        """Name a block that now holds `token_ids` after `parent`; returns its hash. If another
        block already holds that prefix, this one stays unnamed (freed plainly later)."""
        name = block_hash(parent, token_ids, salt)
        if name not in self._by_hash and block_id not in self._blocks:
            self._by_hash[name] = block_id
            self._blocks[block_id] = CachedBlock(name, parent, token_ids, salt)
            self.events.stored(name)
        return name

    def evict(self, block_id: int) -> None:
        """The pool reuses this block: forget what it held."""
        cached = self._blocks.pop(block_id, None)
        if cached is not None:
            self._by_hash.pop(cached.block_hash, None)
            self.stats.evictions += 1
            self.events.evicted(cached.block_hash)
