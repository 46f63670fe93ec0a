"""A base for backends that wrap another one (a codec layer, a timed tier, an injected delay).

Each wrapper changes one or two operations and must hand every other one to the backend it
wraps, unchanged: the lifecycle, ``ping``, host-memory registration, listing, ``stats``.
:class:`WrappedBackend` does that forwarding once, so a wrapper states only what it adds, and an
operation added to the contract later is forwarded by every wrapper at one place.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from lmcache.backends.base import PutResult, StorageBackend
from lmcache.keys import CacheKey

__all__ = ["WrappedBackend"]


class WrappedBackend(StorageBackend):
    """A backend that forwards every operation to ``inner``; subclasses override what they change.

    The wrapper owns ``inner``: opening the wrapper opens it and closing the wrapper closes it.
    Capabilities and secret options start as the inner backend's (a subclass narrows them where
    it serves less), so capability checks and redaction see what the wrapped backend declares.

    Args:
        inner: The backend that stores the values.
    """

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__()
        self.inner = inner
        self.capabilities = inner.capabilities  # type: ignore[misc]
        self.secret_options = inner.secret_options  # type: ignore[misc]

    @property
    def url(self) -> str:
        """The wrapped backend's URL (subclasses add their own options)."""
        return self.inner.url

    def stats(self) -> dict[str, Any]:
        """The wrapped backend's stats (a copy: subclasses add their own fields to it)."""
        return dict(self.inner.stats())

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        await self.inner.open()

    async def _close(self) -> None:
        await self.inner.aclose()

    async def _ping(self) -> None:
        await self.inner.ping()

    async def _register_host_memory(self, view: memoryview) -> None:
        await self.inner.register_host_memory(view)

    async def _unregister_host_memory(self, view: memoryview) -> None:
        await self.inner.unregister_host_memory(view)

    # -- data path ---------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return await self.inner.contains(keys)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        return await self.inner.get_into(keys, dsts)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        return await self.inner.put(keys, srcs)

    async def _delete(self, keys: list[CacheKey]) -> None:
        await self.inner.delete(keys)

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key in self.inner.list_keys():
            yield key

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        async for entry in self.inner.list_entries():
            yield entry
