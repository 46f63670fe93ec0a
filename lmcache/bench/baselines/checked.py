"""The checked baseline of ``lmcache bench backend --checked``: a raw baseline plus lmcache's integrity check.

:class:`CheckedBaseline` wraps a second instance of a store's raw baseline and does around it
what lmcache does around every value (xxh3 of each source before a put, of what landed after a
get, compared), so a run can tell what the check alone costs on this host from what the rest of
lmcache costs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from lmcache.bench.baselines.base import Baseline
from lmcache.errors import IntegrityError
from lmcache.serde import frame

__all__ = ["CheckedBaseline"]


class CheckedBaseline(Baseline):
    """The raw baseline plus lmcache's integrity check: xxh3 of each source before it moves, of what landed after.

    What any client of the same SDK that checks what it moves does (DESIGN.md §3 rule 8): a put
    hashes each value and keeps the checksum, then makes the raw put; a get makes the raw get,
    then hashes what landed and compares it with the checksum kept at put time. The hashing runs
    on ``threads`` threads (one per batch in flight), so one batch's pass over memory overlaps
    other batches' transfers. Its ratio to the raw baseline in the same run is the share of the
    raw throughput that a verifying client can keep on this host: where the transport copies
    with the CPU at memory speed (NIXL over UCX/CMA on one host), the extra pass contends with
    the copy for memory bandwidth.
    """

    name = "checked"

    def __init__(self, inner: Baseline, threads: int) -> None:
        self._inner = inner
        self._threads = max(1, threads)
        self._executor: ThreadPoolExecutor | None = None
        self._sums: dict[int, int] = {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "name": f"{self._inner.name}+xxh3", "raw": self._inner.describe()}

    async def open(self) -> None:
        self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="lmcache-bench-check")
        await self._inner.open()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    async def end_round(self) -> None:
        self._sums.clear()
        await self._inner.end_round()

    async def _hash(self, bufs: Sequence[np.ndarray]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: [frame.payload_checksum(b) for b in bufs]
        )

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        sums = await self._hash(srcs)
        await self._inner.put_batch(slots, srcs)
        self._sums.update(zip(slots, sums, strict=True))

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        got = await self._inner.get_batch(slots, dsts)
        landed = [(s, d[:n]) for s, d, n in zip(slots, dsts, got, strict=True) if n is not None]
        sums = await self._hash([d for _s, d in landed])
        for (slot, _d), checksum in zip(landed, sums, strict=True):
            if self._sums.get(slot) != checksum:
                raise IntegrityError(f"checked baseline: slot {slot} does not match the checksum kept when it was put")
        return got
