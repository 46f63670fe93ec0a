"""A zero-copy RESP data path: pipelined ``SET``/``GET`` of lmcache value frames over raw sockets.

This is the data path of :mod:`lmcache.backends.redis` and :mod:`lmcache.backends.redis_cluster`
(redis-py keeps everything else: ``PING`` at open, ``EXISTS``, ``UNLINK``, ``SCAN``, topology).
It exists because a general client copies every value several times in Python (packing the
command, the transport's buffer, the reply parser's buffer); here a value is never copied by
Python at all:

* ``SET``: the command header and the frame header are a few hundred bytes of ``bytes``; the
  payload goes to the kernel straight from the caller's buffer (``socket.sendmsg`` of the pieces,
  one vectored call for a whole pipeline). Over TLS (:class:`ssl.SSLSocket` has no ``sendmsg``)
  each piece is ``sendall``-ed as a view, still without a join.
* ``GET``: replies are parsed from a small read buffer; a bulk reply's frame header is read into
  that buffer and checked (magic, header checksum, key binding, lengths) before a byte reaches the
  destination, then the payload is received straight into the caller's ``dst`` (``recv_into``
  on views of it) and hashed (xxh3) piece by piece as it lands, while it is still in cache.

The blocking socket work runs on worker threads (:func:`lmcache.backends.base.run_blocking`): on
this kind of host one thread per connection moving megabytes per system call beat an asyncio
transport (whose reads land in its own buffer and must be copied out). A batch is spread over
several connections by the backend, each sub-batch one pipeline on one connection.

Faults
------
* A connection that fails or times out in the middle of anything is closed, never reused: the
  next command on it would otherwise be read by the server as the rest of a half-sent value. A
  half-sent ``SET`` is never executed (the server waits for the rest of the bulk string and drops
  it with the connection), so a broken put never leaves a partial value readable.
* A ``GET`` broken mid-value raises (or is retried on a fresh connection); a value is reported as
  a hit only after its whole payload arrived and matched its checksum. A ``dst`` may hold part of
  a value after a failed or cancelled call, never after a hit.
* ``deadline`` (a :func:`time.monotonic` instant) bounds a whole call: every socket wait is
  limited to what is left of it (within 10 ms: the timeout set on a socket is kept while it
  fits, since ``settimeout`` is a system call and over TLS a receive is one 16 KiB record), and
  retries stop when it has passed. :meth:`RespJob.cancel`
  (called when the awaiting task is cancelled) shuts the job's socket down and marks the
  connection aborted: a shutdown alone would still let the kernel hand over the bytes it had
  queued (over TLS, raw ciphertext once the SSL object is dropped), so every receive checks the
  mark first and no further byte reaches a ``dst``. The caller waits for the worker (bounded: at
  most the one system call it was in), so nothing touches a buffer after the call returned.

Server error replies become :class:`RespError` items (per command, as in a pipeline); socket
and protocol failures are raised as :mod:`lmcache.errors` exceptions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

from lmcache.errors import (
    AuthError,
    BackendTimeoutError,
    BackendUnavailableError,
    IntegrityError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import MIN_HEADER_BYTES, encode_header, needed_header_bytes, parse_header

__all__ = [
    "CORRUPT",
    "Endpoint",
    "RespConnection",
    "RespError",
    "RespJob",
    "TooSmall",
    "error_kind",
]

_CRLF = b"\r\n"
#: Most iovecs handed to one ``sendmsg`` (Linux's IOV_MAX is 1024).
_IOV_MAX = 512
#: Bytes of a received payload hashed at once: large enough to make the per-call cost vanish,
#: small enough that the bytes are still in L2 from the copy that just landed them.
_HASH_STEP = 256 << 10
#: The small read buffer that reply headers, status replies and frame headers are parsed from.
_READ_BUF = 64 << 10
#: How much later than the call's deadline a socket wait may end when the timeout already set on
#: the socket is kept: ``settimeout`` is a system call, and a wait can be one 16 KiB TLS record.
_TIMEOUT_SLACK = 0.01
#: Kernel socket buffers asked for (loopback moves more per system call with larger ones).
_SOCK_BUF = 4 << 20


class RespError(Exception):
    """An error reply from the server (``-ERR …``), for one command of a pipeline."""

    @property
    def code(self) -> str:
        """The first word of the reply (``OOM``, ``WRONGTYPE``, ``MOVED``, ``NOPERM``…)."""
        text = str(self)
        return text.split(" ", 1)[0] if text else ""


#: A ``GET`` result: the stored value is not a well-formed frame of this key (counted as corrupt).
@dataclasses.dataclass(frozen=True)
class Corrupt:
    """A stored value that failed its integrity check; ``reason`` says how."""

    reason: str


CORRUPT = Corrupt


@dataclasses.dataclass(frozen=True)
class TooSmall:
    """A ``GET`` result: the value has ``needed`` payload bytes, more than its ``dst`` holds."""

    needed: int


_AUTH_CODES = frozenset({"NOAUTH", "WRONGPASS", "NOPERM"})
_UNAVAILABLE_CODES = frozenset({"LOADING", "READONLY", "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "BUSY"})


def error_kind(exc: RespError) -> str:
    """Classify an error reply: ``auth``, ``oom``, ``wrongtype``, ``moved``, ``ask``, ``unavailable`` or ``other``."""
    code = exc.code
    text = str(exc)
    if code in _AUTH_CODES or (code == "ERR" and ("AUTH" in text or "password" in text)):
        return "auth"
    if code == "OOM":
        return "oom"
    if code == "WRONGTYPE":
        return "wrongtype"
    if code == "MOVED":
        return "moved"
    if code == "ASK":
        return "ask"
    if code in _UNAVAILABLE_CODES:
        return "unavailable"
    return "other"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where and how to connect: TCP (``host``/``port``) or a Unix socket (``path``), TLS, AUTH, SELECT.

    ``password`` is a secret: it is sent in ``AUTH`` and never appears in a message.
    """

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    db: int = 0
    connect_timeout: float = 2.0

    def describe(self) -> str:
        """The address for messages (no credentials)."""
        if self.path is not None:
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.ssl_context else 'redis'}://{host}:{self.port}"


