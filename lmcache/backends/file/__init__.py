"""``file://``: values as framed files in a local directory, shared by every process on the host.

URL form: ``file:///abs/dir?capacity=200GiB&fsync=none&o_direct=false&workers=4``. The path must
be absolute; the host part must be empty or ``localhost``. Options (also ``LMCACHE_FILE_<NAME>``
environment variables or keyword overrides):

* ``capacity``: bound on stored value bytes (``none``: unbounded). A put that would exceed it is
  ``rejected("capacity")``; a value larger than the whole capacity ``rejected("too_large")``. The
  backend never evicts: :class:`~lmcache.tiered.TieredBackend` decides what to ``delete``.
* ``fsync``: ``none`` (default), ``data`` or ``always`` (see *Durability*).
* ``o_direct``: bypass the page cache (see *O_DIRECT*).
* ``workers``: threads of the backend's own executor, which does every blocking call.
* ``read_only``: inspect only (``lmcache ls`` and ``stats`` open this way): nothing is created,
  deleted, renamed or written, puts are ``rejected("read_only")`` and ``delete`` raises
  :class:`~lmcache.errors.UnsupportedOperationError`; damaged files are reported by
  :meth:`FileBackend.damaged_files`, not removed.

Layout
------
``dir/ab/<digest>.kv``: ``<digest>`` is :meth:`CacheKey.digest` (40 hex chars) and ``ab`` its
first two characters, so no directory grows beyond ~1/256 of the entries. Each file is one
:mod:`lmcache.serde.frame` frame: header (format version, key, lengths, payload checksum, header
checksum), zero padding to the payload offset (64 bytes; 4096 with O_DIRECT), then the value.
The key inside the frame binds a file to its key: a file copied or renamed onto another key's
name is detected and never returned as data.

Writes and publication
----------------------
A put writes ``dir/ab/.<digest>.<pid>.<random>.tmp`` with ``os.writev(header, payload)`` (no
concatenation), applies the fsync policy, then publishes with ``os.link(tmp, final)`` and
unlinks the temp name. ``link`` fails with ``EEXIST`` when the name exists, so among processes
sharing the directory the first writer wins and later ones report ``EXISTS``, atomically, with no
window where a reader can see a partly written file. (Where the filesystem has no hard links the
backend falls back to ``os.replace`` after an existence check; values are immutable, so
replacing one with an identical copy is harmless.) A writer holds ``flock(LOCK_EX)`` on its temp
file for its whole life; that is how ``open()`` tells a stale temp file (its writer died, the
kernel dropped the lock) from one another live process is still writing.

Durability (``fsync``)
----------------------
Every published file is complete as far as this kernel is concerned, so a crashed *process*
(SIGKILL, OOM kill) never leaves a torn value whatever the policy: the page cache survives it.
The policy only matters when the *machine* goes down (power loss, kernel panic):

* ``none``: no syncs. After a power loss a recently published file may be empty or hold partial
  data; its frame (length check against the file size, payload checksum) turns that into a
  counted miss, and ``open()`` removes such files. Fastest; the right default for a cache, where
  a lost value costs a recompute and a wrong value is prevented by the frame anyway.
* ``data``: ``fdatasync`` the temp file before publishing it. After a power loss every file that
  exists is complete; recently stored names may be missing (their directory entry was not
  synced). Costs one device flush per put.
* ``always``: ``data`` plus ``fsync`` of the shard directory after publishing (and of the root
  when a shard directory is created), so a put that returned ``STORED`` survives a power loss.
  Costs a second flush per put. Deletes are not synced: a deleted value that reappears after a
  power loss is still a valid value.

Reads, and what a corrupt value does to ``dst``
-----------------------------------------------
A get opens the file and reads its first 4 KiB into a per-worker staging buffer (reused, page
aligned): the header, or the whole frame of a value up to 64 KiB. The header checksum, the key
bound in the frame, the frame length against the file size and the size of ``dst`` are all
checked there, before any byte reaches ``dst``. A small value is then checked against its
payload checksum in staging and copied. A large one is read with ``preadv`` straight into
``dst[:payload_len]`` (one copy out of the page cache; with O_DIRECT a DMA into ``dst`` when it is
page aligned and the payload a whole number of 4 KiB blocks) and its checksum verified there.

So every miss leaves ``dst`` untouched (absent key, truncated or renamed file, damaged header,
foreign format version, undersized ``dst``, an error opening or reading the header) except one:
a large value whose header checks out but whose payload fails its checksum (or whose payload
read fails midway). Then ``dst`` may hold part of the bad bytes; the call still reports a miss,
counts it, and removes the file. The conformance suite defines a corrupt value's ``dst`` as
unspecified; the base class's "untouched on a miss" holds for every other miss. The only way to
keep ``dst`` untouched on that path too is to check the bytes before they land in ``dst``: a
staging copy, a snapshot of ``dst`` (the same copy), reading the file twice, or ``mmap`` (page-
table setup and teardown per read, and a SIGBUS if a file is truncated while mapped). Each of
those is slower on every hit (figures in ``docs/benchmarks.md``, *file://: where a large value's
read lands*), and with O_DIRECT staging forgoes the DMA into ``dst``. A rare error path does not
justify a copy on every hit. (Reverting is one line: send large values through ``_read_staged``
too.)

O_DIRECT into a ``dst`` that is not page aligned, or a payload that is not a whole number of
blocks, goes through staging (the device's DMA lands there, then one copy), and is checked before
the copy. Staging buffers up to 64 MiB are kept per worker thread; larger frames use a one-off
buffer.

Truncated files, flipped bits, a foreign key in the frame: each is a counted corrupt miss, and
the file is removed (if it is still the same inode) so a later put can store the value again.
A file with another frame format version (a newer lmcache sharing the directory) is a plain miss
and is left in place. An ``OSError`` on read is a counted error (``record_error``) and a miss.

O_DIRECT
--------
With ``o_direct=true`` files are opened with ``O_DIRECT``: the frame header is padded to 4096
bytes, writes go from a page-aligned staging buffer (or straight from the caller's buffer when it
is page aligned and a multiple of 4096 bytes long) in whole 4096-byte blocks and the file is then
truncated to its exact length; reads go straight into a page-aligned ``dst`` or through staging
(see *Reads*). ``open()`` probes the
directory with a real O_DIRECT write; where the filesystem refuses it (tmpfs, some FUSE and
network filesystems) the backend logs a warning and downgrades to buffered I/O rather than
failing: O_DIRECT is a performance hint, and a cache that refuses to start is worse than one
that uses the page cache. ``stats()["o_direct"]`` reports what is in effect.

Index
-----
``open()`` rebuilds an in-memory index (key → payload and file size) by scanning the shard
directories on the executor, reading each file's header only (one ``pread`` of 4 KiB), so a
restarted process keeps its cache and ``used_bytes`` is exact. The scan removes stale temp files
and files whose header is invalid, truncated, or names a key whose digest is not the file's name;
it only ever judges names this backend creates (``<40 hex>.kv`` and its temp-file pattern), so
other files in the directory are left alone. What it found (removed, or left in place with
``read_only``) is :meth:`FileBackend.damaged_files` and ``stats()["damaged_files"]``; removed
damaged values are logged as a warning. ``lmcache fsck`` (:mod:`lmcache.backends.file.fsck`)
does the same walk with a full payload check, and removes only with ``--repair``.

Something other than a regular file at a value's name (a directory, FIFO, socket, device, or a
symlink, even one to a good file: the backend never creates links and never follows them) is
damage: ``contains`` is false, a get is a counted corrupt miss, and a put removes it and stores
the value. Files are opened with ``O_NOFOLLOW | O_NONBLOCK``, so a FIFO never blocks a worker.
The index backs ``used_bytes``, ``entries``, the capacity bound and :meth:`list_keys`.
``contains`` and ``get_into`` still ask the filesystem, so values that other processes stored
after this one opened are found (and adopted into the index when read or re-put). With several
processes sharing one directory each keeps its own index: the capacity bound is then enforced
per process, not across them.

Concurrency
-----------
A get or put batch runs on at most ``workers`` executor threads through
:func:`~lmcache.backends.concurrency.run_blocking`, each thread taking the next value of the batch as
soon as it is free, so one slow value does not hold back a fixed share of the batch (contains,
delete and the open-time scan split their cheap work into contiguous groups instead). The index
and byte counts are updated by the worker threads under one lock, so they stay exact even when
the awaiting task is cancelled. A put batch is admitted against the capacity in input order on
the event loop, before any I/O, so which values fit does not depend on thread scheduling; each
admitted value's reservation is settled by the worker that handles it. A cancellation sets a
``threading.Event`` that every worker checks between values (and before copying into a ``dst``
or publishing a file), and the call returns only once the workers have stopped: no late writes
into ``dst``, no half-published values.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import quote, unquote, urlencode

from lmcache.backends.base import EXISTS, STORED, Capabilities, PutResult, StorageBackend, rejected
from lmcache.backends.buffers import check_dst_size, is_aligned
from lmcache.backends.concurrency import gather_settled, run_blocking
from lmcache.backends.urls import parse_backend_url, split_url
from lmcache.config import format_size, parse_size, setting
from lmcache.errors import (
    BackendError,
    CapacityError,
    ConfigError,
    IntegrityError,
    InvalidArgumentError,
    InvalidBufferError,
    UnsupportedOperationError,
    map_os_errors,
)
from lmcache.keys import CacheKey
from lmcache.serde import frame

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from typing_extensions import Self

__all__ = ["DamagedFile", "FileBackend", "FileSettings"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

#: Block size O_DIRECT I/O is aligned to (covers 512-byte and 4 KiB logical sectors).
DIRECT_ALIGN = 4096
#: Payload alignment of buffered files (the frame's default).
BUFFERED_ALIGN = 64
#: Staging buffers up to this size are kept per worker thread; larger ones are one-off.
STAGING_KEEP = 64 << 20
#: How much of a file the open-time scan reads to parse its header.
SCAN_READ = 4096
#: A get reads this much first: the header of a large value (the frame pads it to 64 bytes, or
#: to 4096 with O_DIRECT; keys are far shorter).
HEADER_READ = 4096
#: Values up to this many frame bytes are read whole into staging and checked before any byte
#: reaches dst (one syscall, and the copy of a few KiB costs less than a second read).
SMALL_VALUE = 64 << 10
_SUFFIX = ".kv"
_TMP_SUFFIX = ".tmp"
_HEX = frozenset("0123456789abcdef")
# Only names this backend creates are ever judged or removed, so pointing file:// at a directory
# that also holds other files never deletes them.
_VALUE_NAME = re.compile(r"[0-9a-f]{40}\.kv")
_TEMP_NAME = re.compile(r"\.[0-9a-f]{40}\.\d+\.[0-9a-f]+\.tmp")
_PROBE_NAME = re.compile(r"\.probe\.\d+\.[0-9a-f]+\.tmp")
_NO_LINK_ERRNOS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK})
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# How every value file is opened for reading: never through a symlink (ELOOP instead), and
# without blocking when a FIFO sits at the name. Reads of regular files ignore O_NONBLOCK
# (open(2)), so it stays set: clearing it would cost two syscalls on every get.
_O_INSPECT = os.O_RDONLY | _O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_FSYNC_CHOICES = ("none", "data", "always")
# macOS has no fdatasync; a full fsync gives the same guarantee there.
_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)


def _parse_capacity(value: object) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "unlimited")):
        return None
    n = parse_size(value)
    if n <= 0:
        raise ValueError("a positive size such as 200GiB, or none")
    return n


@dataclasses.dataclass(frozen=True)
class FileSettings:
    """Options of ``file://`` (URL query, ``LMCACHE_FILE_<NAME>`` env, or keyword overrides)."""

    path: str = setting("", doc="Absolute directory holding the values (the URL's path).")
    capacity: int | None = setting(
        None,
        doc="Bound on stored value bytes (e.g. 200GiB); none means unbounded. Puts beyond it are rejected.",
        parse=_parse_capacity,
    )
    fsync: str = setting(
        "none",
        doc="none: no syncs; data: fdatasync each value before publishing; always: also fsync the directory.",
        choices=_FSYNC_CHOICES,
    )
    o_direct: bool = setting(
        False, doc="Bypass the page cache with O_DIRECT (downgraded with a warning where unsupported)."
    )
    workers: int = setting(4, doc="Threads of the backend's executor (parallel file I/O).", min=1, max=256)
    read_only: bool = setting(
        False,
        doc="Inspect only: never create, delete, rename or write anything (puts are rejected); "
        "damaged files are reported by damaged_files(), not removed.",
    )


