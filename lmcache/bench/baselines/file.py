"""Raw file baseline for ``lmcache bench backend --url file://…``: plain file I/O on the same file system.

:class:`RawFileBaseline` writes one file per value (open/write/close, with the backend's
``fsync`` policy and ``o_direct`` flag) and reads it back (open/readinto/close) on as many threads
as the backend has workers, in a scratch directory inside the backend's root: what any program
storing values as files pays, without lmcache's frame, checksum, atomic publish or index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.bench.baselines.base import Baseline
from lmcache.errors import ConfigError

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawFileBaseline", "make"]

logger = logging.getLogger(__name__)


class RawFileBaseline(Baseline):
    """One file per value: open/write/(sync)/close, and open/readinto/close, on a thread pool.

    Files go to a scratch directory inside the backend's root, so both write to the same file
    system; the directory is removed at the end. Every file is its own job on a pool of
    ``threads`` threads (set to the backend's worker count), the parallelism a file backend has.

    Args:
        root: Directory on the file system under test.
        fsync: ``"none"`` (no sync), ``"data"`` (``fdatasync`` each file) or ``"always"``
            (``fdatasync`` each file, then ``fsync`` the directory): the backend's policy.
        threads: Worker threads.
        o_direct: Open files with ``O_DIRECT`` (needs page-aligned buffers and a value size
            that is a multiple of 4096, which :class:`Workload` provides).
    """

    name = "raw-file"

    def __init__(self, root: Path, fsync: str, threads: int, o_direct: bool = False) -> None:
        if fsync not in ("none", "data", "always"):
            raise ConfigError(f"raw file baseline: fsync must be none, data or always, not {fsync!r}")
        self._root = Path(root)
        self._fsync = fsync
        self._threads = threads
        self._flags = getattr(os, "O_DIRECT", 0) if o_direct else 0
        self._dir: Path | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._written: list[Path] = []
        self._round = 0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "fsync": self._fsync,
            "threads": self._threads,
            "o_direct": bool(self._flags),
            "root": str(self._root),
        }

    async def open(self) -> None:
        self._root.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=".lmcache-bench-baseline-", dir=self._root))
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="lmcache-bench-file")

    async def aclose(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _path(self, slot: int) -> Path:
        assert self._dir is not None
        return self._dir / f"r{self._round}-{slot}.bin"

    async def _each(self, fn: Callable[[Path, memoryview], int], slots: range, bufs: Sequence[np.ndarray]) -> list[int]:
        loop = asyncio.get_running_loop()
        jobs = [
            loop.run_in_executor(self._pool, fn, self._path(slot), memoryview(buf).cast("B"))
            for slot, buf in zip(slots, bufs, strict=True)
        ]
        return list(await asyncio.gather(*jobs))

    def _write_one(self, path: Path, view: memoryview) -> int:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | self._flags, 0o644)
        try:
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
            if self._fsync != "none":
                os.fdatasync(fd)
        finally:
            os.close(fd)
        if self._fsync == "always":
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        return done

    def _read_one(self, path: Path, view: memoryview) -> int:
        fd = os.open(path, os.O_RDONLY | self._flags)
        try:
            done = 0
            while done < view.nbytes:
                n = os.readv(fd, [view[done:]])
                if n == 0:
                    break
                done += n
        finally:
            os.close(fd)
        return done

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        await self._each(self._write_one, slots, srcs)
        self._written.extend(self._path(s) for s in slots)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        return list(await self._each(self._read_one, slots, dsts))

    async def end_round(self) -> None:
        paths, self._written = self._written, []
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, _unlink_all, paths)
        self._round += 1


def _unlink_all(paths: Sequence[Path]) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The raw baseline of a ``file://`` backend, on its root with its fsync, O_DIRECT and worker settings.

    None where there is no raw equivalent: no root, an fsync policy it cannot mirror, or O_DIRECT
    with a value size that is not a multiple of 4096.
    """
    settings = getattr(backend, "settings", None)
    root = getattr(settings, "path", None)
    if not root:
        return None
    fsync = str(getattr(settings, "fsync", "none"))
    if fsync not in ("none", "data", "always"):
        logger.warning("file:// fsync policy %r has no raw equivalent here; no baseline", fsync)
        return None
    o_direct = bool(getattr(settings, "o_direct", False))
    if o_direct and (workload.value_size % 4096 or not hasattr(os, "O_DIRECT")):
        logger.warning("raw O_DIRECT baseline needs a value size that is a multiple of 4096; no baseline")
        return None
    threads = int(getattr(settings, "workers", 0) or workload.concurrency)
    return RawFileBaseline(Path(root), fsync, threads, o_direct=o_direct)
