"""``memory://``: a capacity-bounded, in-process store of values in one preallocated pool.

URL form: ``memory://?capacity=8GiB&prefault=false&hugepages=true`` (options below; there is no
host or path: every ``MemoryBackend`` is its own private pool). Defaults: ``capacity=1GiB``, small
enough to open anywhere, large enough for a few hundred typical KV chunks; size it to your host.

Design
------
*One pool, no per-value allocation.* All values live in a single anonymous private ``mmap`` of
``capacity`` bytes (rounded up to 64), mapped at ``open()`` and reused until ``aclose()``. On this
class of host a fresh buffer costs 5-10x a copy (first-touch page faults: ~0.4-3 GB/s against
~20-25 GB/s for a copy into touched memory), so ``put`` copies straight from the caller's
memoryview into the pool and ``get_into`` straight from the pool into the caller's buffer, with
``memoryview`` slice assignment (a plain memcpy; same bandwidth as ``np.copyto`` for MiB values
and about 4x less per-call overhead for small ones: 0.16 us against 0.66 us at 4 KiB).

*Allocator: best-fit over a free list with neighbour coalescing, 64-byte aligned blocks.* KV
chunks are nearly uniform in size (fixed tokens per chunk times the model's geometry), so most
allocations are exact fits of a block some earlier delete freed; best fit finds those in
O(log n) (``bisect`` over ``(size, offset)``) and leaves large blocks whole for the occasional big
value, while size classes would waste up to half of every block or need the model's geometry up
front. Freed blocks merge with free neighbours at once (O(1) through start/end maps), so filling,
deleting everything and filling again gets the whole pool back: fragmentation never leaks space.
Ties go to the lowest offset, which keeps live data packed towards the start of the pool.

*Pages.* ``hugepages=true`` (default) asks the kernel for transparent huge pages on the pool
(``MADV_HUGEPAGE``, best effort): when it can supply them, first touch faults 512x less often.
``prefault=true`` populates the whole pool at ``open()`` (``MADV_POPULATE_WRITE``, or touching
each page where the kernel lacks it) on a worker thread, so the event loop keeps running and the
first puts run at copy speed. Measured here for 1 GiB and 2 MiB values (steady-state puts
~18.5 GB/s): prefault takes ~50 ms with huge pages (~330 ms without); without it the first fill
runs at ~11 GB/s with huge pages and ~2.6 GB/s without. It is off by default because it commits
the full capacity as resident memory at open (a 64 GiB pool on a 32 GiB host would meet the OOM
killer, so a prefault beyond ``MemAvailable`` is refused with ``CapacityError``); without it the
faults are paid by the first put into each page, and only for the part of the pool ever used.

*Capacity and policy.* A value that does not fit in any free block is ``rejected("capacity")``
(``stats()`` shows ``largest_free_block``: free bytes may be split); one larger than the whole
pool ``rejected("too_large")``. The backend never evicts on its own:
that is :class:`~lmcache.tiered.TieredBackend`'s job (rule 7).

*No integrity frame.* Values never leave this process's memory, and checksumming on every put
and get would roughly halve throughput against the memcpy baseline, so values are stored raw
(``integrity_checked=False``; nothing to corrupt short of a memory error or a bug).

Concurrency
-----------
Every method runs on the event loop (copies are memcpy-fast), but a batch yields to the loop
(``await asyncio.sleep(0)``) after every ``yield_every`` bytes copied (default 16 MiB, under a
millisecond of copying), so a big batch cannot starve other tasks. A value larger than that is
copied in slices with yields between them; a cancelled ``get_into`` may therefore leave the
destination of such a value partly written (smaller values land whole or not at all).
Consistency across those yields:

* A put reserves its block first, copies, and publishes the key only when the copy is complete:
  a concurrent ``contains``/``get_into`` never sees a half-written value. A second put of a key
  whose first put is still copying waits for it and then reports ``EXISTS`` (or stores its own
  value if the first was cancelled). A cancelled put releases the block of the value it was
  copying; values of its batch that were already published stay.
* A delete removes published keys only; a put still copying publishes afterwards (it is ordered
  after the delete). A value being read by a ``get_into`` is unlinked at once but its block is
  freed only when the last reader has finished, so a reader never copies out bytes that a later
  put wrote into reused space.
* ``get_into`` pins every hit before copying anything and checks every destination's size first,
  so an undersized buffer raises before any buffer is written. Copies run in the loop thread, so
  once a cancelled ``get_into`` has returned nothing writes into its buffers (rule 3).

Thread safety: none beyond the event loop. Use a backend from the loop that opened it; it keeps no
locks, and calling it from several threads or loops at once corrupts its index.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import errno
import logging
import mmap
import sys
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode

import numpy as np

from lmcache.backends.base import (
    EXISTS,
    STORED,
    Capabilities,
    PutResult,
    StorageBackend,
    check_dst_size,
    parse_backend_url,
    rejected,
    run_blocking,
    split_url,
)
from lmcache.config import format_size, parse_size, setting
from lmcache.errors import BackendClosedError, CapacityError, ConfigError, map_os_errors

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from typing_extensions import Self

    from lmcache.keys import CacheKey

__all__ = ["DEFAULT_CAPACITY", "MemoryBackend", "MemorySettings", "PoolAllocator"]

logger = logging.getLogger(__name__)

#: Default pool size when the URL names none.
DEFAULT_CAPACITY = 1 << 30
#: Block alignment in the pool: a cache line, so values start where vector copies run fastest.
ALIGNMENT = 64
_PAGE = mmap.PAGESIZE
# Linux >= 5.14; Python 3.11's mmap module has no constant for it.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


def _available_memory() -> int | None:
    """``MemAvailable`` in bytes on Linux, else None (unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    """Options of ``memory://`` (URL query, ``LMCACHE_MEMORY_<NAME>`` env, or keyword overrides)."""

    capacity: int = setting(
        DEFAULT_CAPACITY,
        doc="Pool size in bytes (e.g. 512MiB, 8GiB), rounded up to 64; allocated once at open.",
        parse=parse_size,
        min=1,
        max=1 << 50,
    )
    prefault: bool = setting(False, doc="Populate every page of the pool at open (0.05-0.3 s/GiB, off the event loop).")
    hugepages: bool = setting(True, doc="Ask for transparent huge pages on the pool (best effort).")
    yield_every: int = setting(
        16 << 20,
        doc="Yield to the event loop after this many bytes copied within one call.",
        parse=parse_size,
        min=1,
    )


class PoolAllocator:
    """Best-fit allocator of aligned blocks in ``[0, size)`` with coalescing of free neighbours.

    Pure bookkeeping (it never touches memory). ``alloc`` picks the smallest free block that fits
    (lowest offset among equal sizes) and splits off the rest; ``free`` merges the block with the
    free blocks right before and after it.

    Args:
        size: Bytes to manage; must be a multiple of ``alignment``.
        alignment: Every block offset and size is a multiple of this (a power of two).
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
        mask = self.alignment - 1
        return (nbytes + mask) & ~mask

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


@dataclasses.dataclass(slots=True, eq=False)
class _Entry:
    offset: int
    nbytes: int
    ready: bool = False  # the copy is complete and the key published
    readers: int = 0  # get_into calls copying out of this block right now
    dead: bool = False  # deleted while read: the last reader frees the block
    waiter: asyncio.Future[None] | None = None  # made only when a second put of the key waits


class _Pacer:
    """Counts bytes copied by one call and yields to the loop every ``every`` bytes."""

    __slots__ = ("count", "every")

    def __init__(self, every: int) -> None:
        self.every = every
        self.count = 0

    async def add(self, nbytes: int) -> None:
        self.count += nbytes
        if self.count >= self.every:
            self.count = 0
            await asyncio.sleep(0)


class MemoryBackend(StorageBackend):
    """Values in one preallocated in-process pool; see the module docstring for the design.

    Args:
        settings: Parsed options; defaults to :class:`MemorySettings` defaults (1 GiB).
    """

    schemes: ClassVar[tuple[str, ...]] = ("memory",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False,
        shared=False,
        device_buffers=False,
        listing=True,
        integrity_checked=False,
        bounded=True,
    )

    def __init__(self, settings: MemorySettings | None = None) -> None:
        super().__init__()
        self.settings = settings if settings is not None else MemorySettings()
        self._capacity = PoolAllocator(0).block_size(self.settings.capacity)
        self._alloc = PoolAllocator(self._capacity)
        self._mmap: mmap.mmap | None = None
        self._pool: memoryview | None = None
        # Published values and puts still copying (``ready`` False), under one hash per lookup.
        self._index: dict[CacheKey, _Entry] = {}
        self._entries = 0  # published values

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``memory://?capacity=…`` (no I/O; the pool is mapped at ``open()``).

        Raises:
            ConfigError: A host or path in the URL, an unknown option, or a bad value.
        """
        parts = split_url(url)
        if parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(
                f"memory:// takes no host, path or fragment (got {url!r}); each backend is its own "
                "private pool, configured by query options only, e.g. memory://?capacity=8GiB"
            )
        settings = parse_backend_url(url, cls.schemes, MemorySettings, {}, overrides, split=parts)
        return cls(settings)

    @property
    def url(self) -> str:
        """``memory://?capacity=…`` plus every option that differs from its default."""
        s = self.settings
        items = [("capacity", format_size(s.capacity))]
        if s.prefault:
            items.append(("prefault", "true"))
        if not s.hugepages:
            items.append(("hugepages", "false"))
        if s.yield_every != MemorySettings.yield_every:
            items.append(("yield_every", format_size(s.yield_every)))
        return "memory://?" + urlencode(items, quote_via=quote)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        if self.settings.prefault:
            # Populating takes 0.05-0.3 s/GiB of kernel time: off the loop, so other tasks run.
            self._mmap = await run_blocking(None, self._map_pool, True)
        else:
            self._mmap = self._map_pool(False)
        self._pool = memoryview(self._mmap)

    def _map_pool(self, prefault: bool) -> mmap.mmap:
        """Map the pool (and populate it with ``prefault``); subclasses may map other memory.

        The cache server's :class:`~lmcache.server.pool.SharedPoolMemory` maps a ``/dev/shm``
        file here instead, so same-host clients can map the pool too.
        """
        available = _available_memory()
        if prefault and available is not None and self._capacity > available:
            # Populating more than the host has would summon the OOM killer, not an error.
            raise CapacityError(
                f"memory://: prefault=true would commit the whole {format_size(self._capacity)} pool "
                f"now, but only {format_size(available)} of memory is available; lower capacity or "
                "set prefault=false"
            )
        with map_os_errors(f"memory://: mapping a {format_size(self._capacity)} pool"):
            # Private: a forked child gets copy-on-write pages, never a window into our pool.
            m = mmap.mmap(-1, self._capacity, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if self.settings.hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError as exc:  # THP disabled or unsupported: plain pages still work
                logger.debug("memory://: MADV_HUGEPAGE refused (%s); using normal pages", exc)
        if prefault:
            self._populate(m)
        return m

    @staticmethod
    def _populate(m: mmap.mmap) -> None:
        if _MADV_POPULATE_WRITE is not None:
            try:
                m.madvise(_MADV_POPULATE_WRITE)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # ENOMEM and the like: a real failure
                    size = len(m)
                    m.close()
                    with map_os_errors(f"memory://: prefaulting a {format_size(size)} pool"):
                        raise
                # EINVAL: a kernel older than 5.14; touch one byte per page instead.
        pages = np.frombuffer(m, dtype=np.uint8)
        pages[::_PAGE] = 0
        del pages  # drop the buffer export so the pool can be unmapped at close

    async def _close(self) -> None:
        self._index.clear()
        self._entries = 0
        self._pool = None
        m, self._mmap = self._mmap, None
        if m is not None:
            # An operation still in flight may hold a view; the mapping then goes when it lets go.
            with contextlib.suppress(BufferError):
                m.close()

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        get = self._index.get
        return [(e := get(k)) is not None and e.ready for k in keys]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        pool = self._live_pool()
        get = self._index.get
        hits = [e if (e := get(k)) is not None and e.ready else None for k in keys]
        for k, e, dst in zip(keys, hits, dsts, strict=True):
            if e is not None:
                check_dst_size(k, dst, e.nbytes)
        # Pin before the first yield: a concurrent delete then cannot hand these blocks to a put.
        for e in hits:
            if e is not None:
                e.readers += 1
        results: list[int | None] = [None] * len(keys)
        pacer = _Pacer(self.settings.yield_every)
        try:
            for i, (e, dst) in enumerate(zip(hits, dsts, strict=True)):
                if e is None:
                    continue
                await self._copy(dst[: e.nbytes], pool[e.offset : e.offset + e.nbytes], pacer)
                results[i] = e.nbytes
        finally:
            for e in hits:
                if e is not None:
                    self._unpin(e)
        return results

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(keys)
        waiting: list[int] = []
        pacer = _Pacer(self.settings.yield_every)
        index = self._index
        for i, (k, src) in enumerate(zip(keys, srcs, strict=True)):
            e = index.get(k)
            if e is None:
                results[i] = await self._store(k, src, pacer)
            elif e.ready:
                results[i] = EXISTS
            else:
                waiting.append(i)  # another put is copying this key: settle it after the rest
        for i in waiting:
            k = keys[i]
            while (e := index.get(k)) is not None and not e.ready:
                if e.waiter is None:
                    e.waiter = asyncio.get_running_loop().create_future()
                # wait() rather than awaiting the future: our cancellation must not cancel theirs.
                await asyncio.wait([e.waiter])
            # Ready: the other put stored it. Gone: it was cancelled (or deleted), so store ours.
            results[i] = EXISTS if e is not None else await self._store(k, srcs[i], pacer)
        return results  # type: ignore[return-value]

    async def _store(self, key: CacheKey, src: memoryview, pacer: _Pacer) -> PutResult:
        """Reserve a block, copy ``src`` into it, then publish ``key`` (it is absent now)."""
        nbytes = src.nbytes
        if nbytes > self._capacity:
            return rejected("too_large")
        pool = self._live_pool()
        offset = self._alloc.alloc(nbytes)
        if offset is None:
            return rejected("capacity")
        entry = _Entry(offset, nbytes)
        self._index[key] = entry  # not ready: readers miss, a second put of key waits
        try:
            await self._copy(pool[offset : offset + nbytes], src, pacer)
            if self._pool is None:
                raise BackendClosedError(f"{self!r} was closed during the operation")
            entry.ready = True
            self._entries += 1
        finally:
            if not entry.ready:  # cancelled, closed or failed: give the block back
                if self._index.get(key) is entry:
                    del self._index[key]
                self._alloc.free(offset, nbytes)
            if entry.waiter is not None:
                entry.waiter.set_result(None)
                entry.waiter = None
        return STORED

    async def _delete(self, keys: list[CacheKey]) -> None:
        index = self._index
        for k in keys:
            e = index.get(k)
            if e is None or not e.ready:
                continue  # absent, or still being copied: that put publishes after this delete
            del index[k]
            self._entries -= 1
            if e.readers:
                e.dead = True  # the last reader frees it
            else:
                self._alloc.free(e.offset, e.nbytes)

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        # A snapshot: the caller may delete (or put) while iterating.
        for k in [k for k, e in self._index.items() if e.ready]:
            yield k

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        for k, n in [(k, e.nbytes) for k, e in self._index.items() if e.ready]:
            yield k, n

    def _extra_stats(self) -> dict[str, Any]:
        a = self._alloc
        return {
            "capacity_bytes": self._capacity,
            "used_bytes": a.used,
            "free_bytes": a.free_bytes,
            "largest_free_block": a.largest_free,
            "free_blocks": a.free_blocks,
            "entries": self._entries,
        }

    # -- in place, for the process that owns the pool (the cache server) ----------------------
    #
    # Leases let a value be read where it lies (sent from it, or copied out by another process
    # that maps the pool); reservations let a value be written in place (received into it).
    # Blocks are opaque handles; each lease is released once, each reservation committed or
    # aborted once.

    def lease(self, keys: list[CacheKey]) -> list[Any]:
        """Pin the blocks of the held keys: per key an opaque lease, or None on a miss.

        Each lease must be given back once with :meth:`release`; :meth:`view` reads it.
        """
        if self._pool is None:
            return [None] * len(keys)
        get = self._index.get
        out: list[Any] = []
        for k in keys:
            e = get(k)
            if e is not None and e.ready:
                e.readers += 1
                out.append(e)
            else:
                out.append(None)
        return out

    def view(self, entry: Any) -> memoryview:
        """The leased value's bytes, in place (valid until it is released)."""
        return self._live_pool()[entry.offset : entry.offset + entry.nbytes]

    def release(self, entry: Any) -> None:
        """Give one lease back (a block deleted meanwhile is freed by its last reader)."""
        self._unpin(entry)

    # -- writing in place: reserve a block, fill it from outside, then commit or abort --------

    def reserve(self, key: CacheKey, nbytes: int) -> tuple[str, Any]:
        """Reserve a block for ``key`` to be filled in place (e.g. received from a socket).

        Returns:
            ``("reserved", entry)``, or ``("exists", None)`` when the key is held, or
            ``("busy" | "full" | "too_large", None)`` when the caller should store it the usual
            way (another put is copying it; no free block: the TieredBackend evicts on a put).
            A reserved key reads as absent until :meth:`commit`.
        """
        if nbytes > self._capacity:
            return "too_large", None
        e = self._index.get(key)
        if e is not None:
            return ("exists", None) if e.ready else ("busy", None)
        if self._pool is None:
            return "full", None
        offset = self._alloc.alloc(nbytes)
        if offset is None:
            return "full", None
        entry = _Entry(offset, nbytes)
        self._index[key] = entry  # not ready: readers miss, a second put of the key waits
        return "reserved", entry

    def commit(self, key: CacheKey, entry: Any) -> bool:
        """Publish a filled reservation; False (and the block freed) if the pool was closed."""
        if self._pool is None or self._index.get(key) is not entry:
            self.abort(key, entry)
            return False
        entry.ready = True
        self._entries += 1
        c = self.counters
        c.put_requests += 1
        c.stored += 1
        c.bytes_written += entry.nbytes
        self._wake(entry)
        return True

    def abort(self, key: CacheKey, entry: Any) -> None:
        """Drop an unfilled reservation and free its block."""
        if self._index.get(key) is entry:
            del self._index[key]
        if self._pool is not None:
            self._alloc.free(entry.offset, entry.nbytes)
        self._wake(entry)

    @staticmethod
    def _wake(entry: Any) -> None:
        if entry.waiter is not None:
            entry.waiter.set_result(None)
            entry.waiter = None

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the pool (the capacity rounded up to whole allocator blocks)."""
        return self._capacity

    # -- internals ---------------------------------------------------------------------------

    def _live_pool(self) -> memoryview:
        pool = self._pool
        if pool is None:  # aclose() ran while this batch was yielding
            raise BackendClosedError(f"{self!r} was closed during the operation")
        return pool

    def _unpin(self, e: _Entry) -> None:
        e.readers -= 1
        if e.dead and e.readers == 0:
            self._alloc.free(e.offset, e.nbytes)

    @staticmethod
    async def _copy(dst: memoryview, src: memoryview, pacer: _Pacer) -> None:
        """Copy ``src`` into the equally long ``dst`` in slices of at most ``pacer.every`` bytes."""
        n = src.nbytes
        if n <= pacer.every:  # the common case: one memcpy, no slicing
            dst[:] = src
            await pacer.add(n)
            return
        pos = 0
        while pos < n:
            end = min(pos + pacer.every, n)
            dst[pos:end] = src[pos:end]
            await pacer.add(end - pos)
            pos = end
