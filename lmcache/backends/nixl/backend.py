"""``nixl://host:port``: values in a peer's NIXL-registered DRAM pool, moved by one-sided NIXL transfers.

A peer process (``python -m lmcache.backends.nixl.peer --port P --capacity 8GiB``, see
:mod:`lmcache.backends.nixl.peer`) holds a NIXL-registered DRAM pool and the index. This backend
talks to it over a small TCP control protocol (:mod:`lmcache.backends.nixl.wire`: reserve,
commit, lookup, release, contains, delete, list) and moves the bytes itself with one-sided NIXL
transfers over UCX: a put WRITEs the frame header (from a per-batch buffer) and the caller's
source buffer straight into the reserved pool extent, a get READs the header and the payload
straight into the caller's destination buffer. The caller's buffers are registered with NIXL
for the duration of one batch (one registration call per batch), unless they lie in memory
declared once with :meth:`~lmcache.backends.base.StorageBackend.register_host_memory` (the
engine's chunk pool, the benchmark's arrays); frame headers go into slabs of one registered
arena. So no value is copied on the host. Values are :mod:`lmcache.serde.frame` frames; the
reading client verifies the key, lengths and checksum, so a damaged value is a counted miss (and
is deleted on the peer, so it can be stored again). Like every large-value read that lands
straight in ``dst``, the ``dst`` of a corrupt value is unspecified.

A lookup takes a *lease* on each hit, released after the READ, so the peer never reuses the
bytes of a value that is being read even if it is deleted meanwhile; a reservation is invisible
to readers until its commit. A cancelled put aborts its reservations; a cancelled get waits for
its transfer (rule 3), then releases its leases. A lost control connection is re-established on
the next call (the peer frees what the old connection reserved or leased).

Which thread makes the NIXL calls of the data path, and where values are checksummed, is the
business of the lane picked at open (:mod:`lmcache.backends.nixl.lanes`); every other NIXL call
(agent creation, registration of long-lived memory, the peer's metadata) runs on the backend's
own bounded executor (``workers`` threads), never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import queue
import secrets
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode

import numpy as np

from lmcache.backends.base import (
    EXISTS,
    STORED,
    Capabilities,
    PutResult,
    StorageBackend,
    check_dst_size,
    parse_backend_url,
    rejected,
    run_blocking,
    settings_query,
    split_url,
)
from lmcache.backends.buffers import buffer_address
from lmcache.backends.nixl.lanes import CLane, Hit, Lane, PeerLink, open_lane
from lmcache.backends.nixl.posix import NixlPosixBackend
from lmcache.backends.nixl.sdk import import_nixl, make_agent, register
from lmcache.backends.nixl.wire import (
    FRAME_ALIGN,
    HIT,
    MAX_BATCH,
    RESERVED,
    U32,
    U64,
    Op,
    ProtocolError,
    Reader,
    Status,
    pack_key,
    pack_keys,
    pack_message,
    read_message,
)
from lmcache.config import setting
from lmcache.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde import frame

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["NixlBackend", "NixlSettings"]

logger = logging.getLogger(__name__)

#: Bytes of one slab of the registered arena that holds a batch's frame headers.
_HEADER_SLAB = 64 << 10


@dataclasses.dataclass(frozen=True)
class NixlSettings:
    """Options of ``nixl://host:port`` (URL query, ``LMCACHE_NIXL_<NAME>`` env, or keyword overrides)."""

    host: str = setting("", doc="Host of the peer's control port (the URL's host).")
    port: int = setting(0, doc="The peer's control port (the URL's port).", min=1, max=65535)
    timeout: float = setting(30.0, doc="Seconds to wait for a control reply or a transfer.", min=0.001)
    connect_timeout: float = setting(5.0, doc="Seconds to wait for the control connection.", min=0.001)
    workers: int = setting(4, doc="Threads of the backend's executor (NIXL calls and transfers).", min=1, max=256)
    progress_thread: bool = setting(
        False,
        doc="Run the NIXL agent's progress thread. Off: transfers progress while they are waited on, and a "
        "progress thread that polls all the time takes CPU the transfers need where cores are few "
        "(2 cores, UCX over TCP: ~3.0 -> ~3.8 GB/s puts). Turn it on where cores are plenty. Either way "
        "it sleeps until UCX has an event, so an idle agent takes no CPU.",
    )
    ucx_workers: int = setting(
        1,
        doc="UCX workers of the agent. 1: the agent runs one call at a time, so transfers the host CPU copies "
        "(UCX over CMA on one host, or TCP) run one after another, all made by one lane thread. More: transfers "
        "from different executor threads run in parallel (NIXL maps each thread to a worker by a hash of its id, "
        "so give a few more than workers). Same-host CMA, 2 cores, 4-8 workers: puts ~9-10 -> ~12-13.5 GB/s, gets "
        "~10-11.5 -> ~12-13.6; the raw SDK gains more (gets ~15 -> ~19-27 GB/s), as the checksums and control "
        "messages then take CPU and memory bandwidth from the copies. No effect on what a NIC moves.",
        min=1,
        max=64,
    )
    native_lane: str = setting(
        "auto",
        doc="With one UCX worker, make the data path's NIXL calls and checksums in native code (a C lane built "
        "on first use with the host's C compiler; see lmcache.backends.nixl.native) instead of a Python thread. "
        "auto: use it when it builds and loads, else the Python lane; on: fail to open without it; off: never.",
        choices=("auto", "on", "off"),
    )


