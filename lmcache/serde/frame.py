"""The value frame: a small header that makes every stored value self-checking.

Layout (little-endian)::

    0   4s  magic  b"LMCV"
    4   B   format version (1)
    5   B   flags (reserved, 0)
    6   H   key length in bytes
    8   I   metadata length in bytes
    12  I   payload offset from the start of the frame
    16  Q   payload length
    24  Q   xxh3-64 of the payload
    32  Q   xxh3-64 of bytes 0..32 + key + metadata (the header's own check)
    40  ..  zero padding to 48
    48  key (UTF-8 of CacheKey.to_string()), metadata, zero padding up to the payload offset
    ..  payload

The key inside the frame binds a value to its key, so a value stored or renamed under the
wrong key is detected; the metadata carries the KV geometry (or any codec info) as opaque
bytes. The payload offset is aligned (64 bytes by default, 4096 for O_DIRECT files) so
payloads can be read straight into aligned buffers.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import xxhash

from lmcache.errors import IntegrityError, InvalidArgumentError
from lmcache.keys import MAX_KEY_BYTES, CacheKey

__all__ = ["FRAME_VERSION", "FrameHeader", "decode_frame", "encode_header", "frame_size", "parse_header"]

FRAME_VERSION = 1
MAGIC = b"LMCV"
_FIXED = struct.Struct("<4sBBHIIQQ")  # 32 bytes, covered by the header checksum
_FIXED_SIZE = 48
_HCHECK = struct.Struct("<Q")
MIN_HEADER_BYTES = _FIXED_SIZE
#: Largest metadata section: its length is a 32-bit field. (Keys: :data:`lmcache.keys.MAX_KEY_BYTES`,
#: a 16-bit field.)
MAX_META_BYTES = 0xFFFFFFFF


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def payload_checksum(payload: memoryview | bytes) -> int:
    """The checksum stored for ``payload`` (xxh3-64)."""
    return xxhash.xxh3_64_intdigest(payload)


#: Bytes per step of :func:`copy_with_checksum`: copied, then hashed while still in L2. On the
#: lm:// shm path 256 KiB measured a few % faster than 512 KiB (reads from the pool most), while
#: 128 KiB and 1 MiB were slower.
COPY_CHUNK = 256 << 10


def copy_with_checksum(dst: np.ndarray, src: np.ndarray) -> int:
    """Copy ``src`` into ``dst`` (1-D uint8 arrays of one length) and return the copy's checksum.

    One pass over memory instead of two: each chunk is hashed right after it is copied, from
    cache (~0.9x a bare copy here, against ~0.75x for a copy followed by a checksum of the
    whole value). The checksum is of ``dst`` as written, so it also covers the copy itself.
    Both steps release the GIL.
    """
    if dst.nbytes != src.nbytes:
        raise ValueError(f"copy of {src.nbytes} bytes into {dst.nbytes}")
    n = src.nbytes
    if n <= COPY_CHUNK:
        np.copyto(dst, src)
        return payload_checksum(dst)
    h = xxhash.xxh3_64()
    for off in range(0, n, COPY_CHUNK):
        d = dst[off : off + COPY_CHUNK]
        np.copyto(d, src[off : off + COPY_CHUNK])
        h.update(d)
    return h.intdigest()


def frame_size(key: CacheKey, payload_len: int, meta: bytes = b"", alignment: int = 64) -> int:
    """Total bytes of the frame for a value of ``payload_len`` bytes."""
    return header_size(len(key.to_string().encode()), len(meta), alignment) + payload_len


def header_size(key_len: int, meta_len: int, alignment: int = 64) -> int:
    """Bytes before the payload for the given key and metadata lengths."""
    return _align(_FIXED_SIZE + key_len + meta_len, alignment)


@dataclasses.dataclass(frozen=True, slots=True)
class FrameHeader:
    """A decoded frame header."""

    key: str
    meta: bytes
    payload_offset: int
    payload_len: int
    checksum: int

    @property
    def total_len(self) -> int:
        """Bytes of the whole frame."""
        return self.payload_offset + self.payload_len

    def verify_payload(self, payload: memoryview | bytes) -> None:
        """Check ``payload`` against the stored length and checksum.

        Raises:
            IntegrityError: The payload is truncated or corrupted.
        """
        if len(payload) != self.payload_len:
            raise IntegrityError(f"value for {self.key[:80]} is truncated: {len(payload)} of {self.payload_len} bytes")
        self.verify_checksum(payload_checksum(payload))

    def verify_checksum(self, checksum: int) -> None:
        """Check a payload checksum computed elsewhere (e.g. by :func:`copy_with_checksum`).

        Raises:
            IntegrityError: It differs from the stored one.
        """
        if checksum != self.checksum:
            raise IntegrityError(f"value for {self.key[:80]} failed its checksum")


def encode_header(
    key: CacheKey,
    payload: memoryview | bytes | np.ndarray,
    meta: bytes = b"",
    alignment: int = 64,
    *,
    checksum: int | None = None,
) -> bytes:
    """The header bytes to write before ``payload`` (the payload itself is not copied).

    Args:
        key: The key the value is stored under.
        payload: The value.
        meta: Opaque metadata (e.g. KV geometry), at most 4 GiB.
        alignment: The payload offset is a multiple of this (a power of two >= 64).
        checksum: ``payload``'s checksum when the caller computed it already (e.g. with
            :func:`copy_with_checksum`); otherwise it is computed here.

    Raises:
        InvalidArgumentError: The key text is longer than ``MAX_KEY_BYTES`` (65,535 bytes) or
            the metadata longer than ``MAX_META_BYTES``: their lengths would not fit the header.
    """
    key_bytes = key.to_string().encode()
    if len(key_bytes) > MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"cache key text is {len(key_bytes)} bytes; a value frame holds keys of at most {MAX_KEY_BYTES}"
        )
    if len(meta) > MAX_META_BYTES:
        raise InvalidArgumentError(f"frame metadata is {len(meta)} bytes; at most {MAX_META_BYTES} fit")
    offset = header_size(len(key_bytes), len(meta), alignment)
    fixed = _FIXED.pack(
        MAGIC,
        FRAME_VERSION,
        0,
        len(key_bytes),
        len(meta),
        offset,
        memoryview(payload).nbytes,
        payload_checksum(payload) if checksum is None else checksum,
    )
    hcheck = xxhash.xxh3_64_intdigest(fixed + key_bytes + meta)
    head = fixed + _HCHECK.pack(hcheck)
    out = bytearray(offset)
    out[: len(head)] = head
    out[_FIXED_SIZE : _FIXED_SIZE + len(key_bytes)] = key_bytes
    out[_FIXED_SIZE + len(key_bytes) : _FIXED_SIZE + len(key_bytes) + len(meta)] = meta
    return bytes(out)


def header_tail_len(head: bytes) -> int:
    """Bytes of key and metadata after the fixed 48 of an encoded header (both covered by its check)."""
    _magic, _v, _f, key_len, meta_len, _o, _l, _c = _FIXED.unpack_from(head, 0)
    return int(key_len) + int(meta_len)


def parse_header(buf: memoryview | bytes, expected_key: CacheKey | None = None) -> FrameHeader:
    """Decode and check a frame header from the start of ``buf``.

    ``buf`` must hold at least the fixed part plus the key and metadata; use
    :func:`needed_header_bytes` on the first 48 bytes to learn how much that is.

    Raises:
        IntegrityError: Bad magic, version, header checksum, or the key does not match.
    """
    if len(buf) < _FIXED_SIZE:
        raise IntegrityError(f"value is truncated: {len(buf)} bytes is shorter than a frame header")
    magic, version, _flags, key_len, meta_len, offset, plen, check = _FIXED.unpack_from(buf, 0)
    if magic != MAGIC:
        raise IntegrityError("value does not start with an lmcache frame header")
    if version != FRAME_VERSION:
        raise IntegrityError(f"value has frame format version {version}; this lmcache reads {FRAME_VERSION}")
    end = _FIXED_SIZE + key_len + meta_len
    if len(buf) < end or offset < end:
        raise IntegrityError("value header is truncated or malformed")
    (hcheck,) = _HCHECK.unpack_from(buf, 32)
    key_bytes = bytes(buf[_FIXED_SIZE : _FIXED_SIZE + key_len])
    meta = bytes(buf[_FIXED_SIZE + key_len : end])
    if xxhash.xxh3_64_intdigest(bytes(buf[:32]) + key_bytes + meta) != hcheck:
        raise IntegrityError("value header failed its checksum")
    key = key_bytes.decode("utf-8", errors="replace")
    if expected_key is not None and key != expected_key.to_string():
        raise IntegrityError(f"value stored under {expected_key.to_string()[:80]} belongs to another key")
    return FrameHeader(key=key, meta=meta, payload_offset=offset, payload_len=plen, checksum=check)


def needed_header_bytes(prefix: memoryview | bytes) -> int:
    """Bytes needed to parse the whole header, from at least the first 48 bytes of a frame.

    Raises:
        IntegrityError: ``prefix`` is too short or not a frame.
    """
    if len(prefix) < _FIXED_SIZE:
        raise IntegrityError("value is truncated: shorter than a frame header")
    magic, _v, _f, key_len, meta_len, _o, _l, _c = _FIXED.unpack_from(prefix, 0)
    if magic != MAGIC:
        raise IntegrityError("value does not start with an lmcache frame header")
    return _FIXED_SIZE + key_len + meta_len


def decode_frame(frame: memoryview | bytes, expected_key: CacheKey | None = None) -> tuple[FrameHeader, memoryview]:
    """Check a whole frame held in memory and return its header and payload view.

    Raises:
        IntegrityError: The frame is truncated, corrupted or belongs to another key.
    """
    view = memoryview(frame).cast("B") if not isinstance(frame, memoryview) else frame
    header = parse_header(view, expected_key)
    payload = view[header.payload_offset : header.payload_offset + header.payload_len]
    if len(view) != header.total_len:
        raise IntegrityError(f"value for {header.key[:80]} has {len(view)} bytes, its header says {header.total_len}")
    header.verify_payload(payload)
    return header, payload