def _encode_arg(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    if isinstance(arg, str):
        return arg.encode()
    return str(arg).encode()


def pack_command(*args: bytes | str | int) -> bytes:
    """One RESP command (an array of bulk strings), for small arguments only."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        data = _encode_arg(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RespConnection:
    """One blocking connection to a Redis/Valkey server (or cluster node), RESP2.

    Used by one worker thread at a time; :meth:`abort` may be called from any thread.
    Any exception raised by a method leaves the connection unusable (:attr:`broken`): the caller
    closes it.
    """

    def __init__(self, sock: socket.socket, endpoint: Endpoint) -> None:
        self._sock = sock
        self.endpoint = endpoint
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._buf = bytearray(_READ_BUF)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self.broken = False
        self.last_used = time.monotonic()
        # The timeout set on the socket (seconds; negative: none of ours yet).
        self._armed = -1.0

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def connect(cls, endpoint: Endpoint, deadline: float) -> RespConnection:
        """Connect, wrap in TLS, ``AUTH`` and ``SELECT`` as the endpoint says.

        Raises:
            AuthError: Rejected credentials or an untrusted server certificate.
            BackendUnavailableError: The server cannot be reached within ``connect_timeout``.
            BackendTimeoutError: ``deadline`` passed.
        """
        timeout = min(endpoint.connect_timeout, max(0.001, deadline - time.monotonic()))
        try:
            if endpoint.path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                try:
                    sock.connect(endpoint.path)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):  # a cap below what we ask is fine
                    sock.setsockopt(socket.SOL_SOCKET, opt, _SOCK_BUF)
            if endpoint.ssl_context is not None:
                try:
                    sock = endpoint.ssl_context.wrap_socket(
                        sock, server_hostname=endpoint.server_hostname or endpoint.host
                    )
                except BaseException:
                    sock.close()
                    raise
        except ssl.SSLCertVerificationError as exc:
            raise AuthError(
                f"connecting to {endpoint.describe()}: the server's TLS certificate was not accepted: {exc}"
            ) from exc
        except TimeoutError as exc:
            raise BackendUnavailableError(
                f"connecting to {endpoint.describe()}: no connection within {timeout:g}s"
            ) from exc
        except OSError as exc:
            raise BackendUnavailableError(f"connecting to {endpoint.describe()}: {type(exc).__name__}: {exc}") from exc
        conn = cls(sock, endpoint)
        try:
            conn._handshake(deadline)
        except BaseException:
            conn.close()
            raise
        return conn

    def _handshake(self, deadline: float) -> None:
        ep = self.endpoint
        cmds: list[tuple[str, bytes]] = []
        if ep.password is not None:
            args: tuple[str, ...] = ("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password)
            cmds.append(("AUTH", pack_command(*args)))
        elif ep.username:
            # A user without a password (an ACL user with nopass).
            cmds.append(("AUTH", pack_command("AUTH", ep.username, "")))
        if ep.db:
            cmds.append(("SELECT", pack_command("SELECT", ep.db)))
        if not cmds:
            return
        self.send([b"".join(c for _, c in cmds)], deadline)
        for what, _ in cmds:
            reply = self.read_reply(deadline)
            if isinstance(reply, RespError):
                if what == "AUTH" or error_kind(reply) == "auth":
                    # The server's words only: they never echo the password.
                    raise AuthError(f"{what} on {ep.describe()} refused: {reply}")
                raise PermanentBackendError(f"{what} on {ep.describe()} failed: {reply}")

    def abort(self) -> None:
        """Stop any send or receive now (from any thread); the connection is then broken.

        ``shutdown`` wakes a blocked call, but a receive still returns bytes the kernel had
        already queued (up to a socket buffer's worth), so every receive and send also checks
        :attr:`broken` first: after this returns, the owning thread makes at most the one
        system call it is already in, then raises :class:`ConnectionAbortedError`.
        """
        self.broken = True
        with contextlib.suppress(OSError):
            # socket.socket's own shutdown, also for TLS: SSLSocket.shutdown drops its SSL object,
            # after which a racing recv_into would land raw ciphertext in the caller's buffer.
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def _live(self) -> socket.socket:
        """The socket, unless the connection was aborted (then nothing more is sent or received)."""
        if self.broken:
            raise ConnectionAbortedError(f"connection to {self.endpoint.describe()} aborted")
        return self._sock

    def _arm(self, deadline: float) -> socket.socket:
        """The live socket, its timeout set for one wait that must end by ``deadline``.

        The timeout already set is kept while a wait bounded by it can end neither before
        ``deadline`` (no early timeout) nor more than ``_TIMEOUT_SLACK`` after it; else it is set
        to what is left.

        Raises:
            ConnectionAbortedError: The connection was aborted.
            TimeoutError: ``deadline`` passed.
        """
        sock = self._live()
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        if not 0.0 <= self._armed - left <= _TIMEOUT_SLACK:
            sock.settimeout(left)
            self._armed = left
        return sock

    def close(self) -> None:
        """Close the socket (only by the thread that owns the connection, or when it is idle)."""
        self.broken = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def detach(self) -> socket.socket:
        """Hand the socket to the caller, who then owns and closes it; this connection is then broken.

        For a connection fresh from :meth:`connect` (which leaves nothing unread): a tool that
        speaks RESP itself on a socket set up like the data path's takes it from here.

        Raises:
            RuntimeError: Bytes were received and not read yet (they would be lost).
        """
        if self._end != self._start:
            raise RuntimeError(f"{self.endpoint.describe()}: a connection with unread bytes cannot be detached")
        self.broken = True
        return self._sock

    # -- bytes on the wire ------------------------------------------------------------------

    def send(self, pieces: Sequence[bytes | memoryview], deadline: float) -> None:
        """Send ``pieces`` in order, without joining them (vectored where the socket allows)."""
        if self._tls:
            for p in pieces:
                self._arm(deadline).sendall(p)
            return
        views = [memoryview(p).cast("B") for p in pieces if len(p)]
        i = 0
        while i < len(views):
            sent = self._arm(deadline).sendmsg(views[i : i + _IOV_MAX])
            while sent:
                n = views[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0

    def _fill(self, deadline: float) -> None:
        """Receive more bytes into the read buffer (compacting it first)."""
        if self._start:
            n = self._end - self._start
            self._view[:n] = self._view[self._start : self._end]
            self._start, self._end = 0, n
        if self._end == len(self._buf):
            raise PermanentBackendError(f"reply line from {self.endpoint.describe()} longer than {_READ_BUF} bytes")
        got = self._arm(deadline).recv_into(self._view[self._end :])
        if not got:
            raise ConnectionResetError("the server closed the connection")
        self._end += got

    def _line(self, deadline: float) -> bytes:
        while True:
            at = self._buf.find(_CRLF, self._start, self._end)
            if at >= 0:
                line = bytes(self._view[self._start : at])
                self._start = at + 2
                return line
            self._fill(deadline)

    def _read_exact_into(self, dst: memoryview, deadline: float, hasher: Any = None) -> None:
        """Fill ``dst`` from the buffer first, then straight from the socket; hash as it lands."""
        self._live()  # not even buffered bytes reach dst after an abort
        n = dst.nbytes
        have = min(n, self._end - self._start)
        if have:
            dst[:have] = self._view[self._start : self._start + have]
            self._start += have
        off = hashed = 0
        if hasher is not None and have:
            hasher.update(dst[:have])
            hashed = have
        off = have
        while off < n:
            got = self._arm(deadline).recv_into(dst[off:], n - off)
            if not got:
                raise ConnectionResetError("the server closed the connection in the middle of a value")
            off += got
            if hasher is not None and off - hashed >= _HASH_STEP:
                hasher.update(dst[hashed:off])
                hashed = off
        if hasher is not None and hashed < n:
            hasher.update(dst[hashed:n])

    def _skip(self, n: int, deadline: float) -> None:
        """Read and drop ``n`` bytes (the rest of a value that is not delivered)."""
        while n:
            if self._start == self._end:
                self._start = self._end = 0
                self._fill(deadline)
            take = min(n, self._end - self._start)
            self._start += take
            n -= take

    def _small(self, n: int, deadline: float) -> memoryview:
        """The next ``n`` bytes (at most the read buffer's size) as a view of the buffer."""
        if n > len(self._buf):
            raise PermanentBackendError(f"a frame header of {n} bytes is larger than the read buffer")
        while self._end - self._start < n:
            if self._start and len(self._buf) - self._start < n:
                m = self._end - self._start
                self._view[:m] = self._view[self._start : self._end]
                self._start, self._end = 0, m
            got = self._arm(deadline).recv_into(self._view[self._end :])
            if not got:
                raise ConnectionResetError("the server closed the connection")
            self._end += got
        out = self._view[self._start : self._start + n]
        self._start += n
        return out

    def _crlf(self, deadline: float) -> None:
        tail = self._small(2, deadline)
        if tail != _CRLF:
            raise PermanentBackendError(
                f"malformed reply from {self.endpoint.describe()}: bulk string not ended by CRLF"
            )

    # -- replies ----------------------------------------------------------------------------

    def read_reply(self, deadline: float) -> Any:
        """One reply, fully read: ``bytes`` (status or bulk), ``int``, ``None``, :class:`RespError` or a list."""
        line = self._line(deadline)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            out = bytearray(n)
            self._read_exact_into(memoryview(out), deadline)
            self._crlf(deadline)
            return bytes(out)
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.read_reply(deadline) for _ in range(n)]
        raise PermanentBackendError(f"malformed reply from {self.endpoint.describe()}: {line[:40]!r}")

    def _bulk_len(self, deadline: float) -> int | RespError | None:
        """The header of a ``GET`` reply: the bulk length, ``None`` for nil, or an error reply."""
        line = self._line(deadline)
        kind = line[:1]
        if kind == b"$":
            n = int(line[1:])
            return None if n < 0 else n
        if kind == b"-":
            return RespError(line[1:].decode("utf-8", "replace"))
        raise PermanentBackendError(f"unexpected reply to GET from {self.endpoint.describe()}: {line[:40]!r}")

    # -- commands ---------------------------------------------------------------------------

    def command(self, deadline: float, *args: bytes | str | int) -> Any:
        """Run one small command and return its reply (``PING``, ``ASKING``…)."""
        self.send([pack_command(*args)], deadline)
        return self.read_reply(deadline)

    def set_frames(
        self,
        names: Sequence[bytes],
        keys: Sequence[CacheKey],
        payloads: Sequence[memoryview],
        deadline: float,
        out: list[Any],
        *,
        px: int | None = None,
        asking: Sequence[bool] | None = None,
    ) -> None:
        """Pipelined ``SET name frame NX [PX px]``; appends True (stored), False (held already) or the error reply.

        Each frame is its header (built here, checksum included) and the caller's payload view,
        sent as separate pieces. Results are appended to ``out`` as the replies arrive, so after
        a failure ``len(out)`` items are settled. ``asking[i]`` precedes command ``i`` with
        ``ASKING`` (a cluster slot being migrated); its ``+OK`` is read and dropped.
        """
        tail = (
            b"\r\n$2\r\nNX\r\n"
            if px is None
            else b"\r\n$2\r\nNX\r\n$2\r\nPX\r\n" + b"$%d\r\n%d\r\n" % (len(str(px)), px)
        )
        argc = 4 if px is None else 6
        pieces: list[bytes | memoryview] = []
        pending = b""
        for i, (name, key, payload) in enumerate(zip(names, keys, payloads, strict=True)):
            header = encode_header(key, payload)
            ask = pack_command("ASKING") if asking is not None and asking[i] else b""
            head = b"%s*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (
                ask,
                argc,
                len(name),
                name,
                len(header) + payload.nbytes,
            )
            pieces.append(pending + head + header)
            if payload.nbytes:
                pieces.append(payload)
            pending = tail
        if pending:
            pieces.append(pending)
        self.send(pieces, deadline)
        for i in range(len(names)):
            if asking is not None and asking[i]:
                self.read_reply(deadline)
            reply = self.read_reply(deadline)
            out.append(reply if isinstance(reply, RespError) else reply is not None)
        self.last_used = time.monotonic()

    def get_frames(
        self,
        names: Sequence[bytes],
        keys: Sequence[CacheKey],
        dsts: Sequence[memoryview],
        deadline: float,
        out: list[Any],
        *,
        asking: Sequence[bool] | None = None,
    ) -> None:
        """Pipelined ``GET``; appends the payload bytes written into each ``dst``, or why not.

        ``None`` is a miss (``dst`` untouched); :class:`Corrupt` a value that is not a good frame
        of its key (``dst`` untouched unless the payload checksum failed); :class:`TooSmall` a
        value larger than its ``dst`` (untouched); a :class:`RespError` the server's error reply.
        A result is appended only once its value was wholly received and checked.
        """
        self.send([self._gets(names, asking)], deadline)
        self.read_frames_into(keys, dsts, deadline, out, asking=asking)

    def read_frames_into(
        self,
        keys: Sequence[CacheKey],
        dsts: Sequence[memoryview],
        deadline: float,
        out: list[Any],
        *,
        asking: Sequence[bool] | None = None,
    ) -> None:
        """The receiving half of :meth:`get_frames`: read the replies to GET commands already sent."""
        for i, (key, dst) in enumerate(zip(keys, dsts, strict=True)):
            if asking is not None and asking[i]:
                self.read_reply(deadline)
            out.append(self._read_frame_into(key, dst, deadline))
        self.last_used = time.monotonic()

    @staticmethod
    def _gets(names: Sequence[bytes], asking: Sequence[bool] | None = None) -> bytes:
        ask = pack_command("ASKING")
        return b"".join(
            (ask if asking is not None and asking[i] else b"") + b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(n), n)
            for i, n in enumerate(names)
        )

    def _read_frame_into(
        self, key: CacheKey, dst: memoryview, deadline: float
    ) -> int | Corrupt | TooSmall | RespError | None:
        total = self._bulk_len(deadline)
        if total is None or isinstance(total, RespError):
            return total
        if total < MIN_HEADER_BYTES:
            self._skip(total + 2, deadline)
            return Corrupt(f"value of {total} bytes is shorter than a frame header")
        head = self._small(MIN_HEADER_BYTES, deadline)
        left = total - MIN_HEADER_BYTES
        try:
            more = needed_header_bytes(head) - MIN_HEADER_BYTES
            if more > left:
                raise IntegrityError("value is truncated inside its frame header")
            whole = bytes(head) + bytes(self._small(more, deadline)) if more else bytes(head)
            left -= more
            header = parse_header(whole, key)
            pad = header.payload_offset - len(whole)
            if pad < 0 or pad + header.payload_len != left:
                raise IntegrityError(
                    f"value for {header.key[:80]} has {total} bytes, its header says {header.total_len}"
                )
        except IntegrityError as exc:
            self._skip(left + 2, deadline)
            return Corrupt(str(exc))
        if header.payload_len > dst.nbytes:
            self._skip(left + 2, deadline)
            return TooSmall(header.payload_len)
        self._skip(pad, deadline)
        hasher = xxhash.xxh3_64()
        self._read_exact_into(dst[: header.payload_len], deadline, hasher)
        self._crlf(deadline)
        if hasher.intdigest() != header.checksum:
            return Corrupt(f"value for {header.key[:80]} failed its checksum")
        return header.payload_len


