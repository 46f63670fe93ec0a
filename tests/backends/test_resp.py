"""Tests of the zero-copy RESP data path (:mod:`lmcache.backends.resp`) against a real redis-server.

Faults are injected with a small TCP proxy that cuts a connection after a number of bytes (a fake
for fault injection only; the server is real). No timing thresholds.
"""

from __future__ import annotations

import contextlib
import fcntl
import random
import socket
import ssl
import struct
import termios
import threading
import time
import types
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest
import redis
from servers import RedisServer

import lmcache.backends.resp as resp_module
from lmcache.backends.resp import Corrupt, Endpoint, RespConnection, RespJob, TooSmall, pack_command
from lmcache.errors import AuthError, BackendTimeoutError, BackendUnavailableError
from lmcache.keys import CacheKey
from lmcache.serde.frame import encode_header

MiB = 1 << 20


def key(i: int) -> CacheKey:
    return CacheKey("resp-test", 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


def endpoint(server: RedisServer, **kw: object) -> Endpoint:
    u = urlsplit(server.url)
    return Endpoint(host=u.hostname or "127.0.0.1", port=u.port or 6379, **kw)  # type: ignore[arg-type]


def raw(server: RedisServer, db: int = 0) -> redis.Redis:
    u = urlsplit(server.url)
    return redis.Redis(host=u.hostname or "127.0.0.1", port=u.port or 6379, db=db)


def names(n: int) -> list[bytes]:
    base = f"lmcache:resp-{uuid.uuid4().hex[:8]}:"
    return [f"{base}{i}".encode() for i in range(n)]


def soon(seconds: float = 30.0) -> float:
    return time.monotonic() + seconds


class CuttingProxy:
    """Forwards TCP to the server; the first ``cut_connections`` connections are cut after ``cut_after``
    bytes in one direction (``"up"``: client to server, ``"down"``: server to client)."""

    def __init__(self, port: int, cut_after: int, direction: str, cut_connections: int = 1) -> None:
        self.port = port
        self.cut_after = cut_after
        self.direction = direction
        self.cut_left = cut_connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.threads: list[threading.Thread] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.port))
            limit = None
            if self.cut_left > 0:
                self.cut_left -= 1
                limit = self.cut_after
            for src, dst, d in ((client, server, "up"), (server, client, "down")):
                t = threading.Thread(
                    target=self._pump, args=(src, dst, limit if d == self.direction else None, client, server)
                )
                t.daemon = True
                t.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, limit: int | None, *both: socket.socket) -> None:
        moved = 0
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if limit is not None and moved + len(data) >= limit:
                    dst.sendall(data[: limit - moved])
                    break  # cut: both sockets close below, mid-value
                dst.sendall(data)
                moved += len(data)
        except OSError:
            pass
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.fixture
def conn(redis_server: RedisServer) -> Iterator[RespConnection]:
    c = RespConnection.connect(endpoint(redis_server), soon())
    yield c
    c.close()


# ---------------------------------------------------------------------------------------------
# The data path: what goes on the wire, what lands in dst


def test_set_is_byte_identical_to_a_joined_frame_and_sends_the_callers_buffer() -> None:
    a, b = socket.socketpair()
    sent: list[object] = []

    class Recording(socket.socket):
        def sendmsg(self, buffers, *args):  # type: ignore[no-untyped-def,override]
            sent.extend(buffers)
            return super().sendmsg(buffers, *args)

    rec = Recording(fileno=a.detach())
    conn = RespConnection(rec, Endpoint())
    src = np.frombuffer(value(1, 300_000), dtype=np.uint8).copy()
    view = memoryview(src)
    t = threading.Thread(target=lambda: conn.set_frames([b"k"], [key(1)], [view], soon(), [], px=5000))
    t.start()
    frame = encode_header(key(1), view) + src.tobytes()
    expect = b"*6\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n$2\r\nNX\r\n$2\r\nPX\r\n$4\r\n5000\r\n" % (len(frame), frame)
    got = b""
    while len(got) < len(expect):
        got += b.recv(1 << 20)
    assert got == expect
    b.sendall(b"+OK\r\n")
    t.join()
    # The payload went to the kernel as a view of the caller's array: no copy in Python.
    assert any(isinstance(x, memoryview) and x.obj is src for x in sent)
    rec.close()
    b.close()


