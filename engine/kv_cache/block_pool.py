"""The block pool: which physical KV blocks are free, and how many holders each used block has.

Pure CPU bookkeeping over integer ids; it never touches tensors. A block is free exactly when its
reference count is zero. Reference counts exist so a block can be shared (prefix caching, or a
block held both by a request and by an in-flight transfer) and is returned once its last holder
lets go.

With a prefix cache (`is_cached` / `on_evict`), a block whose last holder lets go while it is
cached keeps its content: it goes to the eviction order (an LRU: oldest first) rather than the
free list. Both count as free; `allocate` takes plain free blocks first and evicts only when
there are none left; `revive` takes a cached block back for a request that hit it.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable


class BlockPool:
    """A fixed set of `num_blocks` KV blocks with a free list and reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached, no holder; LRU first
        self.is_cached: Callable[[int], bool] = lambda block_id: False
        self.on_evict: Callable[[int], None] = lambda block_id: None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take: plain free ones and cached ones nobody holds."""
        return len(self._free_ids) + len(self._evictable)

    @property
    def num_cached_free_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with one reference."""
        if not self.can_allocate(num_blocks):
            raise MemoryError(
                f"KV block pool exhausted: asked for {num_blocks}, {self.num_free_blocks} free"
            )
        block_ids = [self._take() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def _take(self) -> int:
        if self._free_ids:
            return self._free_ids.popleft()
        block_id, _ = self._evictable.popitem(last=False)  # the least recently freed
        self.on_evict(block_id)
        return block_id

    def revive(self, block_id: int) -> None:
        """Add a holder to a cached block (a prefix hit), whether or not anyone holds it."""
        if self._ref_counts[block_id] == 0:
            if block_id not in self._evictable:
                raise ValueError(f"block {block_id} is free and not cached")
            del self._evictable[block_id]
        self._ref_counts[block_id] += 1

    def incref(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is free; cannot add a reference")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in order; blocks reaching zero return to the
        free list, or (cached ones) to the end of the eviction order."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count == 0:
                raise ValueError(f"block {block_id} freed twice")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if self.is_cached(block_id):
                    self._evictable[block_id] = None
                else:
                    self._free_ids.append(block_id)
