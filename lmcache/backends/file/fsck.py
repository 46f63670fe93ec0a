"""``lmcache fsck``: find, report and (on request) remove damaged files in a ``file://`` directory.

:func:`check_directory` walks the directory the way :class:`~lmcache.backends.file.FileBackend`
lays it out and judges only names the backend creates, so other files are never touched:

* ``<root>/<ab>``: a shard name that is not a directory is ``not_a_directory`` (every put into
  that shard would fail);
* ``<root>/<ab>/<40 hex>.kv``: each value file is read whole, its header, length, key binding
  and payload checksum checked (:func:`~lmcache.backends.file.inspect_value_file` with
  ``deep=True``): ``torn``, ``bad_header``, ``wrong_key``, ``checksum``; a directory, FIFO,
  socket, device or symlink at such a name is ``not_a_file``. A value of another frame format
  version is not judged;
* temp files (``.<digest>.<pid>.<random>.tmp``, and ``.probe.*.tmp`` in the root) whose writer is
  gone (their ``flock`` is free) are ``stale_temp``; a live writer's temp file is left alone.

Without ``repair`` nothing is changed (the only side effect is taking a temp file's lock for an
instant to learn whether its writer is alive). With ``repair`` each damaged entry is judged
again just before it is removed, so a value a live process stored at that name meanwhile is
kept; a temp file is unlinked while its lock is held, as the backend's own open-time scan does.
It is safe to run while other processes use the directory.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lmcache.backends.file import (
    _HEX,
    _PROBE_NAME,
    _TEMP_NAME,
    _VALUE_NAME,
    DamagedFile,
    _NotAFile,
    _open_value,
    _remove_path,
    _temp_is_stale,
    inspect_value_file,
)
from lmcache.errors import map_os_errors

__all__ = ["FsckReport", "check_directory"]


@dataclasses.dataclass(frozen=True)
class FsckReport:
    """What :func:`check_directory` found.

    Attributes:
        root: The directory checked.
        values: Good value files.
        bytes: Payload bytes of the good values.
        damaged: Every damaged entry, sorted by path (``removed`` says what ``repair`` removed).
        repair: Whether removal was requested.
    """

    root: str
    values: int
    bytes: int
    damaged: list[DamagedFile]
    repair: bool

    @property
    def remaining(self) -> list[DamagedFile]:
        """Damaged entries still in place."""
        return [d for d in self.damaged if not d.removed]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "root": self.root,
            "values": self.values,
            "bytes": self.bytes,
            "damaged": len(self.damaged),
            "removed": sum(d.removed for d in self.damaged),
            "repair": self.repair,
            "files": [dataclasses.asdict(d) for d in self.damaged],
        }


def check_directory(root: str, *, repair: bool = False, workers: int = 4) -> FsckReport:
    """Check every file the ``file://`` backend owns under ``root``.

    Args:
        root: The cache directory (a ``file://`` URL's path).
        repair: Remove what is damaged.
        workers: Shards checked in parallel (full reads of every value are I/O bound).

    Raises:
        BackendError: ``root`` is missing, not a directory, or cannot be listed (mapped from
            ``OSError`` by :func:`~lmcache.errors.map_os_errors`).
    """
    shards: list[str] = []
    damaged: list[DamagedFile] = []
    with map_os_errors(f"fsck: listing {root}"), os.scandir(root) as it:
        for entry in it:
            name = entry.name
            if len(name) == 2 and set(name) <= _HEX:
                if entry.is_dir(follow_symlinks=False):
                    shards.append(entry.path)
                else:
                    damaged.append(DamagedFile(entry.path, "not_a_directory", "a shard name that is not a directory"))
            elif _PROBE_NAME.fullmatch(name) and _temp_is_stale(entry.path):
                damaged.append(_stale_temp(entry.path))
    values = nbytes = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="lmcache-fsck") as pool:
        for n, size, bad in pool.map(_check_shard, sorted(shards)):
            values += n
            nbytes += size
            damaged.extend(bad)
    damaged.sort(key=lambda d: d.path)
    if repair:
        damaged = [_repair(d) for d in damaged]
    return FsckReport(os.path.normpath(root), values, nbytes, damaged, repair)


def _stale_temp(path: str) -> DamagedFile:
    return DamagedFile(path, "stale_temp", "a temp file whose writer is gone")


def _check_shard(shard: str) -> tuple[int, int, list[DamagedFile]]:
    """Good values, their payload bytes, and the damage in one shard directory."""
    values = nbytes = 0
    damaged: list[DamagedFile] = []
    try:
        with os.scandir(shard) as it:
            names = sorted(e.name for e in it)
    except OSError as exc:
        return 0, 0, [DamagedFile(shard, "unreadable", f"cannot list it: {exc.strerror or exc}")]
    for name in names:
        path = os.path.join(shard, name)
        if _TEMP_NAME.fullmatch(name):
            if _temp_is_stale(path):
                damaged.append(_stale_temp(path))
        elif _VALUE_NAME.fullmatch(name):
            verdict = inspect_value_file(path, deep=True)
            if isinstance(verdict, DamagedFile):
                damaged.append(verdict)
            elif verdict is not None:
                values += 1
                nbytes += verdict[1]
    return values, nbytes, damaged


def _repair(found: DamagedFile) -> DamagedFile:
    """Remove ``found`` if it is still damaged now; the entry with ``removed`` set accordingly."""
    path = found.path
    try:
        if found.reason == "stale_temp":
            removed = _remove_stale_temp(path)
        elif found.reason == "not_a_directory":
            removed = _remove_non_directory(path)
        elif found.reason == "unreadable":
            removed = False  # a shard we cannot list is for a person to look at
        else:
            # Judged again: a live process may have replaced the damage with a good value.
            removed = isinstance(inspect_value_file(path, deep=True), DamagedFile) and _remove_path(path)
    except OSError as exc:
        return dataclasses.replace(found, detail=f"{found.detail}; not removed: {exc.strerror or exc}")
    return dataclasses.replace(found, removed=bool(removed))


def _remove_non_directory(path: str) -> bool:
    """Remove what sits at a shard's name unless it has become a directory meanwhile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return not stat.S_ISDIR(st.st_mode) and _remove_path(path, st)


def _remove_stale_temp(path: str) -> bool:
    """Unlink a temp file while holding its lock (a racing writer then sees ``st_nlink == 0``)."""
    try:
        fd, _st = _open_value(path)
    except _NotAFile:
        return _remove_path(path)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a writer came back to life: not stale after all
        os.unlink(path)
        return True
    finally:
        os.close(fd)
