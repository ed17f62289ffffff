"""Per-request block tables and the token-slot arithmetic around them.

A request's KV lives in the blocks of its table, in order: token position p is stored in block
`table[p // block_size]` at offset `p % block_size`, i.e. in slot `table[p // bs] * bs + p % bs`.

With prefix caching (engine/kv_cache/prefix_cache.py) a new request's table starts with the
cached blocks of its longest cached prefix (`match_prefix`), and each full block a request
completes is named (`commit`) so later requests can find it; freeing a table releases its tail
first, so the eviction order drops a sequence's tail before its head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.kv_cache.block_pool import BlockPool
from engine.kv_cache.prefix_cache import ROOT_HASH, PrefixCache, salt_key

TokenSlice = Callable[[int, int], list[int]]  # (start, count) -> those token ids


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Hands blocks of one `BlockPool` to requests, keyed by request id."""

    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._freed: list[str] = []  # request ids freed since `take_freed` was last called
        self.prefix_cache = PrefixCache(block_size) if enable_prefix_caching else None
        if self.prefix_cache is not None:
            self.pool.is_cached = self.prefix_cache.is_cached
            self.pool.on_evict = self.prefix_cache.evict
        self._chains: dict[str, list[int]] = {}  # hashes of each request's named full blocks
        self._salts: dict[str, int] = {}

    # ---- prefix caching ----------------------------------------------------------------
    def match_prefix(self, request_id: str, token_ids: Sequence[int], cache_salt: str = "") -> int:
        """Start a request that holds no blocks with the cached blocks of its longest cached
        prefix (never its last token, which is computed to sample); returns the tokens they
        hold (0 without prefix caching)."""
        cache = self.prefix_cache
        if cache is None or self._tables.get(request_id):
            return 0
        salt = self._salts[request_id] = salt_key(cache_salt)
        blocks = cache.lookup(token_ids, salt, (len(token_ids) - 1) // self.block_size)
        cache.stats.queried_tokens += len(token_ids)
        cache.stats.hit_tokens += len(blocks) * self.block_size
        for block_id in blocks:
            self.pool.revive(block_id)
        if blocks:
            self._tables[request_id] = list(blocks)
            self._chains[request_id] = [cache.hash_of(block_id) for block_id in blocks]
        return len(blocks) * self.block_size

    def commit(self, request_id: str, num_tokens: int, tokens: TokenSlice) -> None:
        """Name the request's full blocks among its first `num_tokens` tokens (KV written, ids
        known) that are not named yet."""
        cache = self.prefix_cache
        if cache is None:
            return
        chain = self._chains.setdefault(request_id, [])
        table = self._tables.get(request_id, ())
        bs = self.block_size
        for index in range(len(chain), min(num_tokens // bs, len(table))):
            parent = chain[-1] if chain else ROOT_HASH
            ids = tuple(tokens(index * bs, bs))
            chain.append(cache.insert(table[index], parent, ids, self._salts.get(request_id, 0)))

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def num_missing_blocks(self, request_id: str, num_tokens: int) -> int:
        """Blocks the request still needs so that `num_tokens` tokens fit in its table."""
        have = len(self._tables.get(request_id, ()))
        return max(0, num_blocks_for(num_tokens, self.block_size) - have)

    def can_fit(self, request_id: str, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.num_missing_blocks(request_id, num_tokens))

    def grow(self, request_id: str, num_tokens: int) -> list[int]:
        """Extend the request's table to hold `num_tokens` tokens; returns its whole table."""
        table = self._tables.setdefault(request_id, [])
        missing = self.num_missing_blocks(request_id, num_tokens)
        if missing:
            table.extend(self.pool.allocate(missing))
        return table

    def trim(self, request_id: str, num_tokens: int) -> None:
        """Return the blocks past what `num_tokens` tokens need (a speculative step's rejected
        drafts). The table is replaced, not shortened in place, so the plan builder sends it
        whole next time (a delta would miss a block that changed at an unchanged length)."""
        table = self._tables.get(request_id)
        keep = num_blocks_for(num_tokens, self.block_size)
        if table is not None and len(table) > keep:
            self._tables[request_id] = table[:keep]
            self.pool.free(table[keep:])

    def free(self, request_id: str) -> None:
        """Return every block of the request to the pool (no-op if it holds none)."""
        table = self._tables.pop(request_id, None)
        self._chains.pop(request_id, None)
        self._salts.pop(request_id, None)
        if table is not None:
            self._freed.append(request_id)
        if table:
            # cached blocks: tail first, so it is evicted before the (more shared) head
            self.pool.free(reversed(table) if self.prefix_cache is not None else table)

    def take_freed(self) -> list[str]:
        """Request ids whose tables were freed since the last call (the engine core tells its
        executor, which drops its copies of these tables)."""
        freed, self._freed = self._freed, []
        return freed

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def is_idle(self) -> bool:
        """True when no request holds a block: the leak check after every scenario."""
        return not self._tables and self.pool.num_free_blocks == self.pool.num_blocks
