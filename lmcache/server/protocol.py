"""The lm:// wire protocol: length-prefixed binary frames between a client and ``lmcache server``.

Every message, in both directions, is one frame::

    0   4s  magic  b"LMCS"
    4   B   protocol version (1)
    5   B   opcode (HELLO, PING, CONTAINS, GET, PUT, DELETE, LOOKUP_PREFIX, STATS, RELEASE, COMMIT; 0 in an
            error reply about the connection itself, request id 0, sent before closing it)
    6   H   flags: 1 = reply, 2 = error reply, 4 = the values live in shared memory,
            8 = no reply wanted (RELEASE only)
    8   Q   request id (chosen by the client; a reply carries the id of its request)
    16  I   meta length in bytes (a UTF-8 JSON object: keys, sizes, spans, results)
    20  I   reserved (0)
    24  Q   data length in bytes (values, concatenated, in key order; 0 on the shm path)
    32  ..  meta, then data

Rules both sides keep:

* Lengths are checked against the receiver's limits (``max_meta_bytes``, ``max_frame_bytes``)
  from the fixed header, *before* anything else is read: an oversized frame is refused without
  allocating for it. A bad magic, version or length is a protocol error: the server answers with
  an error reply and closes the connection.
* Meta is JSON (``json.loads`` of a bounded UTF-8 string: no pickle, no object hooks); keys
  travel as :meth:`CacheKey.to_string` strings. Values are opaque bytes; the client stores each
  one as an lmcache value frame (:mod:`lmcache.serde.frame`: key bound in, xxh3 checksum), so
  corruption anywhere between two clients reads as a counted miss.
* Requests are pipelined: a client may send many before reading replies; each reply carries its
  request's id. The server answers the requests of one connection in order.
* The first message must be ``HELLO`` (with the token; auth is on unless the server runs with
  ``--no-auth``). Before it is accepted the server allocates nothing a client chooses: a frame
  sent before auth may hold at most ``HELLO_MAX_BYTES`` of meta and of data, and the whole of it
  must arrive within the server's ``hello_timeout``.

This module holds only the frame codec and constants: it imports nothing from the server or
the client, so both (and tests) can use it.
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

from lmcache.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    InvalidArgumentError,
    InvalidBufferError,
    PermanentBackendError,
)

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_META_BYTES",
    "DEFAULT_PORT",
    "FLAG_ERROR",
    "FLAG_NOREPLY",
    "FLAG_REPLY",
    "FLAG_SHM",
    "HEADER",
    "HEADER_BYTES",
    "MAGIC",
    "PROTOCOL_VERSION",
    "HELLO_MAX_BYTES",
    "FrameHead",
    "Op",
    "ProtocolError",
    "decode_meta",
    "encode_frame_head",
    "encode_meta",
    "error_from_reply",
    "parse_frame_head",
    "sock_sendv",
]

MAGIC = b"LMCS"
PROTOCOL_VERSION = 1
HEADER = struct.Struct("<4sBBHQIIQ")
HEADER_BYTES = HEADER.size  # 32
FLAG_REPLY = 1
FLAG_ERROR = 2
FLAG_SHM = 4
FLAG_NOREPLY = 8
DEFAULT_PORT = 8198
DEFAULT_MAX_FRAME_BYTES = 512 << 20
DEFAULT_MAX_META_BYTES = 16 << 20
#: Largest meta, and largest data, of a frame sent before HELLO is accepted (a HELLO needs ~200 B).
HELLO_MAX_BYTES = 8 << 10


class Op(enum.IntEnum):
    """Operation codes."""

    HELLO = 1
    PING = 2
    CONTAINS = 3
    GET = 4
    PUT = 5
    DELETE = 6
    LOOKUP_PREFIX = 7
    STATS = 8
    RELEASE = 9
    COMMIT = 10


class ProtocolError(PermanentBackendError):
    """A frame broke the protocol (bad magic, version, opcode or an oversized length)."""


class FrameHead:
    """A decoded fixed header."""

    __slots__ = ("data_len", "flags", "meta_len", "op", "request_id")

    def __init__(self, op: int, flags: int, request_id: int, meta_len: int, data_len: int) -> None:
        self.op = op
        self.flags = flags
        self.request_id = request_id
        self.meta_len = meta_len
        self.data_len = data_len

    def __repr__(self) -> str:
        return (
            f"FrameHead(op={self.op}, flags={self.flags}, id={self.request_id}, "
            f"meta={self.meta_len}, data={self.data_len})"
        )


def encode_frame_head(op: int, request_id: int, meta: bytes, data_len: int = 0, flags: int = 0) -> bytes:
    """The fixed header followed by ``meta`` (the data is sent after it, unframed)."""
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, int(op), flags, request_id, len(meta), 0, data_len) + meta


def parse_frame_head(buf: bytes | bytearray | memoryview, max_meta: int, max_data: int) -> FrameHead:
    """Decode and check a fixed header against the receiver's limits.

    Raises:
        ProtocolError: Bad magic, version or opcode, or a length over a limit.
    """
    magic, version, op, flags, rid, meta_len, _reserved, data_len = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise ProtocolError(f"not an lm:// frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported (this side speaks {PROTOCOL_VERSION})")
    if op not in _OPS and not (op == 0 and flags & FLAG_ERROR):  # 0: an error about the connection
        raise ProtocolError(f"unknown opcode {op}")
    if meta_len > max_meta:
        raise ProtocolError(f"frame meta of {meta_len} bytes exceeds the limit of {max_meta} bytes")
    if data_len > max_data:
        raise ProtocolError(f"frame data of {data_len} bytes exceeds the max frame size of {max_data} bytes")
    return FrameHead(op, flags, rid, meta_len, data_len)


_OPS = frozenset(int(o) for o in Op)


def encode_meta(obj: dict[str, Any]) -> bytes:
    """Meta as compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_meta(raw: bytes | bytearray | memoryview) -> dict[str, Any]:
    """Parse meta JSON; it must be an object.

    Raises:
        ProtocolError: Not UTF-8 JSON, or not an object.
    """
    if not raw:
        return {}
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"frame meta is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame meta must be a JSON object, not {type(obj).__name__}")
    return obj


