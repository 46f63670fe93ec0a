"""``mooncake://``: a Mooncake Store cluster (``mooncake_master`` plus storage nodes).

URL form (options below; each may also come from ``LMCACHE_MOONCAKE_<NAME>``)::

    mooncake://master-host:50051?metadata_server=P2PHANDSHAKE&protocol=tcp&global_segment_size=0

Storage layout
--------------
One Mooncake object per value, named ``prefix + CacheKey.to_string()`` (default prefix
``lmcache:``). The object holds the shared :mod:`lmcache.serde.frame` header (format version,
length, xxh3 checksum, the key itself) followed by the payload, so a truncated, corrupted or
foreign object is a counted miss, never data.

Data path
---------
The backend owns one *staging region* (``staging_size`` bytes, page aligned) that it registers
with the SDK once (``register_buffer``), cut into ``max_workers`` equal arenas. A put copies each
payload into an arena behind room for its frame header, writes the header, and hands the whole
arena to ``batch_put_from`` (zero-copy from there: the transfer engine reads the registered
memory directly, over TCP or RDMA). A get runs ``batch_get_into`` into an arena, checks every
frame there and copies the payloads into the caller's buffers. Caller buffers therefore never
need registering (RDMA needs registered memory), and a call that times out can be abandoned
safely: the SDK only ever writes into the backend's own arena, and the copy into ``dst`` is
fenced (see :class:`~lmcache.backends.concurrency.WorkerGate`), so once a call has returned
nothing writes into its ``dst``.

Every SDK call runs on the backend's own bounded thread pool (``max_workers`` threads), never on
the event loop, and each is bounded by ``timeout``: a call that takes longer raises
:class:`~lmcache.errors.BackendTimeoutError`; its thread finishes in the background and keeps its
arena until then. The largest value is one arena minus its frame header
(``capabilities.max_value_bytes``, per instance); a batch is split into arena-sized sub-batches
that run concurrently.

Semantics
---------
* First writer wins: a put first asks which keys exist (``batch_is_exist``) and reports those as
  ``EXISTS``; Mooncake itself never overwrites an existing object on ``put`` (it answers success
  or ``OBJECT_ALREADY_EXISTS``), so two racing writers both report ``STORED`` but the stored bytes
  are the first writer's.
* A full cluster (``NO_AVAILABLE_HANDLE``) rejects a put with reason ``capacity``; eviction is the
  master's business (``-eviction_high_watermark_ratio``), so the backend declares
  ``bounded=False``, like Redis.
* ``OBJECT_NOT_FOUND`` and a replica still being written are misses. A delete uses
  ``force=True``: without it, an object read in the last lease period (``OBJECT_HAS_LEASE``)
  could not be deleted.
* RPC and transfer failures (``RPC_FAIL``, ``TRANSFER_FAIL``…) raise
  :class:`~lmcache.errors.BackendUnavailableError`; an object that is busy (``OBJECT_HAS_LEASE``,
  a replica still being written) raises :class:`~lmcache.errors.TransientBackendError` where it is
  not simply a miss; ``NO_AVAILABLE_HANDLE`` outside a put is a
  :class:`~lmcache.errors.CapacityError`; other SDK codes raise
  :class:`~lmcache.errors.PermanentBackendError`. The master is probed with a TCP connect
  (``connect_timeout``) before ``setup()``: the SDK's ``setup()`` against an unreachable master
  blocks for about 90 s.

What this data path costs against the raw SDK (which moves registered buffers directly, with no
staging copy and no checksum) is measured by ``lmcache bench backend``; the figures are in
``docs/benchmarks.md`` (*mooncake:// against the raw Mooncake SDK*). Closing a backend takes about
1 s (the SDK's ``close()``).

Memory: ``global_segment_size`` is what this process contributes to the cluster (0 by default:
the data lives on storage nodes such as ``mooncake_client``; set it to pool this process's RAM),
``local_buffer_size`` is the SDK's own transfer buffer (unused by this data path, kept small).

This module may not touch policy (eviction, promotion): that is
:class:`~lmcache.tiered.TieredBackend`'s job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import mmap
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import numpy as np
from mooncake.store import MooncakeDistributedStore, ReplicateConfig

from lmcache.backends.base import EXISTS, STORED, Capabilities, PutResult, StorageBackend, rejected
from lmcache.backends.buffers import page_aligned
from lmcache.backends.concurrency import (
    Batch,
    WorkerGate,
    gather_all,
    run_gated,
    run_pooled,
    settle_inflight,
    split_by_size,
)
from lmcache.backends.urls import parse_backend_url, server_location, settings_query, split_url, url_host
from lmcache.config import parse_duration, parse_size, setting
from lmcache.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    IntegrityError,
    InvalidBufferError,
    PermanentBackendError,
    TransientBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import FrameHeader, copy_with_checksum, encode_header, header_size, parse_header

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["MooncakeBackend", "MooncakeSettings", "error_name", "mooncake_error"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 50051
_LOCATION_FIELDS = ("host", "port")
# Room reserved in an arena for one frame header (48 bytes + key, padded to 64).
_HEADER_RESERVE = 4096
# Values at least this large are checked after their copy into dst (see _get_batch).
_VERIFY_IN_PLACE_BYTES = 256 << 10

# Mooncake Store's ErrorCode values (mooncake-store/include/types.h) that this backend handles.
OK = 0
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
LEASE_EXPIRED = -707
REPLICA_IS_PROCESSING = -714
_ERROR_NAMES = {
    -1: "INTERNAL_ERROR",
    -10: "BUFFER_OVERFLOW",
    -101: "SEGMENT_NOT_FOUND",
    -103: "CLIENT_NOT_FOUND",
    -200: "NO_AVAILABLE_HANDLE",
    -400: "INVALID_KEY",
    -500: "WRITE_FAIL",
    -600: "INVALID_PARAMS",
    -601: "ILLEGAL_CLIENT",
    -700: "INVALID_WRITE",
    -701: "INVALID_READ",
    -702: "INVALID_REPLICA",
    -703: "REPLICA_IS_NOT_READY",
    -704: "OBJECT_NOT_FOUND",
    -705: "OBJECT_ALREADY_EXISTS",
    -706: "OBJECT_HAS_LEASE",
    -707: "LEASE_EXPIRED",
    -708: "OBJECT_HAS_REPLICATION_TASK",
    -714: "REPLICA_IS_PROCESSING",
    -800: "TRANSFER_FAIL",
    -900: "RPC_FAIL",
    -901: "RPC_TIMEOUT",
    -1010: "UNAVAILABLE_IN_CURRENT_STATUS",
    -1011: "UNAVAILABLE_IN_CURRENT_MODE",
}
# Codes after which retrying (or another node) may help: the master or a peer is unreachable.
_UNAVAILABLE_CODES = frozenset({-1, -101, -103, -800, -900, -901, -902, -1010, -1011})
# Object states that pass (a lease held by a reader, a replica still being written or moved).
_BUSY_CODES = frozenset({-703, -706, -707, -708, -714})


def error_name(code: int) -> str:
    """The Mooncake ``ErrorCode`` name of ``code`` (``"code -123"`` when unknown)."""
    return _ERROR_NAMES.get(code, f"code {code}")


def mooncake_error(code: int, what: str) -> BackendError:
    """The :mod:`lmcache.errors` exception for a failed SDK call that returned ``code``."""
    msg = f"{what}: Mooncake returned {error_name(code)} ({code})"
    if code in _UNAVAILABLE_CODES:
        return BackendUnavailableError(msg)
    if code in _BUSY_CODES:
        return TransientBackendError(msg)
    if code == NO_AVAILABLE_HANDLE:
        return CapacityError(msg)
    return PermanentBackendError(msg)


@dataclasses.dataclass(frozen=True)
class MooncakeSettings:
    """Options of the ``mooncake://`` backend (URL query, ``LMCACHE_MOONCAKE_<NAME>`` env, overrides).

    ``host`` and ``port`` are the master's RPC address and come from the URL itself.
    """

    host: str = setting("127.0.0.1", doc="Master host (from the URL).")
    port: int = setting(DEFAULT_PORT, doc="Master RPC port (from the URL).", min=1, max=65535)
    metadata_server: str = setting(
        "P2PHANDSHAKE", doc="P2PHANDSHAKE, an HTTP metadata URL (http://host:port/metadata) or an etcd address."
    )
    protocol: str = setting("tcp", doc="Transfer protocol.", choices=("tcp", "rdma"))
    rdma_devices: str = setting("", doc="RDMA devices to use, comma-separated (protocol=rdma; empty = all).")
    local_hostname: str = setting(
        "",
        doc="Address peers reach this process at (empty: 127.0.0.1 for a loopback master, "
        "else the local address that routes to the master).",
    )
    global_segment_size: int = setting(
        0, doc="Memory this process contributes to the cluster (0: data lives on storage nodes).", parse=parse_size
    )
    local_buffer_size: int = setting(
        16 << 20, doc="The SDK's own transfer buffer (this backend's data path does not use it).", parse=parse_size
    )
    staging_size: int = setting(
        256 << 20,
        doc="Registered staging memory for transfers; split into max_workers arenas, one arena bounds a value.",
        parse=parse_size,
        min=1 << 20,
    )
    max_workers: int = setting(4, doc="Threads running SDK calls; also the sub-batches in flight.", min=1, max=256)
    replica_num: int = setting(1, doc="Replicas of each stored value.", min=1, max=64)
    prefix: str = setting("lmcache:", doc="Prepended to every object name; namespaces caches sharing a cluster.")
    connect_timeout: float = setting(
        5.0,
        doc="The longest open() may take for each of its steps: the master's TCP probe, then setup().",
        parse=parse_duration,
        min=0.001,
    )
    timeout: float = setting(
        30.0,
        doc=(
            "The longest one call (contains, get_into, put, delete, ping) may take: its sub-batches share "
            "one deadline from the call's start, waiting for a staging arena included."
        ),
        parse=parse_duration,
        min=0.001,
    )


# ---------------------------------------------------------------------------------------------
# The backend


@dataclasses.dataclass(slots=True)
class _GetOutcome:
    lengths: list[int | None]
    corrupt: list[tuple[int, IntegrityError]]
    errors: list[tuple[int, int]]  # (index, code) of reads that failed but count as misses


class MooncakeBackend(StorageBackend):
    """Values in a Mooncake Store cluster, one object per value (see the module docstring).

    Args:
        settings: Parsed options; build with :meth:`from_url`.
    """

    schemes: ClassVar[tuple[str, ...]] = ("mooncake",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        shared=True,
        device_buffers=False,
        listing=False,
        integrity_checked=True,
        bounded=False,
        max_value_bytes=None,  # set per instance: one arena minus a frame header
    )

    def __init__(self, settings: MooncakeSettings) -> None:
        super().__init__()
        self.settings = settings
        self._arena_bytes = settings.staging_size // settings.max_workers // mmap.PAGESIZE * mmap.PAGESIZE
        if self._arena_bytes <= _HEADER_RESERVE:
            raise ConfigError(
                f"mooncake://: staging_size={settings.staging_size} split over max_workers={settings.max_workers} "
                "leaves no room for values; raise staging_size or lower max_workers"
            )
        # Shadows the class attribute: the value limit depends on this instance's arenas.
        self.capabilities = dataclasses.replace(
            type(self).capabilities, max_value_bytes=self._arena_bytes - _HEADER_RESERVE
        )
        self._store: Any = None
        self._staging: np.ndarray | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._arenas: asyncio.Queue[int] | None = None
        self._inflight: set[asyncio.Future[Any]] = set()
        self._config: Any = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``mooncake://master-host[:port][?option=value&…]``; no I/O.

        Raises:
            ConfigError: An unknown option, a bad value, or a URL with a path, credentials or fragment.
        """
        parts = split_url(url)
        location = server_location(parts, "mooncake://127.0.0.1:50051")
        settings = parse_backend_url(url, cls.schemes, MooncakeSettings, location, overrides, split=parts)
        return cls(settings)

    @property
    def url(self) -> str:
        """A URL that rebuilds this backend."""
        s = self.settings
        query = settings_query(s, skip=_LOCATION_FIELDS)
        return f"mooncake://{url_host(s.host)}:{s.port}" + (f"?{query}" if query else "")

    @property
    def master_address(self) -> str:
        """``host:port`` of the master."""
        return f"{url_host(self.settings.host)}:{self.settings.port}"

    def object_name(self, key: CacheKey) -> str:
        """The Mooncake object name a value is stored under (``prefix + key.to_string()``)."""
        return self.settings.prefix + key.to_string()

    # -- lifecycle ---------------------------------------------------------------------------

    def local_hostname(self) -> str:
        """The address peers reach this process at (``local_hostname``, else derived from the master)."""
        s = self.settings
        if s.local_hostname:
            return s.local_hostname
        try:
            if ipaddress.ip_address(socket.gethostbyname(s.host)).is_loopback:
                return "127.0.0.1"
        except (OSError, ValueError):
            pass
        # The address of the interface that routes to the master (a UDP connect sends nothing).
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((s.host, s.port))
            return str(probe.getsockname()[0])
        return socket.gethostname()

    async def _probe_master(self) -> None:
        s = self.settings
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), s.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailableError(
                f"mooncake master {self.master_address} cannot be reached: {type(exc).__name__}: {exc}"
            ) from exc
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    def make_store(self, buffers: Sequence[np.ndarray] = ()) -> Any:
        """A new Mooncake store client set up as this backend's own, with ``buffers`` registered.

        Same master, metadata server, protocol, RDMA devices, segment and buffer sizes, and the
        same local hostname rule. For the backend itself and for tools that must reach the same
        cluster on the same terms (the raw baseline of ``lmcache bench backend``); the caller
        unregisters the buffers and closes the store. Blocks: call it off the event loop.

        Raises:
            BackendError: ``setup()`` or a ``register_buffer`` failed (mapped from Mooncake's code).
        """
        s = self.settings
        hostname = self.local_hostname()  # may resolve names: here, off the event loop
        store = MooncakeDistributedStore()
        code = store.setup(
            hostname,
            s.metadata_server,
            s.global_segment_size,
            s.local_buffer_size,
            s.protocol,
            s.rdma_devices,
            self.master_address,
        )
        if code != OK:
            with contextlib.suppress(Exception):
                store.close()
            raise mooncake_error(code, f"setting up a client of master {self.master_address}")
        for buf in buffers:
            code = store.register_buffer(buf.ctypes.data, buf.nbytes)
            if code != OK:
                with contextlib.suppress(Exception):
                    store.close()
                raise mooncake_error(code, f"registering {buf.nbytes} bytes of memory for transfers")
        return store

    def _setup(self, gate: WorkerGate, staging: np.ndarray) -> Any:
        return self.make_store([staging])

    async def _open(self) -> None:
        s = self.settings
        await self._probe_master()
        self._executor = concurrent.futures.ThreadPoolExecutor(s.max_workers, thread_name_prefix="lmcache-mooncake")
        staging = page_aligned(self._arena_bytes * s.max_workers)
        self._staging = staging
        try:
            self._store = await self._call(self._setup, staging, what="setup()", timeout=s.connect_timeout)
        except BackendTimeoutError as exc:
            await self._shutdown(wait=False)
            raise BackendUnavailableError(
                f"mooncake master {self.master_address} accepted a connection but setup() did not finish "
                f"within {s.connect_timeout:g} s"
            ) from exc
        except BaseException:
            await self._shutdown(wait=False)
            raise
        config = ReplicateConfig()
        config.replica_num = s.replica_num
        self._config = config
        self._arenas = asyncio.Queue()
        for i in range(s.max_workers):
            self._arenas.put_nowait(i)
        logger.debug("%r: connected (%s, arenas of %d bytes)", self, s.protocol, self._arena_bytes)

    async def _close(self) -> None:
        await self._shutdown(wait=True)

    async def _shutdown(self, *, wait: bool) -> None:
        # Threads still inside the SDK (e.g. after timeouts) must leave before close().
        pending = await settle_inflight(self._inflight, self.settings.timeout if wait else 0)
        store, self._store = self._store, None
        executor, self._executor = self._executor, None
        if pending:
            # Closing the SDK under a running call could crash the process: leak the client and
            # its staging memory instead (both are referenced by the still-running threads).
            self.log_once("close", "%r: %d SDK call(s) still running at close; leaving the client open", self, pending)
        elif store is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(executor, _close_store, store, self._staging)
            self._staging = None
        if executor is not None:
            executor.shutdown(wait=False)

    async def _ping(self) -> None:
        # health_check() answers 0 even with the master gone; a real RPC tells the truth.
        def probe(gate: WorkerGate) -> None:
            code = self._store.is_exist(self.settings.prefix + "__ping__")
            if code < 0:
                raise mooncake_error(code, f"ping of master {self.master_address}")

        await self._call(probe, what="ping")

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "master": self.master_address,
            "protocol": self.settings.protocol,
            "prefix": self.settings.prefix,
            "arena_bytes": self._arena_bytes,
            "sdk_calls_in_flight": sum(1 for f in self._inflight if not f.done()),
        }

    # -- running SDK calls -------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any, what: str, timeout: float | None = None) -> T:
        """Run ``fn(gate, *args)`` on the backend's executor, bounded by ``timeout`` (see :func:`run_gated`)."""
        limit = self.settings.timeout if timeout is None else timeout
        job = run_gated(
            self._executor, lambda gate: fn(gate, *args), limit, what=self._on(what), inflight=self._inflight
        )
        with self.counting_errors(what):  # timeouts included
            return await job

    async def _with_arena(self, fn: Callable[..., T], *args: Any, what: str) -> T:
        """Run ``fn(gate, arena_view, *args)`` with an arena of the staging region held (see :func:`run_pooled`)."""
        assert self._arenas is not None and self._staging is not None
        staging, n = self._staging, self._arena_bytes

        def in_arena(gate: WorkerGate, idx: int) -> T:
            return fn(gate, staging[idx * n : (idx + 1) * n], *args)

        job = run_pooled(
            self._executor,
            self._arenas,
            in_arena,
            self.settings.timeout,
            what=self._on(what),
            item="arena",
            inflight=self._inflight,
        )
        with self.counting_errors(what):  # timeouts included
            return await job

    def _on(self, what: str) -> str:
        return f"{what} on mooncake master {self.master_address}"

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        names = [self.object_name(k) for k in keys]

        def run(gate: WorkerGate) -> list[bool]:
            codes = self._store.batch_is_exist(names)
            out = []
            for code in codes:
                if code < 0 and code != OBJECT_NOT_FOUND:
                    raise mooncake_error(code, f"batch_is_exist on {self.master_address}")
                out.append(code == 1)
            return out

        return await self._call(run, what="batch_is_exist")

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        names = [self.object_name(k) for k in keys]
        caps = [
            min(d.nbytes + header_size(len(k.to_string().encode()), 0), self._arena_bytes)
            for k, d in zip(keys, dsts, strict=True)
        ]
        # Read each distinct key once; duplicates get a copy of the first read.
        first: dict[str, int] = {}
        for i, name in enumerate(names):
            first.setdefault(name, i)
        unique = sorted(first.values())
        plan = split_by_size([caps[i] for i in unique], self._arena_bytes)
        batch = Batch(names, keys, caps, dsts)
        jobs = [self._with_arena(self._get_batch, [unique[j] for j in r], batch, what="batch_get_into") for r in plan]
        out: list[int | None] = [None] * len(keys)
        for outcome, r in zip(await gather_all(jobs), plan, strict=True):
            for j, n in zip(r, outcome.lengths, strict=True):
                out[unique[j]] = n
            for i, exc in outcome.corrupt:
                self.record_corrupt(keys[i], exc)
            for i, code in outcome.errors:
                self.record_error(f"read {error_name(code)}", mooncake_error(code, f"reading {names[i]}"))
        for i, name in enumerate(names):
            src = first[name]
            if src != i and out[src] is not None:
                n = out[src]
                assert n is not None
                if dsts[i].nbytes < n:
                    raise InvalidBufferError(
                        f"buffer of {dsts[i].nbytes} bytes is too small for the {n}-byte value of {keys[i]}"
                    )
                dsts[i][:n] = dsts[src][:n]
                out[i] = n
        return out

    def _get_batch(
        self,
        gate: WorkerGate,
        arena: np.ndarray,
        idx: list[int],
        batch: Batch,
    ) -> _GetOutcome:
        store = self._store
        names, keys, caps, dsts = batch.names, batch.keys, batch.sizes, batch.bufs
        base = arena.ctypes.data
        offsets: list[int] = []
        off = 0
        for i in idx:
            offsets.append(off)
            off += caps[i]
        codes = store.batch_get_into([names[i] for i in idx], [base + o for o in offsets], [caps[i] for i in idx])
        lengths: list[int | None] = [None] * len(idx)
        corrupt: list[tuple[int, IntegrityError]] = []
        errors: list[tuple[int, int]] = []
        payloads: list[tuple[int, int, FrameHeader]] = []  # (position, offset in arena, header)
        for pos, (i, o, code) in enumerate(zip(idx, offsets, codes, strict=True)):
            if code >= 0:
                try:
                    header = parse_header(memoryview(arena[o : o + code]), keys[i])
                    if header.total_len != code:
                        raise IntegrityError(
                            f"value for {keys[i]} has {code} bytes, its header says {header.total_len}"
                        )
                except IntegrityError as exc:
                    corrupt.append((i, exc))
                    continue
                if header.payload_len > dsts[i].nbytes:
                    raise InvalidBufferError(
                        f"buffer of {dsts[i].nbytes} bytes is too small for the "
                        f"{header.payload_len}-byte value of {keys[i]}"
                    )
                payloads.append((pos, o + header.payload_offset, header))
            elif code in (OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY, REPLICA_IS_PROCESSING):
                continue  # absent, or still being written: a miss
            elif code == INVALID_PARAMS:
                # The SDK's answer to a buffer smaller than the object: say so if that is the case.
                size = store.get_size(names[i])
                if size > caps[i]:
                    raise InvalidBufferError(
                        f"buffer of {dsts[i].nbytes} bytes is too small for the value of {keys[i]} ({size}-byte frame)"
                    )
                if size < 0 and size != OBJECT_NOT_FOUND:
                    raise mooncake_error(size, f"get_size of {names[i]}")
                if size >= 0:
                    raise mooncake_error(code, f"batch_get_into of {names[i]}")
            elif code == LEASE_EXPIRED:
                errors.append((i, code))  # the object was evicted while we read it: a miss
            else:
                raise mooncake_error(code, f"batch_get_into on {self.master_address}")
        if payloads:
            with gate.held():  # WorkerAbandoned once the caller gave up
                # Large values: copy first, then check the copy while it is still in cache (one
                # pass over cold memory instead of two); one that fails leaves its bytes in dst,
                # which the contract allows for a corrupt value. Small values stay in cache
                # anyway and are checked before the copy.
                for pos, o, header in payloads:
                    i = idx[pos]
                    n = header.payload_len
                    out = dsts[i][:n]
                    src = memoryview(arena[o : o + n])
                    try:
                        if n < _VERIFY_IN_PLACE_BYTES:
                            header.verify_payload(src)  # small: check first, a corrupt dst stays untouched
                            out[:] = src
                        else:
                            header.verify_checksum(
                                copy_with_checksum(np.frombuffer(out, dtype=np.uint8), arena[o : o + n])
                            )
                    except IntegrityError as exc:
                        corrupt.append((i, exc))
                        continue
                    lengths[pos] = n
        return _GetOutcome(lengths, corrupt, errors)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        names = [self.object_name(k) for k in keys]
        heads = [header_size(len(k.to_string().encode()), 0) for k in keys]
        sizes = [h + s.nbytes for h, s in zip(heads, srcs, strict=True)]
        out: list[PutResult] = [rejected("too_large")] * len(keys)
        todo = [i for i, n in enumerate(sizes) if n <= self._arena_bytes]
        if not todo:
            return out
        plan = split_by_size([sizes[i] for i in todo], self._arena_bytes)
        batch = Batch(names, keys, heads, srcs)
        jobs = [self._with_arena(self._put_batch, [todo[j] for j in r], batch, what="batch_put_from") for r in plan]
        for results, r in zip(await gather_all(jobs), plan, strict=True):
            for j, res in zip(r, results, strict=True):
                out[todo[j]] = res
                if res.reason == "capacity":
                    self.log_once("capacity", "%r: the cluster is full (NO_AVAILABLE_HANDLE); puts are rejected", self)
        return out

    def _put_batch(
        self,
        gate: WorkerGate,
        arena: np.ndarray,
        idx: list[int],
        batch: Batch,
    ) -> list[PutResult]:
        store = self._store
        names, keys, heads, srcs = batch.names, batch.keys, batch.sizes, batch.bufs
        results: list[PutResult] = [EXISTS] * len(idx)
        exist = store.batch_is_exist([names[i] for i in idx])
        for code in exist:
            if code < 0 and code != OBJECT_NOT_FOUND:
                raise mooncake_error(code, f"batch_is_exist on {self.master_address}")
        new = [pos for pos, code in enumerate(exist) if code != 1]
        if not new:
            return results
        spans: list[tuple[int, int, int]] = []  # (position, offset, frame length)
        off = 0
        with gate.held():  # WorkerAbandoned once the caller gave up
            # The only reads of caller buffers: one copy of each payload behind its header's room,
            # checksummed as it is copied (one pass over memory).
            for pos in new:
                i = idx[pos]
                n = srcs[i].nbytes
                payload = arena[off + heads[i] : off + heads[i] + n]
                checksum = copy_with_checksum(payload, np.frombuffer(srcs[i], dtype=np.uint8))
                head = encode_header(keys[i], payload, checksum=checksum)
                arena[off : off + heads[i]] = np.frombuffer(head, dtype=np.uint8)
                spans.append((pos, off, heads[i] + n))
                off += heads[i] + n
        base = arena.ctypes.data
        codes = store.batch_put_from(
            [names[idx[pos]] for pos, _, _ in spans],
            [base + o for _, o, _ in spans],
            [t for _, _, t in spans],
            self._config,
        )
        for (pos, _o, _t), code in zip(spans, codes, strict=True):
            if code == OK:
                results[pos] = STORED
            elif code == OBJECT_ALREADY_EXISTS:
                results[pos] = EXISTS
            elif code == NO_AVAILABLE_HANDLE:
                results[pos] = rejected("capacity")
            elif code in _BUSY_CODES:
                results[pos] = rejected("busy")  # another client is writing this key right now
            else:
                raise mooncake_error(code, f"batch_put_from on {self.master_address}")
        return results

    async def _delete(self, keys: list[CacheKey]) -> None:
        names = [self.object_name(k) for k in keys]

        def run(gate: WorkerGate) -> None:
            # force: an object read within its lease period would otherwise refuse (OBJECT_HAS_LEASE).
            codes = self._store.batch_remove(names, force=True)
            for name, code in zip(names, codes, strict=True):
                if code not in (OK, OBJECT_NOT_FOUND):
                    raise mooncake_error(code, f"removing {name}")

        await self._call(run, what="batch_remove")


def _close_store(store: Any, staging: np.ndarray | None) -> None:
    if staging is not None:
        with contextlib.suppress(Exception):
            store.unregister_buffer(staging.ctypes.data)
    store.close()
