"""``BackendTests``: the reusable conformance suite every ``StorageBackend`` must pass.

A backend's test module subclasses :class:`BackendTests` (the base class has no ``Test`` prefix,
so pytest collects only the subclasses) and provides ONE of:

* a fixture ``backend_url`` returning the URL to test (at class, module or conftest level), or
* an override of :meth:`BackendTests.make_backend` returning a new, unopened backend.

Example::

    import pytest
    from lmcache_conformance import BackendTests

    class TestMyBackend(BackendTests):
        large_value_bytes = 1 << 20  # optional knobs, see the class attributes

        @pytest.fixture
        def backend_url(self, tmp_path):
            return f"mystore://{tmp_path}"

        async def corrupt_value(self, backend, key):  # optional bypass hook
            ...  # flip a byte of the stored value without using the backend's methods

The suite reads ``capabilities`` to decide what to check (listing, integrity checks, bounded
capacity) instead of guessing. It uses fresh random keys in every test, so it may run against
shared servers holding other data; on a persistent or shared backend it deletes the keys a test
stored when the test ends, and it closes every backend it opens. Async tests and fixtures use
pytest-asyncio explicitly, so the suite also runs in projects without ``asyncio_mode=auto``.

This module may import only ``lmcache``'s public contract (base, registry, keys, errors) and its
own test dependencies (pytest, pytest-asyncio, numpy; torch and hypothesis when installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
import pytest
import pytest_asyncio

import lmcache
from lmcache.backends.base import PutResult, PutStatus, StorageBackend
from lmcache.errors import (
    BackendClosedError,
    ConfigError,
    InvalidArgumentError,
    InvalidBufferError,
    UnsupportedOperationError,
)
from lmcache.keys import CacheKey

__all__ = ["SENTINEL", "BackendTests", "expect_bytes", "random_key", "random_value"]

KiB = 1 << 10
MiB = 1 << 20

#: Byte that destination buffers are filled with, to see what a call wrote.
SENTINEL = 0xA5

_SOURCE_KINDS = ("bytes", "bytearray", "memoryview", "numpy", "torch")
_DEST_KINDS = ("bytearray", "memoryview", "numpy", "torch")
# Sizes by name, resolved against the class attributes at run time so subclasses can tune them.
_SIZES = {"empty": 0, "one_byte": 1, "kv_chunk": "large_value_bytes", "odd": "odd_value_bytes"}
# Operations that must open a new backend lazily, and must fail on a closed one.
_OPERATIONS = ("contains", "get_into", "put", "delete", "lookup_prefix", "ping")
# Each way a key's scope can differ while its chunk hash stays the same: every one of them must
# name another value (rule 9 of the house plan: tenants never see each other's KV).
_SCOPE_VARIANTS: dict[str, Callable[[CacheKey], CacheKey]] = {
    "model": lambda k: dataclasses.replace(k, model=k.model + "-other-model"),
    "world_size": lambda k: dataclasses.replace(k, world_size=k.world_size * 2),
    "rank": lambda k: dataclasses.replace(k, rank=k.rank + 1),
    "dtype": lambda k: dataclasses.replace(k, dtype="bfloat16"),
    "tag_value": lambda k: dataclasses.replace(k, tags=(("tenant", "tenant-b"),)),
    "tag_name": lambda k: dataclasses.replace(k, tags=(("team", "tenant-a"),)),
    "no_tags": lambda k: dataclasses.replace(k, tags=()),
    "extra_tag": lambda k: dataclasses.replace(k, tags=(("lora", "adapter-1"), ("tenant", "tenant-a"))),
}
# Names of the threads of an event loop's default executor (``asyncio.to_thread``): the loop owns
# them, not the backend, and they end when the loop closes.
_LOOP_EXECUTOR_THREAD_PREFIX = "asyncio_"

# Keys handed out by random_key() during the current suite test (one list while a test runs,
# none outside), so the suite can delete what a test stored from a shared or persistent backend.
_issued_keys: list[list[CacheKey]] = []


def random_key(tag: str = "") -> CacheKey:
    """A fresh key nobody else holds (32 random bytes of hash)."""
    key = CacheKey(f"lmcache-conformance{('/' + tag) if tag else ''}", 1, 0, os.urandom(32), "uint8")
    if _issued_keys:
        _issued_keys[-1].append(key)
    return key


def _scoped_key() -> CacheKey:
    """A fresh key with a non-trivial scope (world size 2, rank 0, float16, tenant tag)."""
    base = random_key("scope")
    key = dataclasses.replace(base, world_size=2, dtype="float16", tags=(("tenant", "tenant-a"),))
    if _issued_keys:
        _issued_keys[-1].append(key)
        _issued_keys[-1].extend(variant(key) for variant in _SCOPE_VARIANTS.values())
    return key


@contextlib.contextmanager
def _private_hypothesis_home() -> Iterator[None]:
    """Point Hypothesis's storage (its cache of source constants) at a temporary folder.

    ``database=None`` is not enough: Hypothesis still writes ``.hypothesis/constants/`` into the
    working directory, which would litter a user's project in zero-code mode. Where that folder
    exists already, it is used as it is.
    """
    try:
        from hypothesis import configuration
    except ImportError:  # pragma: no cover - the caller skipped already
        yield
        return
    set_home = getattr(configuration, "set_hypothesis_home_dir", None)
    current = getattr(configuration, "storage_directory", None)
    if set_home is None or current is None:  # an older Hypothesis: leave it alone
        yield
        return
    previous = getattr(current(intent_to_write=False), "home_directory", None)
    if previous is None or previous.exists():
        # The project keeps a Hypothesis folder already: using it adds nothing new, and its
        # cache saves re-reading every local module's source on each run.
        yield
        return
    with tempfile.TemporaryDirectory(prefix="lmcache-conformance-hypothesis-") as home:
        set_home(home)
        try:
            yield
        finally:
            set_home(previous)


def random_value(n: int, rng: np.random.Generator | None = None) -> bytes:
    """``n`` random bytes (fast for MiB sizes)."""
    return (rng or np.random.default_rng()).bytes(n)


def _import_torch() -> Any:
    return pytest.importorskip("torch", reason="torch is not installed (pip install torch)")


def make_source(kind: str, data: bytes) -> Any:
    """``data`` as a source buffer of ``kind`` (bytes, bytearray, memoryview, numpy, torch)."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        # A view into the middle of a larger buffer: backends must honour its offset and length.
        parent = bytearray(b"\x00" * 7 + data + b"\x00" * 9)
        return memoryview(parent)[7 : 7 + len(data)]
    if kind == "numpy":
        arr = np.frombuffer(data, dtype=np.uint8).copy()
        # A realistic KV chunk is a half-precision array; a byte-sized one covers odd lengths.
        return arr.view(np.float16).reshape(2, -1) if len(data) % 4 == 0 and data else arr
    if kind == "torch":
        torch = _import_torch()
        t = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        return t.view(torch.float16) if len(data) % 2 == 0 and data else t
    raise ValueError(f"unknown source kind {kind!r}")


