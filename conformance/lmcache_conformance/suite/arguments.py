"""Argument mixin: malformed calls raise ``InvalidArgumentError`` and change nothing.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

from typing import Any

import pytest

from lmcache.backends.base import StorageBackend
from lmcache.errors import InvalidArgumentError

from .base import SuiteBase
from .support import random_key

__all__ = ["ArgumentTests"]


class ArgumentTests(SuiteBase):
    """Keys and buffers of different counts, and keys that are not ``CacheKey`` s, are refused."""

    @pytest.mark.asyncio
    async def test_mismatched_lengths_raise(self, backend: StorageBackend) -> None:
        k1, k2 = random_key(), random_key()
        with pytest.raises(InvalidArgumentError):
            await backend.get_into([k1, k2], [bytearray(8)])
        with pytest.raises(InvalidArgumentError):
            await backend.put([k1, k2], [b"x"])
        with pytest.raises(InvalidArgumentError):
            await backend.put([k1], [b"x", b"y"])
        # Nothing was stored by the rejected put.
        assert await backend.contains([k1, k2]) == [False, False]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("bad", ["str", "bytes", "int", "bare_key"])
    async def test_non_cache_keys_raise(self, backend: StorageBackend, bad: str) -> None:
        key = random_key()
        if bad == "bare_key":
            keys: Any = key  # a single key instead of a list of keys
        else:
            keys = [key, {"str": "some-key", "bytes": b"some-key", "int": 7}[bad]]
        n = 1 if bad == "bare_key" else 2
        with pytest.raises(InvalidArgumentError):
            await backend.contains(keys)
        with pytest.raises(InvalidArgumentError):
            await backend.get_into(keys, [bytearray(8) for _ in range(n)])
        with pytest.raises(InvalidArgumentError):
            await backend.put(keys, [b"v" for _ in range(n)])
        with pytest.raises(InvalidArgumentError):
            await backend.delete(keys)
        assert await backend.contains([key]) == [False]
