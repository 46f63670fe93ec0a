"""The server's tier-0 memory pool in shared memory, read by same-host clients under leases.

When the server offers shared memory and its fastest tier is ``memory://``, that tier is a
:class:`SharedPoolMemory`: the same :class:`~lmcache.backends.memory.MemoryBackend` (allocator,
capacity, eviction by the TieredBackend), but its pool is a ``MAP_SHARED`` mapping of a file in
``/dev/shm`` that shm clients map. A GET that hits tier 0 then costs one copy:
the server pins each value's block (a *lease*: the block is not reused while leased, even if
the key is deleted or evicted), replies with pool offsets, and the client copies from the pool
straight into its ``dst`` (checking the value frame's checksum) and releases the lease. A
PUT costs one copy as well: the server reserves blocks (``MemoryBackend.reserve``), the client
(or, for socket puts, the server's own ``recv``) fills them in place, and a commit publishes
them. Leases and reservations are :class:`~lmcache.backends.memory.MemoryBackend` methods; this
class only puts the pool in shared memory.

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

from lmcache.backends.memory import MemoryBackend
from lmcache.errors import map_os_errors
from lmcache.server.shm import SHM_DIR

__all__ = ["MAX_LEASES", "SharedPoolMemory"]

MAX_LEASES = 65536
POOL_PREFIX = "lmcache-pool-"


class SharedPoolMemory(MemoryBackend):
    """``memory://`` whose pool is a shared ``/dev/shm`` mapping clients can read."""

    pool_name: str | None = None

    def _map_pool(self, prefault: bool) -> mmap.mmap:
        size = self.capacity_bytes
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
        return self.capacity_bytes
