"""Raw Mooncake SDK baseline for ``lmcache bench backend --url mooncake://…``.

The baseline is what an application would do without lmcache: its own
``MooncakeDistributedStore`` client, set up exactly like the backend under test by
:meth:`lmcache.backends.mooncake.MooncakeBackend.make_store` (same master, metadata server,
protocol, RDMA devices, segment and buffer sizes), with the workload's source and
destination arrays registered once (``register_buffer``), so every batch is one zero-copy
``batch_put_from`` or ``batch_get_into`` straight from and into those arrays, run on a thread pool as
large as the backend's (``max_workers``). It skips what lmcache adds: the frame header and its xxh3
checksum, the copy through the registered staging arena, the existence check that makes the first
writer win, and the timeout fence. Its objects are named ``<prefix>.bench-baseline/<run>/…`` and
removed at the end of each round.

Registered for :class:`~lmcache.backends.mooncake.MooncakeBackend` (every scheme it serves) in
:data:`lmcache.bench.baselines.BUILTIN_BASELINES`; importing this module registers nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.bench.baselines.base import Baseline
from lmcache.errors import BackendError

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawMooncakeBaseline", "make"]


class RawMooncakeBaseline(Baseline):
    """Plain Mooncake batch_put_from/batch_get_into on registered workload buffers, same client setup."""

    name = "raw-mooncake"

    def __init__(self, backend: Any, workload: Workload) -> None:
        self._backend = backend
        self._settings = backend.settings
        self._workload = workload
        self._store: Any = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._dir = f"{self._settings.prefix}.bench-baseline/{uuid.uuid4().hex[:12]}"
        self._round = 0
        self._written: list[str] = []
        self._registered: list[int] = []

    def describe(self) -> dict[str, Any]:
        s = self._settings
        return {
            **super().describe(),
            "master": f"{s.host}:{s.port}",
            "protocol": s.protocol,
            "metadata_server": s.metadata_server,
            "threads": s.max_workers,
        }

    async def open(self) -> None:
        s = self._settings
        self._pool = concurrent.futures.ThreadPoolExecutor(s.max_workers, thread_name_prefix="bench-mooncake")
        arrays = (self._workload.srcs, self._workload.dsts)
        # The backend's own client setup; the workload's arrays are registered once, for good.
        self._store = await asyncio.get_running_loop().run_in_executor(self._pool, self._backend.make_store, arrays)
        self._registered = [arr.ctypes.data for arr in arrays]

    async def aclose(self) -> None:
        store, self._store = self._store, None
        pool, self._pool = self._pool, None
        if store is not None:
            try:
                await self.end_round_with(store, pool)
            finally:

                def close() -> None:
                    for ptr in self._registered:
                        store.unregister_buffer(ptr)
                    store.close()

                await asyncio.get_running_loop().run_in_executor(pool, close)
        if pool is not None:
            pool.shutdown(wait=True)

    def _name(self, slot: int) -> str:
        return f"{self._dir}/r{self._round}-{slot}"

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        names = [self._name(s) for s in slots]
        ptrs = [src.ctypes.data for src in srcs]
        sizes = [src.nbytes for src in srcs]
        codes = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._store.batch_put_from, names, ptrs, sizes
        )
        bad = [c for c in codes if c != 0]
        if bad:
            raise BackendError(f"raw Mooncake baseline: batch_put_from returned {bad[0]}")
        self._written.extend(names)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        names = [self._name(s) for s in slots]
        ptrs = [dst.ctypes.data for dst in dsts]
        sizes = [dst.nbytes for dst in dsts]
        codes = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._store.batch_get_into, names, ptrs, sizes
        )
        return [int(c) if c >= 0 else None for c in codes]

    async def end_round(self) -> None:
        await self.end_round_with(self._store, self._pool)

    async def end_round_with(self, store: Any, pool: concurrent.futures.Executor | None) -> None:
        names, self._written = self._written, []
        if names:
            await asyncio.get_running_loop().run_in_executor(pool, lambda: store.batch_remove(names, True))
        self._round += 1


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The raw baseline for a ``mooncake://`` backend (None for any other backend)."""
    from lmcache.backends.mooncake import MooncakeBackend

    if not isinstance(backend, MooncakeBackend):
        return None
    return RawMooncakeBaseline(backend, workload)