# ---------------------------------------------------------------------------------------------
# Per-value outcomes reported by worker threads (the event loop turns them into counters).


@dataclasses.dataclass(frozen=True, slots=True)
class _Failure:
    kind: str  # "corrupt" | "error" | "too_small"
    exc: BaseException  # IntegrityError, a mapped BackendError, InvalidBufferError


_MISS = None
_ReadOutcome = int | _Failure | None  # bytes written, a failure, or a plain miss


@dataclasses.dataclass(slots=True)
class _Entry:
    payload: int  # value bytes (what capacity counts)
    disk: int  # file bytes (frame header + value)


@dataclasses.dataclass(frozen=True, slots=True)
class DamagedFile:
    """A file under a ``file://`` directory that is not a usable value (see ``lmcache fsck``).

    Attributes:
        path: Its absolute path.
        reason: ``torn`` (its size differs from what its header says: a partial write or a
            truncation), ``bad_header`` (not a frame, or a header failing its checksum),
            ``checksum`` (the payload fails its checksum; only a full read finds this),
            ``wrong_key`` (the frame belongs to another key than the file's name),
            ``stale_temp`` (a temp file whose writer is gone), ``not_a_file`` (a directory,
            FIFO, socket, device or symlink at a value's name) or ``not_a_directory`` (a
            non-directory at a shard's name), or ``unreadable`` (a shard directory that cannot
            be listed; fsck only).
        detail: What exactly is wrong, for people.
        removed: Whether it was removed.
    """

    path: str
    reason: str
    detail: str = ""
    removed: bool = False