def make_dest(kind: str, n: int) -> Any:
    """A writable destination of ``n`` bytes of ``kind``, filled with :data:`SENTINEL`."""
    if kind == "bytearray":
        return bytearray([SENTINEL]) * n
    if kind == "memoryview":
        parent = bytearray([SENTINEL]) * (n + 16)
        return memoryview(parent)[8 : 8 + n]
    if kind == "numpy":
        return np.full(n, SENTINEL, dtype=np.uint8)
    if kind == "torch":
        torch = _import_torch()
        return torch.full((n,), SENTINEL, dtype=torch.uint8)
    raise ValueError(f"unknown destination kind {kind!r}")


def dest_bytes(dst: Any) -> bytes:
    """The current contents of a destination made by :func:`make_dest` (or a numpy array)."""
    if hasattr(dst, "data_ptr") and hasattr(dst, "numpy"):
        return dst.numpy().tobytes()
    return bytes(memoryview(dst).cast("B"))


def _untouched(data: bytes) -> bool:
    return data.count(SENTINEL) == len(data)


def expect_bytes(got: bytes | bytearray | None, want: bytes | bytearray, what: str = "wrong bytes") -> None:
    """Fail with a short description unless ``got`` equals ``want``.

    A plain ``assert got == want`` on megabyte values makes pytest build a full difflib diff
    of their reprs when it fails, which is quadratic and runs for minutes (pytest skips
    truncating that diff when the ``CI`` environment variable is set). This says where the
    bytes first differ instead.
    """
    if got == want:
        return
    if got is None:
        raise AssertionError(f"{what}: got a miss (None), expected {len(want)} bytes")
    if len(got) != len(want):
        raise AssertionError(f"{what}: got {len(got)} bytes, expected {len(want)}")
    at = int(np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))[0])
    raise AssertionError(f"{what}: {len(want)} bytes, differing from byte {at} (0x{got[at]:02x} != 0x{want[at]:02x})")


