"""``lmcache server``: an engine-independent cache daemon that owns a TieredBackend.

The daemon builds one :class:`~lmcache.tiered.TieredBackend` from the config (``--tier URL``
repeated, or the ``tiers`` of an :class:`~lmcache.config.LMCacheConfig` YAML file) and serves it

* to lm:// clients over the binary protocol of :mod:`lmcache.server.protocol`, on TCP
  (``--host/--port``) and on a Unix socket (``--unix-socket``), with a shared-memory fast path
  for same-host clients (:mod:`lmcache.server.shm`), and
* to operators over HTTP (``--http-port``): health, lookup, pin/unpin, clear, move, stats and
  Prometheus ``/metrics`` (:mod:`lmcache.server.http`).

One connection is one session, served by one task that reads a request, runs it against the
tiered backend and writes the reply, in order (clients pipeline many requests per connection
and use several connections for parallelism). A session owns only per-connection state: its
staging buffer and its mapping of the client's shared-memory segment. Both go when the
connection closes, however the client died, so a killed client leaks nothing (see
:mod:`lmcache.server.shm`).

Misbehaving clients: a frame with a bad magic, version, opcode or an over-limit length, a first
message that is not ``HELLO``, or a wrong token gets an error reply and the connection is
closed; malformed meta in a well-framed request gets an error reply and the session goes on.
Either way other sessions are not affected.

Auth and resource bounds (what a client that is not trusted can cost the server):

* Auth is on by default: with no token configured the server generates one and writes it to a
  private file that same-user clients read (:mod:`lmcache.server.auth`); ``--no-auth`` turns
  it off (with a warning).
* Before ``HELLO`` is accepted, frames are capped at :data:`~lmcache.server.protocol.HELLO_MAX_BYTES`
  (meta and data) and the whole first frame must arrive within ``hello_timeout``: nothing sized
  by the client is allocated before auth.
* Every read has a deadline: a frame that stalls mid-way (no byte for ``read_timeout``) cuts the
  connection, and an authenticated session idle for ``idle_timeout`` is closed. Replies too: a
  client that reads nothing of a reply for ``read_timeout`` is cut (it would otherwise hold its
  staging buffer, its leases and its session forever).
* Sessions stage socket values in buffers drawn from one server-wide :class:`StagingBudget`:
  when it is spent a request waits up to ``staging_wait`` and then gets a ``busy`` error (one
  larger than the whole budget gets ``too_large`` at once), instead of allocating more.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcache.backends.base import PutResult, StorageBackend
from lmcache.config import LMCacheConfig, env_layer, parse_duration, parse_size, resolve_settings, setting
from lmcache.errors import ConfigError, InvalidArgumentError, InvalidBufferError, LMCacheError
from lmcache.keys import CacheKey
from lmcache.pool import InPlaceTier, Lease, Reservation, SharedPoolInfo
from lmcache.server import auth as A
from lmcache.server import protocol as P
from lmcache.server.shm import Segment, attach_segment, pid_alive, shm_available, sweep_stale
from lmcache.tiered import TieredBackend

if TYPE_CHECKING:
    from lmcache.server.metrics import ServerMetrics

__all__ = ["CacheServer", "ServerSettings", "StagingBudget", "add_server_arguments", "run_server_cli"]

logger = logging.getLogger(__name__)

#: Tier-0 blocks one session may hold leased at once; beyond it a shm GET copies into the
#: client's segment instead.
MAX_LEASES = 65536


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Settings of ``lmcache server`` (CLI flags, or ``LMCACHE_SERVER_<FIELD>`` env)."""

    host: str = setting("127.0.0.1", doc="TCP address to listen on (empty: no TCP listener).")
    port: int = setting(P.DEFAULT_PORT, doc="TCP port (0: any free port, see ready_file).", min=0, max=65535)
    unix_socket: str | None = setting(None, doc="Path of a Unix socket to listen on as well.")
    http_host: str = setting("127.0.0.1", doc="Address of the HTTP control API and /metrics.")
    http_port: int | None = setting(None, doc="Port of the HTTP control API (None: disabled; 0: any).", min=0)
    token: str | None = setting(
        None,
        doc="Shared secret clients must send in HELLO / as a Bearer token (None: generate one at start).",
        secret=True,
    )
    auth: bool = setting(True, doc="Require the token in HELLO (False: --no-auth; HTTP mutations still need it).")
    max_frame_bytes: int = setting(
        P.DEFAULT_MAX_FRAME_BYTES, doc="Largest data section of one frame.", parse=parse_size, min=1 << 16
    )
    max_meta_bytes: int = setting(P.DEFAULT_MAX_META_BYTES, doc="Largest meta section.", parse=parse_size, min=4096)
    shm: bool = setting(True, doc="Offer the shared-memory fast path to same-host clients.")
    shm_max_bytes: int = setting(4 << 30, doc="Largest client segment the server maps.", parse=parse_size, min=1)
    hello_timeout: float = setting(
        10.0, doc="Seconds a new connection has to send its whole HELLO frame.", parse=parse_duration, min=0.001
    )
    read_timeout: float = setting(
        30.0,
        doc="Seconds a frame may stall mid-way (no byte received, or a reply not read) before the connection is cut.",
        parse=parse_duration,
        min=0.001,
    )
    idle_timeout: float = setting(
        300.0,
        doc="Seconds an authenticated session may send nothing before it is closed (0: never).",
        parse=parse_duration,
    )
    staging_budget: int = setting(
        128 << 20, doc="Bytes of socket staging buffers all sessions together may hold.", parse=parse_size, min=1 << 16
    )
    staging_wait: float = setting(
        10.0, doc="Seconds a request waits for staging room before a busy error.", parse=parse_duration
    )
    sweep_interval: float = setting(
        30.0, doc="Seconds between sweeps of stale segment names.", parse=parse_duration, min=0.1
    )
    ready_file: str | None = setting(None, doc="Write a JSON file with the bound addresses once serving.")
    ack: str = setting(
        "memory",
        doc="When a put is answered: memory (in tier 0) or durable (on the last persistent tier).",
        choices=("memory", "durable"),
    )
    ack_timeout: float = setting(
        20.0, doc="Seconds an ack=durable put waits for its values to persist.", parse=parse_duration, min=0.001
    )
    exit_when_idle: float = setting(
        0.0,
        doc="Seconds with no session and no live client process (Unix socket peers) before the server "
        "stops itself (0: never).",
        parse=parse_duration,
        min=0,
    )