def test_pipelined_set_and_get_round_trip_straight_into_dst(conn: RespConnection, redis_server: RedisServer) -> None:
    n = 6
    ns = names(n)
    vals = [value(i, 3 * MiB + i) for i in range(n)]
    out: list[object] = []
    conn.set_frames(ns, [key(i) for i in range(n)], [memoryview(v) for v in vals], soon(), out)
    assert out == [True] * n
    again: list[object] = []
    conn.set_frames(ns[:1], [key(0)], [memoryview(vals[0])], soon(), again)
    assert again == [False]  # NX: first writer wins

    dsts = [bytearray(b"\xaa" * (4 * MiB)) for _ in range(n + 1)]
    got: list[object] = []
    conn.get_frames(
        [*ns, b"lmcache:resp-missing"],
        [*(key(i) for i in range(n)), key(99)],
        [memoryview(d) for d in dsts],
        soon(),
        got,
    )
    assert got == [len(v) for v in vals] + [None]
    for v, d in zip(vals, dsts, strict=False):
        assert d[: len(v)] == v
        assert d[len(v) :] == b"\xaa" * (4 * MiB - len(v))  # nothing past the value
    assert dsts[-1] == b"\xaa" * (4 * MiB)  # a miss is untouched
    with raw(redis_server) as r:
        assert r.get(ns[0]) == encode_header(key(0), vals[0]) + vals[0]
        r.unlink(*ns)


def test_damaged_values_are_reported_and_the_pipeline_stays_in_step(
    conn: RespConnection, redis_server: RedisServer
) -> None:
    ns = names(6)
    good = value(1, 200_000)
    frame = encode_header(key(1), good) + good
    with raw(redis_server) as r:
        r.set(ns[0], frame)
        r.set(ns[1], frame[:-1])  # truncated
        r.set(ns[2], b"XXXX" + frame[4:])  # bad magic
        r.set(ns[3], frame)  # read under another key: belongs to key(1)
        r.set(ns[4], frame[:-1] + bytes([frame[-1] ^ 1]))  # payload flipped
        r.rpush(ns[5], b"x")  # not a string
    ks = [key(1), key(1), key(1), key(3), key(1), key(1)]
    dsts = [bytearray(b"\x55" * 200_000) for _ in range(6)]
    small = bytearray(10)
    got: list[object] = []
    conn.get_frames(
        [*ns, ns[0], ns[0]],
        [*ks, key(1), key(1)],
        [*map(memoryview, dsts), memoryview(small), memoryview(dsts[0])],
        soon(),
        got,
    )
    assert got[0] == 200_000
    assert isinstance(got[1], Corrupt) and isinstance(got[2], Corrupt) and isinstance(got[3], Corrupt)
    assert isinstance(got[4], Corrupt) and "checksum" in got[4].reason
    assert got[5].code == "WRONGTYPE"  # type: ignore[union-attr]
    assert got[6] == TooSmall(200_000)
    assert got[7] == 200_000  # after all of that, the next value still parses
    for i in (1, 2, 3):
        assert dsts[i] == b"\x55" * 200_000, "caught in the header: dst untouched"
    assert small == bytearray(10)
    with raw(redis_server) as r:
        r.unlink(*ns)