class BackendTests:
    """The conformance suite; subclass it as ``TestXxx(BackendTests)``.

    Class attributes a subclass may set:

    Attributes:
        large_value_bytes: A realistic KV chunk (default 2 MiB).
        odd_value_bytes: An odd, unaligned size (default 1_000_003).
        loop_batch_bytes: Bytes of the batch during which the event loop must keep ticking.
        min_loop_ticks: Ticks of a concurrent task required during each op of that batch.
        concurrent_batches: Batches run at once by ``asyncio.gather``.
        concurrent_value_bytes: Value size in those batches.
        cancel_batch_values: Values (of ``large_value_bytes``) in the batch that gets cancelled.
        supports_cancellation_check: Set False only where cancellation cannot be checked at all.
        cancelled_dst_all_or_nothing: A dst of a cancelled ``get_into`` holds either nothing or
            the whole value (never part of it). Late writes are always checked.
        hypothesis_max_examples: Examples of the stateful model test.
        hypothesis_steps: Steps per example of the stateful model test.
        hypothesis_shrink: Shrink a failing sequence to a minimal one. Shrinking is unbounded
            in steps and can take minutes on a slow machine; turn it off where only
            "does it fail" matters (the suite's own mutant run).
        large_batch_values: Small values in the one-batch test (at least 256: batches that
            size are routine for an engine, and bugs hide past 32 or 64).
        close_grace_seconds: How long threads a backend started may take to end after
            ``aclose`` returns before they count as leaked.
        clean_up_keys: Delete the keys a test stored when it ends, on backends that are
            persistent or shared (so a run leaves no litter on a shared server).

    Hooks a subclass may override: :meth:`make_backend` and the bypass hook
    :meth:`corrupt_value`; fixtures ``backend_url`` (required unless ``make_backend`` is
    overridden) and ``secret_url`` (optional, a URL holding a password or secret option).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.lmcache_conformance]

    large_value_bytes: ClassVar[int] = 2 * MiB
    odd_value_bytes: ClassVar[int] = 1_000_003
    loop_batch_bytes: ClassVar[int] = 64 * MiB
    min_loop_ticks: ClassVar[int] = 2
    concurrent_batches: ClassVar[int] = 100
    concurrent_value_bytes: ClassVar[int] = 16 * KiB
    cancel_batch_values: ClassVar[int] = 16
    supports_cancellation_check: ClassVar[bool] = True
    cancelled_dst_all_or_nothing: ClassVar[bool] = True
    hypothesis_max_examples: ClassVar[int] = 25
    hypothesis_steps: ClassVar[int] = 25
    hypothesis_shrink: ClassVar[bool] = True
    large_batch_values: ClassVar[int] = 300
    close_grace_seconds: ClassVar[float] = 2.0
    clean_up_keys: ClassVar[bool] = True

    _request: pytest.FixtureRequest | None = None

    # -- hooks -------------------------------------------------------------------------------

    def make_backend(self) -> StorageBackend:
        """A new, unopened backend under test. Default: ``lmcache.open_backend(backend_url)``."""
        return lmcache.open_backend(self._fixture("backend_url", required=True))

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        """Bypass hook: damage the stored bytes of ``key`` without using ``backend``'s methods.

        Flip a payload byte, truncate the value, or overwrite its header. Tests that need this
        hook skip when it is not overridden.
        """
        raise NotImplementedError

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
        _issued_keys.append(issued)
        try:
            yield
        finally:
            _issued_keys.remove(issued)
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
        issued = _issued_keys[-1] if _issued_keys else None
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

    def _size(self, name: str) -> int:
        spec = _SIZES[name]
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
            assert _untouched(dst.tobytes()), "get_into wrote into the buffer of a miss"
            return None
        assert 0 <= n <= capacity
        assert _untouched(dst[n:].tobytes()), "get_into wrote past the value's length"
        return dst[:n].tobytes()

    # -- lifecycle ---------------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_open_and_close_are_idempotent(self) -> None:
        async with self.fresh_backend() as b:
            assert not b.is_open and not b.is_closed
            await b.open()
            await b.open()
            assert b.is_open
            await b.aclose()
            await b.aclose()
            assert b.is_closed and not b.is_open

    @pytest.mark.asyncio
    @pytest.mark.parametrize("op", (*_OPERATIONS, "open"))
    async def test_closed_is_final(self, op: str) -> None:
        async with self.fresh_backend() as b:
            await b.open()
            await b.aclose()
            with pytest.raises(BackendClosedError):
                await self._run_op(b, op)
            assert b.is_closed

    @pytest.mark.asyncio
    async def test_close_before_open_is_final(self) -> None:
        async with self.fresh_backend() as b:
            await b.aclose()
            with pytest.raises(BackendClosedError):
                await b.open()
            with pytest.raises(BackendClosedError):
                await b.contains([random_key()])

    @pytest.mark.asyncio
    async def test_async_with_opens_and_closes(self) -> None:
        key, value = random_key(), random_value(1000)
        b = self.make_backend()
        try:
            async with b as entered:
                assert entered is b
                assert b.is_open
                await self.put_all(b, [key], [value])
                expect_bytes(await self.read(b, key, 1000), value)
            assert b.is_closed
        finally:
            await b.aclose()

    @pytest.mark.asyncio
    async def test_async_with_closes_on_error(self) -> None:
        b = self.make_backend()
        try:
            with pytest.raises(KeyError):
                async with b:
                    raise KeyError("boom")
            assert b.is_closed
        finally:
            await b.aclose()

    @pytest.mark.asyncio
    async def test_aclose_leaves_no_tasks_or_threads(self) -> None:
        """After ``aclose`` returns, nothing the backend started keeps running."""
        # A first backend lets an SDK start what it keeps for the whole process (a shared
        # client pool): only what every backend leaves behind is a leak.
        async with self.fresh_backend() as warm:
            await self._exercise(warm)
        tasks_before = asyncio.all_tasks()
        threads_before = set(threading.enumerate())
        b = self.make_backend()
        try:
            await self._exercise(b)
        finally:
            await self._close_cleanly(b)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.close_grace_seconds
        while True:
            tasks = [t for t in asyncio.all_tasks() - tasks_before if not t.done()]
            threads = [
                t
                for t in threading.enumerate()
                if t not in threads_before and t.is_alive() and not t.name.startswith(_LOOP_EXECUTOR_THREAD_PREFIX)
            ]
            if (not tasks and not threads) or loop.time() > deadline:
                break
            await asyncio.sleep(0.01)
        name = type(b).__name__
        assert not tasks, (
            f"close leaks tasks: after aclose, {name} left {len(tasks)} asyncio task(s) running: "
            + ", ".join(repr(t.get_coro()) for t in tasks[:5])
        )
        assert not threads, (
            f"close leaks threads: {self.close_grace_seconds} s after aclose, {name} left "
            f"{len(threads)} thread(s) running: " + ", ".join(t.name for t in threads[:5])
        )

    async def _exercise(self, b: StorageBackend) -> None:
        """Every operation once, so lazily started workers (executors, write-back) exist."""
        keys = [random_key() for _ in range(3)]
        await b.open()
        await b.put(keys, [random_value(100), b"", random_value(3)])
        await b.contains(keys)
        await b.get_into(keys, [bytearray(128) for _ in keys])
        await b.lookup_prefix(keys)
        await b.ping()
        b.stats()
        await b.delete(keys[:1])

    @pytest.mark.asyncio
    @pytest.mark.parametrize("op", _OPERATIONS)
    async def test_lazy_open_on_first_use(self, op: str) -> None:
        async with self.fresh_backend() as b:
            assert not b.is_open
            await self._run_op(b, op)
            assert b.is_open

    async def _run_op(self, b: StorageBackend, op: str) -> None:
        key = random_key()
        if op == "contains":
            assert await b.contains([key]) == [False]
        elif op == "get_into":
            assert await b.get_into([key], [bytearray(8)]) == [None]
        elif op == "put":
            results = await b.put([key], [b"lazy"])
            assert results[0].status in (PutStatus.STORED, PutStatus.REJECTED)
            await b.delete([key])
        elif op == "delete":
            await b.delete([key])
        elif op == "lookup_prefix":
            assert await b.lookup_prefix([key]) == 0
        elif op == "ping":
            await b.ping()
        elif op == "open":
            await b.open()
        else:  # pragma: no cover - a typo in the parametrisation
            raise AssertionError(op)

    # -- round trips -------------------------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("src_kind", _SOURCE_KINDS)
    @pytest.mark.parametrize("size_name", list(_SIZES))
    async def test_round_trip_sources(self, backend: StorageBackend, size_name: str, src_kind: str) -> None:
        n = self._size(size_name)
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [make_source(src_kind, value)])
        assert await backend.contains([key]) == [True]
        expect_bytes(await self.read(backend, key, n), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("dst_kind", _DEST_KINDS)
    @pytest.mark.parametrize("size_name", list(_SIZES))
    async def test_round_trip_destinations(self, backend: StorageBackend, size_name: str, dst_kind: str) -> None:
        n = self._size(size_name)
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [value])
        dst = make_dest(dst_kind, n)
        assert await backend.get_into([key], [dst]) == [n]
        expect_bytes(dest_bytes(dst), value)
        if isinstance(dst, memoryview):  # a window into a larger buffer: nothing outside it changes
            parent = bytes(dst.obj)  # type: ignore[arg-type]
            assert _untouched(parent[:8] + parent[8 + n :]), "get_into wrote outside its memoryview"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("when", ["before_open", "after_open"])
    async def test_registered_host_memory_round_trip(self, when: str) -> None:
        """Values move through views of registered host memory, then through it once unregistered."""
        n = self.odd_value_bytes
        pool = np.full(4 * n + 24, SENTINEL, dtype=np.uint8)
        keys = [random_key(), random_key(), random_key()]
        values = [random_value(n) for _ in keys]
        async with self.fresh_backend() as b:
            self._require_fits(b, n)
            if when == "after_open":
                await b.open()
            await b.register_host_memory(pool)
            await b.register_host_memory(pool)  # a second time changes nothing
            srcs = [pool[8 + i * n : 8 + (i + 1) * n] for i in range(3)]
            for src, value in zip(srcs, values, strict=True):
                src[:] = np.frombuffer(value, dtype=np.uint8)
            await self.put_all(b, keys, srcs)
            pool[:] = SENTINEL
            assert await b.get_into(keys, [pool[8 + i * n : 8 + (i + 1) * n] for i in range(3)]) == [n] * 3
            for i, value in enumerate(values):
                expect_bytes(pool[8 + i * n : 8 + (i + 1) * n].tobytes(), value)
            assert _untouched(pool[:8].tobytes() + pool[8 + 3 * n :].tobytes()), "wrote outside its views"
            await b.unregister_host_memory(pool)
            await b.unregister_host_memory(pool)  # unknown by now: ignored
            pool[:] = SENTINEL
            assert await b.get_into(keys[:1], [pool[8 : 8 + n]]) == [n]
            expect_bytes(pool[8 : 8 + n].tobytes(), values[0])

    @pytest.mark.asyncio
    async def test_registering_host_memory_checks_its_input(self) -> None:
        async with self.fresh_backend() as b:
            with pytest.raises(InvalidBufferError):
                await b.register_host_memory(object())
            await b.register_host_memory(bytearray())  # nothing to register
            await b.aclose()
            with pytest.raises(BackendClosedError):
                await b.register_host_memory(bytearray(16))

    @pytest.mark.asyncio
    async def test_device_buffers(self, backend: StorageBackend) -> None:
        torch = _import_torch()
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: device buffers are checked on a GPU machine")
        key, value = random_key(), random_value(64 * KiB)
        src = torch.frombuffer(bytearray(value), dtype=torch.uint8).cuda()
        if not backend.capabilities.device_buffers:
            with pytest.raises(InvalidBufferError):
                await backend.put([key], [src])
            await self.put_all(backend, [key], [value])
            with pytest.raises(InvalidBufferError):
                await backend.get_into([key], [torch.zeros(64 * KiB, dtype=torch.uint8, device="cuda")])
            return
        await self.put_all(backend, [key], [src])
        dst = torch.full((64 * KiB + 7,), SENTINEL, dtype=torch.uint8, device="cuda")
        assert await backend.get_into([key], [dst]) == [64 * KiB]
        host = dst.cpu().numpy().tobytes()
        expect_bytes(host[: 64 * KiB], value)
        assert _untouched(host[64 * KiB :]), "get_into wrote past the end of the value"

    @pytest.mark.asyncio
    async def test_get_into_larger_dst_writes_only_the_value(self, backend: StorageBackend) -> None:
        n = self.odd_value_bytes
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [value])
        dst = np.full(n + 4097, SENTINEL, dtype=np.uint8)
        assert await backend.get_into([key], [dst]) == [n]
        expect_bytes(dst[:n].tobytes(), value)
        assert _untouched(dst[n:].tobytes()), "get_into wrote past the end of the value"

    @pytest.mark.asyncio
    async def test_get_into_too_small_dst_raises(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(1000)
        await self.put_all(backend, [key], [value])
        with pytest.raises(InvalidBufferError):
            await backend.get_into([key], [bytearray(999)])
        # The failed call leaves the value intact.
        expect_bytes(await self.read(backend, key, 1000), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", ["bytes", "readonly_numpy", "readonly_memoryview"])
    async def test_get_into_read_only_dst_raises(self, backend: StorageBackend, kind: str) -> None:
        key, value = random_key(), random_value(64)
        await self.put_all(backend, [key], [value])
        if kind == "bytes":
            dst: Any = bytes(64)
        elif kind == "readonly_numpy":
            dst = np.zeros(64, dtype=np.uint8)
            dst.flags.writeable = False
        else:
            dst = memoryview(bytes(64))
        with pytest.raises(InvalidBufferError):
            await backend.get_into([key], [dst])

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

    @pytest.mark.asyncio
    async def test_source_mutation_after_put_does_not_change_value(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(4096)
        src = bytearray(value)
        await self.put_all(backend, [key], [src])
        src[:] = b"\x00" * len(src)
        expect_bytes(await self.read(backend, key, 4096), value)

    # -- misses, batches, idempotence ----------------------------------------------------------

    @pytest.mark.asyncio
    async def test_miss_is_data_and_dst_untouched(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        dsts = [np.full(512, SENTINEL, dtype=np.uint8) for _ in keys]
        assert await backend.contains(keys) == [False, False, False]
        assert await backend.get_into(keys, dsts) == [None, None, None]
        assert all(_untouched(d.tobytes()) for d in dsts)
        assert await backend.lookup_prefix(keys) == 0

    @pytest.mark.asyncio
    async def test_empty_batches(self, backend: StorageBackend) -> None:
        assert await backend.contains([]) == []
        assert await backend.get_into([], []) == []
        assert await backend.put([], []) == []
        assert await backend.delete([]) is None
        assert await backend.lookup_prefix([]) == 0

    @pytest.mark.asyncio
    async def test_batch_order_is_preserved(self, backend: StorageBackend) -> None:
        rng = random.Random()
        sizes = [rng.randrange(1, 5000) for _ in range(12)]
        keys = [random_key() for _ in sizes]
        values = [random_value(n) for n in sizes]
        await self.put_all(backend, keys, values)
        order = list(range(len(keys)))
        rng.shuffle(order)
        dsts = [np.full(5000, SENTINEL, dtype=np.uint8) for _ in order]
        got = await backend.get_into([keys[i] for i in order], dsts)
        assert got == [sizes[i] for i in order]
        for i, dst in zip(order, dsts, strict=True):
            expect_bytes(dst[: sizes[i]].tobytes(), values[i])

    @pytest.mark.asyncio
    async def test_large_batch_of_small_values(self, backend: StorageBackend) -> None:
        """Every value of a batch of hundreds is held, read back and deleted, in input order."""
        n = max(256, self.large_batch_values)
        rng = random.Random()
        keys = [random_key() for _ in range(n)]
        values = [random_value(rng.randrange(0, 64)) for _ in keys]
        await self.put_all(backend, keys, values)
        found = await backend.contains(keys)
        lost = [i for i, hit in enumerate(found) if not hit]
        assert not lost, (
            f"large batch: {len(lost)} of {n} values reported STORED are not held "
            f"(the first is value {lost[0]} of the batch)"
        )
        dsts = [np.full(64, SENTINEL, dtype=np.uint8) for _ in keys]
        got = await backend.get_into(keys, dsts)
        assert len(got) == n, f"large batch: get_into of {n} keys returned {len(got)} results"
        wrong = [i for i, (size, v) in enumerate(zip(got, values, strict=True)) if size != len(v)]
        assert not wrong, f"large batch: {len(wrong)} of {n} values read back as {got[wrong[0]]}, first at {wrong[0]}"
        for i, (dst, value) in enumerate(zip(dsts, values, strict=True)):
            expect_bytes(dst[: len(value)].tobytes(), value, f"large batch: value {i} of {n}")
        assert await backend.lookup_prefix(keys) == n, f"large batch: lookup_prefix of {n} held keys"
        # The same keys again, interleaved with as many new ones: statuses in input order.
        fresh = [random_key() for _ in range(n)]
        mixed = [k for pair in zip(keys, fresh, strict=True) for k in pair]
        results = await backend.put(mixed, [b"x"] * len(mixed))
        statuses = [r.status for r in results]
        if not backend.capabilities.bounded or all(r.ok for r in results):
            expected = [PutStatus.EXISTS, PutStatus.STORED] * n
            assert statuses == expected, "large batch: a put of held and new keys reported statuses out of order"
        await backend.delete(keys)
        found = await backend.contains(keys + fresh)
        assert not any(found[:n]), f"large batch: {sum(found[:n])} of {n} deleted values are still held"
        held_fresh = [r.ok for r in results[1::2]]
        assert found[n:] == held_fresh, "large batch: deleting a batch removed other keys"

    @pytest.mark.asyncio
    async def test_mixed_hits_and_misses(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(8)]
        values = [random_value(100 + i) for i in range(8)]
        held = [0, 2, 3, 6]
        await self.put_all(backend, [keys[i] for i in held], [values[i] for i in held])
        assert await backend.contains(keys) == [i in held for i in range(8)]
        dsts = [np.full(200, SENTINEL, dtype=np.uint8) for _ in keys]
        got = await backend.get_into(keys, dsts)
        for i, (n, dst) in enumerate(zip(got, dsts, strict=True)):
            if i in held:
                assert n == len(values[i])
                expect_bytes(dst[:n].tobytes(), values[i])
                assert _untouched(dst[n:].tobytes())
            else:
                assert n is None
                assert _untouched(dst.tobytes())

    @pytest.mark.asyncio
    async def test_duplicate_keys_in_get(self, backend: StorageBackend) -> None:
        key, other, value = random_key(), random_key(), random_value(777)
        await self.put_all(backend, [key], [value])
        dsts = [np.full(800, SENTINEL, dtype=np.uint8) for _ in range(4)]
        assert await backend.get_into([key, other, key, key], dsts) == [777, None, 777, 777]
        for i in (0, 2, 3):
            expect_bytes(dsts[i][:777].tobytes(), value)
        assert _untouched(dsts[1].tobytes())
        assert await backend.contains([key, key, other]) == [True, True, False]

    @pytest.mark.asyncio
    async def test_duplicate_keys_in_put_first_wins(self, backend: StorageBackend) -> None:
        key, other = random_key(), random_key()
        first, second, third = random_value(300), random_value(300), random_value(50)
        results = await self.put_all(backend, [key, other, key], [first, third, second])
        assert [r.status for r in results] == [PutStatus.STORED, PutStatus.STORED, PutStatus.EXISTS]
        expect_bytes(await self.read(backend, key, 300), first)
        expect_bytes(await self.read(backend, other, 300), third)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("same_bytes", [True, False], ids=["same_bytes", "different_bytes"])
    async def test_put_is_idempotent_first_writer_wins(self, backend: StorageBackend, same_bytes: bool) -> None:
        key, value = random_key(), random_value(2048)
        await self.put_all(backend, [key], [value])
        again = value if same_bytes else random_value(1024)
        results = await backend.put([key], [again])
        assert [r.status for r in results] == [PutStatus.EXISTS]
        assert results[0].ok
        expect_bytes(await self.read(backend, key, 4096), value)

    @pytest.mark.asyncio
    async def test_delete_then_miss(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        values = [random_value(100) for _ in keys]
        await self.put_all(backend, keys, values)
        await backend.delete([keys[0], keys[2], keys[0]])  # a duplicate in one delete is fine
        assert await backend.contains(keys) == [False, True, False]
        assert await self.read(backend, keys[0], 100) is None
        expect_bytes(await self.read(backend, keys[1], 100), values[1])
        # A deleted key can be stored again, with new bytes.
        fresh = random_value(60)
        await self.put_all(backend, [keys[0]], [fresh])
        expect_bytes(await self.read(backend, keys[0], 100), fresh)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 3])
    async def test_delete_is_not_undone_by_background_work(self, ticks: int) -> None:
        # Backends that finish puts in the background (write-back, replication) must not let
        # that work bring a deleted key back. Races are timing-dependent, and likeliest while a
        # new backend starts its workers: try a few rounds, each on a fresh backend.
        for _ in range(8):
            async with self.fresh_backend() as b:
                keys = [random_key() for _ in range(4)]
                srcs = [random_value(10), random_value(3), b"", random_value(64 * KiB)]
                await self.put_all(b, keys, srcs)
                for _ in range(ticks):
                    await asyncio.sleep(0)
                await b.delete(keys[1:])
                assert await b.contains(keys) == [True, False, False, False], "a deleted key is still held"
                for _ in range(20):
                    await asyncio.sleep(0)
                await asyncio.sleep(0.01)
                assert await b.contains(keys) == [True, False, False, False], "a deleted key came back"
                for key in keys[1:]:
                    assert await self.read(b, key, 64 * KiB) is None, "a deleted key came back"
                expect_bytes(await self.read(b, keys[0], 64 * KiB), srcs[0])

    @pytest.mark.asyncio
    @pytest.mark.parametrize("field", list(_SCOPE_VARIANTS))
    async def test_scope_is_part_of_key_identity(self, backend: StorageBackend, field: str) -> None:
        """Keys with one chunk hash in two scopes are two values: tenants never share KV."""
        mine = _scoped_key()
        theirs = _SCOPE_VARIANTS[field](mine)
        rule = f"scope isolation ({field}): a key that differs only in its {field}"
        mine_value, their_value = random_value(500), random_value(300)
        await self.put_all(backend, [mine], [mine_value])
        assert await backend.contains([theirs]) == [False], f"{rule} is reported held (another tenant's value)"
        got = await self.read(backend, theirs, 1024)
        assert got is None, f"{rule} read another tenant's value ({len(got or b'')} bytes)"
        assert await backend.lookup_prefix([theirs]) == 0, f"{rule} counts in lookup_prefix"
        results = await backend.put([theirs], [their_value])
        assert results[0].status is not PutStatus.EXISTS, f"{rule} collides with another tenant's key on put"
        if results[0].status is PutStatus.REJECTED:
            pytest.skip(f"{type(backend).__name__} rejected a value ({results[0].reason}); give it more capacity")
        expect_bytes(await self.read(backend, theirs, 1024), their_value, f"{rule} read the wrong value")
        expect_bytes(await self.read(backend, mine, 1024), mine_value, f"{rule} overwrote the first tenant's value")
        await backend.delete([theirs])
        assert await backend.contains([mine, theirs]) == [True, False], f"{rule}: deleting one deleted the other"
        expect_bytes(await self.read(backend, mine, 1024), mine_value, f"{rule}: delete changed the other value")

    @pytest.mark.asyncio
    async def test_delete_absent_keys_is_fine(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        await backend.delete(keys)
        await backend.delete(keys)
        assert await backend.contains(keys) == [False, False, False]

    @pytest.mark.asyncio
    async def test_contains(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(5)]
        assert await backend.contains(keys) == [False] * 5
        await self.put_all(backend, keys[1:4], [b"a", b"", b"c"])
        assert await backend.contains(keys) == [False, True, True, True, False]
        assert await backend.contains(keys[::-1]) == [False, True, True, True, False][::-1]

    @pytest.mark.asyncio
    async def test_lookup_prefix(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(6)]
        await self.put_all(backend, [keys[0], keys[1], keys[3], keys[4]], [b"0", b"1", b"3", b"4"])
        assert await backend.lookup_prefix(keys) == 2
        assert await backend.lookup_prefix(keys[:2]) == 2
        assert await backend.lookup_prefix(keys[2:]) == 0
        assert await backend.lookup_prefix(keys[3:5]) == 2
        assert await backend.lookup_prefix([keys[5], keys[0]]) == 0

    # -- concurrency and cancellation --------------------------------------------------------

    def _cancel_batch(self, backend: StorageBackend) -> tuple[list[CacheKey], list[bytes]]:
        self._require_fits(backend, self.large_value_bytes)
        keys = [random_key() for _ in range(self.cancel_batch_values)]
        rng = np.random.default_rng()
        return keys, [random_value(self.large_value_bytes, rng) for _ in keys]

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 2, 5, 20])
    async def test_cancelled_get_into_never_writes_late(self, backend: StorageBackend, ticks: int) -> None:
        if not self.supports_cancellation_check:
            pytest.skip(f"{type(self).__name__} sets supports_cancellation_check = False")
        keys, values = self._cancel_batch(backend)
        await self.put_all(backend, keys, values)
        dsts = [np.full(self.large_value_bytes, SENTINEL, dtype=np.uint8) for _ in keys]
        task = asyncio.create_task(backend.get_into(keys, dsts))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        completed = True
        try:
            result = await task
        except asyncio.CancelledError:
            completed = False
        # Right after the cancelled call returns, record what each dst holds.
        snapshot = [d.tobytes() for d in dsts]
        if completed:
            assert result == [len(v) for v in values]
        for i, (got, value) in enumerate(zip(snapshot, values, strict=True)):
            if completed:
                expect_bytes(got, value)
            elif self.cancelled_dst_all_or_nothing and got != value and not _untouched(got):
                raise AssertionError(f"dst {i} holds part of its value after cancellation")
        # Let any straggling thread or task run, then check nothing changed.
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        for i, (d, before) in enumerate(zip(dsts, snapshot, strict=True)):
            expect_bytes(d.tobytes(), before, f"dst {i} was written after get_into was cancelled")
        # The backend still works and still holds every value.
        for key, value in zip(keys[:3], values[:3], strict=True):
            expect_bytes(await self.read(backend, key, self.large_value_bytes), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 3])
    async def test_cancelled_put_leaves_whole_values_or_misses(self, backend: StorageBackend, ticks: int) -> None:
        if not self.supports_cancellation_check:
            pytest.skip(f"{type(self).__name__} sets supports_cancellation_check = False")
        keys, values = self._cancel_batch(backend)
        task = asyncio.create_task(backend.put(keys, values))
        for _ in range(ticks):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(20):
            await asyncio.sleep(0)
        for key, value in zip(keys, values, strict=True):
            got = await self.read(backend, key, self.large_value_bytes)
            if got is not None:
                expect_bytes(got, value, "a cancelled put left a partial or wrong value")
        # Putting the batch again completes it.
        results = await backend.put(keys, values)
        assert all(r.ok for r in results) or backend.capabilities.bounded
        for key, value in zip(keys, values, strict=True):
            if results[keys.index(key)].ok:
                expect_bytes(await self.read(backend, key, self.large_value_bytes), value)

    @pytest.mark.asyncio
    async def test_concurrent_batches(self, backend: StorageBackend) -> None:
        rng = np.random.default_rng()
        per_batch = 4
        batches = [
            [(random_key(), random_value(self.concurrent_value_bytes - j, rng)) for j in range(per_batch)]
            for _ in range(self.concurrent_batches)
        ]
        put_results = await asyncio.gather(*(backend.put([k for k, _ in b], [v for _, v in b]) for b in batches))
        for results in put_results:
            assert [r.status for r in results] == [PutStatus.STORED] * per_batch
        dsts = [[np.full(self.concurrent_value_bytes, SENTINEL, dtype=np.uint8) for _ in b] for b in batches]
        got = await asyncio.gather(
            *(backend.get_into([k for k, _ in b], d) for b, d in zip(batches, dsts, strict=True))
        )
        for batch, sizes, ds in zip(batches, got, dsts, strict=True):
            assert sizes == [len(v) for _, v in batch]
            for (_, value), d in zip(batch, ds, strict=True):
                expect_bytes(d[: len(value)].tobytes(), value)
        found = await asyncio.gather(*(backend.contains([k for k, _ in b]) for b in batches))
        assert found == [[True] * per_batch] * len(batches)

    @pytest.mark.asyncio
    async def test_concurrent_readers_see_whole_values(self, backend: StorageBackend) -> None:
        n = 64 * KiB
        keys = [random_key() for _ in range(16)]
        values = [random_value(n) for _ in keys]
        dsts = [[np.full(n, SENTINEL, dtype=np.uint8) for _ in keys] for _ in range(4)]
        ops: list[Any] = [backend.put(keys[i::2], values[i::2]) for i in range(2)]
        ops += [backend.get_into(keys, d) for d in dsts]
        outcomes = await asyncio.gather(*ops)
        for sizes, ds in zip(outcomes[2:], dsts, strict=True):
            for size, d, value in zip(sizes, ds, values, strict=True):
                if size is None:
                    assert _untouched(d.tobytes())
                else:
                    assert size == n, "a reader saw a partly written value"
                    expect_bytes(d.tobytes(), value, "a reader saw a partly written value")

    @pytest.mark.asyncio
    async def test_event_loop_keeps_ticking_during_large_batch(self, backend: StorageBackend) -> None:
        self._require_fits(backend, self.large_value_bytes)
        count = max(1, self.loop_batch_bytes // self.large_value_bytes)
        rng = np.random.default_rng()
        keys = [random_key() for _ in range(count)]
        values = [random_value(self.large_value_bytes, rng) for _ in keys]
        dsts = [np.empty(self.large_value_bytes, dtype=np.uint8) for _ in keys]
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        try:
            await asyncio.sleep(0)
            start = ticks
            await self.put_all(backend, keys, values)
            put_ticks = ticks - start
            start = ticks
            got = await backend.get_into(keys, dsts)
            get_ticks = ticks - start
        finally:
            stop.set()
            await task
        assert got == [self.large_value_bytes] * count
        assert all(d.tobytes() == v for d, v in zip(dsts, values, strict=True))
        assert put_ticks >= self.min_loop_ticks, f"the event loop ran {put_ticks} times during a large put"
        assert get_ticks >= self.min_loop_ticks, f"the event loop ran {get_ticks} times during a large get_into"

    # -- URLs and identity -------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_url_round_trip(self) -> None:
        async with self.fresh_backend() as b:
            url = b.url
            assert isinstance(url, str) and "://" in url
            cls = type(b)
            assert urlsplit(url).scheme in cls.schemes
            again = cls.from_url(url)
            try:
                assert type(again) is cls
                assert again.url == url
                assert not again.is_open, "from_url must not open the backend"
            finally:
                await again.aclose()
            opened = lmcache.open_backend(url)
            try:
                assert type(opened) is cls
                assert opened.url == url
            finally:
                await opened.aclose()

    @pytest.mark.asyncio
    async def test_from_url_rejects_unknown_option(self) -> None:
        async with self.fresh_backend() as b:
            parts = urlsplit(b.url)
            sep = "&" if parts.query else "?"
            base = b.url.split("#", 1)[0]
            with pytest.raises(ConfigError):
                type(b).from_url(f"{base}{sep}no_such_option_for_conformance=1")

    @pytest.mark.asyncio
    async def test_repr_redacts_secrets(self) -> None:
        url = self._fixture("secret_url")
        if url is None:
            pytest.skip("no secret_url fixture: define one returning a URL with a password or secret option")
        async with self.fresh_backend() as probe:
            cls = type(probe)  # the class under test, which make_backend may choose
        parts = urlsplit(url)
        secrets = [parts.password] if parts.password else []
        secrets += [v for k, v in parse_qsl(parts.query) if k in cls.secret_options and v]
        assert secrets, f"secret_url {url!r} holds no password and no option listed in {cls.__name__}.secret_options"
        b = cls.from_url(url)
        try:
            for text in (repr(b), str(b), f"{b!r:>10}"):
                for secret in secrets:
                    assert secret not in text, f"{cls.__name__}'s repr shows a secret"
        finally:
            await b.aclose()

    # -- health, counters, integrity ---------------------------------------------------------

    @pytest.mark.asyncio
    async def test_ping(self, backend: StorageBackend) -> None:
        assert await backend.ping() is None

    @pytest.mark.asyncio
    async def test_stats_counters_move(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(321)

        def delta(before: dict[str, Any], name: str) -> int:
            return int(backend.stats()[name]) - int(before[name])

        s = backend.stats()
        for name in ("hits", "misses", "stored", "exists", "corrupt", "bytes_read", "bytes_written"):
            assert name in s, f"stats() lacks the counter {name!r}"
        await self.put_all(backend, [key], [value])
        assert delta(s, "stored") == 1
        assert delta(s, "bytes_written") == 321
        s = backend.stats()
        await backend.put([key], [value])
        assert delta(s, "exists") == 1
        assert delta(s, "stored") == 0
        s = backend.stats()
        expect_bytes(await self.read(backend, key, 400), value)
        assert delta(s, "hits") == 1
        assert delta(s, "bytes_read") == 321
        s = backend.stats()
        assert await self.read(backend, random_key(), 400) is None
        assert delta(s, "misses") == 1
        assert delta(s, "hits") == 0

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

    # -- listing -----------------------------------------------------------------------------

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

    # -- a model-based test ------------------------------------------------------------------

    def test_stateful_against_a_dict_model(self) -> None:
        """Random put/get/delete/contains sequences agree with a dict (first writer wins)."""
        pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis import strategies as st
        from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

        suite = self
        max_value = 2048
        n_keys = 6
        index = st.integers(0, n_keys - 1)
        values = st.binary(max_size=max_value)

        class BackendModel(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.loop = asyncio.new_event_loop()
                self.backend = suite.make_backend()
                self.keys = [random_key("stateful") for _ in range(n_keys)]
                self.model: dict[CacheKey, bytes] = {}
                # Steps so far, quoted in failures: a backend with background work can fail in a
                # way Hypothesis cannot replay, and then this is the only trace of what happened.
                self.history: list[str] = []
                caps = self.backend.capabilities
                # Only a backend that declares a capacity (bounded) may reject puts for room or
                # lose values to a tier's eviction policy. A cap on single values is no licence
                # to lose anything: values over it are rejected as too large, and that is all.
                self.exact = not caps.bounded
                self.max_value_bytes = caps.max_value_bytes
                self.run(self.backend.open())

            def run(self, coro: Any) -> Any:
                return self.loop.run_until_complete(coro)

            def name(self, key: CacheKey) -> str:
                return f"k{self.keys.index(key)}"

            def check(self, ok: bool, what: str) -> None:
                if not ok:
                    steps = "\n  ".join(self.history[-40:])
                    mode = "exact: not bounded, so no misses allowed" if self.exact else "bounded: misses allowed"
                    raise AssertionError(f"{what} ({mode}); steps so far:\n  {steps}")

            @rule(items=st.lists(st.tuples(index, values), max_size=4))
            def put(self, items: list[tuple[int, bytes]]) -> None:
                keys = [self.keys[i] for i, _ in items]
                results = self.run(self.backend.put(keys, [v for _, v in items]))
                self.history.append(
                    f"put({[f'{self.name(k)}:{len(v)}B' for k, (_, v) in zip(keys, items, strict=True)]})"
                    f" -> {[r.status.value for r in results]}"
                )
                self.check(len(results) == len(items), "put returned the wrong number of results")
                first: dict[CacheKey, PutResult] = {}
                for k, (_, v), r in zip(keys, items, results, strict=True):
                    n = self.name(k)
                    if k in first:
                        # A duplicate in the batch follows its first occurrence.
                        expected = PutStatus.EXISTS if first[k].ok else PutStatus.REJECTED
                        self.check(r.status is expected, f"duplicate {n} in one put reported {r.status.value}")
                        continue
                    first[k] = r
                    if r.status is PutStatus.STORED:
                        self.check(not self.exact or k not in self.model, f"held key {n} was stored again")
                        self.model[k] = v
                    elif r.status is PutStatus.EXISTS:
                        self.check(k in self.model, f"put reported EXISTS for {n}, which is not held")
                    elif self.max_value_bytes is not None and len(v) > self.max_value_bytes:
                        self.check(r.reason == "too_large", f"{n} over max_value_bytes rejected as {r.reason}")
                    else:
                        self.check(not self.exact, f"a backend without bounded=True rejected {n}: {r}")

            @rule(idx=st.lists(index, max_size=5))
            def get(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                dsts = [np.full(max_value, SENTINEL, dtype=np.uint8) for _ in keys]
                got = self.run(self.backend.get_into(keys, dsts))
                self.history.append(f"get_into({[self.name(k) for k in keys]}) -> {got}")
                for k, n, d in zip(keys, got, dsts, strict=True):
                    if n is None:
                        self.check(not self.exact or k not in self.model, f"held key {self.name(k)} read as a miss")
                        self.check(_untouched(d.tobytes()), f"a miss of {self.name(k)} wrote into its buffer")
                    else:
                        self.check(k in self.model, f"{self.name(k)} read as a hit but was deleted or never stored")
                        self.check(d[:n].tobytes() == self.model[k], f"{self.name(k)} read other bytes than stored")
                        self.check(_untouched(d[n:].tobytes()), f"get_into of {self.name(k)} wrote past the value")

            @rule(idx=st.lists(index, max_size=5))
            def contains(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                found = self.run(self.backend.contains(keys))
                self.history.append(f"contains({[self.name(k) for k in keys]}) -> {found}")
                for k, hit in zip(keys, found, strict=True):
                    if hit:
                        self.check(k in self.model, f"contains reported {self.name(k)}, deleted or never stored")
                    else:
                        self.check(not self.exact or k not in self.model, f"contains missed held {self.name(k)}")

            @rule(idx=st.lists(index, max_size=3))
            def delete(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                self.run(self.backend.delete(keys))
                self.history.append(f"delete({[self.name(k) for k in keys]})")
                for k in keys:
                    self.model.pop(k, None)

            @rule()
            def lookup_prefix(self) -> None:
                n = self.run(self.backend.lookup_prefix(self.keys))
                self.history.append(f"lookup_prefix(k0..k{n_keys - 1}) -> {n}")
                expected = 0
                while expected < n_keys and self.keys[expected] in self.model:
                    expected += 1
                if self.exact:
                    self.check(n == expected, f"lookup_prefix returned {n}, expected {expected}")
                else:
                    self.check(n <= expected, f"lookup_prefix returned {n}, more than the {expected} held")

            @invariant()
            def still_open(self) -> None:
                self.check(self.backend.is_open, "the backend closed itself")

            @invariant()
            def holds_what_the_model_holds(self) -> None:
                # After every step, not only when a rule happens to read the key back: a lost
                # delete or a lost put shows up at the step that caused it.
                if not self.exact:
                    return
                found = self.run(self.backend.contains(self.keys))
                for k, hit in zip(self.keys, found, strict=True):
                    self.check(hit == (k in self.model), f"contains({self.name(k)}) is {hit} after the last step")

            def teardown(self) -> None:
                try:
                    self.run(suite._close_cleanly(self.backend))
                finally:
                    self.loop.close()

        # Never write a .hypothesis folder into a user's project: no example database, and the
        # rest of Hypothesis's storage goes to a temporary folder.
        with _private_hypothesis_home():
            run_state_machine_as_test(
                BackendModel,
                settings=settings(
                    max_examples=self.hypothesis_max_examples,
                    stateful_step_count=self.hypothesis_steps,
                    deadline=None,
                    database=None,
                    phases=tuple(Phase) if self.hypothesis_shrink else tuple(p for p in Phase if p is not Phase.shrink),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
