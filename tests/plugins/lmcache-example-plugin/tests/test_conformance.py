"""The lmcache conformance suite against ``example://``, as a plugin's own CI runs it.

``docs/plugins.md`` (section "Running the conformance suite") shows this file: one subclass of
``BackendTests``, one fixture naming the URL, and the optional bypass hooks and secret URL. Run
it from this folder with ``pytest tests``; lmcache's own test run collects it too.
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

    # Optional bypass hooks: the suite checks stored values through a second path. They reach
    # the storage without the backend's own methods.

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        """The stored frame of ``key`` (header + payload), or None."""
        return raw_store(backend.settings.name).get(key.to_string())  # type: ignore[attr-defined]

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        """Replace the stored frame of ``key``."""
        raw_store(backend.settings.name)[key.to_string()] = data  # type: ignore[attr-defined]

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        """Damage a stored value (without this, the suite flips its last byte via the raw hooks)."""
        frame = bytearray(await self.read_raw(backend, key) or b"")
        frame[16] ^= 0xFF  # the payload length in the header: the header checksum must catch it
        await self.write_raw(backend, key, bytes(frame))
