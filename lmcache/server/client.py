"""``lm://host:port`` and ``lm+unix:///path/to/sock``: the client of ``lmcache server``.

URL forms and options (defaults < ``LMCACHE_LM_*`` / ``LMCACHE_LM_UNIX_*`` env < URL < kwargs)::

    lm://127.0.0.1:8198?shm=true&shm_size=128MiB&timeout=30&connections=1&ack=memory&token=…
    lm+unix:///run/lmcache.sock?shm=false&ack=durable

``ack``: a put returns once every client can read the values from the server (``memory``,
the default), or once they are on its last persistent tier too (``durable``: they survive a
server crash). The server's own ``--ack durable`` makes every put durable; a put the server
cannot persist within its ``--ack-timeout`` comes back ``rejected`` (``not_durable``), so keep
``timeout`` above that.

Values are stored as lmcache value frames (:mod:`lmcache.serde.frame`: key bound in, xxh3
checksum), built here and checked here, so the server and its tiers hold opaque bytes and
corruption anywhere reads as a counted miss. A value found corrupt is deleted on the server
right after the read (values are immutable, so it would otherwise block a good one for ever).

Data paths:

* **Shared memory** (same host: a Unix socket, or TCP to a loopback address, and ``shm=true``):
  each connection creates a segment in ``/dev/shm`` that the server maps and unlinks at ``HELLO``
  (ownership and crash safety: :mod:`lmcache.server.shm`). A put copies the frame into a region
  of the segment and sends only the spans; the server's tier copies it from there. A get sends
  spans sized by the destination buffers; the server's tier copies into them and the client
  copies each checked payload into its ``dst``. The socket carries only control frames.
* **Socket**: values follow the request frame on the socket; a get's payloads are received
  straight into the caller's ``dst`` (no staging copy).

Falls back to the socket when the server declines shared memory (remote, or ``--no-shm``) and
for a request larger than the segment.

Cancellation (rule 3): a cancelled request whose frame has not started to go out (it waits for
another request's frame, e.g. behind a large put to a server that stopped reading) is withdrawn
at once. One whose frame is going out finishes sending it (the stream must stay whole) before
the cancellation propagates; if it is not all out ``timeout`` after the cancellation (the server
stopped reading), the connection is aborted instead (the next call reconnects). A cancelled
get whose reply is not being received yet is drained into scratch space when it arrives; a
value being received into its ``dst`` right now is finished first (so a ``dst`` holds all of
its value or none of it), and the rest of the reply is drained. Only a server that stalls
mid-value for ``timeout`` makes the connection abort (its reader is cancelled and awaited);
the next call reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import unquote

import numpy as np

from lmcache.backends.base import (
    Capabilities,
    PutResult,
    PutStatus,
    StorageBackend,
    gather_all,
    parse_backend_url,
    rejected,
    settings_query,
    split_by_size,
    split_url,
)
from lmcache.config import parse_duration, parse_size, setting
from lmcache.errors import (
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    InvalidBufferError,
    LMCacheError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import (
    copy_with_checksum,
    encode_header,
    header_size,
    needed_header_bytes,
    parse_header,
    payload_checksum,
)
from lmcache.server import protocol as P
from lmcache.server.auth import discover_tcp_token, discover_unix_token
from lmcache.server.shm import Arena, Segment, attach_pool, create_segment, populate, shm_available

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["InPlaceGet", "InPlacePut", "LMServerBackend", "LMServerSettings"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_SHM_REQUEST_BYTES = 16 << 20  # per shm request: small enough that client and server copies overlap
# Per request when the server's pool is mapped: only this side copies, so fewer, larger requests
# (each round trip and reply costs the event loop ~0.1 ms that no copy overlaps).
_POOL_REQUEST_BYTES = 64 << 20
_SOCKET_REQUEST_BYTES = 64 << 20
_MAX_REPLY_META = 64 << 20
_MAX_REPLY_DATA = 1 << 40
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclasses.dataclass(frozen=True)
class LMServerSettings:
    """Settings of an lm:// client."""

    host: str = setting("127.0.0.1", doc="Server host (lm://).")
    port: int = setting(P.DEFAULT_PORT, doc="Server TCP port (lm://).", min=1, max=65535)
    path: str | None = setting(None, doc="Server Unix socket path (lm+unix://).")
    token: str | None = setting(None, doc="Auth token the server expects in HELLO.", secret=True)
    shm: bool = setting(True, doc="Use the shared-memory data path when the server is on this host.")
    shm_size: int = setting(128 << 20, doc="Bytes of the shared-memory segment per connection.", parse=parse_size)
    timeout: float = setting(30.0, doc="Seconds a request may wait for its reply.", parse=parse_duration, min=0.001)
    connect_timeout: float = setting(5.0, doc="Seconds to connect and say HELLO.", parse=parse_duration, min=0.001)
    connections: int = setting(1, doc="Connections per backend (requests are spread over them).", min=1, max=64)
    ack: str = setting(
        "memory",
        doc="When a put returns: memory (in the server's tier 0) or durable (on its last persistent tier).",
        choices=("memory", "durable"),
    )


@dataclasses.dataclass(eq=False)
class _Sending:
    """Whether a request's frame has begun to go out (then it must be finished or the stream is lost)."""

    started: bool = False


@dataclasses.dataclass(eq=False)
class _Req:
    op: int
    future: asyncio.Future[Any]
    keys: list[CacheKey] = dataclasses.field(default_factory=list)
    skeys: list[bytes] = dataclasses.field(default_factory=list)  # UTF-8 key strings (socket GET)
    dsts: list[memoryview] | None = None  # socket GET: payloads go straight here
    region: tuple[int, int] | None = None  # shm: (offset, length) in the arena
    cancelled: bool = False
    receiving: bool = False  # a payload is streaming into one of `dsts` right now
    idle: asyncio.Event | None = None  # set when `receiving` drops (a cancelled caller waits on it)


