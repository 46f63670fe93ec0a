"""Cancellation mixin: a cancelled call writes nothing late and leaves no partial value.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import ClassVar

import numpy as np
import pytest

from lmcache.backends.base import StorageBackend
from lmcache.keys import CacheKey

from .base import SuiteBase
from .support import SENTINEL, expect_bytes, random_key, random_value, untouched

__all__ = ["CancellationTests"]


class CancellationTests(SuiteBase):
    """Cancelled ``get_into`` and ``put`` calls, at several points of their progress.

    Attributes:
        cancel_batch_values: Values (of ``large_value_bytes``) in the batch that gets cancelled.
        supports_cancellation_check: Set False only where cancellation cannot be checked at all.
        cancelled_dst_all_or_nothing: A dst of a cancelled ``get_into`` holds either nothing or
            the whole value (never part of it). Late writes are always checked.
    """

    cancel_batch_values: ClassVar[int] = 16
    supports_cancellation_check: ClassVar[bool] = True
    cancelled_dst_all_or_nothing: ClassVar[bool] = True

    def _cancel_batch(self, backend: StorageBackend) -> tuple[list[CacheKey], list[bytes]]:
        self._require_fits(backend, self.large_value_bytes)
        keys = [random_key() for _ in range(self.cancel_batch_values)]
        rng = np.random.default_rng()
        return keys, [random_value(self.large_value_bytes, rng) for _ in keys]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 2, 5, 20])
    async def test_cancelled_get_into_never_writes_late(self, backend: StorageBackend, ticks: int) -> None:
        if not self.supports_cancellation_check:
            pytest.skip(f"{type(self).__name__} sets supports_cancellation_check = False")
        keys, values = self._cancel_batch(backend)
        await self.put_all(backend, keys, values)
        dsts = [np.full(self.large_value_bytes, SENTINEL, dtype=np.uint8) for _ in keys]
        task = asyncio.create_task(backend.get_into(keys, dsts))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        completed = True
        try:
            result = await task
        except asyncio.CancelledError:
            completed = False
        # Right after the cancelled call returns, record what each dst holds.
        snapshot = [d.tobytes() for d in dsts]
        if completed:
            assert result == [len(v) for v in values]
        for i, (got, value) in enumerate(zip(snapshot, values, strict=True)):
            if completed:
                expect_bytes(got, value)
            elif self.cancelled_dst_all_or_nothing and got != value and not untouched(got):
                raise AssertionError(f"dst {i} holds part of its value after cancellation")
        # Let any straggling thread or task run, then check nothing changed.
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        for i, (d, before) in enumerate(zip(dsts, snapshot, strict=True)):
            expect_bytes(d.tobytes(), before, f"dst {i} was written after get_into was cancelled")
        # The backend still works and still holds every value.
        for key, value in zip(keys[:3], values[:3], strict=True):
            expect_bytes(await self.read(backend, key, self.large_value_bytes), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 3])
    async def test_cancelled_put_leaves_whole_values_or_misses(self, backend: StorageBackend, ticks: int) -> None:
        if not self.supports_cancellation_check:
            pytest.skip(f"{type(self).__name__} sets supports_cancellation_check = False")
        keys, values = self._cancel_batch(backend)
        task = asyncio.create_task(backend.put(keys, values))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(20):
            await asyncio.sleep(0)
        for key, value in zip(keys, values, strict=True):
            got = await self.read(backend, key, self.large_value_bytes)
            if got is not None:
                expect_bytes(got, value, "a cancelled put left a partial or wrong value")
        # Putting the batch again completes it.
        results = await backend.put(keys, values)
        assert all(r.ok for r in results) or backend.capabilities.bounded
        for key, value in zip(keys, values, strict=True):
            if results[keys.index(key)].ok:
                expect_bytes(await self.read(backend, key, self.large_value_bytes), value)