@dataclasses.dataclass
class ServerCounters:
    """Server-wide counters (``STATS`` reply, ``/stats``)."""

    sessions_opened: int = 0
    sessions_closed: int = 0
    requests: int = 0
    protocol_errors: int = 0
    auth_failures: int = 0
    timeouts: int = 0  # connections cut by hello_timeout, read_timeout or idle_timeout
    staging_refused: int = 0  # requests answered busy / too_large by the staging budget
    bad_requests: int = 0
    shm_attached: int = 0
    shm_released: int = 0
    not_durable: int = 0  # ack=durable puts rejected because their values did not persist in time


class _Disconnect(Exception):
    """The peer went away (EOF or reset)."""


class _Stalled(Exception):
    """No byte arrived within the deadline of the read in progress."""


class _SendStalled(_Disconnect):
    """The peer stopped reading a reply for ``read_timeout``: the connection was shut down."""


class _StagingRefused(Exception):
    """The staging budget cannot give a request its buffer: ``kind`` is ``busy`` or ``too_large``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class StagingBudget:
    """One server-wide bound on the bytes of all sessions' staging buffers.

    Sessions take bytes before they allocate a buffer and give them back when they drop it.
    Waiters are served first come, first served; a session gives back what it holds before it
    waits for more, so sessions never hold some while waiting (no deadlock).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def contended(self) -> bool:
        """Whether some session waits for room (holders should give back idle buffers)."""
        return bool(self._waiters)

    async def acquire(self, n: int, wait: float) -> None:
        """Take ``n`` bytes, waiting up to ``wait`` seconds for room.

        Raises:
            _StagingRefused: ``too_large`` when ``n`` exceeds the whole budget, ``busy`` when
                no room came within ``wait``.
        """
        if n > self.limit:
            raise _StagingRefused(
                "too_large",
                f"a request needs {n} bytes of staging, more than the server's whole budget of {self.limit}",
            )
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(wait):
                await fut
        except BaseException as exc:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as the wait ended: give it back
            else:
                fut.cancel()
                self._wake()  # a large waiter leaving may unblock smaller ones behind it
            if isinstance(exc, TimeoutError):
                raise _StagingRefused(
                    "busy", f"the server's staging budget ({self.limit} bytes) stayed full for {wait}s"
                ) from None
            raise

    def release(self, n: int) -> None:
        """Give back ``n`` bytes and wake the waiters that now fit."""
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            if self.used + n > self.limit:
                return
            self._waiters.popleft()
            self.used += n
            fut.set_result(None)


