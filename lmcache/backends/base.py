"""The StorageBackend contract every adapter implements, and the helpers adapters share.

A backend stores immutable byte values under :class:`~lmcache.keys.CacheKey`. It never sees
tokens, layouts or models. The public methods here are template methods: they validate input,
normalise buffers, keep counters and enforce the rules below, then call the subclass's
``_contains``/``_get_into``/``_put``/``_delete``. Rules (checked by ``conformance/``):

1. Results come back in input order; empty batches and duplicate keys are valid.
2. A miss is data (``None``/``False``), never an exception.
3. Buffers are borrowed for the call only; after a cancellation nothing writes into a ``dst``
   (executor work is awaited to completion before the cancellation propagates).
4. Blocking SDK calls run on a backend-owned bounded executor, never on the event loop.
5. Values are immutable: the first writer wins, a second put of a key reports ``EXISTS``.
6. SDK exceptions are mapped into :mod:`lmcache.errors` at the boundary.
7. Policy (eviction, promotion) is the job of :class:`~lmcache.tiered.TieredBackend`; a full
   backend rejects a put (``REJECTED``) rather than evicting on its own.
8. A corrupted or truncated value is a counted miss, never data handed back (its ``dst`` may
   hold partial bytes, which the caller must ignore, as it does for any miss).

Construction (``from_url``) performs no I/O. ``open()`` is explicit and also happens lazily on
first use; ``aclose()`` is final.

The adapter kit
---------------
This module holds the contract: results (:class:`PutResult`), :class:`Capabilities`,
:class:`BackendCounters` and the :class:`StorageBackend` ABC. The helpers adapters build on live
beside it, one topic a module, each with an ``__all__`` that is its public kit:

* :mod:`lmcache.backends.buffers`: buffer views, device buffers, ``check_dst_size``, page-aligned memory;
* :mod:`lmcache.backends.concurrency`: ``run_blocking``, ``run_gated``, ``WorkerGate``, ``take``,
  ``gather_all``, ``gather_settled``, ``split_by_size``;
* :mod:`lmcache.backends.urls`: ``split_url``, ``server_location``, ``parse_backend_url``,
  ``settings_query``, ``url_host``, ``redact_url``.

The kit names plugins imported from here before the split stay importable from here (see
``__all__``), so existing plugins keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from lmcache.backends.buffers import (
    as_readable,
    as_writable,
    buffer_address,
    check_dst_size,
    device_bytes,
    is_device_buffer,
)
from lmcache.backends.concurrency import (
    WorkerAbandoned,
    WorkerGate,
    gather_all,
    run_blocking,
    split_by_size,
)
from lmcache.backends.urls import parse_backend_url, redact_url, settings_query, split_url
from lmcache.errors import (
    BackendClosedError,
    BackendError,
    InvalidArgumentError,
    UnsupportedOperationError,
)
from lmcache.keys import CacheKey, check_key_length

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    # the contract (this module)
    "EXISTS",
    "STORED",
    "BackendCounters",
    "Capabilities",
    "PutResult",
    "PutStatus",
    "StorageBackend",
    "rejected",
    # re-exported from the kit modules, where they live (plugins import them from here too)
    "WorkerAbandoned",
    "WorkerGate",
    "as_readable",
    "as_writable",
    "check_dst_size",
    "gather_all",
    "parse_backend_url",
    "redact_url",
    "run_blocking",
    "settings_query",
    "split_by_size",
    "split_url",
]

logger = logging.getLogger(__name__)


class PutStatus(str, enum.Enum):
    """Outcome of putting one value."""

    STORED = "stored"
    EXISTS = "exists"
    REJECTED = "rejected"


@dataclasses.dataclass(frozen=True, slots=True)
class PutResult:
    """Outcome of putting one value.

    Attributes:
        status: ``STORED`` (written now), ``EXISTS`` (already held; first writer wins) or
            ``REJECTED`` (not stored: full, too large, or the backend failed).
        reason: Why a put was rejected (``"capacity"``, ``"too_large"``, ``"error"``…).
    """

    status: PutStatus
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the value is now held by the backend."""
        return self.status is not PutStatus.REJECTED