class RespJob:
    """One sub-batch's run on a worker thread: connection handling, retries and cancellation.

    The event loop side hands it an idle connection (or none) and, on cancellation, calls
    :meth:`cancel`; the worker calls :meth:`run`. Afterwards :attr:`conn` is the connection to
    give back to the pool (``None`` when it broke and was closed).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        conn: RespConnection | None,
        deadline: float,
        *,
        retries: int = 0,
        backoff: float = 0.05,
        backoff_max: float = 1.0,
        health_check_interval: float = 0.0,
    ) -> None:
        self.endpoint = endpoint
        self.conn = conn
        self.deadline = deadline
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.health_check_interval = health_check_interval
        self._lock = threading.Lock()
        self._cancelled = False

    def cancel(self) -> None:
        """The caller gave up: unblock the worker (it closes the connection and returns)."""
        with self._lock:
            self._cancelled = True
            conn = self.conn
        if conn is not None:
            conn.abort()

    def _connection(self) -> RespConnection:
        conn = self.conn
        if (
            conn is not None
            and self.health_check_interval
            and time.monotonic() - conn.last_used > self.health_check_interval
            and conn.command(self.deadline, "PING") != b"PONG"
        ):
            raise ConnectionError("PING got no PONG")
        if conn is None or conn.broken:
            fresh = RespConnection.connect(self.endpoint, self.deadline)
            with self._lock:
                if self._cancelled:
                    fresh.close()
                    raise ConnectionAbortedError("cancelled")
                self.conn = fresh
            conn = fresh
        return conn

    def run(self, op: Callable[[RespConnection], None], what: str) -> None:
        """Run ``op(connection)``, retrying connection failures on a fresh connection.

        ``op`` must record its results as they arrive and, when run again, resume after the
        last one recorded (see :meth:`RespConnection.set_frames`). Retries back off
        exponentially and stop at ``retries`` or at the deadline.

        Raises:
            BackendTimeoutError: The deadline passed.
            BackendUnavailableError: The server cannot be reached, retries spent.
            AuthError: Credentials refused.
            PermanentBackendError: A malformed reply.
        """
        attempt = 0
        while True:
            try:
                op(self._connection())
                return
            except TimeoutError as exc:
                self._drop()
                raise BackendTimeoutError(
                    f"{what} on {self.endpoint.describe()}: no answer within the call's deadline"
                ) from exc
            except (OSError, ConnectionError, BackendUnavailableError) as exc:
                self._drop()
                if self._cancelled:
                    raise
                if attempt >= self.retries:
                    if isinstance(exc, BackendUnavailableError):
                        raise
                    raise BackendUnavailableError(
                        f"{what} on {self.endpoint.describe()}: {type(exc).__name__}: {exc}"
                    ) from exc
                pause = min(self.backoff_max, self.backoff * (2**attempt))
                attempt += 1
                if time.monotonic() + pause >= self.deadline:
                    raise BackendTimeoutError(
                        f"{what} on {self.endpoint.describe()}: the deadline passed while retrying ({exc})"
                    ) from exc
                time.sleep(pause)
            except BaseException:
                self._drop()
                raise

    def _drop(self) -> None:
        with self._lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