class _Session:
    """One client connection."""

    def __init__(self, server: CacheServer, sock: socket.socket, peer: str, local: bool) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.local = local  # Unix socket or loopback: shared memory may work
        self.client = "?"
        self.segment: Segment | None = None
        self.leases: dict[int, list[Lease[CacheKey]]] = {}  # lease id -> leased tier-0 blocks
        self.sending: list[Lease[CacheKey]] = []  # blocks leased while a socket GET reply is being sent
        self.reservations: dict[int, list[Reservation[CacheKey]]] = {}  # shm puts into the pool
        self.leased = 0
        self._lease_ids = 0
        self._staging = bytearray(0)
        self._staged = 0  # bytes of the staging budget this session holds (its buffer's size)
        self._head = bytearray(P.HEADER_BYTES)

    # -- I/O -------------------------------------------------------------------------------

    async def _recv_into(self, view: memoryview, first: float | None = None) -> None:
        """Fill ``view``; each byte must come within ``read_timeout`` of the previous one.

        ``first``, when given, is the deadline for the first byte instead (``idle_timeout``
        while waiting for the next request; 0: none).

        Raises:
            _Disconnect: EOF.
            _Stalled: A deadline passed.
        """
        try:  # fast path: the bytes are there already (pipelined frames), no deadline needed
            n = self.sock.recv_into(view)
        except (BlockingIOError, InterruptedError):
            n = -1
        if n == 0 and view.nbytes:
            raise _Disconnect
        if n > 0:
            view = view[n:]
            first = None  # the frame has begun: the rest comes under read_timeout
        if not view.nbytes:
            return
        loop = asyncio.get_running_loop()
        step = self.server.settings.read_timeout
        try:
            async with asyncio.timeout(step if first is None else (first or None)) as deadline:
                while view.nbytes:
                    n = await loop.sock_recv_into(self.sock, view)
                    if n == 0:
                        raise _Disconnect
                    view = view[n:]
                    deadline.reschedule(loop.time() + step)
        except TimeoutError:
            raise _Stalled from None

    async def _send(self, op: int, rid: int, meta: dict[str, Any], data: Sequence[memoryview] = (), flags: int = 0):
        size = sum(d.nbytes for d in data)
        head = P.encode_frame_head(op, rid, P.encode_meta(meta), size, flags | P.FLAG_REPLY)
        try:
            # Bounded like reads: a client that stops reading would hold its staging buffer,
            # its leases and this task forever.
            await P.sock_sendv(self.sock, [head, *data], stall=self.server.settings.read_timeout)
        except TimeoutError:
            self.server.counters.timeouts += 1
            logger.warning("lm server: %s read no reply bytes for read_timeout; disconnecting", self.peer)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)  # half a frame was sent: the stream is lost
            raise _SendStalled from None

    async def _send_error(self, op: int, rid: int, kind: str, message: str) -> None:
        self.server.metrics.error("server", kind)
        with contextlib.suppress(OSError, _Disconnect):
            await self._send(op, rid, {"kind": kind, "message": message}, flags=P.FLAG_ERROR)

    async def _stage(self, n: int) -> memoryview:
        """A staging buffer of ``n`` bytes, drawn from the server-wide budget.

        The buffer is kept for the next request (no reallocation per request) unless other
        sessions wait for room (:meth:`_trim_staging`).

        Raises:
            _StagingRefused: No room within ``staging_wait``, or more than the whole budget.
        """
        if len(self._staging) < n:
            self._drop_staging()  # never hold budget while waiting for more
            await self.server.budget.acquire(n, self.server.settings.staging_wait)
            self._staging = bytearray(n)
            self._staged = n
        return memoryview(self._staging)[:n]

    def _drop_staging(self) -> None:
        if self._staged:
            self._staging = bytearray(0)
            self.server.budget.release(self._staged)
            self._staged = 0

    def _trim_staging(self) -> None:
        """Between requests: give the buffer back if another session is waiting for room."""
        if self._staged and self.server.budget.contended:
            self._drop_staging()

    # -- main loop -------------------------------------------------------------------------

    async def run(self) -> None:
        srv = self.server
        s = srv.settings
        try:
            if not await self._handshake():
                return
            while True:
                self._trim_staging()
                head = memoryview(self._head)
                try:
                    await self._recv_into(head, first=s.idle_timeout)
                except _Stalled:
                    # Idle (no byte of a next request) or stalled inside the 32-byte header.
                    srv.counters.timeouts += 1
                    logger.info("lm server: %s was idle for idle_timeout; closing the session", self.peer)
                    return
                try:
                    fh = P.parse_frame_head(head, s.max_meta_bytes, s.max_frame_bytes)
                except P.ProtocolError as exc:
                    srv.counters.protocol_errors += 1
                    logger.warning("lm server: %s sent a bad frame (%s); disconnecting", self.peer, exc)
                    await self._send_error(0, 0, "protocol", str(exc))
                    return
                meta_raw = bytearray(fh.meta_len)
                await self._recv_into(memoryview(meta_raw))
                if fh.flags & P.FLAG_SHM and fh.data_len:
                    srv.counters.protocol_errors += 1
                    await self._send_error(fh.op, fh.request_id, "protocol", "a shm frame carries no data")
                    return
                try:
                    if fh.op == P.Op.PUT and not fh.flags & P.FLAG_SHM and srv.pool is not None and fh.data_len:
                        await self._put_in_place(fh, meta_raw)
                        continue
                    data = await self._stage(fh.data_len)
                except _StagingRefused as exc:
                    # Nothing of the data was read yet: skip it (the stream stays in step), answer.
                    await self._refuse_staging(fh, exc)
                    continue
                if fh.data_len:
                    await self._recv_into(data)
                try:
                    meta = P.decode_meta(meta_raw)
                except P.ProtocolError as exc:
                    srv.counters.protocol_errors += 1
                    await self._send_error(fh.op, fh.request_id, "protocol", str(exc))
                    return
                if fh.op == P.Op.RELEASE:
                    leases = meta.get("leases")
                    for lease_id in leases if isinstance(leases, list) else []:
                        self.release(lease_id)
                    if not fh.flags & P.FLAG_NOREPLY:
                        await self._send(fh.op, fh.request_id, {})
                    continue
                if fh.op == P.Op.COMMIT and fh.flags & P.FLAG_NOREPLY:
                    self._commit_oneway(meta)
                    continue
                await self._dispatch(fh, meta, data)
        except _Stalled:
            srv.counters.timeouts += 1
            logger.warning("lm server: %s stalled mid-frame for read_timeout; disconnecting", self.peer)
            await self._send_error(0, 0, "timeout", f"a frame stalled for {s.read_timeout}s (read_timeout)")
        except (_Disconnect, ConnectionError, OSError):
            pass
        finally:
            self.close()

    async def _refuse_staging(self, fh: P.FrameHead, exc: _StagingRefused) -> None:
        """Answer a request the staging budget refused, after skipping its unread data."""
        srv = self.server
        srv.counters.staging_refused += 1
        logger.info("lm server: %s: %s", self.peer, exc)
        await self._drain(fh.data_len)
        if not fh.flags & P.FLAG_NOREPLY:
            await self._send_error(fh.op, fh.request_id, exc.kind, str(exc))

    async def _handshake(self) -> bool:
        """Read and check the HELLO; True when the session may go on.

        Nothing is allocated from a size the client chose: the frame may hold at most
        ``HELLO_MAX_BYTES`` of meta and of data, and all of it must arrive within
        ``hello_timeout``.
        """
        srv = self.server
        head = memoryview(self._head)
        fh: P.FrameHead | None = None
        error: tuple[str, str] | None = None
        try:
            async with asyncio.timeout(srv.settings.hello_timeout):
                await self._recv_into(head)
                try:
                    fh = P.parse_frame_head(head, P.HELLO_MAX_BYTES, P.HELLO_MAX_BYTES)
                except P.ProtocolError as exc:
                    error = ("protocol", f"{exc} (before HELLO)")
                if fh is not None and fh.op != P.Op.HELLO:
                    error = ("auth", "the first message must be HELLO")
                if error is None:
                    assert fh is not None
                    raw = bytearray(fh.meta_len + fh.data_len)  # at most 2 x HELLO_MAX_BYTES
                    await self._recv_into(memoryview(raw))
        except (TimeoutError, _Stalled):
            srv.counters.timeouts += 1
            logger.warning("lm server: %s sent no complete HELLO within hello_timeout; disconnecting", self.peer)
            await self._send_error(P.Op.HELLO, 0, "timeout", "no complete HELLO within hello_timeout")
            return False
        if error is not None:
            kind, message = error
            if kind == "auth":
                srv.counters.auth_failures += 1
            else:
                srv.counters.protocol_errors += 1
            logger.warning("lm server: %s: %s; disconnecting", self.peer, message)
            await self._send_error(fh.op if fh is not None else 0, fh.request_id if fh else 0, kind, message)
            return False
        assert fh is not None
        try:
            meta = P.decode_meta(raw[: fh.meta_len])
        except P.ProtocolError as exc:
            srv.counters.protocol_errors += 1
            await self._send_error(fh.op, fh.request_id, "protocol", str(exc))
            return False
        return await self._hello(fh, meta)

    def close(self) -> None:
        self.release_all()
        self._drop_staging()
        seg, self.segment = self.segment, None
        if seg is not None:
            seg.close()
            self.server.counters.shm_released += 1
        with contextlib.suppress(OSError):
            self.sock.close()

    def release(self, lease_id: object) -> None:
        entries = self.leases.pop(lease_id, None) if isinstance(lease_id, int) else None
        pool = self.server.pool
        if entries is None or pool is None:
            return
        self.leased -= len(entries)
        for e in entries:
            pool.release(e)

    def release_all(self) -> None:
        """Give back every lease and reservation of this session (the connection is closing)."""
        self._release_sending()
        pool = self.server.pool
        for rid in list(self.reservations):
            for res in self.reservations.pop(rid):
                if pool is not None:
                    pool.abort(res)
        for lease_id in list(self.leases):
            self.release(lease_id)

    async def _hello(self, fh: P.FrameHead, meta: dict[str, Any]) -> bool:
        srv = self.server
        token = srv.token
        sent = meta.get("token")
        if srv.settings.auth and not (isinstance(sent, str) and hmac.compare_digest(sent.encode(), token.encode())):
            srv.counters.auth_failures += 1
            logger.warning("lm server: %s sent a wrong or no token; disconnecting", self.peer)
            await self._send_error(fh.op, fh.request_id, "auth", "wrong or missing token")
            return False
        self.client = str(meta.get("client", "?"))[:200]
        reply: dict[str, Any] = {
            "server": "lmcache",
            "protocol": P.PROTOCOL_VERSION,
            "max_frame_bytes": srv.settings.max_frame_bytes,
            "max_meta_bytes": srv.settings.max_meta_bytes,
            "shm": False,
        }
        shm = meta.get("shm")
        if isinstance(shm, dict):
            if not (srv.settings.shm and self.local):
                reply["shm_error"] = "shared memory is off on this server or this client is not local"
            else:
                try:
                    self.segment = attach_segment(shm.get("name"), shm.get("size"), srv.settings.shm_max_bytes)
                    srv.counters.shm_attached += 1
                    reply["shm"] = True
                    info = srv.shared_pool
                    if info is not None:
                        # resident: every page is allocated (prefault), so a client may map
                        # them all up front instead of faulting them in one by one mid-copy.
                        reply["pool"] = {"name": info.name, "size": info.size, "resident": info.resident}
                except (InvalidArgumentError, OSError) as exc:
                    reply["shm_error"] = f"{type(exc).__name__}: {exc}"
        await self._send(P.Op.HELLO, fh.request_id, reply)
        return True

    # -- requests --------------------------------------------------------------------------

    def _keys(self, meta: dict[str, Any]) -> list[CacheKey]:
        raw = meta.get("keys")
        if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
            raise InvalidArgumentError("meta.keys must be a list of key strings")
        try:
            return [CacheKey.from_string(k) for k in raw]
        except (ValueError, LMCacheError) as exc:
            raise InvalidArgumentError(f"bad key: {exc}") from None

    def _spans(self, meta: dict[str, Any], n: int, total: int, name: str) -> list[tuple[int, int]]:
        raw = meta.get(name)
        if not isinstance(raw, list) or len(raw) != n:
            raise InvalidArgumentError(f"meta.{name} must be a list of {n} entries")
        out: list[tuple[int, int]] = []
        for item in raw:
            if not (isinstance(item, list) and len(item) == 2 and all(type(x) is int for x in item)):
                raise InvalidArgumentError(f"meta.{name} entries must be [offset, length]")
            off, length = item
            if off < 0 or length < 0 or off + length > total:
                raise InvalidArgumentError(f"span [{off}, {length}] lies outside the {total}-byte region")
            out.append((off, length))
        return out

    def _reserve(self, keys: list[CacheKey], meta: dict[str, Any]) -> dict[str, Any]:
        """First half of a shm put into the pool: reserve blocks the client fills itself."""
        pool = self.server.pool
        assert pool is not None
        sizes = meta.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(keys) or not all(type(x) is int and x >= 0 for x in sizes):
            raise InvalidArgumentError("meta.sizes must be a list of one non-negative int per key")
        states: list[str] = []
        offsets: list[int | None] = []
        held: list[Reservation[CacheKey]] = []
        for key, n in zip(keys, sizes, strict=True):
            res = pool.reserve(key, n)
            if isinstance(res, Reservation):
                states.append("reserved")
                offsets.append(res.offset)
                held.append(res)
            else:
                states.append(res.value)
                offsets.append(None)
        reply: dict[str, Any] = {"states": states, "offsets": offsets}
        if held:
            self._lease_ids += 1
            self.reservations[self._lease_ids] = held
            reply["reservation"] = self._lease_ids
        return reply

    def _commit(self, meta: dict[str, Any]) -> tuple[dict[str, Any], list[CacheKey], list[int]]:
        """Second half: publish the blocks the client filled (or drop them: ``abort``).

        Returns the reply, and the reservation's keys and sizes in the order of its results.
        """
        pool = self.server.pool
        rid = meta.get("reservation")
        held = self.reservations.pop(rid, None) if isinstance(rid, int) else None
        if held is None or pool is None:
            raise InvalidArgumentError(f"no open reservation {rid!r} on this connection")
        if meta.get("abort") is True:
            for res in held:
                pool.abort(res)
            return {"results": [["rejected", "aborted"]] * len(held)}, [], []
        t0 = time.perf_counter()
        results, stored_sizes = [], []
        for res in held:
            ok = pool.commit(res)  # tier 0's policy and write-back follow (TieredBackend.in_place)
            results.append(["stored", None] if ok else ["rejected", "error"])
            if ok:
                stored_sizes.append(res.nbytes)
        self.server.metrics.put(sum(stored_sizes))
        self.server.metrics.tier0_in_place("put", stored_sizes, time.perf_counter() - t0)
        return {"results": results}, [r.key for r in held], [r.nbytes for r in held]

    def _commit_oneway(self, meta: dict[str, Any]) -> None:
        """A COMMIT the client does not wait for (``FLAG_NOREPLY``): nothing is sent back."""
        srv = self.server
        srv.counters.requests += 1
        t0 = time.perf_counter()
        try:
            self._commit(meta)
        except InvalidArgumentError as exc:
            srv.counters.bad_requests += 1
            logger.warning("lm server: %s: a one-way COMMIT was refused: %s", self.peer, exc)
            return
        except Exception:  # a bug: log it and keep serving (there is nobody to answer)
            logger.exception("lm server: %s: a one-way COMMIT failed", self.peer)
            return
        srv.metrics.observe("commit", time.perf_counter() - t0)

    def _durable(self, meta: dict[str, Any]) -> bool:
        """Whether a put is answered only once persisted: the server's ``ack`` or the request's."""
        ack = meta.get("ack", "memory")
        if ack not in ("memory", "durable"):
            raise InvalidArgumentError(f"meta.ack must be 'memory' or 'durable', not {ack!r}")
        return ack == "durable" or self.server.settings.ack == "durable"

    async def _persist(self, keys: list[CacheKey], sizes: list[int], results: list[Any]) -> None:
        """``ack=durable``: wait until the stored values are on the last persistent tier.

        A value that does not get there within ``ack_timeout`` is reported ``rejected``
        (``not_durable``) in ``results`` (wire ``[status, reason]`` pairs, changed in place),
        although tier 0 still holds it: the client asked for more than that.
        """
        idx = [i for i, r in enumerate(results) if r[0] in ("stored", "exists")]
        if not idx:
            return
        held = await self.server.tiered.wait_persisted(
            [keys[i] for i in idx], [sizes[i] for i in idx], self.server.settings.ack_timeout
        )
        for i, ok in zip(idx, held, strict=True):
            if not ok:
                results[i] = ["rejected", "not_durable"]
                self.server.counters.not_durable += 1

    async def _put_in_place(self, fh: P.FrameHead, meta_raw: bytearray) -> None:
        """A socket PUT whose values are received straight into reserved tier-0 blocks.

        Values that cannot be reserved (tier 0 full, a put of the key in flight) are received
        into staging and stored through the tiered backend as usual (which evicts). A client
        that disconnects mid-frame leaves no reservation behind.
        """
        srv = self.server
        pool = srv.pool
        assert pool is not None
        srv.counters.requests += 1
        t0 = time.perf_counter()
        try:
            meta = P.decode_meta(meta_raw)
            keys = self._keys(meta)
            sizes = meta.get("sizes")
            if not isinstance(sizes, list) or len(sizes) != len(keys) or not all(type(x) is int for x in sizes):
                raise InvalidArgumentError("meta.sizes must be a list of one int per key")
            if any(x < 0 for x in sizes) or sum(sizes) != fh.data_len:
                raise InvalidArgumentError("meta.sizes do not add up to the data length")
            durable = self._durable(meta)
        except (P.ProtocolError, InvalidArgumentError) as exc:
            srv.counters.bad_requests += 1
            await self._drain(fh.data_len)  # keep the stream in step, then answer
            await self._send_error(fh.op, fh.request_id, "bad_request", str(exc))
            return
        slots: list[Reservation[CacheKey] | None] = []
        staged: list[int] = []
        try:
            for key, n in zip(keys, sizes, strict=True):
                res = pool.reserve(key, n)
                slots.append(res if isinstance(res, Reservation) else None)
            rest_bytes = sum(n for res, n in zip(slots, sizes, strict=True) if res is None)
            staging = await self._stage(rest_bytes)
            views: list[memoryview] = []
            off = 0
            for i, (res, n) in enumerate(zip(slots, sizes, strict=True)):
                if res is not None:
                    await self._recv_into(pool.view(res))
                else:
                    view = staging[off : off + n]
                    off += n
                    await self._recv_into(view)
                    staged.append(i)
                    views.append(view)
            results: list[Any] = [None] * len(keys)
            stored_sizes = []
            for i, res in enumerate(slots):
                if res is not None:
                    ok = pool.commit(res)  # tier 0's policy and write-back follow
                    results[i] = ["stored", None] if ok else ["rejected", "error"]
                    if ok:
                        stored_sizes.append(sizes[i])
        except BaseException:
            for res in slots:
                if res is not None:
                    pool.abort(res)  # a no-op for those already committed
            raise
        srv.metrics.tier0_in_place("put", stored_sizes, time.perf_counter() - t0)
        if staged:
            got = await srv.tiered.put([keys[i] for i in staged], views)
            for i, r in zip(staged, got, strict=True):
                results[i] = [r.status.value, r.reason]
        srv.metrics.put(sum(sizes[i] for i, r in enumerate(results) if r[0] != "rejected"))
        if durable:
            await self._persist(keys, sizes, results)
        srv.metrics.observe("put", time.perf_counter() - t0)
        await self._send(fh.op, fh.request_id, {"results": results})

    async def _drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
        while n > 0:
            chunk = min(n, scratch.nbytes)
            await self._recv_into(scratch[:chunk])
            n -= chunk

    async def _socket_get(self, keys: list[CacheKey], caps: list[int]) -> tuple[dict[str, Any], list[memoryview]]:
        """A socket GET whose tier-0 hits are sent from the pool in place (leased until sent)."""
        pool = self.server.pool
        assert pool is not None
        leased = pool.lease(keys)  # counted as tier-0 hits (TieredBackend.in_place)
        self.sending = [e for e in leased if e is not None]  # released once the reply is sent
        self.server.metrics.tier0_in_place("get", [e.nbytes for e in self.sending], 0.0)
        sizes: list[int | None] = [None] * len(keys)
        views: list[memoryview | None] = [None] * len(keys)
        for i, e in enumerate(leased):
            if e is not None:
                if e.nbytes > caps[i]:
                    raise InvalidBufferError(f"buffer too small for the {e.nbytes}-byte value of {keys[i]}")
                sizes[i], views[i] = e.nbytes, pool.view(e)
        rest = [i for i, e in enumerate(leased) if e is None]
        if rest:
            staging = await self._stage(sum(caps[i] for i in rest))
            dsts, off = [], 0
            for i in rest:
                dsts.append(staging[off : off + caps[i]])
                off += caps[i]
            got = await self.server.tiered.get_into([keys[i] for i in rest], dsts)
            for i, d, n in zip(rest, dsts, got, strict=True):
                if n is not None:
                    sizes[i], views[i] = n, d[:n]
        self.server.metrics.get(sizes, self.server.chunk_size)
        return {"sizes": sizes}, [v for v in views if v is not None]

    async def _leased_get(self, keys: list[CacheKey], dsts: list[memoryview]) -> dict[str, Any]:
        """A shm GET served from the shared tier-0 pool where it hits (one copy, by the client).

        Tier-0 hits are leased and answered with pool offsets; the rest is read through the
        tiered backend into the client's segment as usual (slower tiers, promotion).
        """
        pool = self.server.pool
        assert pool is not None
        # Leases count as tier-0 hits (TieredBackend.in_place); beyond MAX_LEASES, copy instead.
        leased = pool.lease(keys) if self.leased + len(keys) <= MAX_LEASES else [None] * len(keys)
        where: list[str | None] = [None] * len(keys)
        sizes: list[int | None] = [None] * len(keys)
        offsets: list[int | None] = [None] * len(keys)
        held = [e for e in leased if e is not None]
        self.server.metrics.tier0_in_place("get", [e.nbytes for e in held], 0.0)
        for i, e in enumerate(leased):
            if e is None:
                continue
            if e.nbytes > dsts[i].nbytes:
                for x in held:
                    pool.release(x)
                raise InvalidBufferError(f"buffer too small for the {e.nbytes}-byte value of {keys[i]}")
            where[i], sizes[i], offsets[i] = "pool", e.nbytes, e.offset
        rest = [i for i, e in enumerate(leased) if e is None]
        if rest:
            try:
                got = await self.server.tiered.get_into([keys[i] for i in rest], [dsts[i] for i in rest])
            except BaseException:
                for e in held:
                    pool.release(e)
                raise
            for i, n in zip(rest, got, strict=True):
                if n is not None:
                    where[i], sizes[i] = "seg", n
        self.server.metrics.get(sizes, self.server.chunk_size)
        reply: dict[str, Any] = {"sizes": sizes, "where": where, "offsets": offsets}
        if held:
            self._lease_ids += 1
            self.leases[self._lease_ids] = held
            self.leased += len(held)
            reply["lease"] = self._lease_ids
        return reply

    async def _dispatch(self, fh: P.FrameHead, meta: dict[str, Any], data: memoryview) -> None:
        srv = self.server
        srv.counters.requests += 1
        op = fh.op
        name = P.Op(op).name.lower()
        t0 = time.perf_counter()
        try:
            try:
                reply, out = await self._execute(op, fh.flags, meta, data)
            except InvalidBufferError as exc:
                srv.counters.bad_requests += 1
                await self._send_error(op, fh.request_id, "invalid_buffer", str(exc))
                return
            except _StagingRefused as exc:
                srv.counters.staging_refused += 1
                await self._send_error(op, fh.request_id, exc.kind, str(exc))
                return
            except InvalidArgumentError as exc:
                srv.counters.bad_requests += 1
                await self._send_error(op, fh.request_id, "bad_request", str(exc))
                return
            except LMCacheError as exc:
                await self._send_error(op, fh.request_id, "unavailable", f"{type(exc).__name__}: {exc}")
                return
            except (ConnectionError, OSError):
                raise
            except Exception as exc:  # a bug: answer, log, keep serving
                logger.exception("lm server: %s failed", name)
                await self._send_error(op, fh.request_id, "internal", f"{type(exc).__name__}: {exc}")
                return
            srv.metrics.observe(name, time.perf_counter() - t0)
            await self._send(op, fh.request_id, reply, out, flags=fh.flags & P.FLAG_SHM)
        finally:
            self._release_sending()  # blocks a socket GET sent in place (or failed part-way)

    def _release_sending(self) -> None:
        held, self.sending = self.sending, []
        pool = self.server.pool
        if pool is not None:
            for e in held:
                pool.release(e)

    async def _execute(
        self, op: int, flags: int, meta: dict[str, Any], data: memoryview
    ) -> tuple[dict[str, Any], list[memoryview]]:
        tiered = self.server.tiered
        metrics = self.server.metrics
        if op == P.Op.PING:
            await tiered.ping()
            return {}, []
        if op == P.Op.STATS:
            return {"stats": self.server.stats()}, []
        if op == P.Op.HELLO:
            raise InvalidArgumentError("HELLO was already sent on this connection")
        if op == P.Op.COMMIT:
            durable = self._durable(meta)  # checked before anything is published
            reply, committed, csizes = self._commit(meta)
            if durable:
                await self._persist(committed, csizes, reply["results"])
            return reply, []
        keys = self._keys(meta)
        if op == P.Op.CONTAINS:
            return {"found": await tiered.contains(keys)}, []
        if op == P.Op.LOOKUP_PREFIX:
            n = await tiered.lookup_prefix(keys)
            metrics.lookup(n, len(keys), self.server.chunk_size)
            return {"n": n}, []
        if op == P.Op.DELETE:
            await tiered.delete(keys)
            return {}, []
        shm = bool(flags & P.FLAG_SHM)
        if shm and self.segment is None:
            raise InvalidArgumentError("a shm request on a connection without a shared-memory segment")
        if op == P.Op.PUT and shm and meta.get("reserve") is True and self.server.shared_pool is not None:
            return self._reserve(keys, meta), []
        if op == P.Op.PUT:
            durable = self._durable(meta)
            if shm:
                assert self.segment is not None
                spans = self._spans(meta, len(keys), self.segment.size, "spans")
                views = [self.segment.view[o : o + n] for o, n in spans]
            else:
                sizes = meta.get("sizes")
                if not isinstance(sizes, list) or len(sizes) != len(keys) or not all(type(x) is int for x in sizes):
                    raise InvalidArgumentError("meta.sizes must be a list of one int per key")
                if any(x < 0 for x in sizes) or sum(sizes) != data.nbytes:
                    raise InvalidArgumentError("meta.sizes do not add up to the data length")
                views, off = [], 0
                for n in sizes:
                    views.append(data[off : off + n])
                    off += n
            results: list[PutResult] = await tiered.put(keys, views)
            metrics.put(sum(v.nbytes for v, r in zip(views, results, strict=True) if r.ok))
            wire: list[Any] = [[r.status.value, r.reason] for r in results]
            if durable:
                await self._persist(keys, [v.nbytes for v in views], wire)
            return {"results": wire}, []
        if op == P.Op.GET:
            if shm:
                assert self.segment is not None
                spans = self._spans(meta, len(keys), self.segment.size, "spans")
                dsts = [self.segment.view[o : o + n] for o, n in spans]
            else:
                caps = meta.get("caps")
                if not isinstance(caps, list) or len(caps) != len(keys) or not all(type(x) is int for x in caps):
                    raise InvalidArgumentError("meta.caps must be a list of one int per key")
                if any(x < 0 for x in caps) or sum(caps) > self.server.settings.max_frame_bytes:
                    raise InvalidArgumentError("meta.caps exceed the max frame size")
                if self.server.pool is not None:
                    return await self._socket_get(keys, caps)
                staging = await self._stage(sum(caps))
                dsts, off = [], 0
                for n in caps:
                    dsts.append(staging[off : off + n])
                    off += n
            if shm and meta.get("lease") is True and self.server.shared_pool is not None:
                return await self._leased_get(keys, dsts), []
            sizes = await tiered.get_into(keys, dsts)
            metrics.get(sizes, self.server.chunk_size)
            out = [] if shm else [d[:n] for d, n in zip(dsts, sizes, strict=True) if n is not None]
            return {"sizes": sizes}, out
        raise InvalidArgumentError(f"opcode {op} is not a request")


