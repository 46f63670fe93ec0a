"""``memory://``: a capacity-bounded, in-process store of values in one preallocated pool.

URL form: ``memory://?capacity=8GiB&prefault=false&hugepages=true`` (options below; there is no
host or path: every ``MemoryBackend`` is its own private pool). Defaults: ``capacity=1GiB``, small
enough to open anywhere, large enough for a few hundred typical KV chunks; size it to your host.

Design
------
*One pool, no per-value allocation.* All values live in a single anonymous private ``mmap`` of
``capacity`` bytes (rounded up to 64), mapped at ``open()`` and reused until ``aclose()``. A fresh
buffer costs several times a copy (first-touch page faults), so ``put`` copies straight from the
caller's memoryview into the pool and ``get_into`` straight from the pool into the caller's
buffer, with ``memoryview`` slice assignment (a plain memcpy: the bandwidth of ``np.copyto`` for
large values with less per-call overhead for small ones). Figures: docs/benchmarks.md, "Memory
pools".

*Pool, allocator, index.* The pool is mapped by :func:`lmcache.pool.map_pool`, blocks come from
its best-fit :class:`~lmcache.pool.BlockAllocator` (64-byte aligned, neighbours coalesced, so
fragmentation never leaks space), and keys map to blocks through a
:class:`~lmcache.pool.LeasedIndex` (reservations while a put copies, leases while a get copies):
the same pool code as the cache server's tier 0 and the nixl peer.

*Pages.* ``hugepages=true`` (default) asks the kernel for transparent huge pages on the pool
(``MADV_HUGEPAGE``, best effort): when it can supply them, first touch faults 512x less often.
``prefault=true`` populates the whole pool at ``open()`` on a worker thread, so the event loop
keeps running and the first puts run at copy speed rather than page-fault speed. It is off by default
because it commits the full capacity as resident memory at open (a 64 GiB pool on a 32 GiB host
would meet the OOM killer, so a prefault beyond ``MemAvailable`` is refused with
``CapacityError``); without it the faults are paid by the first put into each page, and only for
the part of the pool ever used.

*In place.* The backend is an :class:`~lmcache.pool.InPlaceTier` (:meth:`MemoryBackend.in_place`):
the process that owns it (the cache server) may reserve blocks and fill them itself, and lease
values to read them where they lie. With ``shared=True`` (a constructor argument, not a URL
option) the pool is a ``/dev/shm`` file that same-host processes of this user may map.

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
import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlencode

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
from lmcache.errors import BackendClosedError, ConfigError
from lmcache.pool import (
    ALIGNMENT,
    Block,
    BlockAllocator,
    Lease,
    LeasedIndex,
    PoolMapping,
    Refused,
    Reservation,
    SharedPoolInfo,
    map_pool,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from typing_extensions import Self

    from lmcache.keys import CacheKey

__all__ = ["DEFAULT_CAPACITY", "MemoryBackend", "MemorySettings", "PoolAllocator"]

logger = logging.getLogger(__name__)

#: Default pool size when the URL names none.
DEFAULT_CAPACITY = 1 << 30

#: The pool's allocator (:class:`lmcache.pool.BlockAllocator`; this name stays for its users).
PoolAllocator = BlockAllocator


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
        shared: Map the pool as a ``/dev/shm`` file that same-host processes of this user may
            map (:attr:`shared_pool` names it); the cache server's tier 0 uses this.
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

    def __init__(self, settings: MemorySettings | None = None, *, shared: bool = False) -> None:
        super().__init__()
        self.settings = settings if settings is not None else MemorySettings()
        self.shared = shared
        # Published values and puts still copying (reserved), under one hash per lookup.
        self._index: LeasedIndex[CacheKey] = LeasedIndex(self.settings.capacity, ALIGNMENT)
        self._capacity = self._index.capacity
        self._mapping: PoolMapping | None = None
        self._pool: memoryview | None = None

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
        s = self.settings
        # A shared pool keeps the pages the kernel gives shmem (THP there follows the system's
        # shmem_enabled, not madvise); a private one asks for huge pages as configured.
        args = (self._capacity,)
        kwargs = {"shared": self.shared, "hugepages": s.hugepages and not self.shared, "prefault": s.prefault}
        if s.prefault:
            # Populating takes 0.05-0.3 s/GiB of kernel time: off the loop, so other tasks run.
            self._mapping = await run_blocking(None, lambda: map_pool(*args, **kwargs, owner="memory://"))
        else:
            self._mapping = map_pool(*args, **kwargs, owner="memory://")
        self._pool = self._mapping.view[: self._capacity]

    async def _close(self) -> None:
        self._index.clear()
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(BufferError):
                pool.release()
        m, self._mapping = self._mapping, None
        if m is not None:
            m.close()  # an operation still in flight may hold a view: the mapping goes when it lets go

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        has = self._index.contains
        return [has(k) for k in keys]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        pool = self._live_pool()
        index = self._index
        # Lease before the first yield: a concurrent delete then cannot hand these blocks to a put.
        leases = [index.lease(k) for k in keys]
        results: list[int | None] = [None] * len(keys)
        try:
            for k, lease, dst in zip(keys, leases, dsts, strict=True):
                if lease is not None:
                    check_dst_size(k, dst, lease.nbytes)
            pacer = _Pacer(self.settings.yield_every)
            for i, (lease, dst) in enumerate(zip(leases, dsts, strict=True)):
                if lease is None:
                    continue
                n, off = lease.nbytes, lease.offset
                await self._copy(dst[:n], pool[off : off + n], pacer)
                results[i] = n
        finally:
            for lease in leases:
                if lease is not None:
                    index.release(lease)
        return results

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(keys)
        waiting: list[int] = []
        pacer = _Pacer(self.settings.yield_every)
        index = self._index
        for i, (k, src) in enumerate(zip(keys, srcs, strict=True)):
            if index.contains(k):
                results[i] = EXISTS
            elif index.reserved(k):
                waiting.append(i)  # another put is copying this key: settle it after the rest
            else:
                results[i] = await self._store(k, src, pacer)
        for i in waiting:
            k = keys[i]
            await index.settled(k)
            # Published: the other put stored it. Gone: it was cancelled (or deleted), so store ours.
            results[i] = EXISTS if index.contains(k) else await self._store(k, srcs[i], pacer)
        return results  # type: ignore[return-value]

    async def _store(self, key: CacheKey, src: memoryview, pacer: _Pacer) -> PutResult:
        """Reserve a block, copy ``src`` into it, then publish ``key`` (it is absent now)."""
        pool = self._live_pool()
        res = self._index.reserve(key, src.nbytes)
        if not isinstance(res, Reservation):
            # Absent and not reserved, so only these two; a reserved key readers miss.
            return rejected("too_large" if res is Refused.TOO_LARGE else "capacity")
        try:
            off = res.offset
            await self._copy(pool[off : off + res.nbytes], src, pacer)
            if self._pool is None:
                raise BackendClosedError(f"{self!r} was closed during the operation")
            self._index.commit(res)
        finally:
            self._index.abort(res)  # cancelled, closed or failed: give the block back (else a no-op)
        return STORED

    async def _delete(self, keys: list[CacheKey]) -> None:
        delete = self._index.delete
        for k in keys:
            delete(k)  # a put still copying is left alone: it publishes after this delete

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        # A snapshot: the caller may delete (or put) while iterating.
        for k, _, _ in self._index.items():
            yield k

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        for k, n, _ in self._index.items():
            yield k, n

    def _extra_stats(self) -> dict[str, Any]:
        a = self._index.allocator
        return {
            "capacity_bytes": self._capacity,
            "used_bytes": a.used,
            "free_bytes": a.free_bytes,
            "largest_free_block": a.largest_free,
            "free_blocks": a.free_blocks,
            "entries": self._index.entries,
        }

    # -- in place (InPlaceTier), for the process that owns the pool (the cache server) --------
    #
    # Leases let a value be read where it lies (sent from it, or copied out by another process
    # that maps the pool); reservations let a value be written in place (received into it).

    def in_place(self) -> MemoryBackend:
        """This backend as an :class:`~lmcache.pool.InPlaceTier` (it always is one)."""
        return self

    @property
    def shared_pool(self) -> SharedPoolInfo | None:
        """The ``/dev/shm`` pool other processes may map (``shared=True``, while open), else None."""
        m = self._mapping
        if m is None or m.name is None:
            return None
        return SharedPoolInfo(m.name, self._capacity, bool(self.settings.prefault))

    def lease(self, keys: Sequence[CacheKey]) -> list[Lease[CacheKey] | None]:
        """Pin the blocks of the held keys: per key a lease, or None on a miss.

        Each lease must be given back once with :meth:`release`; :meth:`view` reads it.
        """
        if self._pool is None:
            return [None] * len(keys)
        lease = self._index.lease
        return [lease(k) for k in keys]

    def view(self, block: Block[CacheKey]) -> memoryview:
        """A live lease's or reservation's bytes, in place (valid until it is settled)."""
        return self._live_pool()[block.offset : block.offset + block.nbytes]

    def release(self, lease: Lease[CacheKey]) -> None:
        """Give one lease back (a block deleted meanwhile is freed by its last reader)."""
        self._index.release(lease)

    def reserve(self, key: CacheKey, nbytes: int) -> Reservation[CacheKey] | Refused:
        """Reserve a block for ``key`` to be filled in place (e.g. received from a socket).

        Returns:
            The reservation, or why there is none: ``EXISTS`` (the key is held), or ``BUSY``,
            ``FULL``, ``TOO_LARGE`` when the caller should store it the usual way (another put
            is copying it; no free block: the TieredBackend evicts on a put). A reserved key
            reads as absent until :meth:`commit`.
        """
        if self._pool is None:
            return Refused.FULL
        return self._index.reserve(key, nbytes)

    def commit(self, reservation: Reservation[CacheKey]) -> bool:
        """Publish a filled reservation; False (and the block freed) if the pool was closed."""
        if self._pool is None or not self._index.commit(reservation):
            self._index.abort(reservation)
            return False
        c = self.counters
        c.put_requests += 1
        c.stored += 1
        c.bytes_written += reservation.nbytes
        return True

    def abort(self, reservation: Reservation[CacheKey]) -> None:
        """Drop an unfilled reservation and free its block."""
        self._index.abort(reservation)

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
