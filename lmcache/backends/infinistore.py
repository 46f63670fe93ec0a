"""``infinistore://``: an InfiniStore server (``pip install 'lmcache[infinistore]'``), over RDMA or TCP.

URL form (options below; each may also come from ``LMCACHE_INFINISTORE_<NAME>``)::

    infinistore://10.0.0.5:22345?connection_type=rdma&dev_name=mlx5_0&link_type=Ethernet&block_size=2MiB
    infinistore://10.0.0.5:22345?connection_type=tcp

Storage layout
--------------
One InfiniStore key per value, named ``prefix + CacheKey.to_string()``, holding the shared
:mod:`lmcache.serde.frame` header (format version, length, xxh3 checksum, the key itself) and the
payload, so a truncated, corrupted or foreign value is a counted miss. InfiniStore's RDMA path
moves fixed-size blocks, so with ``block_size`` set (required for RDMA) every frame is padded to
exactly ``block_size`` bytes and values larger than a block are rejected (``too_large``); the
frame's own length says where the value ends. With ``block_size=0`` (TCP only) frames are stored
at their exact size. Clients sharing a server must agree on ``block_size``.

Data path
---------
The backend keeps ``connections`` connections, each with its own staging arena (registered with
``register_mr`` for RDMA) and used by one thread at a time: an InfiniStore connection is one socket
with strict request/response and cannot be shared by concurrent calls. Every SDK call runs on the
backend's bounded thread pool, never on the event loop (the SDK's ``*_async`` RDMA calls block while
the server allocates, so the backend drives the raw completion callbacks from its threads instead),
and each call is bounded by ``timeout``; an abandoned call never writes into the caller's buffer
afterwards (the copy into ``dst`` is fenced, as in :mod:`lmcache.backends.mooncake`).

First writer wins: a put asks ``check_exist`` first and reports held keys as ``EXISTS``.

Failures and an SDK hazard
--------------------------
The server is probed with a TCP connect (``connect_timeout``) before the SDK connects (its own
``connect()`` has no timeout). Socket failures, negative return codes and the SDK's bare
``Exception`` are mapped to :class:`~lmcache.errors.BackendUnavailableError` (the connection is
dropped and reopened on next use); a call past ``timeout`` is a
:class:`~lmcache.errors.BackendTimeoutError`. In infinistore 0.2.x, ``r_tcp`` dereferences a null
result when the key is missing or the socket fails mid-read, which kills the process; the TCP read
path therefore asks ``check_exist`` first and reads only keys the server just said it holds. A key
deleted by another client between those two calls can still hit that SDK bug. The RDMA path reports
missing keys cleanly (status 404) and has no such hazard.

The InfiniStore server itself needs RDMA devices (``/sys/class/infiniband``) even for TCP clients.
This module may not touch policy (eviction, promotion): that is
:class:`~lmcache.tiered.TieredBackend`'s job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import mmap
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import infinistore
import numpy as np

from lmcache.backends.base import EXISTS, STORED, Capabilities, PutResult, StorageBackend, rejected
from lmcache.backends.buffers import page_aligned
from lmcache.backends.concurrency import (
    Batch,
    WorkerGate,
    gather_all,
    run_pooled,
    settle_inflight,
    split_by_size,
)
from lmcache.backends.urls import parse_backend_url, server_location, settings_query, split_url
from lmcache.config import parse_duration, parse_size, setting
from lmcache.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    InvalidBufferError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import decode_frame, encode_header, header_size, parse_header

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["InfiniStoreBackend", "InfiniStoreSettings", "map_infinistore_errors"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 22345
_LOCATION_FIELDS = ("host", "port")
_HEADER_RESERVE = 4096
# Completion codes of the SDK's RDMA callbacks.
_RDMA_OK = 200
_RDMA_NOT_FOUND = 404


@dataclasses.dataclass(frozen=True)
class InfiniStoreSettings:
    """Options of the ``infinistore://`` backend (URL query, ``LMCACHE_INFINISTORE_<NAME>`` env, overrides).

    ``host`` and ``port`` are the server's service (data plane) address and come from the URL itself.
    """

    host: str = setting("127.0.0.1", doc="Server host (from the URL); resolved to an IPv4 address.")
    port: int = setting(DEFAULT_PORT, doc="Server service port (from the URL).", min=1, max=65535)
    connection_type: str = setting("rdma", doc="Transport.", choices=("rdma", "tcp"))
    dev_name: str = setting("mlx5_1", doc="RDMA device (connection_type=rdma).")
    ib_port: int = setting(1, doc="Port of the RDMA device (connection_type=rdma).", min=1, max=255)
    link_type: str = setting("IB", doc="RDMA link layer (connection_type=rdma).", choices=("IB", "Ethernet"))
    block_size: int = setting(
        0,
        doc="Every value is stored as a block of exactly this many bytes (required for rdma; 0 = exact sizes, tcp).",
        parse=parse_size,
    )
    staging_size: int = setting(
        64 << 20,
        doc="Staging memory per connection; bounds one value and one sub-batch.",
        parse=parse_size,
        min=1 << 16,
    )
    connections: int = setting(4, doc="Connections (and threads); also the sub-batches in flight.", min=1, max=64)
    prefix: str = setting("lmcache:", doc="Prepended to every key name; namespaces caches sharing a server.")
    connect_timeout: float = setting(
        5.0, doc="Seconds to reach the server and connect.", parse=parse_duration, min=0.001
    )
    timeout: float = setting(
        30.0,
        doc=(
            "The longest one call (contains, get_into, put, delete, ping) may take: its sub-batches share "
            "one deadline from the call's start, waiting for a connection included."
        ),
        parse=parse_duration,
        min=0.001,
    )
    log_level: str = setting("warning", doc="The SDK's log level.", choices=("error", "warning", "info", "debug"))


# ---------------------------------------------------------------------------------------------
# Errors


@contextlib.contextmanager
def map_infinistore_errors(what: str) -> Any:
    """Map the SDK's exceptions (bare ``Exception`` subclasses, ``OSError``) to :mod:`lmcache.errors`.

    Every SDK failure is a connection-level failure (its calls return -1 for a broken socket or a
    server error alike), so all map to :class:`BackendUnavailableError`, raised ``from`` the original.
    """
    try:
        yield
    except BackendError:
        raise
    except (infinistore.InfiniStoreException, OSError, RuntimeError) as exc:
        raise BackendUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        if type(exc) is Exception:  # what the SDK raises for every failed call
            raise BackendUnavailableError(f"{what}: {exc}") from exc
        raise


@dataclasses.dataclass
class _Slot:
    """One connection, its staging arena and whether the arena is registered on it."""

    arena: np.ndarray
    conn: Any = None
    registered: bool = False


# ---------------------------------------------------------------------------------------------
# The backend


class InfiniStoreBackend(StorageBackend):
    """Values in an InfiniStore server, one key per value (see the module docstring).

    Args:
        settings: Parsed options; build with :meth:`from_url`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("infinistore",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        shared=True,
        device_buffers=False,
        listing=False,
        integrity_checked=True,
        bounded=False,
        max_value_bytes=None,  # set per instance from block_size / staging_size
    )

    def __init__(self, settings: InfiniStoreSettings) -> None:
        super().__init__()
        self.settings = settings
        s = settings
        if s.connection_type == "rdma" and s.block_size <= 0:
            raise ConfigError("infinistore://: connection_type=rdma moves fixed blocks; set block_size (e.g. 2MiB)")
        arena = s.staging_size // mmap.PAGESIZE * mmap.PAGESIZE
        if s.block_size:
            if s.block_size <= _HEADER_RESERVE:
                raise ConfigError(f"infinistore://: block_size must exceed {_HEADER_RESERVE} bytes (the frame header)")
            if s.block_size > arena:
                raise ConfigError("infinistore://: block_size is larger than staging_size; raise staging_size")
            largest = s.block_size - _HEADER_RESERVE
        else:
            if arena <= _HEADER_RESERVE:
                raise ConfigError("infinistore://: staging_size leaves no room for values")
            largest = arena - _HEADER_RESERVE
        self._arena_bytes = arena
        self.capabilities = dataclasses.replace(type(self).capabilities, max_value_bytes=largest)
        self._slots: list[_Slot] = []
        self._free: asyncio.Queue[int] | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._address: str | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``infinistore://host[:port][?option=value&…]``; no I/O.

        Raises:
            ConfigError: An unknown option, a bad value, or a URL with a path, credentials or fragment.
        """
        parts = split_url(url)
        location = server_location(parts, "infinistore://10.0.0.5:22345")
        settings = parse_backend_url(url, cls.schemes, InfiniStoreSettings, location, overrides, split=parts)
        return cls(settings)

    @property
    def url(self) -> str:
        """A URL that rebuilds this backend."""
        s = self.settings
        query = settings_query(s, skip=_LOCATION_FIELDS)
        return f"infinistore://{s.host}:{s.port}" + (f"?{query}" if query else "")

    def key_name(self, key: CacheKey) -> str:
        """The InfiniStore key a value is stored under (``prefix + key.to_string()``)."""
        return self.settings.prefix + key.to_string()

    def _target(self) -> str:
        return f"infinistore://{self.settings.host}:{self.settings.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(s.host, s.port, family=socket.AF_INET, type=socket.SOCK_STREAM), s.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailableError(
                f"{self._target()}: cannot resolve {s.host!r} to an IPv4 address: {exc}"
            ) from exc
        # The SDK takes only an IPv4 literal.
        self._address = str(infos[0][4][0])
        try:
            _r, writer = await asyncio.wait_for(asyncio.open_connection(self._address, s.port), s.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailableError(
                f"{self._target()} cannot be reached: {type(exc).__name__}: {exc}".rstrip(": ")
            ) from exc
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        self._executor = concurrent.futures.ThreadPoolExecutor(s.connections, thread_name_prefix="lmcache-infinistore")
        self._slots = [_Slot(page_aligned(self._arena_bytes)) for _ in range(s.connections)]
        self._free = asyncio.Queue()
        for i in range(s.connections):
            self._free.put_nowait(i)
        try:
            # One connection now, so a server that does not speak InfiniStore fails open().
            await self._with_slot(lambda gate, slot: None, what="connect", timeout=s.connect_timeout)
        except BackendTimeoutError as exc:
            await self._close()
            raise BackendUnavailableError(f"{self._target()} accepted a connection but did not answer") from exc
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        pending = await settle_inflight(self._inflight, self.settings.timeout)
        executor, self._executor = self._executor, None
        if pending:
            self.log_once(
                "close", "%r: %d SDK call(s) still running at close; leaving their connections", self, pending
            )
        else:
            for slot in self._slots:
                _drop(slot)
            self._slots = []
        if executor is not None:
            executor.shutdown(wait=False)

    async def _ping(self) -> None:
        def probe(gate: WorkerGate, slot: _Slot) -> None:
            slot.conn.check_exist(self.settings.prefix + "__ping__")

        await self._with_slot(probe, what="ping")

    def _extra_stats(self) -> dict[str, Any]:
        s = self.settings
        return {"target": self._target(), "connection_type": s.connection_type, "block_size": s.block_size}

    # -- running SDK calls -------------------------------------------------------------------

    def _connect(self, slot: _Slot) -> None:
        s = self.settings
        config = infinistore.ClientConfig(
            connection_type=infinistore.TYPE_RDMA if s.connection_type == "rdma" else infinistore.TYPE_TCP,
            host_addr=self._address,
            service_port=s.port,
            dev_name=s.dev_name,
            ib_port=s.ib_port,
            link_type=s.link_type,
            log_level=s.log_level,
        )
        conn = infinistore.InfinityConnection(config)
        # Not conn.connect(): it prints to stdout. The same two SDK steps, quietly.
        if conn.conn.init_connection(config) < 0:
            raise BackendUnavailableError(f"{self._target()}: the SDK could not connect")
        if s.connection_type == "rdma":
            if conn.conn.setup_rdma(config) < 0:
                conn.close()
                raise BackendUnavailableError(f"{self._target()}: RDMA setup failed (device {s.dev_name})")
            conn.rdma_connected = True
            conn.register_mr(slot.arena.ctypes.data, slot.arena.nbytes)
            slot.registered = True
        slot.conn = conn

    def _in_slot(self, fn: Callable[..., T], gate: WorkerGate, slot: _Slot, *args: Any) -> T:
        """Worker side: (re)connect the slot if needed, run ``fn``, drop the connection on failure."""
        try:
            with map_infinistore_errors(f"{self._target()}"):
                if slot.conn is None:
                    self._connect(slot)
                return fn(gate, slot, *args)
        except BackendUnavailableError:
            _drop(slot)  # a failed call leaves the socket in an unknown state: reconnect next time
            raise

    async def _with_slot(self, fn: Callable[..., T], *args: Any, what: str, timeout: float | None = None) -> T:
        """Run ``fn(gate, slot, *args)`` on the executor with a connection held, bounded by ``timeout``.

        The connection returns to the pool only once its thread is done with it (see :func:`run_pooled`).
        """
        assert self._free is not None
        slots = self._slots

        def in_slot(gate: WorkerGate, idx: int) -> T:
            return self._in_slot(fn, gate, slots[idx], *args)

        job = run_pooled(
            self._executor,
            self._free,
            in_slot,
            self.settings.timeout if timeout is None else timeout,
            what=f"{what} on {self._target()}",
            item="connection",
            inflight=self._inflight,
        )
        with self.counting_errors(what):  # timeouts included
            return await job

    def _frame_len(self, head: int, payload: int) -> int:
        return self.settings.block_size or head + payload

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        names = [self.key_name(k) for k in keys]

        def run(gate: WorkerGate, slot: _Slot) -> list[bool]:
            return [bool(slot.conn.check_exist(n)) for n in names]

        return await self._with_slot(run, what="check_exist")

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        names = [self.key_name(k) for k in keys]
        caps = [
            self._frame_len(header_size(len(k.to_string().encode()), 0), d.nbytes)
            for k, d in zip(keys, dsts, strict=True)
        ]
        caps = [min(c, self._arena_bytes) for c in caps]
        batch = Batch(names, keys, caps, dsts)
        plan = split_by_size(caps, self._arena_bytes)
        jobs = [self._with_slot(self._get_batch, list(r), batch, what="read") for r in plan]
        out: list[int | None] = [None] * len(keys)
        for (lengths, corrupt), r in zip(await gather_all(jobs), plan, strict=True):
            for i, n in zip(r, lengths, strict=True):
                out[i] = n
            for i, exc in corrupt:
                self.record_corrupt(keys[i], exc)
        return out

    def _get_batch(
        self, gate: WorkerGate, slot: _Slot, idx: list[int], batch: Batch
    ) -> tuple[list[int | None], list[tuple[int, IntegrityError]]]:
        conn, arena = slot.conn, slot.arena
        frames: list[tuple[int, memoryview]] = []  # (position, frame bytes)
        if self.settings.connection_type == "tcp":
            for pos, i in enumerate(idx):
                # r_tcp crashes the process on a missing key (SDK bug): only read what is held.
                if not conn.check_exist(batch.names[i]):
                    continue
                data = conn.tcp_read_cache(batch.names[i])
                frames.append((pos, memoryview(np.ascontiguousarray(data, dtype=np.uint8)).cast("B")))
        else:
            block = self.settings.block_size
            present = [pos for pos, i in enumerate(idx) if conn.check_exist(batch.names[i])]
            if present:
                code = _rdma_call(
                    conn.conn.r_rdma_async,
                    [batch.names[idx[p]] for p in present],
                    [n * block for n in range(len(present))],
                    block,
                    ptr=arena.ctypes.data,
                    timeout=self.settings.timeout,
                )
                if code == _RDMA_OK:
                    frames = [(p, memoryview(arena[n * block : (n + 1) * block])) for n, p in enumerate(present)]
                elif code != _RDMA_NOT_FOUND:  # 404: deleted since check_exist, all read as misses
                    raise BackendUnavailableError(f"{self._target()}: RDMA read failed with status {code}")
        lengths: list[int | None] = [None] * len(idx)
        corrupt: list[tuple[int, IntegrityError]] = []
        payloads: list[tuple[int, memoryview]] = []
        for pos, stored in frames:
            i = idx[pos]
            try:
                header = parse_header(stored, batch.keys[i])
                # A padded block holds the frame and zeros after it.
                frame = stored[: header.total_len] if len(stored) > header.total_len else stored
                _h, payload = decode_frame(frame, batch.keys[i])
            except IntegrityError as exc:
                corrupt.append((i, exc))
                continue
            if payload.nbytes > batch.bufs[i].nbytes:
                raise InvalidBufferError(
                    f"buffer of {batch.bufs[i].nbytes} bytes is too small for the {payload.nbytes}-byte value "
                    f"of {batch.keys[i]}"
                )
            payloads.append((pos, payload))
        if payloads:
            with gate.held():  # WorkerAbandoned once the caller gave up
                for pos, payload in payloads:
                    batch.bufs[idx[pos]][: payload.nbytes] = payload
                    lengths[pos] = payload.nbytes
        return lengths, corrupt

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        names = [self.key_name(k) for k in keys]
        heads = [header_size(len(k.to_string().encode()), 0) for k in keys]
        sizes = [self._frame_len(h, s.nbytes) for h, s in zip(heads, srcs, strict=True)]
        limit = self.capabilities.max_value_bytes or 0
        out: list[PutResult] = [rejected("too_large")] * len(keys)
        todo = [i for i, s in enumerate(srcs) if s.nbytes <= limit and heads[i] + s.nbytes <= sizes[i]]
        if not todo:
            return out
        batch = Batch(names, keys, heads, srcs)
        plan = split_by_size([sizes[i] for i in todo], self._arena_bytes)
        jobs = [self._with_slot(self._put_batch, [todo[j] for j in r], batch, what="write") for r in plan]
        for results, r in zip(await gather_all(jobs), plan, strict=True):
            for j, res in zip(r, results, strict=True):
                out[todo[j]] = res
        return out

    def _put_batch(self, gate: WorkerGate, slot: _Slot, idx: list[int], batch: Batch) -> list[PutResult]:
        conn, arena = slot.conn, slot.arena
        results: list[PutResult] = [EXISTS] * len(idx)
        new = [pos for pos, i in enumerate(idx) if not conn.check_exist(batch.names[i])]
        if not new:
            return results
        spans: list[tuple[int, int, int]] = []  # (position, offset, stored length)
        off = 0
        with gate.held():  # WorkerAbandoned once the caller gave up
            for pos in new:
                i = idx[pos]
                head, n = batch.sizes[i], batch.bufs[i].nbytes
                arena[off + head : off + head + n] = np.frombuffer(batch.bufs[i], dtype=np.uint8)
                total = self._frame_len(head, n)
                spans.append((pos, off, total))
                off += total
        for pos, o, total in spans:
            i = idx[pos]
            head, n = batch.sizes[i], batch.bufs[i].nbytes
            arena[o : o + head] = np.frombuffer(
                encode_header(batch.keys[i], memoryview(arena[o + head : o + head + n])), dtype=np.uint8
            )
            arena[o + head + n : o + total] = 0  # deterministic padding of a fixed block
        base = arena.ctypes.data
        if self.settings.connection_type == "tcp":
            for pos, o, total in spans:
                conn.tcp_write_cache(batch.names[idx[pos]], base + o, total)
                results[pos] = STORED
        else:
            code = _rdma_call(
                conn.conn.w_rdma_async,
                [batch.names[idx[pos]] for pos, _, _ in spans],
                [o for _, o, _ in spans],
                self.settings.block_size,
                ptr=base,
                timeout=self.settings.timeout,
            )
            if code != _RDMA_OK:
                raise BackendUnavailableError(f"{self._target()}: RDMA write failed with status {code}")
            for pos, _, _ in spans:
                results[pos] = STORED
        return results

    async def _delete(self, keys: list[CacheKey]) -> None:
        names = [self.key_name(k) for k in keys]

        def run(gate: WorkerGate, slot: _Slot) -> None:
            # The SDK answers -1 when some keys were absent; absent keys are fine here.
            held = [n for n in names if slot.conn.check_exist(n)]
            if held:
                slot.conn.delete_keys(held)

        await self._with_slot(run, what="delete_keys")


def _rdma_call(
    call: Callable[..., int], keys: list[str], offsets: list[int], block: int, *, ptr: int, timeout: float
) -> int:
    """Run one of the SDK's callback-style RDMA calls from a worker thread and wait for its status."""
    done = threading.Event()
    status: list[int] = []

    def callback(code: int) -> None:
        status.append(int(code))
        done.set()

    ret = call(keys, offsets, block, ptr, callback)
    if ret < 0:
        raise BackendUnavailableError(f"RDMA request was refused by the SDK (ret={ret})")
    if not done.wait(timeout):
        raise BackendTimeoutError(f"RDMA transfer did not complete within {timeout:g} s")
    return status[0]


def _drop(slot: _Slot) -> None:
    conn, slot.conn = slot.conn, None
    slot.registered = False
    if conn is not None:
        with contextlib.suppress(Exception):
            conn.close()
