"""Shared-memory segments for same-host lm:// clients, and who owns them.

Ownership (why a SIGKILLed client leaks nothing):

* The **client creates** one segment per connection: a file ``/dev/shm/lmcache-shm-<pid>-<rand>``
  (mode 0600), maps it, and names it in its ``HELLO``.
* The **server attaches** (opens with ``O_NOFOLLOW``, checks it is a regular file of the expected
  size owned by the server's user, maps it) and **unlinks the name at once**. From then on the
  segment is two anonymous mappings: the kernel frees it when both are gone. A client that dies
  loses its mapping with its process; the server drops its own when the connection closes.
  The client also unlinks the name after the ``HELLO`` reply (whichever comes first wins).
* The only window with a name on disk is between the client creating the file and the server's
  reply to ``HELLO``. A client killed in that window leaves a name whose ``<pid>`` is dead: the
  server sweeps such names at start and every ``sweep_interval`` seconds (:func:`sweep_stale`).
* Values a client reads in place from the server's tier-0 pool are leased to its connection
  (see docs/server.md); the server releases every lease of a connection when it closes,
  so a dead client holds no pins either.

The segment is an arena: the client carves a region per request (:class:`Arena`), the request's
meta carries ``[offset, length]`` spans, and the server checks every span against the segment.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import secrets
import stat

from lmcache.errors import InvalidArgumentError
from lmcache.pool.mapping import POOL_PREFIX, SHM_DIR, create_shm, populate

__all__ = [
    "SHM_DIR",
    "Arena",
    "Segment",
    "attach_pool",
    "attach_segment",
    "create_segment",
    "pid_alive",
    "populate",
    "shm_available",
    "sweep_stale",
]

logger = logging.getLogger(__name__)

PREFIX = "lmcache-shm-"
_NAME_RE = re.compile(r"^lmcache-shm-(\d{1,10})-([0-9a-f]{8,32})$")
_STALE_RE = re.compile(r"^lmcache-(?:shm|pool)-(\d{1,10})-([0-9a-f]{8,32})$")  # client segments, server pools
_POOL_RE = re.compile(rf"^{POOL_PREFIX}(\d{{1,10}})-([0-9a-f]{{8,32}})$")
ALIGN = 64


def shm_available() -> bool:
    """True when ``/dev/shm`` exists and is writable."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


class Segment:
    """One mapped segment (either side)."""

    def __init__(self, name: str, size: int, mm: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.mm = mm
        self.view = memoryview(mm)

    def close(self) -> None:
        """Unmap (idempotent). Views handed out must be released first."""
        view, self.view = self.view, memoryview(b"")
        view.release()
        with contextlib.suppress(BufferError, ValueError):
            self.mm.close()

    def unlink(self) -> None:
        """Remove the name from ``/dev/shm`` (absent is fine)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)


def create_segment(size: int) -> Segment:
    """Create and map a new client segment of ``size`` bytes (sparse until touched).

    Raises:
        OSError: ``/dev/shm`` is missing, full or not writable.
    """
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
    return Segment(name, size, create_shm(name, size))


def attach_segment(name: str, size: int, max_size: int) -> Segment:
    """Server side: open, check and map a client's segment, then unlink its name.

    Raises:
        InvalidArgumentError: A bad name or size, or not a regular file of ours.
        OSError: It cannot be opened or mapped (e.g. the client is on another host).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgumentError(f"bad shared-memory segment name {name!r}")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= max_size:
        raise InvalidArgumentError(f"shared-memory segment size must be 1..{max_size} bytes, got {size!r}")
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgumentError(f"{name} is not a regular file")
        if st.st_uid != os.geteuid():
            raise InvalidArgumentError(f"{name} belongs to another user")
        if st.st_size != size:
            raise InvalidArgumentError(f"{name} has {st.st_size} bytes, the client said {size}")
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    seg = Segment(name, size, mm)
    seg.unlink()  # from here on no name exists: nothing can leak whoever dies
    return seg


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (another user's counts: the pid is taken)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def attach_pool(name: str, size: int) -> mmap.mmap:
    """Client side: map the server's tier-0 pool (made by :func:`lmcache.pool.map_pool`).

    Clients read leased blocks from it and fill blocks the server reserved for their puts;
    they never touch other blocks (and the value frames' checksums catch it if one does).

    Raises:
        InvalidArgumentError: A bad name, or not a regular file of the stated size.
        OSError: It cannot be opened (another host, another user).
    """
    if not isinstance(name, str) or not _POOL_RE.match(name) or not isinstance(size, int) or size <= 0:
        raise InvalidArgumentError(f"bad pool name or size: {name!r}, {size!r}")
    fd = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise InvalidArgumentError(f"{name} is not a {size}-byte regular file")
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def sweep_stale() -> list[str]:
    """Unlink segment and pool names whose creating process is gone; returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        m = _STALE_RE.match(name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / name)
            removed.append(name)
    if removed:
        logger.info("removed %d stale shared-memory segment name(s) of dead clients", len(removed))
    return removed


class Arena:
    """First-fit allocator of 64-byte-aligned regions of one segment (client side)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[tuple[int, int]] = [(0, size)]  # (offset, length), sorted by offset
        self.used = 0

    def alloc(self, n: int) -> int | None:
        """Offset of a free region of ``n`` bytes (rounded up), or None."""
        n = max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)
        for i, (off, length) in enumerate(self._free):
            if length >= n:
                if length == n:
                    del self._free[i]
                else:
                    self._free[i] = (off + n, length - n)
                self.used += n
                return off
        return None

    def free(self, off: int, n: int) -> None:
        """Return the region at ``off`` of ``n`` bytes (as passed to :meth:`alloc`)."""
        n = max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)
        self.used -= n
        free = self._free
        lo, hi = 0, len(free)
        while lo < hi:
            mid = (lo + hi) // 2
            if free[mid][0] < off:
                lo = mid + 1
            else:
                hi = mid
        free.insert(lo, (off, n))
        # Merge with the next, then the previous neighbour.
        if lo + 1 < len(free) and free[lo][0] + free[lo][1] == free[lo + 1][0]:
            free[lo] = (free[lo][0], free[lo][1] + free[lo + 1][1])
            del free[lo + 1]
        if lo > 0 and free[lo - 1][0] + free[lo - 1][1] == free[lo][0]:
            free[lo - 1] = (free[lo - 1][0], free[lo - 1][1] + free[lo][1])
            del free[lo]
