"""Raw redis-py baseline for ``lmcache bench backend --url redis://…`` (and rediss, unix, valkey, valkeys).

The baseline is what an application would do with redis-py alone: pipelined ``SET name value``
of the source bytes and pipelined ``GET name`` copied into the destination buffer. It skips what
lmcache adds on top: the frame header and its xxh3 checksum, the ``NX`` first-writer-wins
condition, key binding and verification, and the in-flight byte budget.

It runs on the same terms as the backend under test, read from its settings:

* the same client: a ``BlockingConnectionPool`` of ``max_connections`` built by
  :meth:`lmcache.backends.redis.RedisBackend.make_client` (same server, database, credentials,
  TLS, timeouts, retries, RESP2);
* the same pipelining: each batch is cut into pipelines of at most ``max_batch_bytes`` and
  ``max_batch_keys`` (the backend's sub-batch rule), and at most ``max_connections`` pipelines
  are in flight over all batches, one connection each.

Values are sent as memoryviews of the source rows (redis-py writes those without a copy of its
own). Its keys live under ``<prefix>bench-baseline:<run>:`` and are unlinked at the end of each
round.

Next to it runs :class:`WireBaseline`, the ceiling: a minimal RESP client over raw blocking
sockets, one worker thread per connection, doing the same pipelined ``SET``/``GET`` of the raw
bytes with nothing on top (no frame, no checksum, no ``NX``): each ``SET`` is one ``sendmsg`` of
the command header, a view of the source and the trailing CRLF; each ``GET`` reply is received
straight into its destination. It spreads a batch over the backend's ``connections`` like the
backend does. Its sockets come from :meth:`lmcache.backends.redis.RedisBackend.connect_socket`
(the data path's own setup: buffers, TLS, AUTH, SELECT), but what it sends and receives on them
shares no code with the backend's data path (:mod:`lmcache.backends.resp`), so it measures what
the server and the socket allow. Its keys live under ``<prefix>bench-wire:<run>:``.

Registered for :class:`~lmcache.backends.redis.RedisBackend` (every scheme it serves) in
:data:`lmcache.bench.baselines.BUILTIN_BASELINES`; importing this module registers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.bench.baselines.base import Baseline

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawRedisBaseline", "WireBaseline", "make"]


def _pipelines(nbytes: int, count: int, max_bytes: int, max_keys: int) -> list[range]:
    """Index ranges of ``count`` equal values of ``nbytes``, each within the byte and key limits.

    A lone value larger than ``max_bytes`` gets a pipeline of its own, as in the backend.
    """
    per = max(1, min(max_keys, max_bytes // max(1, nbytes)))
    return [range(i, min(i + per, count)) for i in range(0, count, per)]


class _SameTermsBaseline(Baseline):
    """What both Redis baselines take from the backend under test: its limits and key prefix.

    Its keys are ``<prefix><tag>:<run>:r<round>:<slot>``; those written this round are kept in
    ``_written`` for ``end_round`` to unlink.
    """

    def __init__(self, backend: Any, tag: str) -> None:
        s = backend.settings
        self._backend = backend
        self._max_connections: int = s.max_connections
        self._max_batch_bytes: int = s.max_batch_bytes
        self._max_batch_keys: int = s.max_batch_keys
        self._dir = s.prefix.encode() + f"{tag}:{uuid.uuid4().hex[:12]}:".encode()
        self._slots = asyncio.Semaphore(s.max_connections)  # one pipeline per connection in flight
        self._round = 0
        self._written: list[bytes] = []

    def _name(self, slot: int) -> bytes:
        return self._dir + f"r{self._round}:{slot}".encode()


class RawRedisBaseline(_SameTermsBaseline):
    """redis-py pipelined SET/GET of the raw bytes, same pool, sub-batch size and connection count."""

    name = "raw-redis-py"

    def __init__(self, backend: Any) -> None:
        super().__init__(backend, "bench-baseline")
        self._client: Any = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "commands": "pipelined SET / GET (no NX, no frame, no checksum)",
            "max_connections": self._max_connections,
            "max_batch_bytes": self._max_batch_bytes,
            "max_batch_keys": self._max_batch_keys,
        }

    async def open(self) -> None:
        client = self._backend.make_client()
        try:
            await client.ping()
        except BaseException:
            await _close_client(client)
            raise
        self._client = client

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.end_round()
        client, self._client = self._client, None
        if client is not None:
            await _close_client(client)

    async def _run(self, slots: range, bufs: Sequence[np.ndarray], op: Any) -> None:
        """Run ``op(names, bufs)`` per pipeline-sized piece of the batch, concurrently."""
        names = [self._name(s) for s in slots]
        nbytes = bufs[0].nbytes if bufs else 0
        pieces = _pipelines(nbytes, len(names), self._max_batch_bytes, self._max_batch_keys)

        async def one(r: range) -> None:
            async with self._slots:
                await op([names[i] for i in r], [bufs[i] for i in r], r)

        await asyncio.gather(*(one(r) for r in pieces))

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        async def put(names: list[bytes], bufs: list[np.ndarray], _r: range) -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, buf in zip(names, bufs, strict=True):
                    pipe.set(name, memoryview(buf).cast("B"))
                await pipe.execute()

        await self._run(slots, srcs, put)
        self._written.extend(self._name(s) for s in slots)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        out: list[int | None] = [None] * len(slots)

        async def get(names: list[bytes], bufs: list[np.ndarray], r: range) -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(name)
                replies = await pipe.execute()
            for i, dst, reply in zip(r, bufs, replies, strict=True):
                if reply is None:
                    continue
                n = min(len(reply), dst.nbytes)
                np.copyto(dst[:n], np.frombuffer(reply, dtype=np.uint8, count=n))
                out[i] = len(reply)

        await self._run(slots, dsts, get)
        return out

    async def end_round(self) -> None:
        names, self._written = self._written, []
        for i in range(0, len(names), 1000):
            await self._client.unlink(*names[i : i + 1000])
        self._round += 1


class _WireConn:
    """One raw blocking socket speaking just enough RESP for SET and GET."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.buf = bytearray(1 << 16)
        self.start = self.end = 0

    def send(self, pieces: list[Any]) -> None:
        if self.tls:
            for p in pieces:
                self.sock.sendall(p)
            return
        views = [memoryview(p).cast("B") for p in pieces]
        while views:
            sent = self.sock.sendmsg(views[:512])
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def line(self) -> bytes:
        while True:
            at = self.buf.find(b"\r\n", self.start, self.end)
            if at >= 0:
                out = bytes(self.buf[self.start : at])
                self.start = at + 2
                return out
            if self.start:
                n = self.end - self.start
                self.buf[:n] = self.buf[self.start : self.end]
                self.start, self.end = 0, n
            got = self.sock.recv_into(memoryview(self.buf)[self.end :])
            if not got:
                raise ConnectionResetError("server closed the connection")
            self.end += got

    def read_into(self, dst: memoryview) -> None:
        have = min(dst.nbytes, self.end - self.start)
        dst[:have] = self.buf[self.start : self.start + have]
        self.start += have
        off = have
        while off < dst.nbytes:
            got = self.sock.recv_into(dst[off:])
            if not got:
                raise ConnectionResetError("server closed the connection")
            off += got


