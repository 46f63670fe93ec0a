"""``CodecBackend``: any backend, with values encoded on their way in and decoded on their way out.

Built by :func:`lmcache.backends.registry.open_backend` when a URL names a codec
(``redis://h:6379/0?codec=fp8``) and by :class:`~lmcache.tiered.TieredBackend` for every tier
that keeps values outside this process, so a tier configured ``raw`` still decodes what another
writer encoded. The inner backend stores the encoded bytes as any other value (framed and
checksummed by it: the checksum covers the encoded bytes).

* **put**: each value is encoded on a worker thread (never on the event loop) with the chunk
  geometry read from its key (:func:`~lmcache.serde.codec.geometry_for`), then put into the
  inner backend. ``raw`` passes the caller's buffers through untouched.
* **get_into**: the inner backend reads the stored value straight into the caller's ``dst``
  (an encoded value is never larger than its chunk). A value that starts with a codec header is
  copied out and decoded into ``dst`` on a worker thread (both off the event loop); any other
  value is a raw chunk, already in place (no extra cost for raw). A value of a codec not
  installed here is a miss counted in ``codec_unknown`` and logged with the codec's name; one
  that does not decode is a miss counted in ``corrupt``.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar

from lmcache.backends.base import Capabilities, PutResult, StorageBackend
from lmcache.backends.concurrency import gather_all, run_blocking
from lmcache.backends.urls import settings_query
from lmcache.errors import IntegrityError, InvalidBufferError
from lmcache.keys import CacheKey
from lmcache.serde.codec import (
    Codec,
    UnknownCodecError,
    decode_value,
    encode_value,
    geometry_for,
    make_codec,
    parse_codec_header,
    split_codec_query,
)

__all__ = ["CodecBackend", "codec_backend_class", "codec_executor", "wrap_with_codec"]

_EXECUTOR: list[concurrent.futures.ThreadPoolExecutor] = []  # made on first use


def codec_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide worker pool that encodes and decodes (one thread per core, at most 8)."""
    if not _EXECUTOR:
        _EXECUTOR.append(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="lmcache-codec"
            )
        )
    return _EXECUTOR[0]


