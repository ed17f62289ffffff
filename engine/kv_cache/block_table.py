"""Per-request block tables and the token-slot arithmetic around them.

A request's KV lives in the blocks of its table, in order: token position p is stored in block
`table[p // block_size]` at offset `p % block_size`, i.e. in slot `table[p // bs] * bs + p % bs`.
"""

from __future__ import annotations

from engine.kv_cache.block_pool import BlockPool


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class KVCacheManager:
    """Hands blocks of one `BlockPool` to requests, keyed by request id."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, list[int]] = {}
        self._freed: list[str] = []  # request ids freed since `take_freed` was last called

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

    def free(self, request_id: str) -> None:
        """Return every block of the request to the pool (no-op if it holds none)."""
        table = self._tables.pop(request_id, None)
        if table is not None:
            self._freed.append(request_id)
        if table:
            self.pool.free(table)

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
