"""Concurrency mixin: batches at once, readers beside writers, an event loop that keeps ticking.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np
import pytest

from lmcache.backends.base import PutStatus, StorageBackend

from .base import SuiteBase
from .support import SENTINEL, KiB, MiB, expect_bytes, random_key, random_value, untouched

__all__ = ["ConcurrencyTests"]


class ConcurrencyTests(SuiteBase):
    """Many calls in flight on one backend, and large batches that leave the event loop free.

    Attributes:
        loop_batch_bytes: Bytes of the batch during which the event loop must keep ticking.
        min_loop_ticks: Ticks of a concurrent task required during each op of that batch.
        concurrent_batches: Batches run at once by ``asyncio.gather``.
        concurrent_value_bytes: Value size in those batches.
    """

    loop_batch_bytes: ClassVar[int] = 64 * MiB
    min_loop_ticks: ClassVar[int] = 2
    concurrent_batches: ClassVar[int] = 100
    concurrent_value_bytes: ClassVar[int] = 16 * KiB

    @pytest.mark.asyncio
    async def test_concurrent_batches(self, backend: StorageBackend) -> None:
        rng = np.random.default_rng()
        per_batch = 4
        batches = [
            [(random_key(), random_value(self.concurrent_value_bytes - j, rng)) for j in range(per_batch)]
            for _ in range(self.concurrent_batches)
        ]
        put_results = await asyncio.gather(*(backend.put([k for k, _ in b], [v for _, v in b]) for b in batches))
        for results in put_results:
            assert [r.status for r in results] == [PutStatus.STORED] * per_batch
        dsts = [[np.full(self.concurrent_value_bytes, SENTINEL, dtype=np.uint8) for _ in b] for b in batches]
        got = await asyncio.gather(
            *(backend.get_into([k for k, _ in b], d) for b, d in zip(batches, dsts, strict=True))
        )
        for batch, sizes, ds in zip(batches, got, dsts, strict=True):
            assert sizes == [len(v) for _, v in batch]
            for (_, value), d in zip(batch, ds, strict=True):
                expect_bytes(d[: len(value)].tobytes(), value)
        found = await asyncio.gather(*(backend.contains([k for k, _ in b]) for b in batches))
        assert found == [[True] * per_batch] * len(batches)

    @pytest.mark.asyncio
    async def test_concurrent_readers_see_whole_values(self, backend: StorageBackend) -> None:
        n = 64 * KiB
        keys = [random_key() for _ in range(16)]
        values = [random_value(n) for _ in keys]
        dsts = [[np.full(n, SENTINEL, dtype=np.uint8) for _ in keys] for _ in range(4)]
        ops: list[Any] = [backend.put(keys[i::2], values[i::2]) for i in range(2)]
        ops += [backend.get_into(keys, d) for d in dsts]
        outcomes = await asyncio.gather(*ops)
        for sizes, ds in zip(outcomes[2:], dsts, strict=True):
            for size, d, value in zip(sizes, ds, values, strict=True):
                if size is None:
                    assert untouched(d.tobytes())
                else:
                    assert size == n, "a reader saw a partly written value"
                    expect_bytes(d.tobytes(), value, "a reader saw a partly written value")

    @pytest.mark.asyncio
    async def test_event_loop_keeps_ticking_during_large_batch(self, backend: StorageBackend) -> None:
        self._require_fits(backend, self.large_value_bytes)
        count = max(1, self.loop_batch_bytes // self.large_value_bytes)
        rng = np.random.default_rng()
        keys = [random_key() for _ in range(count)]
        values = [random_value(self.large_value_bytes, rng) for _ in keys]
        dsts = [np.empty(self.large_value_bytes, dtype=np.uint8) for _ in keys]
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            await asyncio.sleep(0)
            start = ticks
            await self.put_all(backend, keys, values)
            put_ticks = ticks - start
            start = ticks
            got = await backend.get_into(keys, dsts)
            get_ticks = ticks - start
        finally:
            stop.set()
            await task
        assert got == [self.large_value_bytes] * count
        assert all(d.tobytes() == v for d, v in zip(dsts, values, strict=True))
        assert put_ticks >= self.min_loop_ticks, f"the event loop ran {put_ticks} times during a large put"
        assert get_ticks >= self.min_loop_ticks, f"the event loop ran {get_ticks} times during a large get_into"