class CacheServer:
    """The daemon: listeners, sessions, the tiered backend, the HTTP control API.

    Args:
        tiered: The backend to serve (owned: closed by :meth:`stop`).
        settings: Listener and protocol settings.
        chunk_size: Tokens per chunk (to report hits in tokens and to hash ``/lookup`` tokens).
        hash_seed: The chunk-hash seed (``/lookup`` by tokens).
    """

    def __init__(
        self,
        tiered: TieredBackend,
        settings: ServerSettings,
        *,
        chunk_size: int = 256,
        hash_seed: str = "lmcache-v1",
        metrics: ServerMetrics | None = None,
    ) -> None:
        from lmcache.server.metrics import ServerMetrics

        self.tiered = tiered
        self.settings = settings
        # Tier 0 in place (when it offers it): socket puts are received into it and hits sent
        # from it; commits and leases do the stack's bookkeeping themselves.
        self.pool: InPlaceTier | None = tiered.in_place()
        self.chunk_size = chunk_size
        self.hash_seed = hash_seed
        self.counters = ServerCounters()
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.bind(self)
        self.sessions: set[_Session] = set()
        #: Processes that connected over the Unix socket (SO_PEERCRED), for ``exit_when_idle``.
        self._client_pids: set[int] = set()
        self._listeners: list[socket.socket] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: Any = None
        self.addresses: dict[str, Any] = {}
        self._stopped = asyncio.Event()
        self.budget = StagingBudget(settings.staging_budget)
        # The HTTP control API's mutating endpoints always need a token, even under --no-auth:
        # without a configured one the server makes its own and leaves it where same-user
        # clients find it (lmcache.server.auth).
        self.token: str = settings.token if settings.token is not None else A.generate_token()
        self._token_files: list[Path] = []

    @property
    def shared_pool(self) -> SharedPoolInfo | None:
        """Tier 0's pool in ``/dev/shm``, which shm clients map, when there is one."""
        return self.pool.shared_pool if self.pool is not None else None

    def stats(self) -> dict[str, Any]:
        """Server counters, live sessions and shared memory, and the tiered backend's stats."""
        server: dict[str, Any] = dataclasses.asdict(self.counters)
        server["sessions"] = len(self.sessions)
        server["shm_segments"] = sum(1 for s in self.sessions if s.segment is not None)
        server["shm_bytes_mapped"] = sum(s.segment.size for s in self.sessions if s.segment is not None)
        server["pinned_keys"] = len(self.tiered.admin().pinned())
        server["leases"] = sum(s.leased for s in self.sessions)
        server["reservations"] = sum(len(r) for s in self.sessions for r in s.reservations.values())
        server["staging_bytes"] = self.budget.used
        server["staging_budget"] = self.budget.limit
        return {"server": server, "backend": self.tiered.stats()}

    async def start(self) -> None:
        """Open the backend, bind every listener and start serving."""
        s = self.settings
        await self.tiered.open()
        if s.shm and shm_available():
            sweep_stale()
        if s.host:
            lsock = socket.create_server((s.host, s.port), reuse_port=False)
            lsock.setblocking(False)
            self._listeners.append(lsock)
            self.addresses["tcp"] = [s.host, lsock.getsockname()[1]]
            self._spawn(self._accept(lsock, tcp=True))
        if s.unix_socket:
            usock = _bind_unix(s.unix_socket)
            self._listeners.append(usock)
            self.addresses["unix"] = s.unix_socket
            self._spawn(self._accept(usock, tcp=False))
        if not self._listeners:
            raise ConfigError("lmcache server: neither a TCP host nor a Unix socket to listen on")
        if s.http_port is not None:
            from lmcache.server.http import start_http

            self._http, port = await start_http(self, s.http_host, s.http_port)
            self.addresses["http"] = [s.http_host, port]
        if s.shm:
            self._spawn(self._sweeper())
        self._publish_token()
        self.addresses["pid"] = os.getpid()
        if s.ready_file:
            _write_atomically(s.ready_file, json.dumps(self.addresses))
        logger.info("lm server: serving %s on %s", self.tiered, self.addresses)
        if s.ack == "durable" and not any(t.capabilities.persistent for t in self.tiered.tiers):
            logger.warning("lm server: --ack durable, but no tier is persistent: a put is durable once in memory")

    def _publish_token(self) -> None:
        """Write a generated token where same-user clients look for it (before ``ready_file``)."""
        s = self.settings
        if not s.auth:
            logger.warning(
                "lm server: --no-auth: any local user (and anyone who can reach %s) can read, write and clear "
                "this cache over lm://; the HTTP control API still needs the token for pin/unpin/clear/move",
                s.host or "the Unix socket",
            )
        if s.token is not None:
            return  # configured: its owner hands it out (--token-file / LMCACHE_SERVER_TOKEN)
        paths: list[Path] = []
        if "tcp" in self.addresses:
            paths.append(A.tcp_token_path(self.addresses["tcp"][1]))
        if "http" in self.addresses:
            paths.append(A.tcp_token_path(self.addresses["http"][1]))
        if "unix" in self.addresses:
            paths.append(A.unix_token_path(self.addresses["unix"]))
        for path in paths:
            A.write_token_file(path, self.token)
            self._token_files.append(path)
        logger.info("lm server: auth token generated; same-user clients read it from %s", ", ".join(map(str, paths)))

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _accept(self, lsock: socket.socket, *, tcp: bool) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(lsock)
            except OSError as exc:
                if lsock.fileno() < 0:
                    return
                logger.warning("lm server: accept failed: %s", exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            if tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                host = addr[0]
                local = host in ("127.0.0.1", "::1") or host.startswith("127.")
                peer = f"{host}:{addr[1]}"
            else:
                local, peer = True, "unix"
                if self.settings.exit_when_idle:
                    self._client_pids.add(_peer_pid(conn))
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            session = _Session(self, conn, peer, local)
            self.sessions.add(session)
            self.counters.sessions_opened += 1
            self._spawn(self._serve(session))

    async def _serve(self, session: _Session) -> None:
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.counters.sessions_closed += 1

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            sweep_stale()

    async def stop(self) -> None:
        """Stop listening, close every session, flush and close the backend."""
        for lsock in self._listeners:
            with contextlib.suppress(OSError):
                lsock.close()
        for session in list(self.sessions):
            session.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.cleanup()
        if self.settings.unix_socket:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.unix_socket)
        await self.tiered.aclose()
        for path in self._token_files:
            A.remove_token_file(path, self.token)
        if self.settings.ready_file:
            with contextlib.suppress(OSError):
                os.unlink(self.settings.ready_file)
        self._stopped.set()

    async def serve_until_signalled(self) -> None:
        """Start, then serve until SIGTERM or SIGINT, then stop."""
        await self.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        if self.settings.exit_when_idle:
            self._spawn(self._exit_when_idle(done))
        try:
            await done.wait()
        finally:
            await self.stop()

    async def _exit_when_idle(self, done: asyncio.Event) -> None:
        """Set ``done`` once no session is open and no client process has lived for ``exit_when_idle``.

        A client process that is alive but between sessions (its idle session was closed, it
        reconnects on its next call) keeps the server up; so does one that restarts within the limit.
        """
        limit = self.settings.exit_when_idle
        idle_since = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(min(limit / 4, 5.0))
            self._client_pids = {pid for pid in self._client_pids if pid > 0 and pid_alive(pid)}
            if self.sessions or self._client_pids:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= limit:
                logger.info("lm server: no client for %ss (exit_when_idle); stopping", limit)
                done.set()


