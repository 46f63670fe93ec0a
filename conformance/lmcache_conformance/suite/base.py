"""``SuiteBase``: what every conformance mixin stands on (hooks, fixtures, helpers, no tests).

Each mixin (:mod:`lmcache_conformance.suite`) subclasses :class:`SuiteBase`, so a test class
that composes any of them gets one copy of the plumbing: the ``backend`` fixture, the hooks a
backend's test class overrides (:meth:`SuiteBase.make_backend` and the bypass hooks
:meth:`SuiteBase.read_raw`, :meth:`SuiteBase.write_raw`, :meth:`SuiteBase.corrupt_value`), and
the clean-up that deletes the keys a test stored on a shared or persistent backend.

This module may import only ``lmcache``'s public contract (base, registry, keys) and the suite's
own test dependencies (pytest, pytest-asyncio, numpy).
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import pytest
import pytest_asyncio

import lmcache
from lmcache.backends.base import PutResult, PutStatus, StorageBackend
from lmcache.keys import CacheKey

from .support import SENTINEL, SIZES, MiB, issued_keys, untouched

__all__ = ["SuiteBase"]


class SuiteBase:
    """The shared base of the conformance mixins; it holds no tests.

    Attributes:
        large_value_bytes: A realistic KV chunk (default 2 MiB).
        odd_value_bytes: An odd, unaligned size (default 1_000_003).
        clean_up_keys: Delete the keys a test stored when it ends, on backends that are
            persistent or shared (so a run leaves no litter on a shared server).

    Each mixin documents the knobs of its own tests.
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.lmcache_conformance]

    large_value_bytes: ClassVar[int] = 2 * MiB
    odd_value_bytes: ClassVar[int] = 1_000_003
    clean_up_keys: ClassVar[bool] = True

    _request: pytest.FixtureRequest | None = None

    # -- hooks -------------------------------------------------------------------------------

    def make_backend(self) -> StorageBackend:
        """A new, unopened backend under test. Default: ``lmcache.open_backend(backend_url)``."""
        return lmcache.open_backend(self._fixture("backend_url", required=True))

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        """Bypass hook: the bytes ``backend`` keeps for ``key``, read without its methods.

        Return the stored value as the backend lays it out (frame header, payload, whatever
        else it keeps in the same place), or None when nothing is stored under ``key``. Tests
        that need this hook skip when it is not overridden.
        """
        raise NotImplementedError

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        """Bypass hook: make ``data`` the stored bytes of ``key``, without ``backend``'s methods.

        It replaces what is stored under ``key`` (a key the backend already holds), in the
        layout :meth:`read_raw` returns. Tests that need this hook skip when it is not
        overridden.
        """
        raise NotImplementedError

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        """Bypass hook: damage the stored bytes of ``key`` without using ``backend``'s methods.

        Flip a payload byte, truncate the value, or overwrite its header. By default, where
        the test class implements both :meth:`read_raw` and :meth:`write_raw`, it flips the last
        stored byte (a payload byte of a framed value) through them; otherwise it raises
        ``NotImplementedError`` and the tests that need it skip.
        """
        if not (self.implements("read_raw") and self.implements("write_raw")):
            raise NotImplementedError
        stored = await self.read_raw(backend, key)
        assert stored, f"read_raw found no stored bytes for {key.to_string()[:80]}, which put reported held"
        damaged = bytearray(stored)
        damaged[-1] ^= 0xFF
        await self.write_raw(backend, key, bytes(damaged))

    def implements(self, hook: str) -> bool:
        """Whether this test class overrides the bypass hook ``hook`` of :class:`SuiteBase`."""
        return getattr(type(self), hook) is not getattr(SuiteBase, hook)

    def require_raw_hooks(self, *hooks: str) -> None:
        """Skip the test, naming what to implement, unless every one of ``hooks`` is overridden."""
        missing = [h for h in hooks if not self.implements(h)]
        if missing:
            pytest.skip(f"{type(self).__name__} does not implement the bypass hook(s) {', '.join(missing)}")

    # -- plumbing ----------------------------------------------------------------------------

    @pytest.fixture(autouse=True)
    def _lmcache_conformance_bind(self, request: pytest.FixtureRequest) -> None:
        """Keep the test's request so hooks can resolve fixtures by name."""
        self._request = request

    def _fixture(self, name: str, *, required: bool = False) -> Any:
        """Resolve fixture ``name`` wherever it is defined (class, module, conftest), or None."""
        request = self._request
        if request is None:
            raise RuntimeError("BackendTests hooks run only inside tests of a BackendTests subclass")
        try:
            return request.getfixturevalue(name)
        except pytest.FixtureLookupError:
            if required:
                pytest.fail(
                    f"{type(self).__name__} must define a fixture {name!r} (a backend URL string) "
                    "or override make_backend()",
                    pytrace=False,
                )
            return None

    @pytest.fixture(autouse=True)
    def _lmcache_conformance_clean_up(self, _lmcache_conformance_bind: None) -> Iterator[None]:
        """Collect the keys the test hands out; delete those still stored when it ends.

        Most are deleted by the backend that stored them, just before the suite closes it
        (:meth:`_close_cleanly`); a test that closes its backend itself leaves its keys to a
        sweep here, through a new backend, on persistent or shared backends only.
        """
        # Resolve the URL now, so that its fixture (a temporary folder, a server) is still set
        # up when the sweep below runs.
        self._fixture("backend_url")
        issued: list[CacheKey] = []
        issued_keys.append(issued)
        try:
            yield
        finally:
            issued_keys.remove(issued)
        if issued and self.clean_up_keys:
            self._sweep(issued)

    def _sweep(self, keys: list[CacheKey]) -> None:
        async def sweep() -> None:
            b = self.make_backend()
            try:
                if b.capabilities.persistent or b.capabilities.shared:
                    await b.delete(list(dict.fromkeys(keys)))
            finally:
                await b.aclose()

        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(sweep())
        except Exception as exc:  # a broken backend must not hide the test's own outcome
            warnings.warn(f"the conformance suite could not delete {len(keys)} test keys: {exc!r}", stacklevel=1)
        finally:
            loop.close()

    async def _close_cleanly(self, b: StorageBackend) -> None:
        """Delete the keys handed out so far (when ``b`` is still open and keeps data), then close."""
        issued = issued_keys[-1] if issued_keys else None
        if issued and self.clean_up_keys and b.is_open and (b.capabilities.persistent or b.capabilities.shared):
            try:
                await b.delete(list(dict.fromkeys(issued)))
                issued.clear()
            except Exception as exc:  # the sweep tries again with a new backend
                warnings.warn(f"the conformance suite could not delete its test keys: {exc!r}", stacklevel=1)
        await b.aclose()

    @pytest_asyncio.fixture
    async def backend(self, _lmcache_conformance_bind: None) -> AsyncIterator[StorageBackend]:
        """An opened backend, always closed after the test."""
        b = self.make_backend()
        try:
            await b.open()
            yield b
        finally:
            await self._close_cleanly(b)

    @contextlib.asynccontextmanager
    async def fresh_backend(self) -> AsyncIterator[StorageBackend]:
        """A new, unopened backend, closed on exit."""
        b = self.make_backend()
        try:
            yield b
        finally:
            await self._close_cleanly(b)

    # -- helpers for the tests ---------------------------------------------------------------

    def _size(self, name: str) -> int:
        spec = SIZES[name]
        return getattr(self, spec) if isinstance(spec, str) else spec

    def _require_fits(self, backend: StorageBackend, nbytes: int) -> None:
        limit = backend.capabilities.max_value_bytes
        if limit is not None and nbytes > limit:
            pytest.skip(f"{type(backend).__name__} takes values up to {limit} bytes; this test needs {nbytes}")

    async def put_all(
        self, backend: StorageBackend, keys: Sequence[CacheKey], srcs: Sequence[Any], *, fresh: bool = True
    ) -> list[PutResult]:
        """Put and require every value to be held; ``fresh`` keys must report ``STORED``.

        A bounded backend that rejects for lack of room skips the test (give it more capacity).
        """
        results = await backend.put(keys, srcs)
        assert len(results) == len(keys), "put must return one result per key"
        seen: set[CacheKey] = set()
        for k, r in zip(keys, results, strict=True):
            assert isinstance(r, PutResult), f"put returned {r!r}, not a PutResult"
            if r.status is PutStatus.REJECTED:
                caps = backend.capabilities
                if (caps.bounded and r.reason == "capacity") or (
                    caps.max_value_bytes is not None and r.reason == "too_large"
                ):
                    pytest.skip(
                        f"{type(backend).__name__} rejected a value ({r.reason}); "
                        "give it more capacity to run the conformance suite"
                    )
                pytest.fail(f"put of {k} was rejected: {r}")
            if fresh:
                expected = PutStatus.EXISTS if k in seen else PutStatus.STORED
                assert r.status is expected, f"put of a fresh key reported {r.status.value}, not {expected.value}"
            seen.add(k)
        return results

    async def read(self, backend: StorageBackend, key: CacheKey, capacity: int) -> bytes | None:
        """Read ``key`` into a fresh sentinel-filled buffer; None on a miss (checked untouched)."""
        dst = np.full(capacity, SENTINEL, dtype=np.uint8)
        result = await backend.get_into([key], [dst])
        assert isinstance(result, list) and len(result) == 1
        (n,) = result
        if n is None:
            assert untouched(dst.tobytes()), "get_into wrote into the buffer of a miss"
            return None
        assert 0 <= n <= capacity
        assert untouched(dst[n:].tobytes()), "get_into wrote past the value's length"
        return dst[:n].tobytes()