class CodecBackend(StorageBackend):
    """Encodes values for ``inner`` with ``codec`` and decodes whatever it reads back.

    Args:
        inner: The backend that stores the encoded bytes (owned: closed by :meth:`aclose`).
        codec: The codec of values written through this layer.
        explicit: Whether the codec was asked for (it is then part of :attr:`url`).
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: StorageBackend, codec: Codec, *, explicit: bool = True) -> None:
        super().__init__()
        self.inner = inner
        self.codec = codec
        self._explicit = explicit
        self.secret_options = inner.secret_options  # type: ignore[misc]
        caps = inner.capabilities
        # Device buffers pass through only where nothing is encoded (codecs work on host bytes).
        self.capabilities = Capabilities(  # type: ignore[misc]
            persistent=caps.persistent,
            shared=caps.shared,
            device_buffers=caps.device_buffers and codec.name == "raw",
            listing=caps.listing,
            integrity_checked=caps.integrity_checked,
            bounded=caps.bounded,
            max_value_bytes=caps.max_value_bytes,
        )
        self.codec_counters = {
            "codec_encoded": 0,
            "codec_stored_raw": 0,
            "codec_decoded": 0,
            "codec_unknown": 0,
            "codec_bytes_in": 0,
            "codec_bytes_out": 0,
        }

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> CodecBackend:
        """Build ``<backend url>?codec=…&codec_level=…`` (no I/O)."""
        from lmcache.backends.registry import open_backend

        base, options = split_codec_query(url)
        return wrap_with_codec(open_backend(base, **overrides), options, explicit=True)  # type: ignore[return-value]

    @property
    def url(self) -> str:
        """The inner backend's URL plus the codec options that differ from their defaults."""
        url = self.inner.url
        if not self._explicit:
            return url
        extra = settings_query(self.codec.settings) or f"codec={self.codec.name}"
        return url + ("&" if "?" in url else "?") + extra

    # -- lifecycle -----------------------------------------------------------------------------

    async def _open(self) -> None:
        await self.inner.open()

    async def _close(self) -> None:
        await self.inner.aclose()

    async def _ping(self) -> None:
        await self.inner.ping()

    async def _register_host_memory(self, view: memoryview) -> None:
        # Forwarded: raw values are read straight into the caller's memory by the inner backend.
        await self.inner.register_host_memory(view)

    async def _unregister_host_memory(self, view: memoryview) -> None:
        await self.inner.unregister_host_memory(view)

    def stats(self) -> dict[str, Any]:
        """The inner backend's stats (capacity, used bytes… of encoded values) plus codec counters."""
        out = dict(self.inner.stats())
        out["corrupt"] = out.get("corrupt", 0) + self.counters.corrupt
        out["codec"] = self.codec.name
        out.update(self.codec_counters)
        return out

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key in self.inner.list_keys():
            yield key

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        async for entry in self.inner.list_entries():
            yield entry

    # -- data path -----------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return await self.inner.contains(keys)

    async def _delete(self, keys: list[CacheKey]) -> None:
        await self.inner.delete(keys)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        if self.codec.name == "raw":
            return await self.inner.put(keys, srcs)
        # Never leave a worker reading a caller's buffer after we return: gather_all and
        # run_blocking wait for every thread, also on cancellation.
        pool = codec_executor()
        encoded = await gather_all([run_blocking(pool, self._encode, k, s) for k, s in zip(keys, srcs, strict=True)])
        c = self.codec_counters  # counted here, on the loop: workers share no state
        for src, out in zip(srcs, encoded, strict=True):
            c["codec_bytes_in"] += src.nbytes
            c["codec_bytes_out"] += len(out)
            c["codec_encoded" if out is not src else "codec_stored_raw"] += 1
        return await self.inner.put(keys, encoded)

    def _encode(self, key: CacheKey, src: memoryview) -> memoryview | bytes:
        return encode_value(self.codec, src, geometry_for(key.model, src.nbytes))

    async def _put_device(self, keys: list[CacheKey], srcs: list[Any]) -> list[PutResult]:
        return await self.inner.put(keys, srcs)

    async def _get_into_device(self, keys: list[CacheKey], dsts: list[Any]) -> list[int | None]:
        return await self.inner.get_into(keys, dsts)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        sizes = await self.inner.get_into(keys, dsts)
        todo = []
        for i, n in enumerate(sizes):
            if n is None:
                continue
            try:
                header = parse_codec_header(dsts[i][:n])
            except IntegrityError as exc:
                self.record_corrupt(keys[i], exc)
                sizes[i] = None
                continue
            if header is not None:
                if header.decoded_len > dsts[i].nbytes:
                    raise InvalidBufferError(
                        f"buffer of {dsts[i].nbytes} bytes is smaller than the {header.decoded_len}-byte value"
                    )
                todo.append((i, header))
        if not todo:
            return sizes
        # Each worker copies the encoded bytes out of dst (small next to the chunk; off the
        # event loop) and decodes into dst.
        jobs = [(i, sizes[i], h) for i, h in todo]
        # One worker call per value, so a batch decodes on several cores (each waits out its
        # thread on cancellation: nothing writes into a dst after we return).
        pool = codec_executor()
        parts = await gather_all([run_blocking(pool, _decode_all, [job], dsts, self.codec) for job in jobs])
        outcomes = [o for part in parts for o in part]
        for (i, _h), outcome in zip(todo, outcomes, strict=True):
            if isinstance(outcome, int):
                sizes[i] = outcome
                self.codec_counters["codec_decoded"] += 1
            elif isinstance(outcome, UnknownCodecError):
                sizes[i] = None
                self.codec_counters["codec_unknown"] += 1
                self.log_once(
                    f"codec:{outcome.codec_name}",
                    "%r: value for %s is encoded with codec %r, which is not installed here; treating it as a miss",
                    self,
                    keys[i],
                    outcome.codec_name,
                )
            else:
                sizes[i] = None
                self.record_corrupt(keys[i], outcome)
        return sizes


def _decode_all(
    jobs: Sequence[tuple[int, int, Any]], dsts: Sequence[memoryview], codec: Codec
) -> list[int | Exception]:
    out: list[int | Exception] = []
    for i, size, header in jobs:
        try:
            data = bytearray(dsts[i][:size])  # the encoded value, out of the buffer it decodes into
            out.append(decode_value(memoryview(data), dsts[i], header, codec))
        except (IntegrityError, InvalidBufferError) as exc:
            out.append(exc)
    return out


_KINDS: dict[type[StorageBackend], type[CodecBackend]] = {}


def codec_backend_class(inner: type[StorageBackend]) -> type[CodecBackend]:
    """The :class:`CodecBackend` subclass for backends of class ``inner`` (it serves their schemes)."""
    kind = _KINDS.get(inner)
    if kind is None:
        kind = type(f"Codec{inner.__name__}", (CodecBackend,), {"schemes": inner.schemes, "__module__": __name__})
        _KINDS[inner] = kind
    return kind


def wrap_with_codec(backend: StorageBackend, options: dict[str, str] | None, *, explicit: bool) -> StorageBackend:
    """``backend`` behind a :class:`CodecBackend` for ``options`` (``{"codec": "fp8", …}``)."""
    codec = make_codec(options or {"codec": "raw"}, owner=f"codec of {type(backend).__name__}")
    return codec_backend_class(type(backend))(backend, codec, explicit=explicit)