STORED = PutResult(PutStatus.STORED)
EXISTS = PutResult(PutStatus.EXISTS)


def rejected(reason: str) -> PutResult:
    """A ``REJECTED`` result with ``reason``."""
    return PutResult(PutStatus.REJECTED, reason)


@dataclasses.dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the conformance suite reads these instead of guessing.

    Attributes:
        persistent: Values survive a restart of this process.
        shared: Values are visible to other processes or hosts.
        device_buffers: ``get_into``/``put`` accept device (CUDA) buffers directly: the template
            methods hand them to ``_get_into_device``/``_put_device`` (flat ``uint8`` tensors)
            and host buffers to ``_get_into``/``_put``. Without it a device buffer is an
            :class:`~lmcache.errors.InvalidBufferError`.
        listing: :meth:`StorageBackend.list_keys` is supported.
        integrity_checked: Values carry a checksummed frame; corruption reads as a miss.
        bounded: The backend has a byte capacity and rejects puts beyond it.
        max_value_bytes: Largest single value, or None for no limit.
    """

    persistent: bool = False
    shared: bool = False
    device_buffers: bool = False
    listing: bool = False
    integrity_checked: bool = True
    bounded: bool = False
    max_value_bytes: int | None = None


@dataclasses.dataclass(slots=True)
class BackendCounters:
    """Operation counters every backend keeps (exposed through ``stats()``)."""

    get_requests: int = 0
    hits: int = 0
    misses: int = 0
    put_requests: int = 0
    stored: int = 0
    exists: int = 0
    rejected: int = 0
    deletes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    corrupt: int = 0
    errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# The contract


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class StorageBackend(ABC):
    """Async, batch-first storage of immutable byte values under cache keys.

    Subclasses set ``schemes`` and ``capabilities``, implement :meth:`from_url`, :attr:`url`
    and the ``_``-prefixed hooks, and call ``super().__init__()``.
    """

    schemes: ClassVar[tuple[str, ...]] = ()
    capabilities: ClassVar[Capabilities] = Capabilities()
    #: Query options whose values are redacted in ``repr`` and logs.
    secret_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._state = _State.NEW
        self._open_lock: asyncio.Lock | None = None
        self.counters = BackendCounters()
        self._logged_errors: set[str] = set()
        self._host_memory: list[memoryview] = []  # see register_host_memory

    # -- construction and identity -----------------------------------------------------------

    @classmethod
    @abstractmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build a backend from its URL; performs no I/O.

        Raises:
            ConfigError: The URL or an option is invalid.
        """

    @property
    @abstractmethod
    def url(self) -> str:
        """A URL that rebuilds an equivalent backend with :meth:`from_url` (may hold secrets)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url, self.secret_options)!r}, state={self._state.value})"

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between a successful :meth:`open` and :meth:`aclose`."""
        return self._state is _State.OPEN

    @property
    def is_closed(self) -> bool:
        """True once :meth:`aclose` was called; a closed backend cannot be reopened."""
        return self._state is _State.CLOSED

    async def open(self) -> None:
        """Connect or load; idempotent. Also runs lazily on first use.

        Raises:
            BackendClosedError: The backend was closed.
            BackendError: Connecting failed (mapped from the SDK).
        """
        if self._state is _State.OPEN:
            return
        if self._state is _State.CLOSED:
            raise BackendClosedError(f"{self!r} is closed; create a new backend instead")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._state is _State.NEW:
                await self._open()
                self._state = _State.OPEN
                for view in list(self._host_memory):
                    await self._apply_host_memory(view)
            elif self._state is _State.CLOSED:
                raise BackendClosedError(f"{self!r} is closed; create a new backend instead")

    async def aclose(self) -> None:
        """Release connections, files and executors; idempotent and final."""
        if self._state is _State.CLOSED:
            return
        was_open = self._state is _State.OPEN
        self._state = _State.CLOSED
        self._host_memory = []  # drop the references to the callers' buffers
        if was_open:
            await self._close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if getattr(self, "_state", None) is _State.OPEN:
            warnings.warn(f"unclosed {type(self).__name__}; call aclose()", ResourceWarning, stacklevel=1)

    async def _ensure_open(self) -> None:
        if self._state is not _State.OPEN:
            await self.open()

    def _check_not_closed(self) -> None:
        # Checked before the empty-batch shortcut: a closed backend refuses every call alike.
        if self._state is _State.CLOSED:
            raise BackendClosedError(f"{self!r} is closed; create a new backend instead")

    # -- long-lived host memory --------------------------------------------------------------

    async def register_host_memory(self, buffer: Any) -> None:
        """Declare host memory that later srcs and dsts will be views of (a hint; optional).

        Backends that must register memory before moving it (``nixl://`` registers with NIXL,
        which pins it for RDMA) then do that once for the whole buffer instead of on every
        call. Typical use: an engine's staging pool. Calls may still pass any buffer; buffers
        outside registered memory are handled per call. The caller keeps ``buffer`` allocated,
        at the same address, until :meth:`unregister_host_memory` or :meth:`aclose`; rule 3 is
        unchanged (a call borrows its views only for its duration). Before :meth:`open` the
        registration is recorded and applied when the backend opens. The default does nothing
        beyond recording it.

        Raises:
            InvalidBufferError: ``buffer`` is not a contiguous host buffer.
            BackendClosedError: The backend was closed.
        """
        view = as_readable(buffer)
        if self._state is _State.CLOSED:
            raise BackendClosedError(f"{self!r} is closed; create a new backend instead")
        if not view.nbytes or any(_same_memory(view, v) for v in self._host_memory):
            return
        self._host_memory.append(view)
        if self._state is _State.OPEN:
            await self._apply_host_memory(view)

    async def unregister_host_memory(self, buffer: Any) -> None:
        """Undo :meth:`register_host_memory` for the same buffer (unknown buffers are ignored).

        No call using views of ``buffer`` may be in flight.

        Raises:
            InvalidBufferError: ``buffer`` is not a contiguous host buffer.
        """
        view = as_readable(buffer)
        for i, known in enumerate(self._host_memory):
            if _same_memory(view, known):
                del self._host_memory[i]
                if self._state is _State.OPEN:
                    try:
                        await self._unregister_host_memory(known)
                    except Exception as exc:  # the memory stays usable; only the hint is gone
                        self.log_once("unregister_host_memory", "%r: unregistering host memory failed: %s", self, exc)
                return

    async def _apply_host_memory(self, view: memoryview) -> None:
        try:
            await self._register_host_memory(view)
        except Exception as exc:  # a hint: calls still work, with per-call registration
            self.log_once("register_host_memory", "%r: registering host memory failed: %s", self, exc)

    # -- operations --------------------------------------------------------------------------

    async def contains(self, keys: Sequence[CacheKey]) -> list[bool]:
        """Whether each key is held, in input order."""
        keys = _check_keys(keys)
        self._check_not_closed()
        if not keys:
            return []
        await self._ensure_open()
        return await self._contains(keys)

    async def get_into(self, keys: Sequence[CacheKey], dsts: Sequence[Any]) -> list[int | None]:
        """Copy each value into its destination buffer.

        Args:
            keys: Keys to read.
            dsts: One writable, contiguous host buffer per key, at least as large as the value
                (or a device tensor, where ``capabilities.device_buffers``).

        Returns:
            Bytes written per key, or ``None`` on a miss. A missing key leaves its ``dst``
            untouched; a stored value that fails its integrity check is also a miss, but a
            backend that verifies in place (to keep reads single-copy) may have written part of
            it, so that ``dst``'s contents are unspecified and must not be used.

        Raises:
            InvalidArgumentError: ``keys`` and ``dsts`` differ in length, or a key is too long.
            InvalidBufferError: A buffer is unusable or smaller than its value.
            BackendClosedError: The backend was closed (also for an empty batch).
        """
        keys = _check_keys(keys)
        bufs = _as_list(dsts, "dsts")
        on_device = self._on_device(bufs)
        if on_device is None:
            views: list[Any] = [as_writable(d) for d in bufs]
        else:
            views = [
                device_bytes(d, writable=True) if dev else as_writable(d)
                for d, dev in zip(bufs, on_device, strict=True)
            ]
        if len(keys) != len(views):
            raise InvalidArgumentError(f"get_into got {len(keys)} keys but {len(views)} buffers")
        self._check_not_closed()
        if not keys:
            return []
        await self._ensure_open()
        if on_device is None:
            results = await self._get_into(keys, views)
        else:
            results = await _by_place(keys, views, on_device, self._get_into, self._get_into_device)
        c = self.counters
        c.get_requests += len(keys)
        for n in results:
            if n is None:
                c.misses += 1
            else:
                c.hits += 1
                c.bytes_read += n
        return results

    async def put(self, keys: Sequence[CacheKey], srcs: Sequence[Any]) -> list[PutResult]:
        """Store values; idempotent (an existing key reports ``EXISTS``, first writer wins).

        The sources are copied before this returns, so callers may reuse them afterwards.

        Raises:
            InvalidArgumentError: ``keys`` and ``srcs`` differ in length, or a key is too long.
            InvalidBufferError: A source is not a contiguous host buffer (or, where
                ``capabilities.device_buffers``, a contiguous device tensor).
            BackendClosedError: The backend was closed (also for an empty batch).
        """
        keys = _check_keys(keys)
        bufs = _as_list(srcs, "srcs")
        on_device = self._on_device(bufs)
        if on_device is None:
            views: list[Any] = [as_readable(s) for s in bufs]
        else:
            views = [device_bytes(s) if dev else as_readable(s) for s, dev in zip(bufs, on_device, strict=True)]
        if len(keys) != len(views):
            raise InvalidArgumentError(f"put got {len(keys)} keys but {len(views)} buffers")
        self._check_not_closed()
        if not keys:
            return []
        await self._ensure_open()
        results: list[PutResult | None] = [None] * len(keys)
        first: dict[CacheKey, int] = {}
        todo_keys: list[CacheKey] = []
        todo_views: list[Any] = []
        todo_idx: list[int] = []
        limit = self.capabilities.max_value_bytes
        for i, (k, v) in enumerate(zip(keys, views, strict=True)):
            if k in first:
                continue  # a duplicate in one batch: the first occurrence wins
            first[k] = i
            if limit is not None and v.nbytes > limit:
                results[i] = rejected("too_large")
                continue
            todo_keys.append(k)
            todo_views.append(v)
            todo_idx.append(i)
        if todo_keys:
            if on_device is None:
                stored = await self._put(todo_keys, todo_views)
            else:
                places = [on_device[i] for i in todo_idx]
                stored = await _by_place(todo_keys, todo_views, places, self._put, self._put_device)
            for i, r in zip(todo_idx, stored, strict=True):
                results[i] = r
        for i, k in enumerate(keys):
            if results[i] is None:
                owner = results[first[k]]
                results[i] = EXISTS if owner is not None and owner.ok else owner
        out: list[PutResult] = results  # type: ignore[assignment]
        c = self.counters
        c.put_requests += len(keys)
        for i, r in enumerate(out):
            if r.status is PutStatus.STORED:
                c.stored += 1
                c.bytes_written += views[i].nbytes
            elif r.status is PutStatus.EXISTS:
                c.exists += 1
            else:
                c.rejected += 1
        return out

    async def delete(self, keys: Sequence[CacheKey]) -> None:
        """Remove keys; absent keys are ignored."""
        keys = _check_keys(keys)
        self._check_not_closed()
        if not keys:
            return
        await self._ensure_open()
        await self._delete(list(dict.fromkeys(keys)))
        self.counters.deletes += len(keys)

    async def lookup_prefix(self, keys: Sequence[CacheKey]) -> int:
        """Length of the leading run of held keys (how many prefix chunks are hits)."""
        found = await self.contains(keys)
        for i, hit in enumerate(found):
            if not hit:
                return i
        return len(found)

    async def ping(self) -> None:
        """Check the backend answers.

        Raises:
            BackendError: It does not.
        """
        await self._ensure_open()
        await self._ping()

    def stats(self) -> dict[str, Any]:
        """Counters plus backend-specific gauges (capacity, used bytes, entries…)."""
        out: dict[str, Any] = self.counters.as_dict()
        out.update(self._extra_stats())
        return out

    async def list_keys(self) -> AsyncIterator[CacheKey]:
        """Iterate over held keys (only where ``capabilities.listing``).

        Raises:
            UnsupportedOperationError: The backend cannot list.
        """
        if not self.capabilities.listing:
            raise UnsupportedOperationError(f"{type(self).__name__} cannot list its keys")
        await self._ensure_open()
        async for key in self._list_keys():
            yield key

    async def list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        """Iterate over held keys with their value sizes in bytes (only where ``capabilities.listing``).

        A size is None where the backend cannot tell it without reading the value; backends
        that know sizes cheaply override ``_list_entries``.

        Raises:
            UnsupportedOperationError: The backend cannot list.
        """
        if not self.capabilities.listing:
            raise UnsupportedOperationError(f"{type(self).__name__} cannot list its keys")
        await self._ensure_open()
        async for entry in self._list_entries():
            yield entry

    # -- helpers for subclasses --------------------------------------------------------------

    def record_corrupt(self, key: CacheKey, exc: Exception) -> None:
        """Count a value that failed its integrity check (it is reported as a miss)."""
        self.counters.corrupt += 1
        self.log_once("corrupt", "%r: value for %s is corrupt (%s); treating it as a miss", self, key, exc)

    def record_error(self, kind: str, exc: BaseException) -> None:
        """Count a backend failure, logging each ``kind`` once."""
        self.counters.errors += 1
        self.log_once(kind, "%r: %s failed: %s: %s", self, kind, type(exc).__name__, exc)

    @contextlib.contextmanager
    def counting_errors(self, kind: str) -> Iterator[None]:
        """Count (:meth:`record_error`) a :class:`~lmcache.errors.BackendError` raised inside, and let it through."""
        try:
            yield
        except BackendError as exc:
            self.record_error(kind, exc)
            raise

    def log_once(self, kind: str, msg: str, *args: object) -> None:
        """Log a warning the first time ``kind`` happens on this backend."""
        if kind in self._logged_errors:
            logger.debug(msg, *args)
            return
        self._logged_errors.add(kind)
        logger.warning(msg, *args)

    def _on_device(self, bufs: list[Any]) -> list[bool] | None:
        """Which buffers go to the device hooks; None when all are host buffers (the usual case).

        Only a backend with ``capabilities.device_buffers`` takes device buffers; elsewhere
        :func:`~lmcache.backends.buffers.as_readable` refuses them with a clear message.
        """
        if not self.capabilities.device_buffers:
            return None
        flags = [is_device_buffer(b) for b in bufs]
        return flags if any(flags) else None

    # -- hooks -------------------------------------------------------------------------------

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Connect/load. Called once."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called once, only if opened."""

    async def _ping(self) -> None:  # noqa: B027 - optional hook
        """Raise a BackendError if unhealthy."""

    async def _register_host_memory(self, view: memoryview) -> None:  # noqa: B027 - optional hook
        """Prepare ``view`` (long-lived host memory) for fast transfers; see :meth:`register_host_memory`."""

    async def _unregister_host_memory(self, view: memoryview) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`_register_host_memory`; no call using ``view`` is in flight."""

    def _extra_stats(self) -> dict[str, Any]:
        return {}

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        raise UnsupportedOperationError(f"{type(self).__name__} cannot list its keys")
        yield  # pragma: no cover - makes this an async generator

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        """Held keys and value sizes; by default the keys of ``_list_keys`` with unknown sizes."""
        async for key in self._list_keys():
            yield key, None

    @abstractmethod
    async def _contains(self, keys: list[CacheKey]) -> list[bool]: ...

    @abstractmethod
    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        """Write each value into its ``dst`` (flat byte views); ``None`` on a miss.

        Raise :class:`InvalidBufferError` when a dst is smaller than its value.
        """

    @abstractmethod
    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        """Store values; keys within one call are distinct."""

    @abstractmethod
    async def _delete(self, keys: list[CacheKey]) -> None: ...

    # Device-buffer hooks: called only where ``capabilities.device_buffers``, with the device
    # buffers of a call (flat ``uint8`` tensors); its host buffers still go to ``_get_into`` and
    # ``_put``. The template keeps the counters, order and duplicate rules for both.

    async def _get_into_device(self, keys: list[CacheKey], dsts: list[Any]) -> list[int | None]:
        """Like :meth:`_get_into`, into device tensors."""
        raise UnsupportedOperationError(f"{type(self).__name__} declares device_buffers but reads none")

    async def _put_device(self, keys: list[CacheKey], srcs: list[Any]) -> list[PutResult]:
        """Like :meth:`_put`, from device tensors (copy them before returning)."""
        raise UnsupportedOperationError(f"{type(self).__name__} declares device_buffers but stores none")


T = TypeVar("T")


async def _by_place(
    keys: list[CacheKey],
    bufs: list[Any],
    on_device: list[bool],
    host: Callable[[list[CacheKey], list[Any]], Awaitable[list[T]]],
    device: Callable[[list[CacheKey], list[Any]], Awaitable[list[T]]],
) -> list[T]:
    """Results of ``host`` for the host buffers and ``device`` for the device ones, in input order."""
    out: list[Any] = [None] * len(keys)
    for want, hook in ((False, host), (True, device)):
        idx = [i for i, dev in enumerate(on_device) if dev is want]
        if idx:
            for i, r in zip(idx, await hook([keys[i] for i in idx], [bufs[i] for i in idx]), strict=True):
                out[i] = r
    return out


def _same_memory(a: memoryview, b: memoryview) -> bool:
    """Whether two flat byte views cover exactly the same memory."""
    return a.nbytes == b.nbytes and buffer_address(a) == buffer_address(b)


def _check_keys(keys: Sequence[CacheKey]) -> list[CacheKey]:
    """The keys as a list; each must be a CacheKey whose text fits the value frame (every backend alike)."""
    if isinstance(keys, (str, bytes, CacheKey)):
        raise InvalidArgumentError("keys must be a sequence of CacheKey (wrap a single key in a list)")
    out = _as_list(keys, "keys")
    for k in out:
        if not isinstance(k, CacheKey):
            raise InvalidArgumentError(f"keys must be CacheKey instances, got {type(k).__name__}")
        check_key_length(k)
    return out


def _as_list(items: Iterable[Any], what: str) -> list[Any]:
    """``items`` as a list: batches may come as any iterable (a generator is read once, here)."""
    if isinstance(items, list):
        return items
    try:
        return list(items)
    except TypeError:
        raise InvalidArgumentError(f"{what} must be a sequence, got {type(items).__name__}") from None
