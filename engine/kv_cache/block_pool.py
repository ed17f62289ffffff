"""The block pool: which physical KV blocks are free, and how many holders each used block has.

Pure CPU bookkeeping over integer ids; it never touches tensors. A block is free exactly when its
reference count is zero. Reference counts exist so a block can be shared (prefix caching, or a
block held both by a request and by an in-flight transfer) and is returned once its last holder
lets go.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    """A fixed set of `num_blocks` KV blocks with a free list and reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` free blocks, each with one reference."""
        if not self.can_allocate(num_blocks):
            raise MemoryError(
                f"KV block pool exhausted: asked for {num_blocks}, {self.num_free_blocks} free"
            )
        block_ids = [self._free_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def incref(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is free; cannot add a reference")
            self._ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero return to the free list."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count == 0:
                raise ValueError(f"block {block_id} freed twice")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free_ids.append(block_id)
