"""Lifecycle mixin: open, close, ``async with``, lazy open on first use, nothing left running after ``aclose``.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import asyncio
import threading
from typing import ClassVar

import pytest

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.errors import BackendClosedError

from .base import SuiteBase
from .support import expect_bytes, random_key, random_value

__all__ = ["LifecycleTests"]

# Operations that must open a new backend lazily, and must fail on a closed one.
OPERATIONS = ("contains", "get_into", "put", "delete", "lookup_prefix", "ping")
# Names of the threads of an event loop's default executor (``asyncio.to_thread``): the loop owns
# them, not the backend, and they end when the loop closes.
_LOOP_EXECUTOR_THREAD_PREFIX = "asyncio_"


class LifecycleTests(SuiteBase):
    """Open and close are idempotent, closed is final, the first operation opens, close leaks nothing.

    Attributes:
        close_grace_seconds: How long threads a backend started may take to end after
            ``aclose`` returns before they count as leaked.
    """

    close_grace_seconds: ClassVar[float] = 2.0

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
    @pytest.mark.parametrize("op", (*OPERATIONS, "open"))
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
    @pytest.mark.parametrize("op", OPERATIONS)
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