#: Error kinds the server sends, and the exception a client raises for each.
_ERROR_TYPES: dict[str, type[Exception]] = {
    "auth": AuthError,
    "protocol": ProtocolError,
    "bad_request": InvalidArgumentError,
    "invalid_buffer": InvalidBufferError,
    "unavailable": BackendUnavailableError,
    "busy": BackendUnavailableError,  # the server-wide staging budget stayed full: retry later
    "too_large": CapacityError,  # the request needs more staging than the whole budget
    "timeout": BackendTimeoutError,  # a frame stalled longer than the server's read_timeout
    "internal": BackendError,
}


def error_from_reply(meta: dict[str, Any]) -> Exception:
    """The lmcache exception for an error reply's meta (``{"kind": …, "message": …}``)."""
    kind = str(meta.get("kind", "internal"))
    message = str(meta.get("message", "the server reported an error"))
    cls = _ERROR_TYPES.get(kind, BackendError)
    return cls(f"lm server: {message}")


_IOV_MAX = 512

#: With a stall deadline, a buffer the socket cannot take at once is sent in parts this large,
#: each within the deadline: the peer must keep reading, at least this much per deadline.
STALL_STEP = 1 << 20


async def sock_sendv(sock: socket.socket, buffers: Sequence[bytes | memoryview], stall: float | None = None) -> None:
    """Send ``buffers`` in order on a non-blocking socket, gathered (``sendmsg``) where possible.

    One ``sendmsg`` moves a frame head and many values in one syscall; when the socket buffer
    fills, the rest of the current buffer goes through ``loop.sock_sendall`` (which waits for
    the socket to drain) and gathering resumes.

    Args:
        sock: A non-blocking, connected socket.
        buffers: What to send, in order.
        stall: Seconds each :data:`STALL_STEP` bytes may wait for the peer to read (None: no
            limit); a peer that stops reading must not hold the sender forever.

    Raises:
        TimeoutError: The peer read nothing for ``stall`` seconds.
    """
    loop = asyncio.get_running_loop()
    views = [memoryview(b) for b in buffers if len(b)]
    i = 0
    while i < len(views):
        try:
            sent = sock.sendmsg(views[i : i + _IOV_MAX])
        except (BlockingIOError, InterruptedError):
            sent = 0
        while sent and i < len(views):
            n = views[i].nbytes
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
        if i < len(views):
            # Partly sent or would block: wait for room through the loop, then gather again.
            await _send_within(loop, sock, views[i], stall)
            i += 1


async def _send_within(loop: asyncio.AbstractEventLoop, sock: socket.socket, view: memoryview, stall: float | None):
    """``loop.sock_sendall`` of ``view``, each :data:`STALL_STEP` part within ``stall`` seconds."""
    if stall is None:
        await loop.sock_sendall(sock, view)
        return
    while view.nbytes:
        part = view[:STALL_STEP]
        async with asyncio.timeout(stall):
            await loop.sock_sendall(sock, part)
        view = view[part.nbytes :]
