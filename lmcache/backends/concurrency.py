"""Adapter kit: running blocking SDK calls and batches without leaving work behind.

What every adapter needs to keep rules 3 and 4 of :mod:`lmcache.backends.base` (buffers are
borrowed for the call only; blocking calls run on a backend-owned executor):

* :func:`run_blocking`: one blocking call on an executor; a cancellation waits for it.
* :func:`run_gated`: one blocking call bounded by a timeout, which the caller may abandon:
  a :class:`WorkerGate` fences the worker's touches of caller buffers, and a ``release``
  callback hands back what the worker holds (an arena, a connection) once it is done.
* :func:`run_pooled`: :func:`run_gated` with an item of a pool (a staging arena, a connection)
  held until the worker is done; :func:`take` waits for a free one.
* :func:`gather_all` (cancel the rest on the first failure) and :func:`gather_settled` (let
  every one finish, then raise the first failure): several sub-batches at once, none left
  running behind the call.
* :func:`settle_inflight`: at close, wait for abandoned workers before closing the SDK.
* :func:`split_by_size`: cut a batch into sub-batches that fit a staging arena; :class:`Batch`
  is the call's keys and buffers that those sub-batches index into.

Nothing here knows a backend or a value format.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, TypeVar

from lmcache.errors import BackendTimeoutError

if TYPE_CHECKING:
    from lmcache.keys import CacheKey

__all__ = [
    "Batch",
    "WorkerAbandoned",
    "WorkerGate",
    "gather_all",
    "gather_settled",
    "run_blocking",
    "run_gated",
    "run_pooled",
    "settle_inflight",
    "split_by_size",
    "take",
]

S = TypeVar("S")
P = TypeVar("P")


async def run_blocking(
    executor: Executor | None,
    fn: Callable[..., S],
    *args: Any,
    on_cancel: Callable[[], None] | None = None,
) -> S:
    """Run blocking ``fn(*args)`` on ``executor`` without ever leaving it running behind.

    If the awaiting task is cancelled, ``on_cancel`` is called (so ``fn`` can stop early) and
    the call waits for ``fn`` to finish before re-raising ``CancelledError``. That is what
    makes rule 3 hold: once a cancelled ``get_into`` returns, no thread writes into ``dst``.
    """
    loop = asyncio.get_running_loop()
    fut = loop.run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        while not fut.done():
            try:
                await asyncio.wait({fut})
            except asyncio.CancelledError:
                continue
        _retrieve(fut)  # the caller was cancelled and cannot see it
        raise


class WorkerGate:
    """Fences a worker thread's use of caller buffers against a caller that gave up.

    The worker holds the gate (:meth:`enter` ... :meth:`leave`) around each touch of a caller's
    buffer; a caller that times out or is cancelled calls :meth:`abandon`, which waits for the
    worker to leave. Once it returns the worker never touches those buffers again
    (:meth:`enter` returns False, and the worker raises :class:`WorkerAbandoned`).
    """

    __slots__ = ("_abandoned", "_lock")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False

    def enter(self) -> bool:
        """Take the gate; False (not taken) once the caller abandoned the call."""
        self._lock.acquire()
        if self._abandoned:
            self._lock.release()
            return False
        return True

    def leave(self) -> None:
        """Give the gate back."""
        self._lock.release()

    def abandon(self) -> None:
        """The caller gave up: wait for the worker to leave, then keep it out."""
        with self._lock:
            self._abandoned = True

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the gate around a touch of caller buffers (worker side).

        Raises:
            WorkerAbandoned: The caller gave up; the worker must stop (its result is dropped).
        """
        if not self.enter():
            raise WorkerAbandoned
        try:
            yield
        finally:
            self.leave()


class WorkerAbandoned(Exception):
    """Raised inside a worker whose caller gave up (see :class:`WorkerGate`); nobody sees it."""


async def run_gated(
    executor: Executor | None,
    fn: Callable[[WorkerGate], S],
    timeout: float,
    release: Callable[[], None] | None = None,
    *,
    what: str,
    inflight: set[asyncio.Future[Any]] | None = None,
) -> S:
    """Run blocking ``fn(gate)`` on ``executor``; give up on it after ``timeout`` seconds.

    Unlike :func:`run_blocking`, the caller does not wait for a worker it gave up on (an SDK
    call can hang for minutes). So ``fn`` must hold ``gate`` (:class:`WorkerGate`) around every
    touch of a caller's buffer: on a timeout or a cancellation the gate is abandoned, which
    waits for a touch in progress, and from then on the worker keeps out and its result is
    dropped.

    Args:
        executor: Where ``fn`` runs (the backend's own bounded pool).
        fn: The blocking call; it receives the call's gate.
        timeout: Seconds to wait for ``fn``.
        release: Called exactly once, when ``fn`` has finished: at once when the call
            completes, or later, from the event loop, when an abandoned worker ends. Hands back
            what the worker uses (a staging arena, a connection).
        what: The call and its target, for the timeout's message
            (``"batch_put_from on mooncake master h:50051"``).
        inflight: A set that holds the worker's future until it is done (so ``aclose`` can
            wait for or count stragglers).

    Raises:
        BackendTimeoutError: ``fn`` did not finish in time (it is abandoned).
        asyncio.CancelledError: The caller was cancelled (``fn`` is abandoned).
        Exception: Whatever ``fn`` raised.
    """
    loop = asyncio.get_running_loop()
    gate = WorkerGate()
    try:
        fut = loop.run_in_executor(executor, fn, gate)
    except BaseException:  # e.g. the executor was shut down: nothing runs, give back at once
        if release is not None:
            release()
        raise
    if inflight is not None:
        inflight.add(fut)
        fut.add_done_callback(inflight.discard)
    try:
        return await asyncio.wait_for(asyncio.shield(fut), timeout)
    except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
        gate.abandon()
        fut.add_done_callback(_retrieve)
        if release is not None:
            later, release = release, None  # bound now: the finally below must not run it too
            fut.add_done_callback(lambda _f: later())
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise BackendTimeoutError(f"{what}: no answer within {timeout:g} s") from None
    finally:
        if release is not None:
            release()