def test_auth_select_and_refused_credentials(redis_acl_server: RedisServer, redis_server: RedisServer) -> None:
    user, password = redis_acl_server.extra.get("user"), redis_acl_server.extra.get("password")
    if not user:
        pytest.skip("needs the local ACL server")
    ep = endpoint(redis_acl_server, username=user, password=password)
    c = RespConnection.connect(ep, soon())
    ns = [b"lmcache:resp-acl"]
    out: list[object] = []
    c.set_frames(ns, [key(1)], [memoryview(b"v")], soon(), out)
    assert out == [True]
    denied: list[object] = []
    c.set_frames([b"forbidden:x"], [key(1)], [memoryview(b"v")], soon(), denied)
    assert denied[0].code == "NOPERM"  # type: ignore[union-attr]
    c.command(soon(), "UNLINK", ns[0])
    c.close()
    with pytest.raises(AuthError) as info:
        RespConnection.connect(endpoint(redis_acl_server, username=user, password="WRONG-pw-9"), soon())
    assert "WRONG-pw-9" not in str(info.value)

    c = RespConnection.connect(endpoint(redis_server, db=5), soon())
    ns = names(1)
    c.set_frames(ns, [key(2)], [memoryview(b"db five")], soon(), [])
    c.close()
    with raw(redis_server, db=5) as r5, raw(redis_server, db=0) as r0:
        assert r5.exists(ns[0]) and not r0.exists(ns[0])
        r5.unlink(ns[0])


# ---------------------------------------------------------------------------------------------
# Faults


def test_a_set_cut_mid_value_is_never_committed_and_a_retry_stores_it_whole(redis_server: RedisServer) -> None:
    port = urlsplit(redis_server.url).port
    assert port is not None
    payload = value(7, 8 * MiB)
    proxy = CuttingProxy(port, cut_after=3 * MiB, direction="up")
    try:
        ep = Endpoint(host="127.0.0.1", port=proxy.address[1])
        ns = names(1)
        out: list[object] = []
        job = RespJob(ep, None, soon(), retries=0)
        with pytest.raises(BackendUnavailableError):
            job.run(lambda c: c.set_frames(ns, [key(7)], [memoryview(payload)], soon(), out), "SET")
        assert job.conn is None  # a broken connection is closed, never pooled
        with raw(redis_server) as r:
            time.sleep(0.2)  # let the server notice the closed connection
            assert not r.exists(ns[0]), "a half-sent SET was committed"

        proxy.cut_left = 1
        out = []
        job = RespJob(ep, None, soon(), retries=1, backoff=0.01)
        job.run(lambda c: c.set_frames(ns[len(out) :], [key(7)], [memoryview(payload)], soon(), out), "SET")
        assert out == [True]
        with raw(redis_server) as r:
            assert r.get(ns[0]) == encode_header(key(7), payload) + payload
            r.unlink(ns[0])
        assert job.conn is not None
        job.conn.close()
    finally:
        proxy.close()


def test_a_get_cut_mid_value_is_never_a_hit(redis_server: RedisServer) -> None:
    port = urlsplit(redis_server.url).port
    assert port is not None
    payload = value(8, 8 * MiB)
    ns = names(1)
    with raw(redis_server) as r:
        r.set(ns[0], encode_header(key(8), payload) + payload)
    proxy = CuttingProxy(port, cut_after=5 * MiB, direction="down")
    try:
        ep = Endpoint(host="127.0.0.1", port=proxy.address[1])
        dst = bytearray(8 * MiB)
        got: list[object] = []
        job = RespJob(ep, None, soon(), retries=0)
        with pytest.raises(BackendUnavailableError):
            job.run(lambda c: c.get_frames(ns, [key(8)], [memoryview(dst)], soon(), got), "GET")
        assert got == [], "a value cut mid-way was reported"

        proxy.cut_left = 1
        job = RespJob(ep, None, soon(), retries=1, backoff=0.01)
        job.run(lambda c: c.get_frames(ns[len(got) :], [key(8)], [memoryview(dst)], soon(), got), "GET")
        assert got == [8 * MiB]
        assert dst == payload
        assert job.conn is not None
        job.conn.close()
    finally:
        proxy.close()
        with raw(redis_server) as r:
            r.unlink(ns[0])


def test_deadline_and_cancel_end_a_call_to_a_server_that_never_answers() -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (backlog), never answers
    try:
        ep = Endpoint(host="127.0.0.1", port=silent.getsockname()[1])
        job = RespJob(ep, None, time.monotonic() + 0.5, retries=3)
        with pytest.raises(BackendTimeoutError):
            job.run(lambda c: c.get_frames([b"k"], [key(1)], [memoryview(bytearray(8))], job.deadline, []), "GET")

        job = RespJob(ep, None, soon(120), retries=0)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                job.run(lambda c: c.get_frames([b"k"], [key(1)], [memoryview(bytearray(8))], job.deadline, []), "GET")
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        while job.conn is None:
            time.sleep(0.01)
        job.cancel()  # what a cancelled task does: the worker returns at once
        t.join(30)
        assert not t.is_alive()
        assert errors and job.conn is None
    finally:
        silent.close()


