"""The control protocol between a ``nixl://`` client and its peer: message framing and field codecs.

Values never travel over this protocol: clients move the bytes themselves with one-sided NIXL
WRITE (put) and READ (get) transfers between their own registered buffers and the peer's pool.
The control protocol only decides *where*:

* ``HELLO``: the peer's agent metadata and the pool's address and length (the client adds the
  peer as a remote agent).
* ``RESERVE`` (a client-chosen group id, keys, frame lengths) → per key: an offset in the pool,
  ``EXISTS``, or a refusal (``capacity``, ``too_large``). Reservations are invisible to readers
  until ``COMMIT`` of their group; a commit with ``ok=0`` (the client failed or was cancelled)
  frees them; a dropped connection frees all of its open groups. Requests on one connection are
  handled in order, so a client cancelled while waiting for a ``RESERVE`` reply can abort the
  group at once, without knowing what was reserved.
* ``LOOKUP`` (keys) → per key: a lease id, offset and lengths. A leased entry's bytes are not
  reused while the lease is held, even if the key is deleted meanwhile (its space is freed on
  ``RELEASE``, or when the connection drops), so a reader never sees another value's bytes.
* ``CONTAINS``, ``DELETE``, ``LIST``, ``STATS``, ``PING``.
* ``CORRUPT`` (only on a peer started with ``--debug-ops``): flip the last byte of a stored
  value, the bypass path of integrity tests.

Wire format (little-endian): every message is a 12-byte head ``<IBBHI>`` (body length, protocol
version, op, flags, request id) followed by the body. A reply carries the request's id and op
(``ERROR``, op 255, with a UTF-8 message, when the request failed). Bodies are lists of
length-prefixed fields; every length is checked against the body and against hard limits
(:data:`MAX_BODY`, :data:`MAX_KEY`, :data:`MAX_BATCH`) before use; nothing is unpickled.

Both sides (:mod:`lmcache.backends.nixl.peer`, :mod:`lmcache.backends.nixl.backend`) and the raw
benchmark baseline speak it through this module only.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence

from lmcache.errors import PermanentBackendError

__all__ = [
    "FRAME_ALIGN",
    "HEAD",
    "HIT",
    "MAX_BATCH",
    "MAX_BODY",
    "MAX_KEY",
    "MISS",
    "RESERVED",
    "U16",
    "U32",
    "U64",
    "VERSION",
    "Op",
    "ProtocolError",
    "Reader",
    "Status",
    "pack_key",
    "pack_keys",
    "pack_message",
    "read_message",
]

VERSION = 1
HEAD = struct.Struct("<IBBHI")  # body length, version, op, flags, request id
#: Largest message body either side accepts.
MAX_BODY = 64 << 20
#: Longest key (bytes of ``CacheKey.to_string()``).
MAX_KEY = 4096
#: Most keys in one request.
MAX_BATCH = 65536
#: Clients align the frames they write into the pool to this many bytes.
FRAME_ALIGN = 64

U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
#: A ``RESERVE`` reply item: status, offset in the pool.
RESERVED = struct.Struct("<BQ")
#: A ``LOOKUP`` reply item: found, lease id, offset, frame length, header length.
HIT = struct.Struct("<BQQQI")
MISS = HIT.pack(0, 0, 0, 0, 0)


class Op:
    """Request and reply operation codes."""

    HELLO = 1
    RESERVE = 2
    COMMIT = 3
    LOOKUP = 4
    RELEASE = 5
    CONTAINS = 6
    DELETE = 7
    LIST = 8
    STATS = 9
    PING = 10
    CORRUPT = 126
    ERROR = 255


class Status:
    """Per-key outcomes of ``RESERVE`` and ``COMMIT``."""

    OK = 0
    EXISTS = 1
    CAPACITY = 2
    TOO_LARGE = 3


class ProtocolError(PermanentBackendError):
    """A malformed or oversized message (the peer answers ``ERROR`` and closes the connection)."""


class Reader:
    """Bounds-checked reads from one message body."""

    __slots__ = ("_buf", "_pos")

    def __init__(self, buf: bytes | memoryview) -> None:
        self._buf = memoryview(buf)
        self._pos = 0

    def _take(self, n: int) -> memoryview:
        end = self._pos + n
        if n < 0 or end > len(self._buf):
            raise ProtocolError(f"message body is truncated (wanted {n} bytes at {self._pos} of {len(self._buf)})")
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def unpack(self, st: struct.Struct) -> tuple[int, ...]:
        return st.unpack(self._take(st.size))

    def u8(self) -> int:
        return self._take(1)[0]

    def u32(self) -> int:
        return U32.unpack(self._take(4))[0]

    def u64(self) -> int:
        return U64.unpack(self._take(8))[0]

    def blob(self, limit: int = MAX_BODY) -> bytes:
        n = self.u32()
        if n > limit:
            raise ProtocolError(f"field of {n} bytes exceeds the limit of {limit}")
        return bytes(self._take(n))

    def key(self) -> bytes:
        n = U16.unpack(self._take(2))[0]
        if n == 0 or n > MAX_KEY:
            raise ProtocolError(f"key of {n} bytes (1..{MAX_KEY} allowed)")
        return bytes(self._take(n))

    def count(self) -> int:
        n = self.u32()
        if n > MAX_BATCH:
            raise ProtocolError(f"batch of {n} items exceeds the limit of {MAX_BATCH}")
        return n

    def keys(self) -> list[bytes]:
        return [self.key() for _ in range(self.count())]

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise ProtocolError(f"{len(self._buf) - self._pos} unexpected trailing bytes in a message")


def pack_key(key: bytes) -> bytes:
    """A key field: u16 length + bytes."""
    if not 0 < len(key) <= MAX_KEY:
        raise ValueError(f"key of {len(key)} bytes (1..{MAX_KEY} allowed)")
    return U16.pack(len(key)) + key


def pack_keys(keys: Sequence[bytes]) -> bytes:
    """A key list: u32 count + key fields."""
    return U32.pack(len(keys)) + b"".join(pack_key(k) for k in keys)


def pack_message(op: int, req_id: int, body: bytes = b"") -> bytes:
    """A whole message: head + body."""
    if len(body) > MAX_BODY:
        raise ValueError(f"message body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEAD.pack(len(body), VERSION, op, 0, req_id) + body


async def read_message(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """``(op, request id, body)`` of the next message.

    Raises:
        asyncio.IncompleteReadError: The connection closed.
        ProtocolError: Wrong version or an oversized body.
    """
    head = await reader.readexactly(HEAD.size)
    length, version, op, _flags, req_id = HEAD.unpack(head)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}; this side speaks {VERSION}")
    if length > MAX_BODY:
        raise ProtocolError(f"message body of {length} bytes exceeds {MAX_BODY}")
    body = await reader.readexactly(length) if length else b""
    return op, req_id, body