async def take(queue: asyncio.Queue[S], timeout: float, what: str) -> S:
    """The next free item of a pool ``queue`` (arenas, connections), waiting at most ``timeout``.

    Raises:
        BackendTimeoutError: None came free in time (``what`` says what was waited for:
            ``"put on redis://h:6379: no free connection"``).
    """
    try:
        return await asyncio.wait_for(queue.get(), timeout)
    except asyncio.TimeoutError:
        raise BackendTimeoutError(f"{what} within {timeout:g} s") from None


async def run_pooled(
    executor: Executor | None,
    pool: asyncio.Queue[P],
    fn: Callable[[WorkerGate, P], S],
    timeout: float,
    *,
    what: str,
    item: str,
    inflight: set[asyncio.Future[Any]] | None = None,
) -> S:
    """:func:`run_gated` of ``fn(gate, held)``, with ``held`` taken from ``pool`` and given back once ``fn`` is done.

    ``timeout`` bounds the whole call, the wait for a free item included: calls abandoned
    earlier may still hold every item of the pool. An abandoned worker keeps its item until it
    ends, so nothing else uses an arena or a connection it may still write to.

    Args:
        executor: Where ``fn`` runs.
        pool: The free items (arena numbers, connection slots).
        fn: The blocking call; it receives the call's gate and the item it holds.
        timeout: Seconds for the whole call.
        what: The call and its target, for timeout messages.
        item: What the pool holds, for the message of a wait that timed out (``"arena"``).
        inflight: See :func:`run_gated`.

    Raises:
        BackendTimeoutError: No item came free, or ``fn`` did not finish, in time.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    held = await take(pool, timeout, f"{what}: no free {item}")
    return await run_gated(
        executor,
        lambda gate: fn(gate, held),
        max(deadline - loop.time(), 0.001),
        lambda: pool.put_nowait(held),
        what=what,
        inflight=inflight,
    )


@dataclasses.dataclass(slots=True)
class Batch:
    """One call's object names, keys, per-key sizes and caller buffers, shared by its sub-batches.

    :func:`split_by_size` cuts a call into index ranges; each sub-batch job gets this and its
    indices, rather than copies of the lists.
    """

    names: list[str]
    keys: list[CacheKey]
    sizes: list[int]  # what the backend needs per key: bytes to read, a frame header's length…
    bufs: list[memoryview]


def split_by_size(sizes: Sequence[int], max_bytes: int, max_items: int | None = None) -> list[range]:
    """Contiguous index ranges whose sizes sum to at most ``max_bytes``.

    A range also holds at most ``max_items`` items; a lone item larger than ``max_bytes`` gets a
    range of its own.
    """
    out: list[range] = []
    start = acc = 0
    for i, n in enumerate(sizes):
        if i > start and (acc + n > max_bytes or (max_items is not None and i - start >= max_items)):
            out.append(range(start, i))
            start, acc = i, 0
        acc += n
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


async def gather_all(coros: Sequence[Awaitable[S]]) -> list[S]:
    """Await ``coros`` concurrently and return their results in order.

    On a failure or cancellation the rest are cancelled, and every one has finished before the
    error is raised: sub-batches may hold borrowed buffers (rule 3): none may be left running behind the call.
    """
    if len(coros) == 1:
        return [await coros[0]]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        while not all(t.done() for t in tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait(tasks)
        for t in tasks:
            _retrieve(t)  # only the first failure is raised
        raise


async def gather_settled(coros: Sequence[Awaitable[S]]) -> list[S]:
    """Await ``coros`` concurrently, let every one finish, then raise the first failure.

    For jobs that must not be cut short by a sibling's failure (each one settles its own
    bookkeeping, or reports per-value failures as data): results come back in order.
    """
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


async def settle_inflight(inflight: set[asyncio.Future[Any]], timeout: float) -> int:
    """Wait up to ``timeout`` for the workers in ``inflight`` (see :func:`run_gated`) to end.

    For ``aclose``: abandoned workers may still be inside the SDK, which must not be closed under
    them. Returns how many are still running (then leave the SDK client open, and log it).
    """
    pending = [f for f in inflight if not f.done()]
    if pending and timeout > 0:
        await asyncio.wait(pending, timeout=timeout)
    return sum(1 for f in inflight if not f.done())


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark ``fut``'s exception as retrieved: its caller gave up on it, nobody will look."""
    if not fut.cancelled():
        fut.exception()