class _NotAFile(Exception):
    """Something other than a regular file sits at a value's name (``str(exc)`` says what)."""


def _describe(mode: int) -> str:
    """``mode``'s file type for people (``a directory``, ``a FIFO``…)."""
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _open_value(path: str, flags: int = 0) -> tuple[int, os.stat_result]:
    """Open the value file at ``path`` for reading: ``(fd, fstat)``.

    Args:
        path: The file.
        flags: Extra open flags (``O_DIRECT``).

    Raises:
        FileNotFoundError: Nothing is there.
        _NotAFile: A symlink, directory, FIFO, socket or device is there.
        OSError: Opening failed otherwise.
    """
    try:
        fd = os.open(path, _O_INSPECT | flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _NotAFile("a symbolic link") from exc
        if exc.errno == errno.ENXIO:  # a UNIX socket
            raise _NotAFile("a socket") from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _NotAFile(_describe(st.st_mode))
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _remove_path(path: str, expect: os.stat_result | None = None) -> bool:
    """Remove whatever is at ``path`` (a directory with its contents); True if it was removed.

    With ``expect``, only when ``path`` is still that inode (a racing writer may have replaced
    it with a good value meanwhile).

    Raises:
        OSError: Removing failed.
    """
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    if expect is not None and (now.st_dev, now.st_ino) != (expect.st_dev, expect.st_ino):
        return False
    if stat.S_ISDIR(now.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)
    return True


def _temp_is_stale(path: str) -> bool | None:
    """Whether the temp file at ``path`` was left by a dead writer (its flock is free).

    None when it is gone or cannot be opened. The lock is taken and released at once: a live
    writer that raced us for it only waits that long, and nothing is written.
    """
    try:
        fd, _st = _open_value(path)
    except _NotAFile:
        return True  # no writer of ours made this
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live writer holds it
        return True
    finally:
        os.close(fd)


def inspect_value_file(path: str, *, deep: bool = False) -> tuple[CacheKey, int, int] | DamagedFile | None:
    """Judge the file at a value name (``<shard>/<40 hex>.kv``) without changing anything.

    Args:
        path: The file.
        deep: Also read the payload and check its checksum (``lmcache fsck``); otherwise only
            the header is read (the open-time index scan).

    Returns:
        ``(key, payload bytes, file bytes)`` for a good value; a :class:`DamagedFile` (not
        removed); or None for a file to leave alone (gone meanwhile, unreadable, or written by
        another frame format version).
    """
    name = os.path.basename(path)
    stem = name[: -len(_SUFFIX)]
    shard = os.path.basename(os.path.dirname(path))
    try:
        fd, st = _open_value(path)
    except _NotAFile as exc:
        return DamagedFile(path, "not_a_file", f"{exc} at a value's name")
    except OSError:
        return None
    try:
        size = st.st_size
        head = os.pread(fd, SCAN_READ, 0)
        if _foreign_version(memoryview(head)):
            return None  # another lmcache version's value: not ours to judge
        if size < frame.MIN_HEADER_BYTES:
            return DamagedFile(path, "torn", f"{size} bytes, shorter than a frame header")
        try:
            need = frame.needed_header_bytes(head)
            if size < need:
                return DamagedFile(path, "torn", f"{size} bytes, shorter than its own header ({need} bytes)")
            if need > len(head):
                head = os.pread(fd, need, 0)
            header = frame.parse_header(head)
        except IntegrityError as exc:
            return DamagedFile(path, "bad_header", f"{exc} ({size} bytes)")
        if header.total_len != size:
            return DamagedFile(path, "torn", f"{size} bytes, its header says {header.total_len}")
        try:
            key = CacheKey.from_string(header.key)
        except InvalidArgumentError as exc:
            return DamagedFile(path, "bad_header", f"the key in its header does not parse: {exc}")
        if stem != key.digest() or shard != stem[:2]:
            return DamagedFile(path, "wrong_key", f"its frame belongs to key {header.key[:120]}")
        if deep:
            payload = bytearray(header.payload_len)
            got = _pread_full(fd, memoryview(payload), header.payload_offset, header.payload_len)
            try:
                header.verify_payload(memoryview(payload)[:got])
            except IntegrityError as exc:
                return DamagedFile(path, "checksum", str(exc))
        return key, header.payload_len, size
    except OSError:
        return None
    finally:
        os.close(fd)


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _split(items: Sequence[T], groups: int) -> list[Sequence[T]]:
    """``items`` cut into at most ``groups`` contiguous, nearly equal runs."""
    n = len(items)
    groups = max(1, min(groups, n))
    step, extra = divmod(n, groups)
    out = []
    start = 0
    for g in range(groups):
        end = start + step + (1 if g < extra else 0)
        out.append(items[start:end])
        start = end
    return out


def _pread_full(fd: int, view: memoryview, offset: int, want: int) -> int:
    """Read from ``offset`` into ``view`` until ``want`` bytes arrived or EOF; bytes read.

    ``view`` may be longer than ``want`` (O_DIRECT reads whole blocks; EOF ends them early).
    """
    got = 0
    while got < want:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _writev_full(fd: int, bufs: list[memoryview]) -> None:
    """``os.writev`` until every buffer is written (a single call may write less)."""
    pending = [b for b in bufs if b.nbytes]
    while pending:
        n = os.writev(fd, pending)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        while n:
            head = pending[0]
            if n >= head.nbytes:
                n -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[n:]
                n = 0


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _foreign_version(view: memoryview) -> bool:
    """True when ``view`` starts with a frame of another format version (not corruption)."""
    return view.nbytes >= 5 and bytes(view[:4]) == frame.MAGIC and view[4] != frame.FRAME_VERSION


class FileBackend(StorageBackend):
    """Values as framed files under one directory; see the module docstring for the design.

    Subclasses that serve the same directory format and change only how bytes move
    (:mod:`~lmcache.backends.gds`, :mod:`~lmcache.backends.nixl.posix`) override these hooks,
    and need nothing else of this module:

    * :meth:`_read_at` and :meth:`_write_frame`: move file bytes into and out of host memory.
    * :meth:`_read_payload`: check an open value file's frame and move its payload into a
      destination (e.g. device memory), with :meth:`_read_head` to read and check the header.
      Every outcome (miss, corrupt value, error, too small a buffer) is counted by the caller,
      :meth:`_get_into`, which takes any destination :meth:`_read_payload` handles.
    * :meth:`_url_items` and ``settings_cls``: the options of the subclass's URL (plain
      :class:`FileSettings` given to the constructor are widened to ``settings_cls``, its own
      options at their defaults).

    and may use :meth:`_staging` (this worker thread's page-aligned scratch buffer),
    ``_local`` (per-worker-thread state), ``_executor`` (the bounded pool every blocking call
    runs on) and ``_root`` (the directory).

    Args:
        settings: Parsed options (``path`` is required and must be absolute).
    """

    schemes: ClassVar[tuple[str, ...]] = ("file",)
    #: The settings dataclass ``from_url`` parses (subclasses serving other schemes extend it).
    settings_cls: ClassVar[type[FileSettings]] = FileSettings
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        shared=True,
        device_buffers=False,
        listing=True,
        integrity_checked=True,
        bounded=False,
    )

    def __init__(self, settings: FileSettings) -> None:
        super().__init__()
        if not isinstance(settings, self.settings_cls):
            fields = dataclasses.fields(FileSettings)
            settings = self.settings_cls(**{f.name: getattr(settings, f.name) for f in fields})
        path = settings.path
        if not path or not os.path.isabs(path) or os.path.normpath(path) == "/":
            raise ConfigError(
                f"file://: path {path!r} must be an absolute directory other than '/', "
                "e.g. file:///var/lib/lmcache?capacity=200GiB"
            )
        self.settings = dataclasses.replace(settings, path=os.path.normpath(path))
        if settings.capacity is not None:
            # Bounded only when a capacity is set: an instance-level view of the class defaults.
            self.capabilities = dataclasses.replace(type(self).capabilities, bounded=True)  # type: ignore[misc]
        self._root = self.settings.path
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the index, the byte counts and _shards
        self._index: dict[CacheKey, _Entry] = {}
        self._used = 0  # payload bytes of indexed values
        self._disk = 0  # file bytes of indexed values
        self._reserved = 0  # payload bytes of puts being written now
        self._shards: set[str] = set()
        self._local = threading.local()
        self._o_direct = False  # in effect (settings.o_direct may have been downgraded)
        self._use_link = True
        self._pid = os.getpid()
        self._damaged: list[DamagedFile] = []  # what the open-time scan found

    # -- construction and identity -----------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``file:///abs/dir?capacity=…&fsync=…&o_direct=…&workers=…`` (no I/O).

        Raises:
            ConfigError: A host other than ``localhost``, a missing or relative path, an unknown
                option or a bad value.
        """
        parts = split_url(url)
        scheme = cls.schemes[0]
        form = f"{scheme}:///absolute/dir?capacity=200GiB"
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"{scheme}://: the URL {url!r} names host {parts.netloc!r}; {scheme}:// stores on this host only "
                f"and takes an absolute path after three slashes: {form}"
            )
        if parts.fragment:
            raise ConfigError(f"{scheme}://: the URL {url!r} has a fragment; expected {form}")
        path = unquote(parts.path)
        location: dict[str, object] = {}
        if path and path != "/":
            location["path"] = path
        settings = parse_backend_url(url, cls.schemes, cls.settings_cls, location, overrides, split=parts)
        if not settings.path:
            raise ConfigError(f"{scheme}://: the URL {url!r} has no directory path; expected {form}")
        return cls(settings)

    @property
    def url(self) -> str:
        """``file:///dir`` plus every option that differs from its default."""
        items = self._url_items()
        base = f"{self.schemes[0]}://" + quote(self._root)
        return base + ("?" + urlencode(items, quote_via=quote) if items else "")

    def _url_items(self) -> list[tuple[str, str]]:
        """Query items of :attr:`url` (options that differ from the settings class's defaults)."""
        s = self.settings
        defaults = type(s)
        items: list[tuple[str, str]] = []
        if s.capacity is not None:
            items.append(("capacity", format_size(s.capacity)))
        if s.fsync != defaults.fsync:
            items.append(("fsync", s.fsync))
        if s.o_direct != defaults.o_direct:
            items.append(("o_direct", "true" if s.o_direct else "false"))
        if s.workers != defaults.workers:
            items.append(("workers", str(s.workers)))
        if s.read_only:
            items.append(("read_only", "true"))
        return items

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="lmcache-file")
        try:
            await run_blocking(self._executor, self._prepare_dir)
            await self._rebuild_index()
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise

    async def _close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            # Every operation awaits its own work, so this only waits for stragglers of calls
            # that raced with aclose(); done off the loop all the same.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    def _prepare_dir(self) -> None:
        if self.settings.read_only:
            # Inspect only: a missing directory is an error (never created), and no O_DIRECT
            # probe (it writes a file); reads are buffered.
            with map_os_errors(f"file://: opening {self._root} read-only"):
                if not os.path.isdir(self._root):
                    raise FileNotFoundError(errno.ENOENT, "no such cache directory", self._root)
            return
        with map_os_errors(f"file://: creating {self._root}"):
            created = not os.path.exists(self._root)
            os.makedirs(self._root, exist_ok=True)
            if not os.path.isdir(self._root):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", self._root)
            if created and self.settings.fsync == "always":
                _fsync_dir(os.path.dirname(self._root))
        if self.settings.o_direct:
            self._o_direct = self._probe_o_direct()

    def _probe_o_direct(self) -> bool:
        if not _O_DIRECT:
            logger.warning("file://%s: O_DIRECT is not available on this platform; using buffered I/O", self._root)
            return False
        probe = os.path.join(self._root, f".probe.{self._pid}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        buf = mmap.mmap(-1, DIRECT_ALIGN)
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_DIRECT, 0o600)
            try:
                os.write(fd, buf)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                with map_os_errors(f"file://: probing O_DIRECT in {self._root}"):
                    raise
            logger.warning(
                "file://%s: the filesystem refuses O_DIRECT (%s); o_direct=true is downgraded to buffered I/O",
                self._root,
                exc.strerror,
            )
            return False
        finally:
            buf.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(probe)
        return True

    # -- index rebuild -----------------------------------------------------------------------

    async def _rebuild_index(self) -> None:
        shards, damaged = await run_blocking(self._executor, self._list_shards)
        found: list[tuple[CacheKey, _Entry]] = []
        if shards:
            cancel = threading.Event()
            groups = _split(shards, self.settings.workers)
            results = await self._gather(self._scan_shards, groups, cancel, cancel=cancel)
            for entries, bad in results:
                found.extend(entries)
                damaged.extend(bad)
        self._damaged = damaged
        with self._lock:
            self._shards.update(shards)
            for key, entry in found:
                if key not in self._index:
                    self._index[key] = entry
                    self._used += entry.payload
                    self._disk += entry.disk
        self._log_damage(damaged)
        logger.debug("file://%s: index holds %d values, %d bytes", self._root, len(self._index), self._used)

    def _log_damage(self, damaged: list[DamagedFile]) -> None:
        temps = [d for d in damaged if d.reason == "stale_temp"]
        bad = [d for d in damaged if d.reason != "stale_temp"]
        if temps:
            # Stale temp files are a normal leftover of a killed writer, not lost values.
            logger.info(
                "file://%s: %s %d stale temp file(s)",
                self._root,
                "found (read-only, left in place)" if self.settings.read_only else "removed",
                len(temps),
            )
        if bad:
            # Removing values is worth a warning; a read-only caller reports what it found itself.
            logger.log(
                logging.INFO if self.settings.read_only else logging.WARNING,
                "file://%s: %s %d damaged value file(s), e.g. %s (%s: %s)",
                self._root,
                "found (read-only, left in place)" if self.settings.read_only else "removed",
                len(bad),
                bad[0].path,
                bad[0].reason,
                bad[0].detail,
            )

    def damaged_files(self) -> list[DamagedFile]:
        """Damaged files the open-time scan found (removed, unless ``read_only``).

        The scan reads headers only: a payload that fails its checksum is found by a read of
        that value or by ``lmcache fsck`` (:func:`lmcache.backends.file.fsck.check_directory`).
        """
        return list(self._damaged)

    def _judge_temp(self, path: str) -> DamagedFile | None:
        """A stale temp file (removed unless read-only), or None when it is live or gone."""
        if not _temp_is_stale(path):
            return None
        removed = False
        if not self.settings.read_only:
            # Unlinked after the lock was free: a writer that raced us sees st_nlink == 0 and retries.
            removed = bool(self._remove(path))
        return DamagedFile(path, "stale_temp", "a temp file whose writer is gone", removed)

    def _list_shards(self) -> tuple[list[str], list[DamagedFile]]:
        shards = []
        damaged: list[DamagedFile] = []
        with map_os_errors(f"file://: listing {self._root}"), os.scandir(self._root) as it:
            for entry in it:
                name = entry.name
                if len(name) == 2 and set(name) <= _HEX and entry.is_dir(follow_symlinks=False):
                    shards.append(name)
                elif _PROBE_NAME.fullmatch(name):
                    found = self._judge_temp(entry.path)  # an O_DIRECT probe left by a killed process
                    if found is not None:
                        damaged.append(found)
        return sorted(shards), damaged

    def _scan_shards(
        self, shards: Sequence[str], cancel: threading.Event
    ) -> tuple[list[tuple[CacheKey, _Entry]], list[DamagedFile]]:
        found: list[tuple[CacheKey, _Entry]] = []
        damaged: list[DamagedFile] = []
        for shard in shards:
            if cancel.is_set():
                break
            shard_dir = os.path.join(self._root, shard)
            try:
                with os.scandir(shard_dir) as it:
                    names = [e.name for e in it]
            except OSError as exc:
                logger.warning("file://%s: cannot list %s: %s", self._root, shard_dir, exc)
                continue
            for name in names:
                path = os.path.join(shard_dir, name)
                if _TEMP_NAME.fullmatch(name):
                    stale = self._judge_temp(path)
                    if stale is not None:
                        damaged.append(stale)
                elif _VALUE_NAME.fullmatch(name):
                    verdict = inspect_value_file(path)
                    if isinstance(verdict, tuple):
                        key, payload, disk = verdict
                        found.append((key, _Entry(payload, disk)))
                    elif verdict is not None:
                        if not self.settings.read_only:
                            verdict = dataclasses.replace(verdict, removed=bool(self._remove(path)))
                        damaged.append(verdict)
        return found, damaged

    @staticmethod
    def _remove(path: str) -> int:
        try:
            return int(_remove_path(path))
        except OSError:
            return 0

    # -- helpers -----------------------------------------------------------------------------

    def _path(self, key: CacheKey) -> tuple[str, str, str]:
        """``(shard_dir, digest, final_path)`` of ``key``."""
        digest = key.digest()
        shard = os.path.join(self._root, digest[:2])
        return shard, digest, os.path.join(shard, digest + _SUFFIX)

    def _staging(self, nbytes: int) -> memoryview:
        """A page-aligned scratch buffer of at least ``nbytes``, reused per worker thread."""
        local = self._local
        buf: memoryview | None = getattr(local, "buf", None)
        if buf is not None and buf.nbytes >= nbytes:
            return buf
        size = _round_up(max(nbytes, 1), 1 << 20)
        fresh = memoryview(mmap.mmap(-1, size))
        if size <= STAGING_KEEP:
            local.buf = fresh
        return fresh

    def _add_entry(self, key: CacheKey, payload: int, disk: int, release: int = 0) -> None:
        """Index a value; ``release`` moves that many reserved bytes into use atomically."""
        with self._lock:
            self._reserved -= release
            if key not in self._index:
                self._index[key] = _Entry(payload, disk)
                self._used += payload
                self._disk += disk

    def _drop_entry(self, key: CacheKey) -> None:
        with self._lock:
            entry = self._index.pop(key, None)
            if entry is not None:
                self._used -= entry.payload
                self._disk -= entry.disk

    async def _gather(
        self, fn: Callable[..., T], groups: Sequence[Any], *args: Any, cancel: threading.Event | None = None
    ) -> list[T]:
        """Run ``fn(group, *args)`` for every group in parallel on the executor.

        On cancellation ``cancel`` is set (workers poll it) and every job is waited for before
        ``CancelledError`` propagates (:func:`run_blocking`). Workers report per-value failures
        as data; an exception here is a bug or an executor failure and is re-raised.
        """
        executor = self._executor
        on_cancel = cancel.set if cancel is not None else None
        return await gather_settled([run_blocking(executor, fn, g, *args, on_cancel=on_cancel) for g in groups])

    async def _map_items(
        self,
        fn: Callable[[Any, threading.Event], R],
        skipped: Callable[[Any], R],
        items: Sequence[Any],
    ) -> list[R]:
        """``fn(item, cancel)`` for every item, on up to ``workers`` executor threads.

        Each thread takes the next unclaimed item as soon as it is free, so one slow value (a
        cold read, a large file) does not hold back a whole share of the batch. ``fn`` must not
        raise. After a cancellation the remaining items get ``skipped(item)`` and the call
        waits for the items in progress before ``CancelledError`` propagates.
        """
        n = len(items)
        results: list[Any] = [None] * n
        cancel = threading.Event()
        claim = threading.Lock()
        next_index = 0

        def drain() -> None:
            nonlocal next_index
            while True:
                with claim:
                    i = next_index
                    next_index += 1
                if i >= n:
                    return
                results[i] = skipped(items[i]) if cancel.is_set() else fn(items[i], cancel)

        executor = self._executor
        await gather_settled(
            [run_blocking(executor, drain, on_cancel=cancel.set) for _ in range(min(n, self.settings.workers))]
        )
        return results

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        parts = await self._gather(self._contains_group, _split(keys, self.settings.workers))
        return [hit for part in parts for hit in part]

    def _contains_group(self, keys: Sequence[CacheKey]) -> list[bool]:
        out = []
        for key in keys:
            try:
                st = os.lstat(self._path(key)[2])
            except FileNotFoundError:
                self._drop_entry(key)  # deleted by another process
                out.append(False)
            except OSError:
                out.append(False)
            else:
                # A directory, FIFO or symlink at the name is damage, never a value.
                out.append(stat.S_ISREG(st.st_mode))
        return out

    async def _get_into(self, keys: list[CacheKey], dsts: list[Any]) -> list[int | None]:
        # Known sizes are checked before any I/O, so an undersized buffer usually raises before
        # any dst is written; values this process has not indexed are checked by the workers.
        with self._lock:
            known = [self._index.get(k) for k in keys]
        for key, dst, entry in zip(keys, dsts, known, strict=True):
            if entry is not None:
                check_dst_size(key, dst, entry.payload)
        items = list(zip(keys, dsts, strict=True))
        outcomes = await self._map_items(self._read_item, self._skip_read, items)
        results: list[int | None] = []
        too_small: BaseException | None = None
        for (key, _dst), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, _Failure):
                if outcome.kind == "corrupt":
                    self.record_corrupt(key, outcome.exc)  # type: ignore[arg-type]
                elif outcome.kind == "error":
                    self.record_error("read", outcome.exc)
                elif too_small is None:
                    too_small = outcome.exc
                results.append(None)
            else:
                results.append(outcome)
        if too_small is not None:
            raise too_small  # InvalidBufferError, once every worker is done
        return results

    def _read_item(self, item: tuple[CacheKey, Any], cancel: threading.Event) -> _ReadOutcome:
        try:
            return self._read_one(item[0], item[1], cancel)
        except Exception as exc:  # never let a worker raise: the call must wait for every item
            return _Failure("error", exc)

    @staticmethod
    def _skip_read(item: tuple[CacheKey, Any]) -> _ReadOutcome:
        return _MISS

    def _read_one(self, key: CacheKey, dst: Any, cancel: threading.Event) -> _ReadOutcome:
        """Read one value: open its file, let :meth:`_read_payload` fill ``dst``, turn failures into outcomes."""
        _shard, _digest, path = self._path(key)
        where = f"{self.schemes[0]}://"
        try:
            fd, st = _open_value(path, _O_DIRECT if self._o_direct else 0)
        except FileNotFoundError:
            self._drop_entry(key)
            return _MISS
        except _NotAFile as exc:
            return self._not_a_file(key, path, exc)
        except OSError as exc:
            return _Failure("error", _mapped(exc, f"{where}: opening {path}"))
        try:
            size = st.st_size
            if size < frame.MIN_HEADER_BYTES:
                raise IntegrityError(f"value file {path} is truncated ({size} bytes)")
            return self._read_payload(fd, key, size, dst, cancel)
        except IntegrityError as exc:
            return self._corrupt(key, path, st, exc)
        except InvalidBufferError as exc:
            return _Failure("too_small", exc)
        except OSError as exc:
            return _Failure("error", _mapped(exc, f"{where}: reading {path}"))
        finally:
            os.close(fd)

    def _read_head(
        self, fd: int, key: CacheKey, size: int, first: int = HEADER_READ
    ) -> tuple[frame.FrameHeader, memoryview] | None:
        """Read the first ``first`` bytes of a value file into staging and check its header there.

        Args:
            fd: The open value file (``O_DIRECT`` when in effect).
            key: The key the frame must name.
            size: The file's size.
            first: Bytes to read (more when the header is longer; rounded up to blocks with O_DIRECT).

        Returns:
            The header and the bytes read (a view of this thread's staging buffer), or None for a
            frame of another format version (a plain miss, left in place).

        Raises:
            IntegrityError: The header is damaged, names another key, or disagrees with ``size``.
            OSError: Reading failed.
        """
        want = _round_up(first, DIRECT_ALIGN) if self._o_direct else first
        staging = self._staging(max(want, SMALL_VALUE))
        got = self._read_at(fd, staging[:want], 0, first)
        view = staging[:got]
        if _foreign_version(view):
            return None
        need = frame.needed_header_bytes(view)
        if need > got:  # an unusually long key: read the whole header
            want = _round_up(need, DIRECT_ALIGN) if self._o_direct else need
            staging = self._staging(want)
            got = self._read_at(fd, staging[:want], 0, need)
            view = staging[:got]
        header = frame.parse_header(view, expected_key=key)
        if header.total_len != size:
            raise IntegrityError(f"value file for {key} has {size} bytes, its header says {header.total_len}")
        return header, view

    def _read_payload(self, fd: int, key: CacheKey, size: int, dst: Any, cancel: threading.Event) -> int | None:
        """Hook: check the frame of the open value file ``fd`` and move its payload into ``dst``.

        A subclass that moves payloads another way (into device memory) overrides this, and
        reads and checks the header with :meth:`_read_head` first.

        Returns:
            The payload's length, or None for a plain miss (a foreign format version, or the
            caller cancelled: ``dst`` is not written then).

        Raises:
            IntegrityError: The value is damaged (a counted corrupt miss; the file is removed).
            InvalidBufferError: ``dst`` is too small (raised once the batch is done).
            OSError: Reading failed (a counted error and a miss).
        """
        # First read: the whole frame when it is small, else its first block (the header).
        head = self._read_head(fd, key, size, size if size <= SMALL_VALUE else HEADER_READ)
        if head is None:
            return _MISS
        header, view = head
        n, offset = header.payload_len, header.payload_offset
        check_dst_size(key, dst, n)
        if cancel.is_set():
            return _MISS  # the caller is gone: never write into its buffer now
        if view.nbytes == size:
            # Small value: check it in staging, so even a corrupt one leaves dst untouched.
            payload = view[offset:size]
            header.verify_payload(payload)
            dst[:n] = payload
        elif self._o_direct and not (offset % DIRECT_ALIGN == 0 == n % DIRECT_ALIGN and is_aligned(dst, DIRECT_ALIGN)):
            return self._read_staged(fd, key, dst, size, cancel)  # O_DIRECT needs alignment
        else:
            # The hot path: the payload goes from the file straight into dst (one copy,
            # or DMA with O_DIRECT), and is checked there. A checksum failure now leaves
            # bytes in dst; the result is still a counted miss (see the module docstring).
            out = dst[:n]
            if self._read_at(fd, out, offset, n) != n:
                raise IntegrityError(f"value file for {key} shrank while it was read")
            header.verify_payload(out)
        self._add_entry(key, n, size)
        return n

    def _read_staged(self, fd: int, key: CacheKey, dst: memoryview, size: int, cancel: threading.Event) -> int | None:
        """Read the whole frame into staging, check it, then copy (O_DIRECT into unaligned dst).

        Raises:
            IntegrityError: The frame is damaged (dst is untouched).
            InvalidBufferError: ``dst`` is too small.
            OSError: Reading failed.
        """
        want = _round_up(size, DIRECT_ALIGN) if self._o_direct else size
        staging = self._staging(want)
        got = self._read_at(fd, staging[:want], 0, size)
        view = staging[:got]
        header = frame.parse_header(view, expected_key=key)
        if header.total_len != size or got != size:
            raise IntegrityError(f"value file for {key} has {size} bytes, its header says {header.total_len}")
        check_dst_size(key, dst, header.payload_len)
        payload = view[header.payload_offset : size]
        header.verify_payload(payload)
        if cancel.is_set():
            return _MISS
        dst[: header.payload_len] = payload
        self._add_entry(key, header.payload_len, size)
        return header.payload_len

    def _corrupt(self, key: CacheKey, path: str, st: os.stat_result, exc: IntegrityError) -> _Failure:
        # Remove the bad file (only if the name still points at the inode we read) so a later
        # put can store the value again instead of reporting EXISTS for a value nobody can read.
        if not self.settings.read_only:
            with contextlib.suppress(OSError):
                _remove_path(path, st)
        self._drop_entry(key)
        return _Failure("corrupt", exc)

    def _not_a_file(self, key: CacheKey, path: str, exc: _NotAFile) -> _Failure:
        # A counted corrupt miss, left in place: a put of the key replaces it (see _write_one).
        self._drop_entry(key)
        return _Failure("corrupt", IntegrityError(f"{exc} sits at the name of value file {path}"))

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        # Capacity is admitted here, in input order and before any I/O, so which values of a
        # batch fit does not depend on how the workers happen to be scheduled. Each admitted
        # value carries its reservation to a worker, which always releases it (stored or not),
        # so the accounting stays exact even when this task is cancelled.
        results: list[PutResult | None] = [None] * len(keys)
        todo: list[tuple[int, CacheKey, memoryview, int]] = []
        cap = self.settings.capacity
        with self._lock:
            for i, (key, src) in enumerate(zip(keys, srcs, strict=True)):
                nbytes = src.nbytes
                if cap is None or key in self._index:
                    todo.append((i, key, src, 0))  # unbounded, or most likely EXISTS
                elif nbytes > cap:
                    results[i] = rejected("too_large")
                elif self._used + self._reserved + nbytes > cap:
                    results[i] = rejected("capacity")
                else:
                    self._reserved += nbytes
                    todo.append((i, key, src, nbytes))
        if todo:
            outcomes = await self._map_items(self._write_item, self._skip_write, [t[1:] for t in todo])
            for (i, *_), outcome in zip(todo, outcomes, strict=True):
                if isinstance(outcome, _Failure):
                    self.record_error("write", outcome.exc)  # type: ignore[arg-type]
                    results[i] = rejected("error")
                else:
                    results[i] = outcome
        return results  # type: ignore[return-value]

    def _write_item(self, item: tuple[CacheKey, memoryview, int], cancel: threading.Event) -> PutResult | _Failure:
        key, src, reserved = item
        try:
            return self._write_one(key, src, reserved, cancel)  # settles ``reserved``
        except CapacityError:
            return rejected("capacity")  # the device is full (ENOSPC, EDQUOT…)
        except Exception as exc:  # never let a worker raise: the call must wait for every item
            return _Failure("error", exc)

    def _skip_write(self, item: tuple[CacheKey, memoryview, int]) -> PutResult | _Failure:
        with self._lock:
            self._reserved -= item[2]
        return rejected("cancelled")

    def _write_one(self, key: CacheKey, src: memoryview, reserved: int, cancel: threading.Event) -> PutResult:
        """Store one value; settles its capacity ``reserved`` bytes on every path."""
        final = self._path(key)[2]
        try:
            if self.settings.read_only:
                return rejected("read_only")
            try:
                st = os.lstat(final)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _mapped(exc, f"file://: checking {final}") from exc
            else:
                if stat.S_ISREG(st.st_mode):
                    return self._exists(key, final, src.nbytes)
                # Damage (a directory, FIFO, dangling symlink…) would make this key EXISTS and
                # unreadable forever: replace it with the value.
                logger.warning("file://%s: replacing %s at %s with a value", self._root, _describe(st.st_mode), final)
                with map_os_errors(f"file://: removing {_describe(st.st_mode)} at {final}"):
                    _remove_path(final, st)
            with map_os_errors(f"file://: writing {final}"):
                result, disk = self._write_file(key, src, cancel)
            if result is STORED:
                self._add_entry(key, src.nbytes, disk, release=reserved)
                reserved = 0
            return result
        finally:
            if reserved:
                with self._lock:
                    self._reserved -= reserved

    def _exists(self, key: CacheKey, final: str, nbytes: int) -> PutResult:
        # Values are immutable: a file under this key holds this value (same size), possibly
        # written by another process; adopt it so used_bytes counts it.
        with contextlib.suppress(OSError):
            self._add_entry(key, nbytes, os.stat(final).st_size)
        return EXISTS

    def _ensure_shard(self, shard: str) -> None:
        name = os.path.basename(shard)
        with self._lock:
            if name in self._shards:
                return
        try:
            os.mkdir(shard)
        except FileExistsError:
            pass
        else:
            if self.settings.fsync == "always":
                _fsync_dir(self._root)
        with self._lock:
            self._shards.add(name)

    def _write_file(self, key: CacheKey, src: memoryview, cancel: threading.Event) -> tuple[PutResult, int]:
        """Write and publish one value: ``(STORED, file size)``, ``(EXISTS, 0)`` or cancelled."""
        shard, digest, final = self._path(key)
        self._ensure_shard(shard)
        direct = self._o_direct
        header = frame.encode_header(key, src, alignment=DIRECT_ALIGN if direct else BUFFERED_ALIGN)
        total = len(header) + src.nbytes
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | (_O_DIRECT if direct else 0)
        for _attempt in range(3):
            tmp = os.path.join(shard, f".{digest}.{self._pid}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
            try:
                fd = os.open(tmp, flags, 0o644)
            except FileNotFoundError:
                # The shard (or the whole cache directory) was removed behind our back:
                # recreate it rather than failing every later put into it.
                with self._lock:
                    self._shards.discard(os.path.basename(shard))
                os.makedirs(shard, exist_ok=True)
                continue
            try:
                # Held until the temp name is gone: open() of another process treats a temp
                # file it can lock as stale and removes it.
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_nlink == 0:
                    continue  # a cleaner removed it between our create and our lock: start over
                try:
                    self._write_frame(fd, header, src, total)
                    if self.settings.fsync != "none":
                        _fdatasync(fd)
                    if cancel.is_set():
                        return rejected("cancelled"), 0  # the finally below removes the temp file
                    stored = self._publish(tmp, final)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
            finally:
                os.close(fd)
            if not stored:
                return self._exists(key, final, src.nbytes), 0
            if self.settings.fsync == "always":
                _fsync_dir(shard)
            return STORED, total
        raise OSError(errno.EAGAIN, "the temp file or its directory was removed repeatedly while writing")

    # -- data-path hooks (subclasses that move the bytes another way override these; see the class) --

    def _read_at(self, fd: int, view: memoryview, offset: int, want: int) -> int:
        """Read up to ``want`` bytes at ``offset`` into ``view``; bytes read (short only at EOF).

        ``view`` may be longer than ``want`` (O_DIRECT reads whole blocks). With O_DIRECT in
        effect, ``offset`` and ``view`` are block aligned whenever ``view`` is longer than ``want``.
        """
        return _pread_full(fd, view, offset, want)

    def _write_frame(self, fd: int, header: bytes, src: memoryview, total: int) -> None:
        """Write a whole frame (``header`` then ``src``, ``total`` bytes) into the new temp file ``fd``."""
        if self._o_direct:
            self._write_direct(fd, header, src, total)
        else:
            _writev_full(fd, [memoryview(header), src])

    def _write_direct(self, fd: int, header: bytes, src: memoryview, total: int) -> None:
        hlen = len(header)  # a multiple of DIRECT_ALIGN (the frame pads it)
        if src.nbytes % DIRECT_ALIGN == 0 and is_aligned(src, DIRECT_ALIGN):
            staging = self._staging(hlen)
            staging[:hlen] = header
            _writev_full(fd, [staging[:hlen], src])
            return
        padded = _round_up(total, DIRECT_ALIGN)
        staging = self._staging(padded)
        staging[:hlen] = header
        staging[hlen:total] = src
        staging[total:padded] = bytes(padded - total)
        _writev_full(fd, [staging[:padded]])
        os.ftruncate(fd, total)

    def _publish(self, tmp: str, final: str) -> bool:
        """Give the temp file its final name; False when the name already exists."""
        if self._use_link:
            try:
                os.link(tmp, final)
                return True
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in _NO_LINK_ERRNOS:
                    raise
                logger.info("file://%s: no hard links here (%s); publishing with rename", self._root, exc.strerror)
                self._use_link = False
        if os.path.lexists(final):
            return False
        os.replace(tmp, final)  # immutable values: replacing a racing writer's copy is harmless
        return True

    async def _delete(self, keys: list[CacheKey]) -> None:
        if self.settings.read_only:
            raise UnsupportedOperationError(f"{self!r} is read-only: delete is not allowed")
        errors = await self._gather(self._delete_group, _split(keys, self.settings.workers))
        for errs in errors:
            if errs:
                raise errs[0]

    def _delete_group(self, keys: Sequence[CacheKey]) -> list[BackendError]:
        errs: list[BackendError] = []
        for key in keys:
            path = self._path(key)[2]
            try:
                _remove_path(path)  # also a directory or other damage at the name
            except FileNotFoundError:
                pass
            except OSError as exc:
                errs.append(_mapped(exc, f"file://: deleting {path}"))
                continue
            self._drop_entry(key)
        return errs

    async def _ping(self) -> None:
        await run_blocking(self._executor, self._ping_blocking)

    def _ping_blocking(self) -> None:
        with map_os_errors(f"file://: checking {self._root}"):
            if not os.path.isdir(self._root):
                raise FileNotFoundError(errno.ENOENT, "cache directory is gone", self._root)
            if self.settings.read_only:
                if not os.access(self._root, os.R_OK | os.X_OK):
                    raise PermissionError(errno.EACCES, "cache directory is not readable", self._root)
            elif not os.access(self._root, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "cache directory is not writable", self._root)

    def _extra_stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "capacity_bytes": self.settings.capacity,
                "used_bytes": self._used,
                "disk_bytes": self._disk,
                "entries": len(self._index),
                "o_direct": self._o_direct,
                "fsync": self.settings.fsync,
                "read_only": self.settings.read_only,
                "damaged_files": len(self._damaged),
            }

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        with self._lock:
            keys = list(self._index)
        for key in keys:
            yield key

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        # Sizes are the value (payload) bytes, the unit of capacity and used_bytes.
        with self._lock:
            entries = [(key, entry.payload) for key, entry in self._index.items()]
        for entry in entries:
            yield entry


def _mapped(exc: OSError, what: str) -> BackendError:
    """``exc`` mapped into the lmcache error tree (see :func:`lmcache.errors.map_os_errors`)."""
    try:
        with map_os_errors(what):
            raise exc
    except BackendError as mapped:
        return mapped
    raise AssertionError("unreachable")  # pragma: no cover