class NixlBackend(StorageBackend):
    """Values in a NIXL peer's registered DRAM pool, moved by one-sided UCX transfers.

    Args:
        settings: Parsed options (``host`` and ``port`` are required).
    """

    schemes: ClassVar[tuple[str, ...]] = ("nixl",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False, shared=True, device_buffers=False, listing=True, integrity_checked=True, bounded=True
    )

    def __init__(self, settings: NixlSettings) -> None:
        super().__init__()
        if not settings.host or not settings.port:
            raise ConfigError("nixl://: a peer URL needs host and port, e.g. nixl://127.0.0.1:7400")
        if settings.native_lane == "on" and settings.ucx_workers > 1:
            raise ConfigError("nixl://: native_lane=on needs ucx_workers=1 (with more, executor threads copy)")
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._lane: Lane | None = None  # picked at open
        # The agent, the peer's agent and pool, and long-lived registrations, shared with the lane.
        self._link = PeerLink(timeout=settings.timeout)
        self._slabs: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)
        self._groups = itertools.count(1)
        self._conn_lock: asyncio.Lock | None = None
        self._connects = 0

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``nixl://host:port?…``, or a :class:`NixlPosixBackend` from ``nixl:///dir?backend=posix``.

        Raises:
            ConfigError: A malformed URL, an unknown option or a bad value.
        """
        parts = split_url(url)
        if not parts.netloc:
            query = parse_qsl(parts.query, keep_blank_values=True)
            backend = [v for k, v in query if k == "backend"]
            if backend and backend[-1].lower() == "posix":
                rest = urlencode([(k, v) for k, v in query if k != "backend"], quote_via=quote)
                return NixlPosixBackend.from_url(
                    f"nixl+posix://{parts.path}" + (f"?{rest}" if rest else ""), **overrides
                )  # type: ignore[return-value]
            raise ConfigError(
                f"nixl://: {url!r} names no peer; use nixl://host:port for a peer store or "
                "nixl+posix:///abs/dir (nixl:///abs/dir?backend=posix) for files"
            )
        if parts.path not in ("", "/") or parts.fragment or parts.username:
            raise ConfigError(f"nixl://: expected nixl://host:port?options, got {url!r}")
        location: dict[str, object] = {"host": parts.hostname or ""}
        if parts.port is not None:
            location["port"] = parts.port
        return cls(parse_backend_url(url, cls.schemes, NixlSettings, location, overrides, split=parts))

    @property
    def url(self) -> str:
        """``nixl://host:port`` plus every option that differs from its default."""
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        query = settings_query(s, skip=("host", "port"))
        return f"nixl://{host}:{s.port}" + (f"?{query}" if query else "")

    def make_agent(self, name: str) -> Any:
        """A new NIXL agent configured like this backend's own: UCX, ``progress_thread``, ``ucx_workers``.

        For the backend itself and for tools that move bytes to the same peer on the same terms
        (the raw baseline of ``lmcache bench backend``); the caller drops it when done. Blocks:
        call it off the event loop.

        Raises:
            MissingDependencyError: NIXL is not installed.
            BackendUnavailableError: NIXL could not create the agent or has no UCX plugin here.
        """
        s = self.settings
        return make_agent(name, ["UCX"], s.progress_thread, s.ucx_workers)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        import_nixl()  # a missing SDK is a MissingDependencyError before any thread starts
        self._conn_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="lmcache-nixl")
        try:
            name = f"lmcache-nixl-{os.getpid()}-{secrets.token_hex(4)}"
            s = self.settings
            self._link.agent = await run_blocking(self._executor, self.make_agent, name)
            self._lane = await run_blocking(
                self._executor, lambda: open_lane(self._link, ucx_workers=s.ucx_workers, native_lane=s.native_lane)
            )
            # Frame headers of concurrent batches go into slabs of one arena registered once.
            slabs = s.workers + 1
            arena = np.empty(slabs * _HEADER_SLAB, dtype=np.uint8)
            await self._register_host_memory(memoryview(arena))
            for i in range(slabs):
                self._slabs.put(arena[i * _HEADER_SLAB : (i + 1) * _HEADER_SLAB])
            await self._connect()
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        self._drop_connection(BackendUnavailableError("nixl://: the backend was closed"))
        executor, self._executor = self._executor, None
        lane, self._lane = self._lane, None
        link = self._link
        agent, link.agent = link.agent, None
        remote, link.remote = link.remote, None
        loop = asyncio.get_running_loop()
        if executor is not None:
            if agent is not None and remote is not None:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(executor, agent.remove_remote_agent, remote)
            await loop.run_in_executor(None, executor.shutdown, True)
        if lane is not None:  # every batch has ended with the executor
            await loop.run_in_executor(None, lane.close)

    # -- control connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        s = self.settings
        where = f"nixl://{s.host}:{s.port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), s.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailableError(f"{where}: cannot reach the peer's control port: {exc}") from None
        self._reader, self._writer = reader, writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader))
        body = await self._request(Op.HELLO, b"", connect=False)
        try:
            r = Reader(body)
            pool_addr, pool_len = r.u64(), r.u64()
            metadata = r.blob()
            r.end()
        except ProtocolError as exc:
            self._drop_connection(BackendUnavailableError(f"{where}: bad HELLO reply"))
            raise PermanentBackendError(f"{where}: the peer's HELLO reply is malformed: {exc}") from None
        agent, old = self._link.agent, self._link.remote

        def add_remote() -> str:
            if old is not None:
                with contextlib.suppress(Exception):
                    agent.remove_remote_agent(old)  # a restarted peer: its old metadata is stale
            try:
                name = agent.add_remote_agent(metadata)
            except Exception as exc:
                raise BackendUnavailableError(f"{where}: NIXL rejected the peer's metadata: {exc}") from None
            return name.decode() if isinstance(name, bytes) else str(name)

        self._link.remote = await run_blocking(self._executor, add_remote)
        self._link.pool_addr, self._link.pool_len = pool_addr, pool_len
        self._connects += 1
        logger.debug("%s: connected (pool of %d bytes, agent %s)", where, pool_len, self._link.remote)

    async def _ensure_connection(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        assert self._conn_lock is not None
        async with self._conn_lock:
            if self._writer is None or self._writer.is_closing():
                await self._connect()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        exc: BaseException = BackendUnavailableError(
            f"nixl://{self.settings.host}:{self.settings.port}: the control connection closed"
        )
        try:
            while True:
                op, req_id, body = await read_message(reader)
                fut = self._waiters.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((op, body))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolError as e:
            exc = PermanentBackendError(f"nixl://{self.settings.host}:{self.settings.port}: {e}")
        except asyncio.CancelledError:
            return
        finally:
            if self._reader is reader:
                self._drop_connection(exc)

    def _drop_connection(self, exc: BaseException) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if writer is not None:
            writer.close()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # the waiter may be gone (cancelled): never warn about it

    async def _request(self, op: int, body: bytes, *, connect: bool = True) -> bytes:
        if connect:
            await self._ensure_connection()
        writer = self._writer
        if writer is None:
            raise BackendUnavailableError(f"nixl://{self.settings.host}:{self.settings.port}: not connected")
        req_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiters[req_id] = fut
        try:
            writer.write(pack_message(op, req_id, body))
            await writer.drain()
            reply_op, reply = await asyncio.wait_for(fut, self.settings.timeout)
        except asyncio.TimeoutError:
            # A reply may still arrive later and would be matched to nothing: drop the connection
            # so the peer frees whatever this request held, and start clean on the next call.
            self._drop_connection(BackendTimeoutError("nixl://: a control request timed out"))
            raise BackendTimeoutError(
                f"nixl://{self.settings.host}:{self.settings.port}: no reply within {self.settings.timeout:g} s"
            ) from None
        except (ConnectionError, OSError) as exc:
            self._drop_connection(BackendUnavailableError(str(exc)))
            raise BackendUnavailableError(
                f"nixl://{self.settings.host}:{self.settings.port}: control connection failed: {exc}"
            ) from None
        finally:
            self._waiters.pop(req_id, None)
        if reply_op == Op.ERROR:
            raise PermanentBackendError(
                f"nixl://{self.settings.host}:{self.settings.port}: the peer refused a request: "
                f"{reply.decode('utf-8', 'replace')}"
            )
        return reply

    def _send_nowait(self, op: int, body: bytes) -> None:
        """Send a request whose reply nobody waits for (releases, aborts; safe in ``finally``)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(pack_message(op, 0, body))

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_blocking(self._executor, fn, *args)

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), MAX_BATCH):
            part = keys[i : i + MAX_BATCH]
            reply = await self._request(Op.CONTAINS, pack_keys([k.to_string().encode() for k in part]))
            if len(reply) != len(part):
                raise PermanentBackendError("nixl://: malformed CONTAINS reply")
            out.extend(b == 1 for b in reply)
        return out

    async def _delete(self, keys: list[CacheKey]) -> None:
        for i in range(0, len(keys), MAX_BATCH):
            await self._request(Op.DELETE, pack_keys([k.to_string().encode() for k in keys[i : i + MAX_BATCH]]))

    async def _ping(self) -> None:
        await self._request(Op.PING, b"")

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        r = Reader(await self._request(Op.LIST, b""))
        entries = [(r.key(), r.u64()) for _ in range(r.count())]
        r.end()
        for raw, size in entries:
            try:
                key = CacheKey.from_string(raw.decode())
            except Exception:  # a key another client stored in another format: not ours
                continue
            yield key, size

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key, _size in self._list_entries():
            yield key

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "peer": f"{self.settings.host}:{self.settings.port}",
            "connected": self._writer is not None,
            "pool_bytes": self._link.pool_len,
            "connects": self._connects,
            "native_lane": isinstance(self._lane, CLane),
        }

    async def peer_stats(self) -> dict[str, int]:
        """The peer's capacity, used bytes and entry count (one control round trip)."""
        capacity, used, entries = struct.unpack("<QQQ", await self._request(Op.STATS, b""))
        return {"capacity_bytes": capacity, "used_bytes": used, "entries": entries}

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(keys)
        for start in range(0, len(keys), MAX_BATCH):
            end = start + MAX_BATCH
            part = await self._put_part(keys[start:end], srcs[start:end])
            results[start:end] = part
        return results  # type: ignore[return-value]

    async def _put_part(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        raw = [k.to_string().encode() for k in keys]
        hlens = [frame.header_size(len(b), 0, FRAME_ALIGN) for b in raw]
        group = next(self._groups)
        body = (
            U64.pack(group)
            + U32.pack(len(keys))
            + b"".join(
                pack_key(b) + U64.pack(h + s.nbytes) + U32.pack(h) for b, h, s in zip(raw, hlens, srcs, strict=True)
            )
        )
        try:
            return await self._reserve_write_commit(group, keys=keys, srcs=srcs, hlens=hlens, body=body)
        except BaseException:
            # Cancelled or failed anywhere after the RESERVE was sent: abort the group. The peer
            # handles one connection's requests in order, so the abort follows the reservation;
            # aborting a group that reserved nothing, or was committed, changes nothing.
            self._send_nowait(Op.COMMIT, U64.pack(group) + b"\x00")
            raise

    async def _reserve_write_commit(
        self,
        group: int,
        *,
        keys: list[CacheKey],
        srcs: list[memoryview],
        hlens: list[int],
        body: bytes,
    ) -> list[PutResult]:
        reply = Reader(await self._request(Op.RESERVE, body))
        if reply.count() != len(keys):
            raise PermanentBackendError("nixl://: malformed RESERVE reply")
        results: list[PutResult] = []
        todo: list[int] = []
        offsets: list[int] = []
        for i in range(len(keys)):
            status, offset = reply.unpack(RESERVED)
            if status == Status.OK:
                todo.append(i)
                offsets.append(offset)
                results.append(STORED)
            elif status == Status.EXISTS:
                results.append(EXISTS)
            elif status == Status.TOO_LARGE:
                results.append(rejected("too_large"))
            else:
                results.append(rejected("capacity"))
        reply.end()
        if not todo:
            return results
        try:
            await self._call(
                self._write_values,
                [keys[i] for i in todo],
                [srcs[i] for i in todo],
                [hlens[i] for i in todo],
                offsets,
            )
            ok = 1
        except BackendError as exc:
            self.record_error("write", exc)
            ok = 0
            for i in todo:
                results[i] = rejected("error")
        # Not waited for: the peer handles a connection's messages in order, so every later
        # request of ours sees the commit, and a commit cannot fail on the peer's side. Waiting
        # only added a round trip per batch.
        writer = self._writer
        if writer is None or writer.is_closing():
            raise BackendUnavailableError(f"nixl://{self.settings.host}:{self.settings.port}: connection lost")
        writer.write(pack_message(Op.COMMIT, 0, U64.pack(group) + bytes([ok])))
        return results

    def _write_values(self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int]) -> None:
        """WRITE each value's header and payload (straight from its src) into its reserved extent, on the lane."""
        lane = self._lane
        if lane is None:
            raise BackendUnavailableError("nixl://: the backend was closed")
        with self._header_buffer(sum(hlens)) as headers:
            lane.write(keys, srcs, hlens, offsets, headers)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        results: list[int | None] = []
        for start in range(0, len(keys), MAX_BATCH):
            end = start + MAX_BATCH
            results.extend(await self._get_part(keys[start:end], dsts[start:end]))
        return results

    async def _get_part(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        reply = Reader(await self._request(Op.LOOKUP, pack_keys([k.to_string().encode() for k in keys])))
        if reply.count() != len(keys):
            raise PermanentBackendError("nixl://: malformed LOOKUP reply")
        hits: list[Hit] = []  # key, dst, offset, header, payload
        index: list[int] = []
        leases: list[int] = []
        for i in range(len(keys)):
            found, lease, offset, frame_len, hlen = reply.unpack(HIT)
            if found:
                leases.append(lease)
                index.append(i)
                hits.append((keys[i], dsts[i], offset, hlen, frame_len - hlen))
        reply.end()
        results: list[int | None] = [None] * len(keys)
        if not hits:
            return results
        try:
            for key, dst, _off, _h, n in hits:
                check_dst_size(key, dst, n)  # raises before any byte moves
            outcomes = await self._call(self._read_values, hits)
        finally:
            self._send_nowait(Op.RELEASE, U32.pack(len(leases)) + b"".join(U64.pack(x) for x in leases))
        corrupt: list[CacheKey] = []
        for i, (key, *_), outcome in zip(index, hits, outcomes, strict=True):
            if isinstance(outcome, IntegrityError):
                self.record_corrupt(key, outcome)
                corrupt.append(key)
            else:
                results[i] = outcome
        if corrupt:
            # Like file://, drop a damaged value so that a later put can store it again.
            self._send_nowait(Op.DELETE, pack_keys([k.to_string().encode() for k in corrupt]))
        return results

    def _read_values(self, hits: list[Hit]) -> list[int | IntegrityError]:
        """READ each hit's header and payload (payload straight into its dst) on the lane, then verify it."""
        lane = self._lane
        if lane is None:
            raise BackendUnavailableError("nixl://: the backend was closed")
        with self._header_buffer(sum(h for *_, h, _n in hits)) as headers:
            return lane.read(hits, headers)

    # -- long-lived memory ----------------------------------------------------------------------

    def _nixl_thread(self) -> ThreadPoolExecutor | None:
        lane = self._lane
        return (lane.thread if lane is not None else None) or self._executor

    async def _register_host_memory(self, view: memoryview) -> None:
        addr, nbytes = buffer_address(view), view.nbytes
        link = self._link
        reg = await run_blocking(self._nixl_thread(), register, link.agent, [(addr, nbytes, 0)], "DRAM")
        link.host_regs = (*link.host_regs, (addr, addr + nbytes, reg))  # replaced whole: batch threads read it

    async def _unregister_host_memory(self, view: memoryview) -> None:
        addr, end = buffer_address(view), buffer_address(view) + view.nbytes
        link = self._link
        for entry in link.host_regs:
            if entry[0] == addr and entry[1] == end:
                link.host_regs = tuple(e for e in link.host_regs if e is not entry)
                # On the Python lane, this follows every transfer already queued.
                await run_blocking(self._nixl_thread(), link.agent.deregister_memory, entry[2])
                return

    @contextlib.contextmanager
    def _header_buffer(self, nbytes: int) -> Iterator[np.ndarray]:
        """A buffer for ``nbytes`` of a batch's frame headers, held until every transfer is done.

        A free registered slab when one is big enough; otherwise a new array, which the batch
        registers with its other buffers.
        """
        slab: np.ndarray | None = None
        if nbytes <= _HEADER_SLAB:
            with contextlib.suppress(queue.Empty):
                slab = self._slabs.get_nowait()
        try:
            yield np.empty(max(nbytes, 1), dtype=np.uint8) if slab is None else slab[: max(nbytes, 1)]
        finally:
            if slab is not None:
                self._slabs.put(slab)
