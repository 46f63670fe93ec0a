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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

from lmcache.config import env_layer, env_names, resolve_settings, unknown_env_error, unknown_env_vars
from lmcache.errors import (
    BackendClosedError,
    ConfigError,
    InvalidArgumentError,
    InvalidBufferError,
    UnsupportedOperationError,
)
from lmcache.keys import CacheKey, check_key_length

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "EXISTS",
    "STORED",
    "BackendCounters",
    "Capabilities",
    "PutResult",
    "PutStatus",
    "StorageBackend",
    "WorkerAbandoned",
    "WorkerGate",
    "as_readable",
    "as_writable",
    "check_dst_size",
    "gather_all",
    "parse_backend_url",
    "rejected",
    "run_blocking",
    "settings_query",
    "split_by_size",
    "split_url",
]

logger = logging.getLogger(__name__)
S = TypeVar("S")


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
        device_buffers: ``get_into``/``put`` accept device (CUDA) buffers directly.
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
# Buffers


def _torch_view(obj: Any, writable: bool) -> memoryview:
    if obj.device.type != "cpu":
        raise InvalidBufferError(
            f"a tensor on {obj.device} was given to a backend that takes host buffers; "
            "copy it to a (pinned) CPU buffer first"
        )
    if not obj.is_contiguous():
        raise InvalidBufferError("tensor buffers must be contiguous")
    if writable and obj.requires_grad:
        raise InvalidBufferError("destination tensors must not require grad")
    import torch

    flat = obj.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _as_view(obj: Any, writable: bool) -> memoryview:
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous") and hasattr(obj, "device"):
        return _torch_view(obj, writable)
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidBufferError(
            f"{type(obj).__name__} does not support the buffer protocol; pass bytes, bytearray, "
            "memoryview, a numpy array or a CPU tensor"
        ) from None
    if writable and view.readonly:
        raise InvalidBufferError("destination buffer is read-only")
    if not view.c_contiguous:
        raise InvalidBufferError("buffers must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def as_readable(obj: Any) -> memoryview:
    """A flat byte view of a source buffer.

    Raises:
        InvalidBufferError: ``obj`` is not a contiguous host buffer.
    """
    return _as_view(obj, writable=False)


def as_writable(obj: Any) -> memoryview:
    """A flat, writable byte view of a destination buffer.

    Raises:
        InvalidBufferError: ``obj`` is read-only, non-contiguous or not a host buffer.
    """
    return _as_view(obj, writable=True)


# ---------------------------------------------------------------------------------------------
# Executors and cancellation


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
        if not fut.cancelled():
            fut.exception()  # mark retrieved: the caller was cancelled and cannot see it
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


class WorkerAbandoned(Exception):
    """Raised inside a worker whose caller gave up (see :class:`WorkerGate`); nobody sees it."""


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
            if not t.cancelled():
                t.exception()  # retrieved: only the first failure is raised
        raise


# ---------------------------------------------------------------------------------------------
# URLs


def parse_backend_url(
    url: str,
    schemes: Sequence[str],
    settings_cls: type[S],
    location: Mapping[str, object],
    overrides: Mapping[str, object],
    *,
    split: SplitResult | None = None,
) -> S:
    """Resolve backend settings: defaults < ``LMCACHE_<SCHEME>_*`` env < URL < ``overrides``.

    Args:
        url: The backend URL (for error messages and its query string).
        schemes: Schemes the backend serves; the URL's must be one of them.
        settings_cls: The backend's settings dataclass.
        location: Settings taken from the URL's host/path/credentials by the caller.
        overrides: Keyword overrides (highest precedence).
        split: The already split URL, if the caller has it.

    Raises:
        ConfigError: Wrong scheme, a repeated or unknown option, or a bad value.
    """
    parts = split or split_url(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"URL scheme {parts.scheme!r} is not served here; expected one of {list(schemes)}")
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in query:
            raise ConfigError(f"{parts.scheme}://: option {k!r} is given twice in the URL")
        query[k] = v
    env_prefix = "LMCACHE_" + parts.scheme.upper().replace("+", "_").replace("-", "_") + "_"
    _check_env(env_prefix, settings_cls, parts.scheme)
    layers: list[tuple[str, Mapping[str, object]]] = [
        ("environment", env_layer(env_prefix, settings_cls)),
        ("URL", location),
        ("URL query", query),
        ("keyword arguments", overrides),
    ]
    return resolve_settings(settings_cls, layers, owner=f"{parts.scheme}://", strict=("URL query", "keyword arguments"))


def _check_env(prefix: str, settings_cls: type[Any], scheme: str) -> None:
    """Refuse an ``LMCACHE_<SCHEME>_…`` variable that names no option (a typo is otherwise ignored)."""
    unknown = unknown_env_vars(prefix, settings_cls)
    if not unknown:
        return
    # LMCACHE_REDIS_CLUSTER_NODES belongs to redis+cluster://, not redis://: skip the variables
    # of schemes whose prefix extends this one. Imported here: the registry imports this module.
    from lmcache.backends.registry import env_prefixes

    longer = tuple(p for p in env_prefixes().values() if p != prefix and p.startswith(prefix))
    for var in unknown:
        if longer and var.startswith(longer):
            continue
        raise unknown_env_error(var, env_names(prefix, settings_cls), f"{scheme}://", prefix)


def split_url(url: str) -> SplitResult:
    """``urlsplit`` with lmcache's errors: a malformed URL is a :class:`ConfigError`."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a backend URL: {url!r} (expected scheme://…, e.g. memory://?capacity=1GiB)")
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # multi-host URLs (redis+cluster://h1:p1,h2:p2) check their own ports
            _ = parts.port  # validates the port
    except ValueError as exc:
        raise ConfigError(f"malformed backend URL {redact_url(url)!r}: {exc}") from None
    if not parts.scheme:
        raise ConfigError(f"backend URL {redact_url(url)!r} has no scheme")
    return parts


def settings_query(settings: Any, skip: Sequence[str] = ()) -> str:
    """URL query of the settings that differ from their defaults (for round-trippable URLs)."""
    items = []
    for f in dataclasses.fields(settings):
        if not f.init or f.name in skip:
            continue
        value = getattr(settings, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "none"
        elif isinstance(value, (list, tuple)):
            text = " ".join(map(str, value))
        else:
            text = str(value)
        items.append((f.name, text))
    return urlencode(items, quote_via=quote)


def redact_url(url: str, secret_options: Sequence[str] = ()) -> str:
    """``url`` with its password and any ``secret_options`` query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    query = parts.query
    if query and secret_options:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k in secret_options else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide; urlsplit/geturl would drop the "//" of "memory://?…"
    out = parts._replace(netloc=netloc, query=query).geturl()
    if "://" in url and "://" not in out:
        out = out.replace(":", "://", 1)
    return out


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
            dsts: One writable, contiguous host buffer per key, at least as large as the value.

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
        views = [as_writable(d) for d in _as_list(dsts, "dsts")]
        if len(keys) != len(views):
            raise InvalidArgumentError(f"get_into got {len(keys)} keys but {len(views)} buffers")
        self._check_not_closed()
        if not keys:
            return []
        await self._ensure_open()
        results = await self._get_into(keys, views)
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
            InvalidBufferError: A source is not a contiguous host buffer.
            BackendClosedError: The backend was closed (also for an empty batch).
        """
        keys = _check_keys(keys)
        views = [as_readable(s) for s in _as_list(srcs, "srcs")]
        if len(keys) != len(views):
            raise InvalidArgumentError(f"put got {len(keys)} keys but {len(views)} buffers")
        self._check_not_closed()
        if not keys:
            return []
        await self._ensure_open()
        results: list[PutResult | None] = [None] * len(keys)
        first: dict[CacheKey, int] = {}
        todo_keys: list[CacheKey] = []
        todo_views: list[memoryview] = []
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
            for i, r in zip(todo_idx, await self._put(todo_keys, todo_views), strict=True):
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

    def log_once(self, kind: str, msg: str, *args: object) -> None:
        """Log a warning the first time ``kind`` happens on this backend."""
        if kind in self._logged_errors:
            logger.debug(msg, *args)
            return
        self._logged_errors.add(kind)
        logger.warning(msg, *args)

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


def _same_memory(a: memoryview, b: memoryview) -> bool:
    """Whether two flat byte views cover exactly the same memory."""
    if a.nbytes != b.nbytes:
        return False
    import numpy as np

    return bool(np.frombuffer(a, dtype=np.uint8).ctypes.data == np.frombuffer(b, dtype=np.uint8).ctypes.data)


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


def check_dst_size(key: CacheKey, dst: memoryview, needed: int) -> None:
    """Raise :class:`InvalidBufferError` when ``dst`` cannot hold ``needed`` bytes."""
    if dst.nbytes < needed:
        raise InvalidBufferError(f"buffer of {dst.nbytes} bytes is too small for the {needed}-byte value of {key}")