class WireBaseline(_SameTermsBaseline):
    """Raw-socket RESP client: pipelined SET/GET of raw bytes, sendmsg from the source, recv_into the destination."""

    name = "wire"

    def __init__(self, backend: Any) -> None:
        super().__init__(backend, "bench-wire")
        self._connections: int = min(backend.settings.connections, self._max_connections)
        self._idle: list[_WireConn] = []
        self._executor = ThreadPoolExecutor(max_workers=self._max_connections, thread_name_prefix="bench-wire")

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "commands": "pipelined SET / GET over raw sockets (no NX, no frame, no checksum)",
            "connections": self._connections,
            "max_batch_bytes": self._max_batch_bytes,
        }

    def _connect(self) -> _WireConn:
        # The backend's own socket setup (buffers, TLS, AUTH, SELECT); only the RESP on it is ours.
        return _WireConn(self._backend.connect_socket())

    async def _on_connection(self, work: Any) -> Any:
        async with self._slots:
            conn = self._idle.pop() if self._idle else None

            def run() -> tuple[_WireConn, Any]:
                c = conn or self._connect()
                return c, work(c)

            c, result = await asyncio.get_running_loop().run_in_executor(self._executor, run)
            self._idle.append(c)
            return result

    def _parts(self, count: int, nbytes: int) -> list[range]:
        per = -(-count // self._connections)
        per = max(1, min(per, self._max_batch_keys, self._max_batch_bytes // max(1, nbytes)))
        return [range(i, min(i + per, count)) for i in range(0, count, per)]

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        names = [self._name(x) for x in slots]

        def work(c: _WireConn, r: range) -> None:
            pieces: list[Any] = []
            for i in r:
                view = memoryview(srcs[i]).cast("B")
                pieces.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(names[i]), names[i], view.nbytes))
                pieces.append(view)
                pieces.append(b"\r\n")
            c.send(pieces)
            for _ in r:
                reply = c.line()
                if reply != b"+OK":
                    raise ConnectionError(f"wire baseline SET: {reply[:80]!r}")

        nbytes = srcs[0].nbytes if srcs else 0
        await self._spread([lambda c, r=r: work(c, r) for r in self._parts(len(names), nbytes)])
        self._written.extend(names)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        names = [self._name(x) for x in slots]
        out: list[int | None] = [None] * len(names)

        def work(c: _WireConn, r: range) -> None:
            c.send([b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(names[i]), names[i]) for i in r)])
            for i in r:
                head = c.line()
                n = int(head[1:])
                if n < 0:
                    continue
                dst = memoryview(dsts[i]).cast("B")
                if n > dst.nbytes:
                    raise ValueError(f"wire baseline: a value of {n} bytes for a {dst.nbytes}-byte buffer")
                c.read_into(dst[:n])
                c.line()  # the CRLF after the bulk string
                out[i] = n

        nbytes = dsts[0].nbytes if dsts else 0
        await self._spread([lambda c, r=r: work(c, r) for r in self._parts(len(names), nbytes)])
        return out

    async def _spread(self, works: list[Any]) -> None:
        """Run the pieces of one batch, at most ``connections`` at once (as the backend does)."""
        lanes = asyncio.Semaphore(self._connections)

        async def one(work: Any) -> None:
            async with lanes:
                await self._on_connection(work)

        await asyncio.gather(*(one(w) for w in works))

    async def end_round(self) -> None:
        names, self._written = self._written, []

        def unlink(c: _WireConn, chunk: list[bytes]) -> None:
            c.send([_cmd(b"UNLINK", *chunk)])
            c.line()

        for i in range(0, len(names), 1000):
            await self._on_connection(lambda c, chunk=names[i : i + 1000]: unlink(c, chunk))
        self._round += 1

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.end_round()
        idle, self._idle = self._idle, []
        for c in idle:
            with contextlib.suppress(OSError):
                c.sock.close()
        self._executor.shutdown(wait=False)


def _cmd(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


async def _close_client(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()
    with contextlib.suppress(Exception):
        await client.connection_pool.disconnect()


def make(backend: StorageBackend, workload: Workload) -> list[Baseline] | None:
    """The baselines of a standalone Redis/Valkey backend: raw redis-py, then the wire (None for others)."""
    from lmcache.backends.redis import RedisBackend
    from lmcache.backends.redis_cluster import RedisClusterBackend

    if not isinstance(backend, RedisBackend) or isinstance(backend, RedisClusterBackend):
        return None
    return [RawRedisBaseline(backend), WireBaseline(backend)]
