"""In-process block allocator: which block ids of the pool are free.

The Redis-backed allocator (shared by all processes) has the same method names; this one serves tests and a
single-process deployment. Both are atomic: an allocation that cannot be satisfied takes nothing.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable


class OutOfBlocks(Exception):
    """Raised by `allocate` when fewer than `needed` blocks are free. Nothing was taken."""

    def __init__(self, needed: int, free: int) -> None:
        super().__init__(f"out of KV blocks: needed {needed}, {free} free")
        self.needed = needed
        self.free = free


class BlockAllocator:
    """Free-list of block ids 0..num_blocks-1.

    Freed blocks go to the back of the list (FIFO reuse), so a just-freed block, which may still be read by a
    kernel in flight on another stream, is the last to be handed out again. `shuffle_seed` shuffles the initial
    free-list so that tests see non-contiguous, unordered block tables and can prove paging is invisible.
    """

    def __init__(self, num_blocks: int, shuffle_seed: int | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        ids = list(range(num_blocks))
        if shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(ids)
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(ids)
        self._used: set[int] = set()

    def allocate(self, n: int) -> list[int]:
        """Take n free block ids, or raise OutOfBlocks and take none."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks ({n})")
        if n > len(self._free):
            raise OutOfBlocks(needed=n, free=len(self._free))
        blocks = [self._free.popleft() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, block_ids: Iterable[int]) -> None:
        """Return blocks to the free-list. Raises ValueError (freeing none) on an unknown, free or repeated id."""
        ids = list(block_ids)
        seen: set[int] = set()
        for block_id in ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(
                    f"cannot free block {block_id}: not a block id of this pool (0..{self.num_blocks - 1})"
                )
            if block_id not in self._used or block_id in seen:
                raise ValueError(f"cannot free block {block_id}: it is already free (double free)")
            seen.add(block_id)
        self._used.difference_update(ids)
        self._free.extend(ids)

    def num_free(self) -> int:
        return len(self._free)

    def num_used(self) -> int:
        return len(self._used)
