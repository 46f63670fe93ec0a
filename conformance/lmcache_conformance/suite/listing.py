"""Listing mixin: ``list_keys`` and ``list_entries``, or ``UnsupportedOperationError`` without listing.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import pytest

from lmcache.backends.base import StorageBackend
from lmcache.errors import UnsupportedOperationError

from .base import SuiteBase
from .support import random_key, random_value

__all__ = ["ListingTests"]


class ListingTests(SuiteBase):
    """Listing names what is held and stops naming what was deleted."""

    @pytest.mark.asyncio
    async def test_list_keys(self, backend: StorageBackend) -> None:
        if not backend.capabilities.listing:
            with pytest.raises(UnsupportedOperationError):
                async for _ in backend.list_keys():
                    pass
            with pytest.raises(UnsupportedOperationError):
                async for _ in backend.list_entries():
                    pass
            return
        keys = [random_key() for _ in range(3)]
        values = [random_value(10 * (i + 1)) for i in range(3)]
        await self.put_all(backend, keys, values)
        listed = {k async for k in backend.list_keys()}
        assert set(keys) <= listed
        entries = {k: size async for k, size in backend.list_entries()}
        for k, v in zip(keys, values, strict=True):
            assert entries[k] is None or entries[k] == len(v)
        await backend.delete([keys[1]])
        listed = {k async for k in backend.list_keys()}
        assert keys[0] in listed and keys[2] in listed and keys[1] not in listed
