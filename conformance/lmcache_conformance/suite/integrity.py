"""Integrity mixin: damaged values are counted misses, checked through the bypass hooks.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmcache.backends.base import StorageBackend

from .base import SuiteBase
from .support import SENTINEL, expect_bytes, random_key, random_value

__all__ = ["IntegrityTests"]


class IntegrityTests(SuiteBase):
    """A value damaged behind the backend's back is never served.

    It reads as a miss and counts in ``stats()["corrupt"]``. The damage goes through the bypass
    hooks (:meth:`corrupt_value`, or :meth:`read_raw` and :meth:`write_raw`); a test whose hook
    the test class does not implement skips and names it.
    """

    @pytest.mark.asyncio
    async def test_corrupt_value_is_a_counted_miss(self, backend: StorageBackend) -> None:
        if not backend.capabilities.integrity_checked:
            pytest.skip(f"{type(backend).__name__} declares integrity_checked=False")
        key, value = random_key(), random_value(4096)
        other, other_value = random_key(), random_value(4096)
        await self.put_all(backend, [key, other], [value, other_value])
        try:
            await self.corrupt_value(backend, key)
        except NotImplementedError:
            pytest.skip(f"{type(self).__name__} does not override the corrupt_value bypass hook")
        before = backend.stats()["corrupt"]
        dsts = [np.full(4096, SENTINEL, dtype=np.uint8) for _ in range(2)]
        got = await backend.get_into([key, other], dsts)
        assert got[0] is None, "a corrupted value was returned as a hit"
        assert got[1] == 4096
        expect_bytes(dsts[1].tobytes(), other_value)
        assert backend.stats()["corrupt"] > before
        # The corrupt dst's contents are unspecified (a backend may stream into it before the
        # checksum fails); what matters is that the call reported a miss. It stays a miss, and
        # deleting the key lets a good value be stored again.
        assert await self.read(backend, key, 4096) is None
        await backend.delete([key])
        await self.put_all(backend, [key], [value])
        expect_bytes(await self.read(backend, key, 4096), value)