def _queued(c: RespConnection) -> int:
    """Bytes the kernel holds for the connection's socket, not yet received (FIONREAD)."""
    out = fcntl.ioctl(c._sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    return int(struct.unpack("i", out)[0])


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_after_abort_not_even_a_queued_reply_reaches_dst(request: pytest.FixtureRequest, tls: bool) -> None:
    """Rule 3 on the data path: once a cancel has aborted the connection, nothing more lands in dst.

    ``shutdown`` does not make a receive return at once: the kernel still hands out the bytes it
    had queued (a loopback reply of megabytes), so the worker went on writing them into ``dst``
    (over TLS, once ``SSLSocket.shutdown`` dropped its SSL object, raw ciphertext). Here the
    whole reply is queued before the abort, the state in which that happened every time.
    """
    server: RedisServer = request.getfixturevalue("redis_tls_server" if tls else "redis_server")
    ctx = ssl.create_default_context(cafile=server.extra["ca"]) if tls else None
    ep = endpoint(server, ssl_context=ctx)
    payload = value(9, 256 << 10)
    ns = names(1)
    c = RespConnection.connect(ep, soon())
    try:
        stored: list[object] = []
        c.set_frames(ns, [key(9)], [memoryview(payload)], soon(), stored)
        assert stored == [True]
        c.send([pack_command("GET", ns[0])], soon())
        # Wait until the whole reply sits in the kernel's receive queue (and stops growing).
        reply = len(encode_header(key(9), payload)) + len(payload)
        last, steady = -1, 0
        while steady < 3:
            time.sleep(0.02)
            n = _queued(c)
            steady = steady + 1 if n == last and n >= reply else 0
            last = n
        c.abort()  # what RespJob.cancel does when the awaiting task is cancelled
        dst = bytearray(b"\xa5" * len(payload))
        got: list[object] = []
        with pytest.raises(ConnectionAbortedError):
            c.read_frames_into([key(9)], [memoryview(dst)], soon(), got)
        assert got == [], "a value read after the abort was reported"
        assert dst.count(0xA5) == len(dst), "bytes were written into dst after the abort"
    finally:
        c.close()
        fresh = RespConnection.connect(ep, soon())
        with contextlib.closing(fresh):
            fresh.command(soon(), "UNLINK", ns[0])


def test_the_socket_timeout_is_kept_while_it_fits_the_deadline(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # settimeout is a system call; over TLS a receive is one 16 KiB record, so it is not made per
    # receive. A wait bounded by the socket's timeout must still never end before the deadline
    # (no early timeout) nor more than _TIMEOUT_SLACK after it.
    c = RespConnection.connect(endpoint(redis_server), soon())
    try:
        sock = c._sock
        now = [1000.0]
        monkeypatch.setattr(resp_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
        deadline = 1030.0
        assert c._arm(deadline) is sock and sock.gettimeout() == 30.0
        now[0] += resp_module._TIMEOUT_SLACK / 2
        c._arm(deadline)
        assert sock.gettimeout() == 30.0  # kept: ends at most half the slack late
        now[0] += resp_module._TIMEOUT_SLACK
        c._arm(deadline)
        assert sock.gettimeout() == pytest.approx(deadline - now[0])  # would end too late: set again
        c._arm(deadline + 100)
        assert sock.gettimeout() == pytest.approx(deadline + 100 - now[0])  # a later deadline: never early
        c._arm(deadline - 20)
        assert sock.gettimeout() == pytest.approx(deadline - 20 - now[0])
        now[0] = deadline
        with pytest.raises(TimeoutError):
            c._arm(deadline)
        monkeypatch.undo()
        assert c.command(soon(), "PING") == b"PONG"
    finally:
        c.close()
