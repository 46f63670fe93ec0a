"""The one block allocator of every in-memory pool (``memory://``, the cache server, the nixl peer).

*Best fit over a free list with neighbour coalescing, 64-byte aligned blocks.* KV chunks are
nearly uniform in size (fixed tokens per chunk times the model's geometry), so most allocations
are exact fits of a block some earlier free released; best fit finds those in O(log n)
(``bisect`` over ``(size, offset)``) and leaves large blocks whole for the occasional big value,
while size classes would waste up to half of every block or need the model's geometry up front.
Freed blocks merge with free neighbours at once (O(1) through start/end maps), so filling,
freeing everything and filling again gets the whole pool back: fragmentation never leaks space.
Ties go to the lowest offset, which keeps live data packed towards the start of the pool.

Pure bookkeeping: nothing here touches memory, so it serves any pool (a private mapping, a
``/dev/shm`` file, a NIXL-registered region) and runs in tests without one.
"""

from __future__ import annotations

import bisect

__all__ = ["ALIGNMENT", "BlockAllocator", "round_up"]

#: Block alignment: a cache line, so values start where vector copies run fastest (NIXL frames
#: are 64-byte aligned themselves).
ALIGNMENT = 64


def round_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    """``nbytes`` rounded up to a multiple of ``alignment`` (a power of two)."""
    mask = alignment - 1
    return (nbytes + mask) & ~mask


class BlockAllocator:
    """Best-fit allocator of aligned blocks in ``[0, size)`` with coalescing of free neighbours.

    ``alloc`` picks the smallest free block that fits (lowest offset among equal sizes) and
    splits off the rest; ``free`` merges the block with the free blocks right before and after.

    Args:
        size: Bytes to manage; must be a multiple of ``alignment``.
        alignment: Every block offset and size is a multiple of this (a power of two).

    Raises:
        ValueError: A bad size or alignment.
    """

    def __init__(self, size: int, alignment: int = ALIGNMENT) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two")
        if size < 0 or size % alignment:
            raise ValueError("size must be a non-negative multiple of alignment")
        self.size = size
        self.alignment = alignment
        self.used = 0
        self._by_start: dict[int, int] = {}  # free block start -> size
        self._by_end: dict[int, int] = {}  # free block end -> start
        self._by_size: list[tuple[int, int]] = []  # sorted (size, start) of free blocks
        if size:
            self._add_free(0, size)

    def block_size(self, nbytes: int) -> int:
        """The block size that holds ``nbytes`` (rounded up to the alignment)."""
        return round_up(nbytes, self.alignment)

    def alloc(self, nbytes: int) -> int | None:
        """Reserve a block for ``nbytes``; returns its offset, or None when no free block fits.

        Zero bytes take no space: offset 0 is returned and nothing must be freed.
        """
        size = self.block_size(nbytes)
        if size == 0:
            return 0
        i = bisect.bisect_left(self._by_size, (size, -1))
        if i == len(self._by_size):
            return None
        block, start = self._by_size[i]
        self._remove_free(start, block, i)
        if block > size:
            self._add_free(start + size, block - size)
        self.used += size
        return start

    def free(self, offset: int, nbytes: int) -> None:
        """Return the block that :meth:`alloc` gave for ``nbytes`` at ``offset``."""
        size = self.block_size(nbytes)
        if size == 0:
            return
        self.used -= size
        start, end = offset, offset + size
        left = self._by_end.get(start)
        if left is not None:
            self._remove_free(left, start - left)
            start = left
        right = self._by_start.get(end)
        if right is not None:
            self._remove_free(end, right)
            end += right
        self._add_free(start, end - start)

    @property
    def free_bytes(self) -> int:
        """Bytes in free blocks."""
        return self.size - self.used

    @property
    def largest_free(self) -> int:
        """Size of the largest free block (the largest value that fits now, rounded)."""
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def free_blocks(self) -> int:
        """Number of free blocks (1 when nothing is fragmented)."""
        return len(self._by_size)

    def free_list(self) -> list[tuple[int, int]]:
        """``(offset, size)`` of every free block, by offset (for tests and debugging)."""
        return sorted(self._by_start.items())

    def _add_free(self, start: int, size: int) -> None:
        self._by_start[start] = size
        self._by_end[start + size] = start
        bisect.insort(self._by_size, (size, start))

    def _remove_free(self, start: int, size: int, index: int | None = None) -> None:
        del self._by_start[start]
        del self._by_end[start + size]
        if index is None:
            index = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[index]
