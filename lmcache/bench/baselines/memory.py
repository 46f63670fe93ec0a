"""Memcpy baseline for ``lmcache bench backend --url memory://…``: the hardware floor of an in-memory store.

:class:`MemcpyBaseline` copies each source into a preallocated pool with ``numpy.copyto`` and
back out: what a store that keeps values in host memory cannot beat. The pool is allocated and
touched once at open, like a long-lived pool after its first use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lmcache.bench.baselines.base import Baseline

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["MemcpyBaseline", "make"]


class MemcpyBaseline(Baseline):
    """``numpy.copyto`` from the source buffer into a preallocated pool, and back out."""

    name = "memcpy"

    def __init__(self, workload: Workload) -> None:
        self._count = workload.count
        self._value_size = workload.value_size
        self._pool = np.empty((0, 0), dtype=np.uint8)

    def _allocate(self, nbytes: int) -> np.ndarray:
        """The pool's flat bytes (subclasses map other memory)."""
        return np.empty(nbytes, dtype=np.uint8)

    async def open(self) -> None:
        self._pool = self._allocate(self._count * self._value_size).reshape(self._count, self._value_size)
        self._pool.fill(0)  # touched once, like a long-lived pool after its first use

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        for slot, src in zip(slots, srcs, strict=True):
            np.copyto(self._pool[slot], src)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        out: list[int | None] = []
        for slot, dst in zip(slots, dsts, strict=True):
            np.copyto(dst, self._pool[slot])
            out.append(dst.nbytes)
        return out

    async def aclose(self) -> None:
        self._pool = np.empty((0, 0), dtype=np.uint8)


def make(backend: StorageBackend, workload: Workload) -> Baseline:
    """The memcpy baseline of a ``memory://`` backend (its settings change nothing here)."""
    return MemcpyBaseline(workload)