def _peer_pid(conn: socket.socket) -> int:
    """The process id at the other end of a Unix socket (0 when the platform does not say)."""
    try:
        pid, _, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except (OSError, AttributeError, struct.error):
        return 0
    return int(pid)


def _bind_unix(path: str) -> socket.socket:
    if Path(path).is_socket():
        os.unlink(path)  # a stale socket left by a server that was killed
    usock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    usock.bind(path)
    os.chmod(path, 0o600)  # same-user clients only: the socket is the first line of access control
    usock.listen(128)
    usock.setblocking(False)
    return usock


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# CLI


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lmcache server``."""
    from lmcache.backends.registry import TIER_URL_HELP

    p.add_argument("--tier", action="append", default=None, metavar="URL", help=TIER_URL_HELP)
    p.add_argument("--config", default=None, metavar="YAML", help="an lmcache config file (tiers, eviction policy…)")
    p.add_argument("--host", default=None, help="TCP address (default 127.0.0.1; '' for none)")
    p.add_argument("--port", type=int, default=None, help=f"TCP port (default {P.DEFAULT_PORT}; 0: any)")
    p.add_argument("--unix-socket", default=None, metavar="PATH", help="also listen on this Unix socket")
    p.add_argument("--http-host", default=None, help="HTTP control API address (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=None, help="HTTP control API + /metrics port (0: any)")
    p.add_argument(
        "--token-file",
        default=None,
        help="file holding the auth token (or LMCACHE_SERVER_TOKEN); default: a random token, written where "
        "same-user clients find it ($XDG_RUNTIME_DIR/lmcache/<port>.token, <unix-socket>.token)",
    )
    p.add_argument(
        "--no-auth",
        action="store_true",
        help="let any client in without a token (logs a warning; HTTP pin/unpin/clear/move still need it)",
    )
    p.add_argument("--hello-timeout", default=None, help="seconds a new connection has to send HELLO (default 10)")
    p.add_argument("--read-timeout", default=None, help="seconds a frame may stall mid-way (default 30)")
    p.add_argument(
        "--idle-timeout", default=None, help="seconds before an idle session is closed (default 300; 0: never)"
    )
    p.add_argument("--staging-budget", default=None, help="bytes of socket staging for all sessions (default 128MiB)")
    p.add_argument("--staging-wait", default=None, help="seconds a request waits for staging room (default 10)")
    p.add_argument("--max-frame-size", default=None, help="largest frame data section (e.g. 512MiB)")
    p.add_argument("--no-shm", action="store_true", help="do not offer the shared-memory fast path")
    p.add_argument("--ready-file", default=None, help="write the bound addresses (JSON) here once serving")
    p.add_argument(
        "--ack",
        default=None,
        choices=("memory", "durable"),
        help="answer a put once it is in tier 0 (memory, the default) or on the last persistent tier (durable)",
    )
    p.add_argument("--ack-timeout", default=None, help="seconds a durable put waits to persist (default 20)")
    p.add_argument(
        "--exit-when-idle",
        default=None,
        metavar="S",
        help="stop once no session is open and no Unix-socket client process has lived for S seconds "
        "(default 0: never; the server vLLM's `server: auto` starts uses 600)",
    )


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Server settings: defaults < ``LMCACHE_SERVER_*`` env < command-line flags."""
    flags: dict[str, Any] = {}
    for name, attr in (
        ("host", "host"),
        ("port", "port"),
        ("unix_socket", "unix_socket"),
        ("http_host", "http_host"),
        ("http_port", "http_port"),
        ("max_frame_bytes", "max_frame_size"),
        ("hello_timeout", "hello_timeout"),
        ("read_timeout", "read_timeout"),
        ("idle_timeout", "idle_timeout"),
        ("staging_budget", "staging_budget"),
        ("staging_wait", "staging_wait"),
        ("ready_file", "ready_file"),
        ("ack", "ack"),
        ("ack_timeout", "ack_timeout"),
        ("exit_when_idle", "exit_when_idle"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            flags[name] = value
    if getattr(args, "no_shm", False):
        flags["shm"] = False
    if getattr(args, "no_auth", False):
        flags["auth"] = False
    if getattr(args, "token_file", None):
        try:
            flags["token"] = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    layers = [("environment", env_layer("LMCACHE_SERVER_", ServerSettings)), ("command line", flags)]
    return resolve_settings(ServerSettings, layers, owner="lmcache server", strict=("command line",))


def build_server(args: argparse.Namespace) -> CacheServer:
    """The server described by parsed ``lmcache server`` flags (no I/O).

    Each tier is wrapped in a :class:`~lmcache.server.timed.TimedTier` so that latency and
    value sizes are measured per tier; the stack's settings come from the config exactly as
    :meth:`TieredBackend.from_config` reads them.
    """
    from lmcache.backends.memory import MemoryBackend
    from lmcache.backends.registry import open_backend
    from lmcache.server.metrics import ServerMetrics
    from lmcache.server.timed import TimedTier
    from lmcache.tiered import TieredSettings

    config = LMCacheConfig.load(args.config) if args.config else LMCacheConfig.load()
    if args.tier:
        from lmcache.backends.registry import warn_command_line_secrets

        for url in args.tier:
            warn_command_line_secrets(url, "--tier")  # other users see it in ps
        config = config.replace(tiers=list(args.tier))
    settings = settings_from_args(args)  # validate flags before building anything
    layers = [
        ("environment", env_layer("LMCACHE_TIERED_", TieredSettings)),
        (
            "config",
            {
                "eviction_policy": config.eviction_policy,
                "promote_on_hit": config.promote_on_hit,
                "write_back_queue": config.write_back_queue,
                "tier_timeout": config.tier_timeout,
            },
        ),
    ]
    tiered_settings = resolve_settings(TieredSettings, layers, owner="tiered://")
    metrics = ServerMetrics()
    built = [open_backend(u) for u in config.tiers]
    if type(built[0]) is MemoryBackend and settings.shm and shm_available():
        # Tier 0 in shared memory: shm clients copy hits straight out of it and fill reserved
        # blocks themselves (any memory:// tier 0 serves socket clients in place).
        built[0] = MemoryBackend(built[0].settings, shared=True)
    tiers: list[StorageBackend] = [TimedTier(b, metrics, i) for i, b in enumerate(built)]
    tiered = TieredBackend(tiers, tiered_settings, own_tiers=True)
    return CacheServer(tiered, settings, chunk_size=config.chunk_size, hash_seed=config.hash_seed, metrics=metrics)


def run_server_cli(args: argparse.Namespace) -> int:
    """``lmcache server``: serve until SIGTERM/SIGINT."""
    server = build_server(args)
    # Plain asyncio, not uvloop: uvloop cut a control round trip by ~10 us but made socket puts
    # ~10% slower (its sock_recv_into), measured with lmcache bench backend.
    asyncio.run(server.serve_until_signalled())
    return 0
