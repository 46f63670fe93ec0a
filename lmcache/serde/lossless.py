"""Lossless codecs: ``raw`` (the stored bytes are the chunk) and ``zstd``/``lz4`` over byte planes.

16-bit KV compresses poorly as it is: each word's high byte (sign, exponent, top mantissa bits)
repeats a lot, its low byte (the rest of the mantissa) is close to noise, and interleaved they
hide each other's redundancy. With ``codec_shuffle`` (the default) the chunk is split into its
byte planes first (all low bytes, then all high bytes; four planes for float32), which lets the
compressor find the exponent's redundancy; ``lmcache bench codec`` measures both.

Body layout: one byte of flags (bit 0: shuffled), one byte of element size, then the compressed
stream. The zstd and lz4 bindings release the GIL while they work.
"""

from __future__ import annotations

import numpy as np

from lmcache.errors import IntegrityError, MissingDependencyError
from lmcache.serde.codec import ChunkGeometry, Codec, CodecSettings

__all__ = ["Lz4Codec", "RawCodec", "ZstdCodec", "shuffle", "unshuffle"]


def shuffle(data: memoryview, itemsize: int) -> np.ndarray:
    """Byte planes of ``data`` (``itemsize``-byte elements): plane 0 holds every element's byte 0."""
    a = np.frombuffer(data, dtype=np.uint8)
    return np.ascontiguousarray(a.reshape(-1, itemsize).T)


def unshuffle(planes: np.ndarray | memoryview | bytes, itemsize: int, out: memoryview) -> None:
    """Write the elements whose byte planes are ``planes`` into ``out``."""
    p = np.frombuffer(planes, dtype=np.uint8).reshape(itemsize, -1)
    np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)[:] = p.T


class RawCodec(Codec):
    """The chunk's own bytes: no codec header, nothing to decode (today's format)."""

    name = "raw"

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Never called for raw (values are stored as they are)."""
        return None

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Copy ``body`` into ``out`` (only a hand-made raw-named codec header gets here)."""
        if body.nbytes != geometry.nbytes:
            raise IntegrityError("raw body has the wrong size")
        out[:] = body


class _Compressed(Codec):
    """Shared framing of the byte-plane compressors."""

    def _compress(self, data: bytes | memoryview | np.ndarray) -> bytes:
        raise NotImplementedError

    def _decompress(self, body: memoryview, size: int) -> bytes:
        raise NotImplementedError

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Flags, element size, then the compressed (optionally byte-shuffled) chunk."""
        item = geometry.itemsize
        shuffled = self.settings.codec_shuffle and item > 1
        src = shuffle(data, item) if shuffled else data
        return bytes((1 if shuffled else 0, item)) + self._compress(src)

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Decompress into ``out``, restoring the element order if the planes were split."""
        flags, item = body[0], body[1]
        raw = self._decompress(body[2:], geometry.nbytes)
        if len(raw) != geometry.nbytes:
            raise IntegrityError(f"{self.name} body decompressed to {len(raw)} bytes, not {geometry.nbytes}")
        if flags & 1:
            unshuffle(raw, item, out)
        else:
            out[:] = raw


class ZstdCodec(_Compressed):
    """zstd over byte planes (``codec_level`` 1-22, default 3)."""

    name = "zstd"

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        try:
            import zstandard
        except ImportError as exc:
            raise MissingDependencyError("zstandard", "codecs", "the zstd codec") from exc
        self._zstd = zstandard
        self._level = max(1, self.settings.codec_level)

    def _compress(self, data: bytes | memoryview | np.ndarray) -> bytes:
        # One compressor per call: zstandard's objects are not safe to share between threads.
        return self._zstd.ZstdCompressor(level=self._level, write_content_size=True).compress(data)

    def _decompress(self, body: memoryview, size: int) -> bytes:
        return self._zstd.ZstdDecompressor().decompress(body, max_output_size=size)


class Lz4Codec(_Compressed):
    """lz4 block format over byte planes (``codec_level`` 0-16: 0 is the fast mode, more is HC)."""

    name = "lz4"

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        try:
            import lz4.block
        except ImportError as exc:
            raise MissingDependencyError("lz4", "codecs", "the lz4 codec") from exc
        self._block = lz4.block
        self._level = min(self.settings.codec_level, 16)

    def _compress(self, data: bytes | memoryview | np.ndarray) -> bytes:
        if self._level > 3:
            return self._block.compress(data, mode="high_compression", compression=self._level, store_size=False)
        return self._block.compress(data, mode="fast", store_size=False)

    def _decompress(self, body: memoryview, size: int) -> bytes:
        return self._block.decompress(body, uncompressed_size=size)
