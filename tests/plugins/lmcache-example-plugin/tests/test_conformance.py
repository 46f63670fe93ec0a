"""The lmcache conformance suite against ``example://``, as a plugin's own CI runs it.

``docs/plugins.md`` (section "Running the conformance suite") shows this file: one subclass of
``BackendTests``, one fixture naming the URL, and the optional bypass hook and secret URL. Run it
from this folder with ``pytest tests``; lmcache's own test run collects it too.
"""

from __future__ import annotations

import uuid

import pytest
from lmcache_conformance import BackendTests
from lmcache_example_plugin.backend import raw_store

from lmcache.backends.base import StorageBackend
from lmcache.keys import CacheKey


class TestExampleBackend(BackendTests):  # no Test prefix on the base: only this class runs
    large_value_bytes = 2 << 20  # optional knobs (class attributes); this is the default

    @pytest.fixture
    def backend_url(self) -> str:  # the ONE required fixture: a fresh store per test
        return f"example://conformance-{uuid.uuid4().hex}"

    @pytest.fixture
    def secret_url(self) -> str:  # optional: repr must not show the token
        return "example://secrets?token=tok-3f9a1c77"

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        """Bypass hook: damage a stored value without the backend's own methods."""
        store = raw_store(backend.settings.name)  # type: ignore[attr-defined]
        frame = bytearray(store[key.to_string()])
        frame[-1] ^= 0xFF  # flip the last payload byte: the checksum must catch it
        store[key.to_string()] = bytes(frame)
