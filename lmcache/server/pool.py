"""The server's tier-0 memory pool in shared memory, read by same-host clients under leases.

When the server offers shared memory and its fastest tier is ``memory://``, that tier is a
:class:`SharedPoolMemory`: the same :class:`~lmcache.backends.memory.MemoryBackend` (allocator,
capacity, eviction by the TieredBackend), but its pool is a ``MAP_SHARED`` mapping of a file in
``/dev/shm`` that shm clients map. A GET that hits tier 0 then costs one copy:
the server pins each value's block (a *lease*: the block is not reused while leased, even if
the key is deleted or evicted), replies with pool offsets, and the client copies from the pool
straight into its ``dst`` (checking the value frame's checksum) and releases the lease. A
PUT costs one copy as well: the server reserves blocks (:meth:`LeasedMemory.reserve`), the
client (or, for socket puts, the server's own ``recv``) fills them in place, and a commit
publishes them.

Ownership and crash safety:

* The server owns the pool (mode 0600, same-user clients only, like the Unix socket). Its name
  stays in ``/dev/shm`` while the server runs (clients attach at any time) and is unlinked at
  close; a SIGKILLed *server* leaves it behind, and the next server start sweeps names whose
  ``<pid>`` is dead (:func:`lmcache.server.shm.sweep_stale`).
* Leases and reservations belong to a connection: a client releases each right after copying, and every lease
  still held when the connection closes (a SIGKILLed client) is released then. A session holds
  at most ``MAX_LEASES`` blocks; beyond that a GET falls back to copying into the client's own
  segment.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
from typing import Any

from lmcache.backends.memory import MemoryBackend, _Entry
from lmcache.errors import map_os_errors
from lmcache.keys import CacheKey
from lmcache.server.shm import SHM_DIR

__all__ = ["MAX_LEASES", "LeasedMemory", "SharedPoolMemory"]

MAX_LEASES = 65536
POOL_PREFIX = "lmcache-pool-"


class LeasedMemory(MemoryBackend):
    """``memory://`` whose values can be leased: read in place while their blocks stay pinned.

    The server uses this for its tier 0 (a plain ``memory://`` URL): a socket GET sends tier-0
    hits straight from the pool (no staging copy), and with :class:`SharedPoolMemory` shm
    clients copy them straight out of it.
    """

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


class SharedPoolMemory(LeasedMemory):
    """``memory://`` whose pool is a shared ``/dev/shm`` mapping clients can read."""

    pool_name: str | None = None

    def _map_pool(self, prefault: bool) -> mmap.mmap:
        size = self._capacity
        name = f"{POOL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        with map_os_errors(f"memory:// (shared): creating a {size}-byte pool in {SHM_DIR}"):
            fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.ftruncate(fd, size)
                m = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except BaseException:
                os.unlink(SHM_DIR / name)
                raise
            finally:
                os.close(fd)
        self.pool_name = name
        if prefault:
            self._populate(m)
        return m

    async def _close(self) -> None:
        name, self.pool_name = self.pool_name, None
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / name)
        await super()._close()

    @property
    def pool_size(self) -> int:
        """Bytes of the pool mapping."""
        return self._capacity
