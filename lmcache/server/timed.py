"""``TimedTier``: a tier of the cache server's stack, timed per call for its metrics.

The server wraps each tier it builds in one, so that latency, value sizes and errors are
measured per tier (:class:`~lmcache.server.metrics.ServerMetrics`) while the tiered backend
sees exactly the backend it would without it: same capabilities, stats, URL and in-place
access.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, ClassVar

from lmcache.backends.base import Capabilities, PutResult, StorageBackend
from lmcache.backends.wrapper import WrappedBackend
from lmcache.errors import InvalidArgumentError, UnsupportedOperationError
from lmcache.keys import CacheKey
from lmcache.pool import InPlaceTier, OffersInPlace

if TYPE_CHECKING:
    from lmcache.server.metrics import ServerMetrics

__all__ = ["TimedTier"]


class TimedTier(WrappedBackend):
    """A tier as the server's TieredBackend sees it: the real backend, timed per call.

    Every call is delegated unchanged; latency and value sizes go to ``lmcache_tier_seconds``
    and ``lmcache_tier_value_bytes`` (labels ``tier``, ``op``), exceptions to
    ``lmcache_errors_total{backend="tier<i>", kind=<exception type>}``. ``stats()`` and
    ``url`` are the inner backend's, so the stack reports exactly what it would without this.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()  # per instance: the inner backend's

    def __init__(self, inner: StorageBackend, metrics: ServerMetrics, index: int) -> None:
        super().__init__(inner)
        self.schemes = inner.schemes  # type: ignore[misc]
        self._m = metrics
        self._tier = str(index)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> TimedTier:
        raise UnsupportedOperationError("TimedTier wraps a built backend; it has no URL form of its own")

    def __repr__(self) -> str:
        return repr(self.inner)

    async def _timed(self, op: str, call: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await call
        except InvalidArgumentError:
            raise  # the caller's mistake, not the tier's
        except Exception as exc:
            self._m.error(f"tier{self._tier}", type(exc).__name__)
            raise
        finally:
            self._m.tier_latency.labels(self._tier, op).observe(time.perf_counter() - t0)

    async def _ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return await self._timed("contains", self.inner.contains(keys))  # type: ignore[no-any-return]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        got: list[int | None] = await self._timed("get", self.inner.get_into(keys, dsts))
        hist = self._m.tier_bytes.labels(self._tier, "get")
        for n in got:
            if n is not None:
                hist.observe(n)
        return got

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        out: list[PutResult] = await self._timed("put", self.inner.put(keys, srcs))
        hist = self._m.tier_bytes.labels(self._tier, "put")
        for src, r in zip(srcs, out, strict=True):
            if r.ok:
                hist.observe(src.nbytes)
        return out

    async def _delete(self, keys: list[CacheKey]) -> None:
        await self._timed("delete", self.inner.delete(keys))

    def in_place(self) -> InPlaceTier | None:
        """The inner backend's in-place access, untimed (the server times that path itself)."""
        inner = self.inner
        return inner.in_place() if isinstance(inner, OffersInPlace) else None
