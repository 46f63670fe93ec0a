"""Integrity mixin: damaged values are counted misses, checked through the bypass hooks.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.keys import CacheKey

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
            pytest.skip(
                f"{type(self).__name__} implements neither the corrupt_value bypass hook "
                "nor both of read_raw and write_raw"
            )
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

    async def _read_damaged(self, backend: StorageBackend, key: CacheKey) -> int | None:
        """``get_into`` of a damaged value: its size, or None (the dst's contents are unspecified)."""
        # A backend may stream into the buffer before the checksum fails, so unlike read() this
        # does not require an untouched buffer on a miss; only the reported result counts.
        (n,) = await backend.get_into([key], [np.full(8192, SENTINEL, dtype=np.uint8)])
        return n

    def _require_integrity_checked(self, backend: StorageBackend) -> None:
        if not backend.capabilities.integrity_checked:
            pytest.skip(f"{type(backend).__name__} declares integrity_checked=False")

    @pytest.mark.asyncio
    async def test_raw_bytes_follow_put_and_delete(self, backend: StorageBackend) -> None:
        """The stored bytes (read through the bypass hook) appear on put, stay, and go on delete."""
        self.require_raw_hooks("read_raw")
        key, value = random_key(), random_value(4096)
        assert await self.read_raw(backend, key) is None, "read_raw found stored bytes for a key never stored"
        await self.put_all(backend, [key], [value])
        stored = await self.read_raw(backend, key)
        assert stored, "after put reported STORED, read_raw finds no stored bytes"
        results = await backend.put([key], [random_value(4096)])
        assert results[0].status is PutStatus.EXISTS, f"a second put of a held key reported {results[0].status.value}"
        assert await self.read_raw(backend, key) == stored, "a put that reported EXISTS changed the stored bytes"
        await backend.delete([key])
        assert await self.read_raw(backend, key) is None, "a delete left the value's stored bytes behind"

    @pytest.mark.asyncio
    async def test_truncated_value_is_a_counted_miss(self, backend: StorageBackend) -> None:
        """A value cut short in storage (a crash mid-write) is never served as a shorter hit."""
        self._require_integrity_checked(backend)
        self.require_raw_hooks("read_raw", "write_raw")
        keys = [random_key(), random_key()]
        await self.put_all(backend, keys, [random_value(4096) for _ in keys])
        # Each key is damaged once: a backend may drop a value it found damaged.
        for key, keep in zip(keys, ("all_but_one", "half"), strict=True):
            stored = await self.read_raw(backend, key)
            assert stored, "after put reported STORED, read_raw finds no stored bytes"
            cut = len(stored) - 1 if keep == "all_but_one" else len(stored) // 2
            await self.write_raw(backend, key, stored[:cut])
            before = backend.stats()["corrupt"]
            got = await self._read_damaged(backend, key)
            assert got is None, f"a value truncated to {cut} of {len(stored)} stored bytes was returned as a hit"
            assert backend.stats()["corrupt"] > before, "a truncated value was not counted as corrupt"

    @pytest.mark.asyncio
    async def test_value_under_another_key_is_a_counted_miss(self, backend: StorageBackend) -> None:
        """A whole, undamaged value stored under the wrong key is never served for that key."""
        self._require_integrity_checked(backend)
        self.require_raw_hooks("read_raw", "write_raw")
        mine, theirs = random_key(), random_key()
        mine_value, their_value = random_value(4096), random_value(4096)
        await self.put_all(backend, [mine, theirs], [mine_value, their_value])
        stored = await self.read_raw(backend, mine)
        assert stored, "after put reported STORED, read_raw finds no stored bytes"
        await self.write_raw(backend, theirs, stored)
        before = backend.stats()["corrupt"]
        got = await self._read_damaged(backend, theirs)
        assert got is None, f"another key's value was returned as a hit ({got} bytes)"
        assert backend.stats()["corrupt"] > before, "a value under the wrong key was not counted as corrupt"
        expect_bytes(await self.read(backend, mine, 8192), mine_value, "the value that was copied")
