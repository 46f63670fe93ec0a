"""``TimedTier`` (the server's per-tier timing wrapper) is the tier it wraps, to every caller.

It forwards through :class:`lmcache.backends.wrapper.WrappedBackend`; the shared suite's mixins
that apply to a wrapper without a URL form of its own run on it around ``memory://``, so an
operation it fails to forward (listing, stats, lifecycle, host memory) fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
from lmcache_conformance import (
    ArgumentTests,
    BatchTests,
    HealthTests,
    LifecycleTests,
    ListingTests,
    RoundTripTests,
    ScopeIsolationTests,
)

from lmcache.backends.base import StorageBackend
from lmcache.backends.registry import open_backend
from lmcache.keys import CacheKey
from lmcache.server.metrics import ServerMetrics
from lmcache.server.timed import TimedTier


class TestTimedTierConformance(
    LifecycleTests, RoundTripTests, ArgumentTests, BatchTests, ScopeIsolationTests, HealthTests, ListingTests
):
    """The mixins that do not need a URL form (TimedTier has none: it wraps a built backend)."""

    def make_backend(self) -> StorageBackend:
        return TimedTier(open_backend("memory://?capacity=160MiB"), ServerMetrics(), 0)


async def test_timed_tier_reports_the_inner_tiers_url_stats_and_host_memory() -> None:
    inner = open_backend("memory://?capacity=4MiB")
    tier = TimedTier(inner, ServerMetrics(), 3)
    async with tier:
        key = CacheKey("m", 1, 0, bytes(32), "uint8")
        assert all(r.ok for r in await tier.put([key], [np.arange(64, dtype=np.uint8)]))
        assert tier.url == inner.url
        assert tier.stats() == inner.stats()
        assert [k async for k in tier.list_keys()] == [key]
        # Registration reaches the inner backend (a no-op there, but it must not raise).
        view = memoryview(bytearray(4096))
        await tier.register_host_memory(view)
        await tier.unregister_host_memory(view)
    assert not inner.is_open


def test_timed_tier_has_no_url_form() -> None:
    from lmcache.errors import UnsupportedOperationError

    with pytest.raises(UnsupportedOperationError):
        TimedTier.from_url("memory://")
