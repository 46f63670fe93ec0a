"""Mapping a pool's memory: private or in ``/dev/shm``, on huge pages, prefaulted or lazy.

One routine, :func:`map_pool`, maps the pool of every in-memory store: ``memory://`` (private
anonymous memory), the cache server's tier 0 (a ``/dev/shm`` file same-host clients map too) and
the nixl peer (private memory registered with NIXL).

*Why one preallocated pool.* A fresh buffer costs several times a copy (first-touch page faults
run far below copy bandwidth; figures in docs/benchmarks.md, "Memory pools"), so stores copy
straight between callers' buffers and a pool mapped once.

*Huge pages.* ``hugepages=True`` asks for transparent huge pages (``MADV_HUGEPAGE``, best
effort): when the kernel can supply them, first touch faults 512x less often, and transfers run
faster on them (UCX's CMA copies are slower on 4 KiB pages). Private memory is used
wherever no other process maps the pool, since shared anonymous memory is shmem, which gets
transparent huge pages only where shmem THP is enabled.

*Prefault.* ``prefault=True`` populates every page now (``MADV_POPULATE_WRITE``, or one touch per
page on kernels older than 5.14; blocking: run it off the event loop), after which the first
fill runs at copy speed instead of fault speed. It commits the whole size as resident memory,
so a prefault beyond ``MemAvailable`` is refused with :class:`~lmcache.errors.CapacityError`
rather than summoning the OOM killer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import sys
from pathlib import Path

import numpy as np

from lmcache.config import format_size
from lmcache.errors import CapacityError, map_os_errors

__all__ = [
    "POOL_PREFIX",
    "SHM_DIR",
    "PoolMapping",
    "available_memory",
    "create_shm",
    "map_pool",
    "populate",
    "prefault",
]

logger = logging.getLogger(__name__)

#: Where shared pools (and the cache server's client segments) live.
SHM_DIR = Path("/dev/shm")
#: Shared pools are named ``<POOL_PREFIX><pid>-<random hex>`` (stale ones are swept by pid).
POOL_PREFIX = "lmcache-pool-"
_PAGE = mmap.PAGESIZE
# Linux >= 5.14; Python 3.11's mmap module has no constant for it.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


def available_memory() -> int | None:
    """``MemAvailable`` in bytes on Linux, else None (unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class PoolMapping:
    """One mapped pool: ``mm`` (the mapping), ``view`` (a memoryview of it), and its ``name``.

    ``name`` is the ``/dev/shm`` file of a shared pool (None for private memory); it is unlinked
    by :meth:`close`.
    """

    def __init__(self, mm: mmap.mmap, name: str | None) -> None:
        self.mm = mm
        self.name = name
        self.size = len(mm)
        self.view = memoryview(mm)

    @property
    def address(self) -> int:
        """The pool's virtual address in this process (to register it with NIXL)."""
        return int(np.frombuffer(self.mm, dtype=np.uint8).ctypes.data) if self.size else 0

    def close(self) -> None:
        """Unlink a shared pool's name and unmap (idempotent).

        An operation still holding a view of the pool keeps the mapping alive until it lets go.
        """
        name, self.name = self.name, None
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SHM_DIR / name)
        view, self.view = self.view, memoryview(b"")
        with contextlib.suppress(BufferError, ValueError):
            view.release()
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()


def create_shm(name: str, size: int) -> mmap.mmap:
    """Create ``/dev/shm/<name>`` (mode 0600; never an existing file or a link) and map it shared.

    The file is ``size`` bytes, sparse until touched; its name is removed again if sizing or
    mapping fails. Used for shared pools and for the cache server's client segments.

    Raises:
        OSError: ``/dev/shm`` is missing, full or not writable, or the name exists.
    """
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, size)
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(SHM_DIR / name)
        raise
    finally:
        os.close(fd)


def map_pool(size: int, *, shared: bool, hugepages: bool, prefault: bool, owner: str = "pool") -> PoolMapping:
    """Map a pool of ``size`` bytes (see the module docstring).

    Args:
        size: Bytes (at least one page is mapped for a zero size).
        shared: Map a new ``/dev/shm`` file (mode 0600) that other processes of this user can
            map by name; else private anonymous memory (a forked child gets copy-on-write pages,
            never a window into the pool).
        hugepages: Ask for transparent huge pages (best effort).
        prefault: Populate every page now (blocking).
        owner: Who maps it, for error messages (e.g. ``"memory://"``).

    Raises:
        CapacityError: ``prefault`` of more than the host's available memory.
        BackendError: The mapping or prefault failed (mapped from ``OSError``).
    """
    available = available_memory()
    if prefault and available is not None and size > available:
        raise CapacityError(
            f"{owner}: prefault=true would commit the whole {format_size(size)} pool now, but only "
            f"{format_size(available)} of memory is available; lower capacity or set prefault=false"
        )
    size = max(size, _PAGE)
    name: str | None = None
    with map_os_errors(f"{owner}: mapping a {format_size(size)} pool"):
        if shared:
            name = f"{POOL_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
            mm = create_shm(name, size)
        else:
            mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    pool = PoolMapping(mm, name)
    try:
        if hugepages and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError as exc:  # THP disabled or unsupported: plain pages still work
                logger.debug("%s: MADV_HUGEPAGE refused (%s); using normal pages", owner, exc)
        if prefault:
            _prefault(mm, owner)
    except BaseException:
        pool.close()
        raise
    return pool


def prefault(mm: mmap.mmap, owner: str = "pool") -> None:
    """Populate every page of ``mm`` (``MADV_POPULATE_WRITE``, else one touch per page).

    Raises:
        BackendError: The kernel could not populate it (e.g. out of memory).
    """
    _prefault(mm, owner)


def _prefault(mm: mmap.mmap, owner: str) -> None:
    if _MADV_POPULATE_WRITE is not None:
        try:
            mm.madvise(_MADV_POPULATE_WRITE)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:  # ENOMEM and the like: a real failure
                with map_os_errors(f"{owner}: prefaulting a {format_size(len(mm))} pool"):
                    raise
            # EINVAL: a kernel older than 5.14; touch one byte per page instead.
    pages = np.frombuffer(mm, dtype=np.uint8)
    pages[::_PAGE] = 0
    del pages  # drop the buffer export so the pool can be unmapped at close


def populate(mm: mmap.mmap) -> bool:
    """Map every page of ``mm`` into this process now, where the kernel has the advice.

    For a mapping of memory another process already holds (a client mapping the server's
    resident pool): a fresh mapping still takes one page fault per 4 KiB page on first touch
    (copying 2 MiB into such a region ran at ~1.5 GB/s against ~20 GB/s once mapped). It never
    touches pages itself, since that would allocate any page that is not resident. Blocking
    (~0.1 s/GiB). Returns False where the kernel has no such advice (older than 5.14) or
    refuses; pages then fault in on first use.
    """
    if _MADV_POPULATE_WRITE is None:
        return False
    try:
        mm.madvise(_MADV_POPULATE_WRITE)
    except (OSError, ValueError) as exc:
        logger.debug("cannot populate a shared mapping (%s); pages fault in on first use", exc)
        return False
    return True