class _Conn:
    """One connection: a socket, its reader task, pending requests and maybe a shm arena."""

    def __init__(self, owner: LMServerBackend, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self.pending: dict[int, _Req] = {}
        self.ids = itertools.count(1)
        self.created = asyncio.get_running_loop().time()
        self.send_lock = asyncio.Lock()
        self.reader: asyncio.Task[None] | None = None
        self.closed = False
        self.broken = False  # a frame broke off mid-way: nothing more may be sent; aborting
        self.error: Exception | None = None
        self.segment: Segment | None = None
        self.arena: Arena | None = None
        self.pool_mm: mmap.mmap | None = None  # the server's tier-0 pool, read-only
        self.pool_view: memoryview | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._freed = asyncio.Event()
        self.max_frame = P.DEFAULT_MAX_FRAME_BYTES
        self._head = bytearray(P.HEADER_BYTES)

    # -- setup and teardown ----------------------------------------------------------------

    async def hello(self, want_shm: bool) -> None:
        s = self.owner.settings
        meta: dict[str, Any] = {"client": f"lmcache-py/{os.getpid()}"}
        token = self.owner.auth_token()
        if token is not None:
            meta["token"] = token
        seg: Segment | None = None
        if want_shm:
            try:
                seg = create_segment(s.shm_size)
                meta["shm"] = {"name": seg.name, "size": seg.size}
            except OSError as exc:
                logger.info("lm://: no shared memory (%s); using the socket", exc)
        self.reader = asyncio.get_running_loop().create_task(self._read_loop())
        try:
            reply, _ = await self.request(P.Op.HELLO, meta)
        except BaseException:
            if seg is not None:
                seg.unlink()
                seg.close()
            raise
        if seg is not None:
            seg.unlink()  # the server unlinked it already when it attached; this covers a refusal
            if reply.get("shm"):
                self.segment, self.arena = seg, Arena(seg.size)
            else:
                logger.info("lm://: the server declined shared memory (%s)", reply.get("shm_error"))
                seg.close()
        self.max_frame = int(reply.get("max_frame_bytes", self.max_frame))
        pool = reply.get("pool")
        if self.segment is not None and isinstance(pool, dict):
            try:
                self.pool_mm = attach_pool(pool.get("name"), pool.get("size"))
                self.pool_view = memoryview(self.pool_mm)
                if pool.get("resident") is True:
                    # Its pages exist already; mapping them now keeps page faults out of copies.
                    await asyncio.to_thread(populate, self.pool_mm)
            except (OSError, LMCacheError) as exc:
                logger.info("lm://: cannot map the server's pool (%s); tier-0 hits are copied", exc)

    def _teardown(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = exc
        with contextlib.suppress(OSError):
            self.sock.close()
        for req in self.pending.values():
            if not req.future.done():
                req.future.set_exception(exc)
                req.future.exception()  # a cancelled caller may never look
        self.pending.clear()
        seg, self.segment, self.arena = self.segment, None, None
        if seg is not None:
            seg.close()
        view, self.pool_view = self.pool_view, None
        if view is not None:
            with contextlib.suppress(BufferError):
                view.release()
        mm, self.pool_mm = self.pool_mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
        self._freed.set()

    async def abort(self, exc: Exception) -> None:
        """Close now; after this returns nothing writes into any caller's buffer."""
        reader = self.reader
        if reader is not None and not reader.done() and reader is not asyncio.current_task():
            reader.cancel()
            while not reader.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({reader})
        self._teardown(exc)

    # -- sending ---------------------------------------------------------------------------

    async def _send(
        self,
        frame: bytes,
        data: Sequence[memoryview],
        fill: Callable[[int], None] | None = None,
        sending: _Sending | None = None,
    ) -> None:
        async with self.send_lock:
            if self.closed or self.broken:
                raise self.error or BackendUnavailableError("lm://: connection closed")
            if sending is not None:
                sending.started = True
            if fill is None:
                await P.sock_sendv(self.sock, [frame, *data])
                return
            # data is (header, payload) pairs whose headers are written just before they go
            # out: each payload's checksum is then taken right before the kernel copies it, so
            # that copy reads it from cache instead of making a second pass over memory.
            await P.sock_sendv(self.sock, [frame])
            for i in range(0, len(data), 2):
                try:
                    fill(i // 2)
                except Exception as exc:  # a bug: half a frame is out, the stream is lost
                    await self.abort(BackendUnavailableError(f"lm://: a request broke off mid-frame: {exc}"))
                    raise
                await P.sock_sendv(self.sock, data[i : i + 2])

    def _try_lock(self) -> bool:
        """Take the send lock now if that needs no waiting (no coroutine, no suspension)."""
        if self.send_lock.locked():
            return False
        step = self.send_lock.acquire()
        try:
            step.send(None)
        except StopIteration:
            return True
        step.close()  # it would wait (others queued for it): leave it to them
        return False

    def _send_inline(self, frame: bytes) -> bool | asyncio.Task[None]:
        """Send a control frame right here when nothing else is sending.

        Most requests are a frame head and a little JSON: one non-blocking ``send`` takes all of
        it, and skipping the send task saves event-loop hops per request. Returns False when the
        lock was busy (nothing sent), True when the whole frame went out, else the task sending
        the rest (it holds the lock, so no other frame can cut in).

        Raises:
            OSError: The socket failed.
        """
        if not self._try_lock():
            return False
        try:
            if self.closed or self.broken:
                raise self.error or BackendUnavailableError("lm://: connection closed")
            try:
                sent = self.sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
        except BaseException:
            self.send_lock.release()
            raise
        if sent == len(frame):
            self.send_lock.release()
            return True
        return asyncio.get_running_loop().create_task(self._send_rest(memoryview(frame)[sent:]))

    async def _send_rest(self, rest: memoryview) -> None:
        try:
            await P.sock_sendv(self.sock, [rest])
        finally:
            self.send_lock.release()

    async def request(
        self,
        op: int,
        meta: dict[str, Any],
        data: Sequence[memoryview] = (),
        *,
        flags: int = 0,
        keys: list[CacheKey] | None = None,
        dsts: list[memoryview] | None = None,
        region: tuple[int, int] | None = None,
        skeys: list[bytes] | None = None,
        fill: Callable[[int], None] | None = None,
    ) -> tuple[dict[str, Any], Any]:
        """Send one request and wait for its reply; returns ``(meta, values)``.

        ``fill(i)``, when given, writes the header of the ``i``-th ``(header, payload)`` pair
        of ``data`` just before that pair is sent.
        """
        if self.closed:
            raise self.error or BackendUnavailableError("lm://: connection closed")
        loop = asyncio.get_running_loop()
        rid = next(self.ids)
        req = _Req(op, loop.create_future(), keys or [], skeys or [], dsts, region)
        self.pending[rid] = req
        frame = P.encode_frame_head(op, rid, P.encode_meta(meta), sum(d.nbytes for d in data), flags)
        send: asyncio.Task[None] | None = None
        sending = _Sending()
        try:
            inline = False if data else self._send_inline(frame)
            if inline is False:
                send = loop.create_task(self._send(frame, data, fill, sending))
            elif inline is not True:
                send, sending.started = inline, True
            if send is not None:
                await asyncio.shield(send)
        except asyncio.CancelledError:
            if send is not None and not send.done() and not sending.started:
                # Still waiting for the socket (behind another frame): nothing of it went out,
                # so withdraw it; no reply will come, so its region is ours to free now.
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await send
                if not sending.started:
                    self.pending.pop(rid, None)
                    req.cancelled = True
                    self.release(req)
                    raise
            # Half a frame would break the stream, and `data` is borrowed: finish sending first.
            await self._finish_send(send)
            await self._cancel(req)  # its reply may be streaming into a dst already
            raise
        except BaseException as exc:
            self.pending.pop(rid, None)
            if isinstance(exc, OSError):
                await self.abort(BackendUnavailableError(f"lm://: sending failed: {exc}"))
                raise self.error from exc  # type: ignore[misc]
            raise
        try:
            async with asyncio.timeout(self.owner.settings.timeout):
                return await asyncio.shield(req.future)
        except TimeoutError:
            await self._cancel(req)
            raise BackendTimeoutError(
                f"lm://: no reply within {self.owner.settings.timeout}s ({P.Op(op).name})"
            ) from None
        except asyncio.CancelledError:
            await self._cancel(req)
            raise
        except BaseException:
            self._forget(req)  # an error reply: the region (if any) is free again
            raise

    async def _finish_send(self, send: asyncio.Task[None] | None) -> None:
        """Wait for a frame that is going out; abort the connection if it stalls for ``timeout``."""
        if send is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.owner.settings.timeout
        while not send.done():
            left = deadline - loop.time()
            if left <= 0:
                # The server takes nothing (stopped, or gone without a reset): give up the frame
                # and with it the stream. Nothing may follow the half frame, so block sends first.
                self.broken = True
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await send
                await self.abort(BackendUnavailableError("lm://: the server stopped taking a request mid-frame"))
                return
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({send}, timeout=left)

    def _forget(self, req: _Req) -> None:
        req.cancelled = True
        if req.future.done():
            if not req.future.cancelled() and req.future.exception() is None:
                reply = req.future.result()[0]  # replied, never read: give back what it holds
                self.release_lease(reply.get("lease"))
                self.abort_reservation(reply.get("reservation"))
            self.release(req)

    async def _cancel(self, req: _Req) -> None:
        """The caller gave up on ``req``: make sure nothing writes into its buffers later."""
        self._forget(req)
        if not req.receiving:
            return
        # Let the value being received finish (a dst then holds all of it or nothing, and the
        # connection survives); if the server stalls mid-value, abort the connection instead.
        req.idle = asyncio.Event()
        waiter = asyncio.ensure_future(req.idle.wait())
        deadline = asyncio.get_running_loop().time() + self.owner.settings.timeout
        while not waiter.done():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({waiter}, timeout=left)
        if not waiter.done():
            waiter.cancel()
            await self.abort(BackendUnavailableError("lm://: connection aborted by a cancelled read"))

    def release(self, req: _Req) -> None:
        """Give the request's shm region back (once)."""
        region, req.region = req.region, None
        if region is not None:
            self.free_region(region)

    def release_lease(self, lease: object) -> None:
        """Tell the server we are done with a leased GET's pool blocks (no reply, no waiting)."""
        if not isinstance(lease, int) or self.closed:
            return
        try:
            task = self._send_oneway(P.Op.RELEASE, {"leases": [lease]})
        except (OSError, BackendUnavailableError) as exc:
            logger.debug("lm://: a lease release was not sent (%s); the server frees it at disconnect", exc)
            return
        if task is not None:
            self._background.add(task)
            task.add_done_callback(self._sent_in_background)

    def _send_oneway(self, op: int, meta: dict[str, Any]) -> asyncio.Task[None] | None:
        """Send a request the server does not answer (``FLAG_NOREPLY``), in order with the rest.

        Returns None when it went out at once, else the task sending it.

        Raises:
            OSError: The socket failed.
            BackendUnavailableError: The connection is closed.
        """
        frame = P.encode_frame_head(op, 0, P.encode_meta(meta), 0, P.FLAG_NOREPLY)
        inline = self._send_inline(frame)
        if inline is True:
            return None
        return inline or asyncio.get_running_loop().create_task(self._send(frame, []))

    def abort_reservation(self, rid: object) -> None:
        """Drop a put reservation we will not fill (a failed or cancelled put), in the background."""
        if not isinstance(rid, int) or self.closed:
            return

        async def abort() -> None:
            with contextlib.suppress(Exception):
                await self.request(P.Op.COMMIT, {"reservation": rid, "abort": True})

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._sent_in_background)

    def _sent_in_background(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug(
                "lm://: a lease release was not sent (%s); the server frees it at disconnect", task.exception()
            )

    def free_region(self, region: tuple[int, int]) -> None:
        """Return a region after a successful request (a no-op once the connection closed)."""
        if self.arena is not None:
            self.arena.free(*region)
            self._freed.set()

    async def alloc(self, n: int) -> tuple[int, int] | None:
        """A region of ``n`` bytes of the segment, waiting for room; None when it never fits."""
        while True:
            arena = self.arena
            if arena is None or n > arena.size:
                return None
            off = arena.alloc(n)
            if off is not None:
                return off, n
            self._freed.clear()
            await self._freed.wait()

    # -- receiving -------------------------------------------------------------------------

    async def _recv_into(self, view: memoryview) -> None:
        loop = asyncio.get_running_loop()
        while view.nbytes:
            n = await loop.sock_recv_into(self.sock, view)
            if n == 0:
                raise BackendUnavailableError("lm://: the server closed the connection")
            view = view[n:]

    async def _drain(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20) or 1))
        while n > 0:
            chunk = min(n, scratch.nbytes)
            await self._recv_into(scratch[:chunk])
            n -= chunk

    async def _read_loop(self) -> None:
        try:
            while True:
                head = memoryview(self._head)
                await self._recv_into(head)
                fh = P.parse_frame_head(head, _MAX_REPLY_META, _MAX_REPLY_DATA)
                raw = bytearray(fh.meta_len)
                await self._recv_into(memoryview(raw))
                meta = P.decode_meta(raw)
                req = self.pending.pop(fh.request_id, None)
                if fh.flags & P.FLAG_ERROR:
                    await self._drain(fh.data_len)
                    exc = P.error_from_reply(meta)
                    if req is None:  # about the connection itself; the server closes it next
                        self.error = exc
                        continue
                    self._settle(req, exc=exc)
                    continue
                if req is None:
                    await self._drain(fh.data_len)
                    continue
                values = None
                if req.op == P.Op.GET and not fh.flags & P.FLAG_SHM:
                    values = await self._recv_values(req, meta, fh.data_len)
                else:
                    await self._drain(fh.data_len)
                self._settle(req, result=(meta, values))
        except asyncio.CancelledError:
            self._teardown(self.error or BackendUnavailableError("lm://: connection aborted"))
            raise
        except Exception as exc:
            if not isinstance(exc, BackendUnavailableError) or self.error is None:
                self.error = self.error or (
                    exc if isinstance(exc, BackendUnavailableError) else BackendUnavailableError(f"lm://: {exc}")
                )
            self._teardown(self.error)

    def _settle(self, req: _Req, *, result: Any = None, exc: Exception | None = None) -> None:
        if req.cancelled:
            self.release(req)  # the caller is gone: the region and any lease are ours to free
            if result is not None:  # a reply nobody will read: give back what it holds for us
                self.release_lease(result[0].get("lease"))
                self.abort_reservation(result[0].get("reservation"))
            return
        if req.future.done():
            return
        if exc is not None:
            req.future.set_exception(exc)
        else:
            req.future.set_result(result)

    async def _recv_values(self, req: _Req, meta: dict[str, Any], data_len: int) -> list[int | None]:
        """Receive a socket GET's frames, payloads straight into the caller's buffers."""
        sizes = meta.get("sizes")
        if not isinstance(sizes, list) or len(sizes) != len(req.keys):
            raise P.ProtocolError("a GET reply without one size per key")
        assert req.dsts is not None
        out: list[int | None] = [None] * len(sizes)
        left = data_len
        head = bytearray(64 << 10)
        for i, n in enumerate(sizes):
            if n is None:
                continue
            if not isinstance(n, int) or n < 0 or n > left:
                raise P.ProtocolError("a GET reply whose sizes do not match its data")
            left -= n
            if req.cancelled:
                await self._drain(n)
                continue
            key, dst = req.keys[i], req.dsts[i]
            got = 0  # bytes of this value taken off the socket
            try:
                if n < 48:
                    raise IntegrityError(f"value for {key} is truncated ({n} bytes)")
                hv = memoryview(head)
                # We wrote the frame without metadata, so its header length follows from the key:
                # take it in one read, then check it like any other header.
                expect = min(n, header_size(len(req.skeys[i]), 0), len(head))
                await self._recv_into(hv[:expect])
                got = expect
                need = needed_header_bytes(hv[:expect])
                if need > expect:
                    raise IntegrityError("value header is malformed")
                header = parse_header(hv[:need], key)
                if header.payload_offset != expect or header.total_len != n:
                    raise IntegrityError(f"value for {key} has {n} bytes, its header says {header.total_len}")
                plen = header.payload_len
                if plen > dst.nbytes:
                    raise IntegrityError(f"value for {key} claims {plen} bytes, more than its buffer")
                if req.cancelled:  # the caller left while we read the header: nothing into dst
                    await self._drain(n - got)
                    continue
                req.receiving = True  # set with no await since the check above
                try:
                    await self._recv_into(dst[:plen])
                finally:
                    req.receiving = False
                    if req.idle is not None:
                        req.idle.set()
                got = n
                header.verify_payload(dst[:plen])
                out[i] = plen
            except IntegrityError as exc:
                self.owner.record_corrupt(key, exc)
                self.owner.corrupt_seen.append(key)
                await self._drain(n - got)
        if left:
            await self._drain(left)
        return out


class LMServerBackend(StorageBackend):
    """A client of ``lmcache server`` over TCP or a Unix socket, with a shared-memory fast path."""

    schemes: ClassVar[tuple[str, ...]] = ("lm", "lm+unix")
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False, shared=True, listing=False, integrity_checked=True, bounded=True
    )
    secret_options: ClassVar[tuple[str, ...]] = ("token",)

    def __init__(self, settings: LMServerSettings, scheme: str = "lm") -> None:
        super().__init__()
        if scheme == "lm+unix" and not settings.path:
            raise ConfigError("lm+unix:// needs a socket path, e.g. lm+unix:///run/lmcache.sock")
        self.settings = settings
        self._scheme = scheme
        self._conns: list[_Conn | None] = [None] * settings.connections
        self._rr = itertools.count()
        self._connect_lock: asyncio.Lock | None = None
        self.shm_active = False  # the last connection made uses a shared-memory segment
        self.pool_active = False  # ... and reads tier-0 hits straight from the server's pool
        self.corrupt_seen: list[CacheKey] = []  # corrupt values read, deleted after the get
        # Sent with every put (or its commit); absent means the server's own --ack.
        self._ack: dict[str, str] = {"ack": "durable"} if settings.ack == "durable" else {}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``lm://host:port?…`` or ``lm+unix:///path?…`` (no I/O)."""
        parts = split_url(url)
        location: dict[str, object] = {}
        if parts.scheme == "lm+unix":
            if parts.netloc not in ("", "localhost"):
                raise ConfigError("lm+unix:// takes a path, e.g. lm+unix:///run/lmcache.sock")
            if parts.path:
                location["path"] = unquote(parts.path)
        else:
            if parts.path not in ("", "/"):
                raise ConfigError("lm:// takes host:port only, e.g. lm://127.0.0.1:8198")
            if parts.hostname:
                location["host"] = parts.hostname
            if parts.port is not None:  # lm://host:0 is refused by the port's bounds, not defaulted
                location["port"] = parts.port
            elif parts.netloc.rsplit("@", 1)[-1].endswith(":"):
                raise ConfigError("lm:// URL has an empty port, e.g. lm://127.0.0.1:8198")
        if parts.password:
            location["token"] = unquote(parts.password)
        settings = parse_backend_url(url, cls.schemes, LMServerSettings, location, overrides, split=parts)
        return cls(settings, parts.scheme)

    @property
    def url(self) -> str:
        s = self.settings
        query = settings_query(s, skip=("host", "port", "path"))
        if self._scheme == "lm+unix":
            base = f"lm+unix://{s.path}"
        else:
            host = f"[{s.host}]" if ":" in s.host else s.host
            base = f"lm://{host}:{s.port}"
        return base + (f"?{query}" if query else "")

    # -- connections -------------------------------------------------------------------------

    def _local(self) -> bool:
        return self._scheme == "lm+unix" or self.settings.host in _LOOPBACK or self.settings.host.startswith("127.")

    def auth_token(self) -> str | None:
        """The token for HELLO: the configured one, else the one a local server of ours wrote.

        Looked up at every connect, so a restarted server's new token is picked up. Only files
        of this user are read (:mod:`lmcache.server.auth`); a remote server needs ``token=``.
        """
        s = self.settings
        if s.token is not None:
            return s.token
        if self._scheme == "lm+unix":
            return discover_unix_token(s.path) if s.path else None
        return discover_tcp_token(s.port) if self._local() else None

    async def _connect(self) -> _Conn:
        s = self.settings
        loop = asyncio.get_running_loop()
        if self._scheme == "lm+unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: Any = s.path
            where = f"lm+unix://{s.path}"
        else:
            infos = await loop.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)
            if not infos:
                raise BackendUnavailableError(f"lm://{s.host}:{s.port}: cannot resolve the host")
            family, _, _, _, target = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            where = f"lm://{s.host}:{s.port}"
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        sock.setblocking(False)
        conn = _Conn(self, sock)
        try:
            async with asyncio.timeout(s.connect_timeout):
                await loop.sock_connect(sock, target)
                await conn.hello(s.shm and self._local() and shm_available())
        except TimeoutError:
            await conn.abort(BackendTimeoutError(f"{where}: no answer within {s.connect_timeout}s"))
            raise BackendTimeoutError(f"{where}: no answer within {s.connect_timeout}s") from None
        except LMCacheError as exc:  # e.g. AuthError (a PermissionError, so before OSError)
            await conn.abort(BackendUnavailableError(f"{where}: {exc}"))
            raise
        except OSError as exc:
            await conn.abort(BackendUnavailableError(f"{where}: {exc}"))
            raise BackendUnavailableError(f"{where}: cannot connect: {exc.strerror or exc}") from exc
        except BaseException as exc:
            await conn.abort(BackendUnavailableError(f"{where}: {exc}"))
            raise
        self.shm_active = conn.segment is not None
        self.pool_active = conn.pool_view is not None
        return conn

    async def _conn(self) -> _Conn:
        i = next(self._rr) % len(self._conns)
        conn = self._conns[i]
        if conn is not None and not conn.closed:
            return conn
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            conn = self._conns[i]
            if conn is None or conn.closed:
                conn = await self._connect()
                self._conns[i] = conn
            return conn

    async def _retrying(self, call: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run ``call`` on a connection; retry once on a new one if an old one turns out dead.

        Every operation is idempotent (values are immutable), so a request that met a
        connection the server closed meanwhile (a server restart) is simply sent again.
        """
        started = asyncio.get_running_loop().time()
        conn = await self._conn()
        fresh = conn.created >= started  # made for this call: its failure is real news
        try:
            return await call(conn)
        except BackendUnavailableError:
            if fresh or not conn.closed:
                raise
            logger.info("lm://: the connection was closed by the server; reconnecting once")
            return await call(await self._conn())

    async def _open(self) -> None:
        await self._conn()

    async def _close(self) -> None:
        conns, self._conns = self._conns, [None] * len(self._conns)
        for conn in conns:
            if conn is not None:
                await conn.abort(BackendUnavailableError("lm://: backend closed"))

    async def _ping(self) -> None:
        await self._retrying(lambda conn: conn.request(P.Op.PING, {}))

    def _extra_stats(self) -> dict[str, Any]:
        live = [c for c in self._conns if c is not None and not c.closed]
        return {
            "connections": len(live),
            "shm": any(c.segment is not None for c in live),
            "shm_pool": any(c.pool_view is not None for c in live),
            "shm_bytes_in_use": sum(c.arena.used for c in live if c.arena is not None),
        }

    async def server_stats(self) -> dict[str, Any]:
        """The server's ``STATS`` reply (server counters and its tiered backend's stats)."""
        await self._ensure_open()
        conn = await self._conn()
        reply, _ = await conn.request(P.Op.STATS, {})
        stats: dict[str, Any] = reply.get("stats", {})
        return stats

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        meta = {"keys": [k.to_string() for k in keys]}
        reply, _ = await self._retrying(lambda conn: conn.request(P.Op.CONTAINS, meta))
        return [bool(x) for x in reply["found"]]

    async def lookup_prefix(self, keys: Sequence[CacheKey]) -> int:
        """Leading run of held keys, answered by the server in one round trip."""
        keys = list(keys)
        if not keys:
            return 0
        await self._ensure_open()
        if any(not isinstance(k, CacheKey) for k in keys):
            return await super().lookup_prefix(keys)  # raises the usual InvalidArgumentError
        meta = {"keys": [k.to_string() for k in keys]}
        reply, _ = await self._retrying(lambda conn: conn.request(P.Op.LOOKUP_PREFIX, meta))
        return int(reply["n"])

    async def _delete(self, keys: list[CacheKey]) -> None:
        meta = {"keys": [k.to_string() for k in keys]}
        await self._retrying(lambda conn: conn.request(P.Op.DELETE, meta))

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        return await self._retrying(lambda conn: self._put_on(conn, keys, srcs))

    async def _put_on(self, conn: _Conn, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        # Header sizes follow from the keys (no metadata); checksums are taken later, per path.
        hsizes = [header_size(len(k.to_string().encode()), 0) for k in keys]
        results: list[PutResult | None] = [None] * len(keys)
        limit = min(conn.max_frame, _request_bytes(conn))
        fits: list[int] = []
        for i, (h, s) in enumerate(zip(hsizes, srcs, strict=True)):
            if h + s.nbytes > conn.max_frame:
                results[i] = rejected("too_large")
            else:
                fits.append(i)
        plan = split_by_size([hsizes[i] + srcs[i].nbytes for i in fits], limit)
        groups = [[fits[j] for j in r] for r in plan]

        async def one(group: list[int]) -> None:
            got = await self._put_group(
                conn, [keys[i] for i in group], [hsizes[i] for i in group], [srcs[i] for i in group]
            )
            for i, r in zip(group, got, strict=True):
                results[i] = r

        await gather_all([one(g) for g in groups])
        return results  # type: ignore[return-value]

    async def _put_group(
        self, conn: _Conn, keys: list[CacheKey], hsizes: list[int], srcs: list[memoryview]
    ) -> list[PutResult]:
        if conn.pool_view is not None and conn.segment is not None:
            return await self._put_into_pool(conn, keys, hsizes, srcs)
        return await self._put_copied(conn, keys, hsizes, srcs)

    async def _put_into_pool(
        self, conn: _Conn, keys: list[CacheKey], hsizes: list[int], srcs: list[memoryview]
    ) -> list[PutResult]:
        """A shm put in one copy: the server reserves tier-0 blocks, we fill them, it commits.

        Keys it cannot reserve (tier 0 full, a put of the key in flight) go the copied way,
        through our segment (the tiered backend evicts for those).
        """
        pool = conn.pool_view
        assert pool is not None
        sizes = [h + s.nbytes for h, s in zip(hsizes, srcs, strict=True)]
        meta = {"keys": [k.to_string() for k in keys], "sizes": sizes, "reserve": True}
        reply, _ = await conn.request(P.Op.PUT, meta, flags=P.FLAG_SHM)
        states, offsets, rid = reply.get("states"), reply.get("offsets"), reply.get("reservation")
        if not isinstance(states, list) or not isinstance(offsets, list) or len(states) != len(keys):
            raise P.ProtocolError("a reserve reply without one state per key")
        results: list[PutResult | None] = [None] * len(keys)
        reserved = [i for i, st in enumerate(states) if st == "reserved"]
        try:
            places = []
            for i in reserved:
                off = offsets[i]
                if not isinstance(off, int) or off < 0 or off + sizes[i] > pool.nbytes:
                    raise P.ProtocolError("a reserved block outside the pool")
                places.append((off, hsizes[i]))
            if reserved:
                # The one copy, checksummed on the way (on the loop: see _write_frames).
                _write_frames(pool, places, [keys[i] for i in reserved], [srcs[i] for i in reserved])
                # Wait for the commit's answer, also on one connection: a put that returned is
                # readable by every client (ack=memory), or persisted (ack=durable).
                done, _ = await conn.request(P.Op.COMMIT, {"reservation": rid, **self._ack})
                for i, (status, reason) in zip(reserved, done["results"], strict=True):
                    results[i] = PutResult(PutStatus(status), reason)
        except BaseException:
            if reserved and not conn.closed:
                conn.abort_reservation(rid)
            raise
        rest = []
        for i, st in enumerate(states):
            if st == "exists":
                results[i] = PutResult(PutStatus.EXISTS)
            elif st != "reserved":
                rest.append(i)
        if rest:
            got = await self._put_copied(
                conn, [keys[i] for i in rest], [hsizes[i] for i in rest], [srcs[i] for i in rest]
            )
            for i, r in zip(rest, got, strict=True):
                results[i] = r
        return results  # type: ignore[return-value]

    async def _put_copied(
        self, conn: _Conn, keys: list[CacheKey], hsizes: list[int], srcs: list[memoryview]
    ) -> list[PutResult]:
        total = sum(h + s.nbytes for h, s in zip(hsizes, srcs, strict=True))
        skeys = [k.to_string() for k in keys]
        region = await conn.alloc(total) if conn.arena is not None else None
        if region is not None and conn.segment is not None:
            off = region[0]
            spans, places = [], []
            for h, s in zip(hsizes, srcs, strict=True):
                spans.append([off, h + s.nbytes])
                places.append((off, h))
                off += h + s.nbytes
            try:
                _write_frames(conn.segment.view, places, keys, srcs)
            except BaseException:
                conn.free_region(region)
                raise
            # On failure or cancellation request() hands the region back (now or on the reply).
            reply, _ = await conn.request(
                P.Op.PUT, {"keys": skeys, "spans": spans, **self._ack}, flags=P.FLAG_SHM, region=region
            )
            conn.free_region(region)
        else:
            heads = [bytearray(h) for h in hsizes]
            data: list[memoryview] = []
            for head, s in zip(heads, srcs, strict=True):
                data.append(memoryview(head))
                data.append(s)

            def fill(i: int) -> None:
                # A memoryview never resizes: a header of another length fails loudly here.
                memoryview(heads[i])[:] = encode_header(keys[i], srcs[i])

            sizes = [h + s.nbytes for h, s in zip(hsizes, srcs, strict=True)]
            reply, _ = await conn.request(P.Op.PUT, {"keys": skeys, "sizes": sizes, **self._ack}, data, fill=fill)
        out = []
        for status, reason in reply["results"]:
            out.append(PutResult(PutStatus(status), reason))
        return out

    # -- in place (zero-copy into and out of the server's tier-0 pool) ------------------------

    async def reserve_in_place(self, keys: Sequence[CacheKey], nbytes: Sequence[int]) -> InPlacePut | None:
        """Reserve tier-0 blocks for values the caller writes itself (the first half of a put).

        The caller writes each reserved value's payload into :meth:`InPlacePut.payload` (from
        any thread), then calls :meth:`commit_in_place`, which checksums the payloads, frames
        them and publishes them. So a put costs the caller's own copy into the pool and one
        checksum pass, no staging copy.

        Returns:
            None when this client cannot write into the server's pool (no shared memory, or a
            server without a shared tier 0): use :meth:`put` then.
        """
        keys = list(keys)
        await self._ensure_open()
        conn = await self._conn()
        pool = conn.pool_view
        if pool is None or conn.segment is None or not keys:
            return None
        skeys = [k.to_string() for k in keys]
        hsizes = [header_size(len(sk.encode()), 0) for sk in skeys]
        sizes = [h + int(n) for h, n in zip(hsizes, nbytes, strict=True)]
        reply, _ = await conn.request(P.Op.PUT, {"keys": skeys, "sizes": sizes, "reserve": True}, flags=P.FLAG_SHM)
        states, offsets = reply.get("states"), reply.get("offsets")
        if not isinstance(states, list) or not isinstance(offsets, list) or len(states) != len(keys):
            raise P.ProtocolError("a reserve reply without one state per key")
        held = InPlacePut(conn, reply.get("reservation"), keys, [], [])
        for i, st in enumerate(states):
            off = offsets[i] if st == "reserved" else None
            if off is not None and (not isinstance(off, int) or off < 0 or off + sizes[i] > pool.nbytes):
                if held.reservation is not None and not conn.closed:
                    conn.abort_reservation(held.reservation)
                raise P.ProtocolError("a reserved block outside the pool")
            held.states.append(str(st))
            held.places.append((off, hsizes[i], sizes[i] - hsizes[i]) if off is not None else None)
        return held

    def seal_in_place(self, held: InPlacePut, i: int, *, checksum: int | None = None) -> None:
        """Checksum and frame value ``i`` of ``held`` now (its payload is written); from any thread.

        :meth:`commit_in_place` frames what is not sealed yet; sealing each value as soon as it
        is written lets the checksum passes overlap the caller's later writes. A value must not
        be written again after it is sealed.

        Args:
            held: The reservation.
            i: Which of its values.
            checksum: The payload's xxh3-64 when the caller took it while writing the payload
                (a copy that hashes as it goes); otherwise the payload is read again for it.
        """
        place, pool = held.places[i], held.conn.pool_view
        if place is None or pool is None:
            return
        off, h, n = place
        payload = np.frombuffer(pool, dtype=np.uint8, count=n, offset=off + h)
        if checksum is None:
            checksum = payload_checksum(payload)
        pool[off : off + h] = encode_header(held.keys[i], payload, checksum=checksum)
        held.sealed.add(i)

    async def commit_in_place(self, held: InPlacePut, *, abort: bool = False) -> list[PutResult | None]:
        """Publish (or with ``abort``, drop) the values of :meth:`reserve_in_place`.

        Returns:
            Per key: the commit's result for a reserved one, ``EXISTS`` for a key the server
            held already, and None for a key it could not reserve (tier 0 full, a put of the
            key in flight): the caller puts those through :meth:`put`.
        """
        conn, pool = held.conn, held.conn.pool_view
        out: list[PutResult | None] = [PutResult(PutStatus.EXISTS) if st == "exists" else None for st in held.states]
        reserved = [i for i, p in enumerate(held.places) if p is not None]
        if not reserved:
            return out
        if conn.closed or pool is None:
            raise BackendUnavailableError("lm://: the connection holding the reservation was closed")
        if abort:
            conn.abort_reservation(held.reservation)
            return [rejected("aborted") if i in reserved else r for i, r in enumerate(out)]
        try:
            arr = np.frombuffer(pool, dtype=np.uint8)
            for i in reserved:
                if i in held.sealed:
                    continue
                off, h, n = held.places[i]  # type: ignore[misc]
                payload = arr[off + h : off + h + n]
                pool[off : off + h] = encode_header(held.keys[i], payload, checksum=payload_checksum(payload))
            done, _ = await conn.request(P.Op.COMMIT, {"reservation": held.reservation, **self._ack})
        except BaseException:
            if not conn.closed:
                conn.abort_reservation(held.reservation)
            raise
        for i, (status, reason) in zip(reserved, done["results"], strict=True):
            out[i] = PutResult(PutStatus(status), reason)
        return out

    async def get_in_place(
        self, keys: Sequence[CacheKey], nbytes: Sequence[int], *, verify: bool = True
    ) -> InPlaceGet | None:
        """Read values where they lie: tier-0 hits in the server's pool, others in our segment.

        Each value's frame is checked (key, length, checksum) but not copied: the caller reads
        the payloads (:attr:`InPlaceGet.payloads`, None for a miss, a corrupt value or one of
        another size than ``nbytes``) and then must call :meth:`release_in_place`.

        With ``verify`` False the payloads' checksums are not taken here: the caller checks
        each payload against :attr:`InPlaceGet.checksums` (the stored xxh3-64) as it reads it
        (one pass over the value instead of two) and reports a mismatch with
        :meth:`reject_in_place` before using anything it copied.

        Returns:
            None when this client has no shared memory (use :meth:`get_into` then), or when
            the values do not fit in one request (at most half the segment).
        """
        keys = list(keys)
        await self._ensure_open()
        conn = await self._conn()
        if conn.arena is None or conn.segment is None or not keys:
            return None
        skeys = [k.to_string() for k in keys]
        caps = [int(n) + header_size(len(sk.encode()), 0) for sk, n in zip(skeys, nbytes, strict=True)]
        if sum(caps) > _request_bytes(conn):
            return None
        region = await conn.alloc(sum(caps))
        if region is None:
            return None
        reply, frames = await _shm_get(conn, skeys, caps, region)
        got = InPlaceGet(conn, region, reply.get("lease"), [])
        try:
            for frame, key, skey, want in zip(frames, keys, skeys, nbytes, strict=True):
                if frame is None:
                    got.payloads.append(None)
                    got.checksums.append(None)
                    continue
                checked = self._checked_payload(key, skey, frame, int(want), verify=verify)
                got.payloads.append(None if checked is None else checked[0])
                got.checksums.append(None if checked is None else checked[1])
        except BaseException:
            self.release_in_place(got)
            raise
        return got

    def in_place_get_bytes(self) -> int:
        """The most payload bytes one :meth:`get_in_place` should ask for.

        What one request may carry (half the shared-memory segment, at most
        ``_POOL_REQUEST_BYTES``), less a sixteenth for the values' headers: two such gets fit
        in the segment at once (the next read while the last one is used). Fewer, larger gets
        cost fewer round trips; values in the server's pool are not copied whatever the size.
        """
        return max(1, min(_POOL_REQUEST_BYTES, self.settings.shm_size // 2) * 15 // 16)

    def _checked_payload(
        self, key: CacheKey, skey: str, frame: memoryview, want: int, *, verify: bool = True
    ) -> tuple[memoryview, int] | None:
        """The payload of ``frame`` and its stored checksum; None (counted) if a check fails.

        The header is always checked; the checksum only with ``verify``.
        """
        try:
            header = parse_header(frame)
            if header.key != skey:
                raise IntegrityError(f"value stored under {skey[:80]} belongs to another key")
            if header.total_len != frame.nbytes:
                raise IntegrityError(f"value for {key} has {frame.nbytes} bytes, its header says {header.total_len}")
            payload = frame[header.payload_offset :]
            if verify:
                header.verify_checksum(payload_checksum(payload))
        except IntegrityError as exc:
            self.reject_in_place(key, exc)
            return None
        return (payload, header.checksum) if payload.nbytes == want else None

    def reject_in_place(self, key: CacheKey, exc: IntegrityError) -> None:
        """Report a value read by :meth:`get_in_place` as corrupt: counted, a miss, removed on the next get."""
        self.record_corrupt(key, exc)
        self.corrupt_seen.append(key)

    def release_in_place(self, got: InPlaceGet) -> None:
        """Hand back what :meth:`get_in_place` holds (call on the backend's event loop)."""
        got.payloads = []
        region, got.region = got.region, None
        if region is not None:
            got.conn.free_region(region)
        lease, got.lease = got.lease, None
        got.conn.release_lease(lease)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        results = await self._retrying(lambda conn: self._get_on(conn, keys, dsts))
        if self.corrupt_seen:
            # First writer wins, so a corrupt value would block a good one for ever (and a
            # socket read may have streamed it into its dst): remove it so it reads as a plain
            # miss and the next put repairs it.
            doomed, self.corrupt_seen = list(dict.fromkeys(self.corrupt_seen)), []
            with contextlib.suppress(BackendUnavailableError, BackendTimeoutError):
                await self._delete(doomed)
        return results

    async def _get_on(self, conn: _Conn, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        skeys = [k.to_string() for k in keys]  # once per call: it is not free for MiB-rate gets
        caps = [
            min(d.nbytes + header_size(len(sk.encode()), 0), conn.max_frame) for sk, d in zip(skeys, dsts, strict=True)
        ]
        groups = [list(r) for r in split_by_size(caps, min(conn.max_frame, _request_bytes(conn)))]
        results: list[int | None] = [None] * len(keys)

        async def one(group: list[int]) -> None:
            got = await self._get_group(
                conn,
                [keys[i] for i in group],
                [skeys[i] for i in group],
                [dsts[i] for i in group],
                [caps[i] for i in group],
            )
            for i, n in zip(group, got, strict=True):
                results[i] = n

        await gather_all([one(g) for g in groups])
        return results

    async def _get_group(
        self, conn: _Conn, keys: list[CacheKey], skeys: list[str], dsts: list[memoryview], caps: list[int]
    ) -> list[int | None]:
        region = await conn.alloc(sum(caps)) if conn.arena is not None else None
        if region is None:
            _, values = await conn.request(
                P.Op.GET, {"keys": skeys, "caps": caps}, keys=keys, dsts=dsts, skeys=[k.encode() for k in skeys]
            )
            return list(values)
        reply, frames = await _shm_get(conn, skeys, caps, region)
        try:
            got = _read_frames(frames, keys, skeys, dsts)
            out: list[int | None] = []
            for key, r in zip(keys, got, strict=True):
                if isinstance(r, IntegrityError):
                    self.record_corrupt(key, r)
                    self.corrupt_seen.append(key)
                    out.append(None)
                else:
                    out.append(r)
            return out
        finally:
            conn.free_region(region)
            conn.release_lease(reply.get("lease"))


async def _shm_get(
    conn: _Conn, skeys: list[str], caps: list[int], region: tuple[int, int]
) -> tuple[dict[str, Any], list[memoryview | None]]:
    """A shared-memory GET of ``skeys``: the reply, and each value's frame (None: a miss).

    Values land in ``region`` of our segment, one span of ``caps`` each; tier-0 hits are leased
    and read where they lie in the server's pool. A malformed reply gives the region and any
    lease back before :class:`~lmcache.server.protocol.ProtocolError` is raised.
    """
    spans, off = [], region[0]
    for c in caps:
        spans.append([off, c])
        off += c
    meta: dict[str, Any] = {"keys": skeys, "spans": spans}
    pool, seg = conn.pool_view, conn.segment
    assert seg is not None
    if pool is not None:
        meta["lease"] = True  # tier-0 hits: read them straight from the server's pool
    reply, _ = await conn.request(P.Op.GET, meta, flags=P.FLAG_SHM, region=region)
    try:
        sizes = reply["sizes"]
        if not isinstance(sizes, list) or len(sizes) != len(skeys):
            raise P.ProtocolError("a GET reply without one size per key")
        where = reply.get("where") or ["seg"] * len(skeys)
        offsets = reply.get("offsets") or [None] * len(skeys)
        frames: list[memoryview | None] = []
        for (o, c), n, w, po in zip(spans, sizes, where, offsets, strict=True):
            if n is None:
                frames.append(None)
            elif not isinstance(n, int):
                raise P.ProtocolError("a GET reply size that is not a number")
            elif w == "pool" and pool is not None:
                if not isinstance(po, int) or po < 0 or po + n > pool.nbytes:
                    raise P.ProtocolError("a GET reply pool span outside the pool")
                frames.append(pool[po : po + n])
            else:
                if not 0 <= n <= c:
                    raise P.ProtocolError("a GET reply size outside its span")
                frames.append(seg.view[o : o + n])
    except BaseException:
        conn.free_region(region)
        conn.release_lease(reply.get("lease"))
        raise
    return reply, frames


@dataclasses.dataclass(eq=False)
class InPlacePut:
    """Tier-0 blocks reserved by :meth:`LMServerBackend.reserve_in_place`, to be filled and committed.

    Attributes:
        states: Per key, the server's answer: ``reserved``, ``exists``, ``busy``, ``full``…
        places: Per key, ``(offset, header bytes, payload bytes)`` in the pool when reserved.
    """

    conn: _Conn
    reservation: Any
    keys: list[CacheKey]
    states: list[str]
    places: list[tuple[int, int, int] | None]
    sealed: set[int] = dataclasses.field(default_factory=set)  # framed already (seal_in_place)

    def payload(self, i: int) -> memoryview | None:
        """The writable payload bytes of key ``i`` in the server's pool (None: not reserved)."""
        place, pool = self.places[i], self.conn.pool_view
        if place is None or pool is None:
            return None
        off, h, n = place
        return pool[off + h : off + h + n]


@dataclasses.dataclass(eq=False)
class InPlaceGet:
    """Values read in place by :meth:`LMServerBackend.get_in_place` (release them after use).

    Attributes:
        payloads: Per key, the checked payload (a view of the pool or of our segment) or None.
        checksums: Per key, the payload's stored xxh3-64 (None where the payload is None);
            verified already unless the get was made with ``verify=False``.
    """

    conn: _Conn
    region: tuple[int, int] | None
    lease: Any
    payloads: list[memoryview | None]
    checksums: list[int | None] = dataclasses.field(default_factory=list)


def _request_bytes(conn: _Conn) -> int:
    """Bytes of values per request on ``conn``: a get's spans must fit its segment."""
    if conn.arena is None:
        return _SOCKET_REQUEST_BYTES
    if conn.pool_view is not None:
        return min(_POOL_REQUEST_BYTES, conn.arena.size // 2)
    return _SHM_REQUEST_BYTES


def _write_frames(
    view: memoryview, places: list[tuple[int, int]], keys: list[CacheKey], srcs: list[memoryview]
) -> None:
    """Write each value as a frame at ``(offset, header bytes)`` of ``view``.

    Each payload is checksummed as it is copied (:func:`copy_with_checksum`: one pass over
    memory). The copies run on the event loop: handing copies or checksums to threads measured
    slower on a 2-core host (GIL hand-offs, and a second pass competing for memory bandwidth),
    and so did giving the loop a turn between values (replies then interleave the batches).
    """
    arr = np.frombuffer(view, dtype=np.uint8)
    for (off, h), key, src in zip(places, keys, srcs, strict=True):
        payload = arr[off + h : off + h + src.nbytes]
        checksum = copy_with_checksum(payload, np.frombuffer(src, dtype=np.uint8))
        view[off : off + h] = encode_header(key, payload, checksum=checksum)


def _read_frames(
    frames: list[memoryview | None], keys: list[CacheKey], skeys: list[str], dsts: list[memoryview]
) -> list[int | IntegrityError | None]:
    """Check each frame's header, copy its payload into its ``dst`` and verify it on the way.

    Per value: the payload length, None (a miss), or the IntegrityError that makes it a
    counted miss. The checksum is taken as the payload is copied (one pass over memory), so a
    corrupt value may land in its ``dst`` (allowed: it is reported as a miss).

    Raises:
        InvalidBufferError: A ``dst`` is too small for its value.
    """
    out: list[int | IntegrityError | None] = []
    for frame, key, skey, dst in zip(frames, keys, skeys, dsts, strict=True):
        if frame is None:
            out.append(None)
            continue
        n = frame.nbytes
        try:
            header = parse_header(frame)
            if header.key != skey:
                raise IntegrityError(f"value stored under {skey[:80]} belongs to another key")
            if header.total_len != n:
                raise IntegrityError(f"value for {key} has {n} bytes, its header says {header.total_len}")
            plen = n - header.payload_offset
            if plen > dst.nbytes:
                raise InvalidBufferError(
                    f"buffer of {dst.nbytes} bytes is too small for the {plen}-byte value of {key}"
                )
            target = np.frombuffer(dst, dtype=np.uint8, count=plen)
            payload = np.frombuffer(frame, dtype=np.uint8, offset=header.payload_offset)
            header.verify_checksum(copy_with_checksum(target, payload))
        except IntegrityError as exc:
            out.append(exc)
            continue
        out.append(plen)
    return out
