"""Health mixin: ``ping`` and the counters of ``stats()``.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmcache.backends.base import StorageBackend

from .base import SuiteBase
from .support import expect_bytes, random_key, random_value

__all__ = ["HealthTests"]


class HealthTests(SuiteBase):
    """``ping`` answers and every counter of ``stats()`` moves with the calls it counts."""

    @pytest.mark.asyncio
    async def test_ping(self, backend: StorageBackend) -> None:
        assert await backend.ping() is None

    @pytest.mark.asyncio
    async def test_stats_counters_move(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(321)

        def delta(before: dict[str, Any], name: str) -> int:
            return int(backend.stats()[name]) - int(before[name])

        s = backend.stats()
        for name in ("hits", "misses", "stored", "exists", "corrupt", "bytes_read", "bytes_written"):
            assert name in s, f"stats() lacks the counter {name!r}"
        await self.put_all(backend, [key], [value])
        assert delta(s, "stored") == 1
        assert delta(s, "bytes_written") == 321
        s = backend.stats()
        await backend.put([key], [value])
        assert delta(s, "exists") == 1
        assert delta(s, "stored") == 0
        s = backend.stats()
        expect_bytes(await self.read(backend, key, 400), value)
        assert delta(s, "hits") == 1
        assert delta(s, "bytes_read") == 321
        s = backend.stats()
        assert await self.read(backend, random_key(), 400) is None
        assert delta(s, "misses") == 1
        assert delta(s, "hits") == 0
