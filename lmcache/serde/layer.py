"""``CodecBackend``: any backend, with values encoded on their way in and decoded on their way out.

Built by :func:`lmcache.backends.registry.open_backend` when a URL names a codec
(``redis://h:6379/0?codec=fp8``) and by :class:`~lmcache.tiered.TieredBackend` for every tier
that keeps values outside this process, so a tier configured ``raw`` still decodes what another
writer encoded. The inner backend stores the encoded bytes as any other value (framed and
checksummed by it: the checksum covers the encoded bytes).

* **put**: each value is encoded on a worker thread (never on the event loop) with the chunk
  geometry read from its key (:func:`~lmcache.serde.codec.geometry_for`), then put into the
  inner backend. ``raw`` passes the caller's buffers through untouched.
* **get_into**, on a tier whose codec is not ``raw`` (its values are mostly encoded): a
  pipeline. The batch is cut into groups of about :data:`READ_GROUP_BYTES` (one chunk each for
  real KV chunks); up to :data:`READ_WINDOW` groups are in flight at once (:data:`READ_FETCHES`
  of them on the wire), each read by its own inner ``get_into`` into reusable staging buffers,
  and decoded into the caller's ``dst`` on a worker thread as soon as that group has landed,
  while later groups are still on the wire (decoders release the GIL: torch ops and the C
  loops). A raw value found there is copied into its ``dst`` on the worker too.
* **get_into** on a ``raw`` tier: the inner backend reads straight into the caller's ``dst``
  (no extra cost for raw values); an encoded value found there is copied out into a per-thread
  scratch and decoded into ``dst`` on a worker.
* Either way nothing decodes on the event loop, a value of a codec not installed here is a miss
  counted in ``codec_unknown`` and logged with the codec's name, and one that does not decode is
  a miss counted in ``corrupt`` (that chunk only: the rest of the batch is unaffected).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from lmcache.backends.base import Capabilities, PutResult, StorageBackend
from lmcache.backends.concurrency import gather_all, run_blocking
from lmcache.backends.urls import settings_query
from lmcache.backends.wrapper import WrappedBackend
from lmcache.errors import IntegrityError, InvalidBufferError
from lmcache.keys import CacheKey
from lmcache.serde.codec import (
    CODEC_MAGIC,
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

#: Bytes of ``dst`` one inner ``get_into`` of a pipelined read covers (at least one value): a
#: group is decoded as soon as it has landed, so groups are small next to a batch.
READ_GROUP_BYTES = 4 << 20
#: Groups of one pipelined read in flight at once (being read or decoded); also bounds the
#: staging memory a read holds to about this many groups.
READ_WINDOW = 8
#: Groups of one pipelined read on the wire at once. Few, so that they land one after another
#: and the first ones decode while later ones are still arriving (a server answering many
#: connections at once interleaves them, and they would all land at about the same time).
READ_FETCHES = 2


def codec_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide worker pool that encodes and decodes (one thread per core, at most 8)."""
    if not _EXECUTOR:
        _EXECUTOR.append(
            concurrent.futures.ThreadPoolExecutor(
                max_workers=min(8, os.cpu_count() or 2), thread_name_prefix="lmcache-codec"
            )
        )
    return _EXECUTOR[0]


class CodecBackend(WrappedBackend):
    """Encodes values for ``inner`` with ``codec`` and decodes whatever it reads back.

    Args:
        inner: The backend that stores the encoded bytes (owned: closed by :meth:`aclose`).
        codec: The codec of values written through this layer.
        explicit: Whether the codec was asked for (it is then part of :attr:`url`).
    """

    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: StorageBackend, codec: Codec, *, explicit: bool = True) -> None:
        super().__init__(inner)
        self.codec = codec
        self._explicit = explicit
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
        self._staging = _Staging(READ_WINDOW)
        #: Debug timings: when a list, each pipelined read appends one record per group (seconds
        #: from the read's start: ``wire_start``/``wire_end``, ``decode_start``/``decode_end`` on
        #: the worker, ``decode_cpu``, ``done``; ``wire_bytes``). None (the default) records nothing.
        self.read_trace: list[dict[str, float]] | None = None
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

    async def _close(self) -> None:
        self._staging.clear()
        await super()._close()

    def stats(self) -> dict[str, Any]:
        """The inner backend's stats (capacity, used bytes… of encoded values) plus codec counters."""
        out = super().stats()
        out["corrupt"] = out.get("corrupt", 0) + self.counters.corrupt
        out["codec"] = self.codec.name
        out.update(self.codec_counters)
        return out

    # -- data path -----------------------------------------------------------------------------

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
        if self.codec.name != "raw":
            return await self._get_pipelined(keys, dsts)
        sizes = await self.inner.get_into(keys, dsts)
        jobs = [(i, dsts[i], n) for i, n in enumerate(sizes) if n is not None and _maybe_encoded(dsts[i], n)]
        if not jobs:
            return sizes
        # One worker call per value, so a batch decodes on several cores (each waits out its
        # thread on cancellation: nothing writes into a dst after we return).
        pool = codec_executor()
        parts = await gather_all([run_blocking(pool, _land, [job], dsts, self.codec, False) for job in jobs])
        self._settle(keys, sizes, [(job[0], out) for job, part in zip(jobs, parts, strict=True) for out in part])
        return sizes

    async def _get_pipelined(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        """Read groups of values into staging buffers and decode each group as soon as it lands."""
        sizes: list[int | None] = [None] * len(keys)
        landed: list[tuple[int, int | Exception]] = []
        window, wire = asyncio.Semaphore(READ_WINDOW), asyncio.Semaphore(READ_FETCHES)
        pool = codec_executor()
        groups = _groups([d.nbytes for d in dsts], READ_GROUP_BYTES)
        trace = self.read_trace
        t0 = time.perf_counter()

        async def group(g: int, idx: list[int]) -> None:
            rec: dict[str, float] | None = None if trace is None else {"group": g, "values": len(idx)}
            async with window:
                bufs = [self._staging.take(dsts[i].nbytes) for i in idx]
                try:
                    views = [memoryview(b)[: dsts[i].nbytes] for b, i in zip(bufs, idx, strict=True)]
                    async with wire:
                        if rec is not None:
                            rec["wire_start"] = time.perf_counter() - t0
                        got = await self.inner.get_into([keys[i] for i in idx], views)
                    jobs = [(i, v, n) for i, v, n in zip(idx, views, got, strict=True) if n is not None]
                    if rec is not None:
                        rec["wire_end"] = time.perf_counter() - t0
                        rec["wire_bytes"] = sum(n for _i, _v, n in jobs)
                    if jobs:
                        timing = None if rec is None else (rec, t0)
                        outs = await run_blocking(pool, _land, jobs, dsts, self.codec, True, timing)
                        landed.extend((job[0], out) for job, out in zip(jobs, outs, strict=True))
                finally:  # the inner call and the worker are done with them (also on cancellation)
                    for buf in bufs:
                        self._staging.give(buf)
            if rec is not None:
                rec["done"] = time.perf_counter() - t0
                trace.append(rec)  # type: ignore[union-attr]

        await gather_all([group(g, idx) for g, idx in enumerate(groups)])
        self._settle(keys, sizes, landed)
        return sizes

    def _settle(self, keys: list[CacheKey], sizes: list[int | None], landed: list[tuple[int, int | Exception]]) -> None:
        """Record each landed value's outcome (on the loop: workers share no state) into ``sizes``."""
        too_small: InvalidBufferError | None = None
        for i, outcome in landed:
            if isinstance(outcome, int):
                sizes[i] = outcome
                continue
            sizes[i] = None
            if isinstance(outcome, _TooSmall):
                too_small = too_small or InvalidBufferError(str(outcome))
            elif isinstance(outcome, UnknownCodecError):
                self.codec_counters["codec_unknown"] += 1
                self.log_once(
                    f"codec:{outcome.codec_name}",
                    "%r: value for %s is encoded with codec %r, which is not installed here; treating it as a miss",
                    self,
                    keys[i],
                    outcome.codec_name,
                )
            else:
                self.record_corrupt(keys[i], outcome)
        self.codec_counters["codec_decoded"] += sum(1 for _i, o in landed if isinstance(o, _Decoded))
        if too_small is not None:
            raise too_small


class _Decoded(int):
    """A decoded value's size (an ``int``; its type tells it from a raw value's)."""


class _TooSmall(Exception):
    """An encoded value decodes into more bytes than its ``dst`` holds (the call raises)."""


class _Staging:
    """Reusable host buffers that pipelined reads land encoded values in (used on the event loop only).

    Fresh buffers would cost a page fault per 4 KiB on every read; at most ``keep`` free buffers
    are kept, and :meth:`clear` drops them (at close).
    """

    def __init__(self, keep: int) -> None:
        self._free: list[np.ndarray] = []
        self._keep = keep

    def take(self, nbytes: int) -> np.ndarray:
        """A buffer of at least ``nbytes`` bytes (a kept one when one is large enough)."""
        for j, buf in enumerate(self._free):
            if buf.size >= nbytes:
                return self._free.pop(j)
        return np.empty(max(nbytes, 1), dtype=np.uint8)

    def give(self, buf: np.ndarray) -> None:
        """Hand ``buf`` back (kept for the next read, or dropped)."""
        if len(self._free) < self._keep:
            self._free.append(buf)
        else:  # keep the larger ones: they serve any request the small ones would
            small = min(range(len(self._free)), key=lambda j: self._free[j].size)
            if self._free[small].size < buf.size:
                self._free[small] = buf

    def clear(self) -> None:
        """Drop the kept buffers."""
        self._free.clear()


def _groups(sizes: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices cut into groups of about ``limit`` bytes (at least one index each)."""
    out: list[list[int]] = []
    cur: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if cur and total + n > limit:
            out.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += n
    if cur:
        out.append(cur)
    return out


def _maybe_encoded(buf: memoryview, n: int) -> bool:
    """Whether ``buf[:n]`` may start with a codec header (a cheap test before a worker looks)."""
    return n >= 4 and buf[:4] == CODEC_MAGIC


_SCRATCH = threading.local()


def _scratch(nbytes: int) -> memoryview:
    """A per-thread buffer of ``nbytes`` (reused: an encoded value copied out of its ``dst``)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        _SCRATCH.buf = buf
    return memoryview(buf)[:nbytes]


def _land(
    jobs: Sequence[tuple[int, memoryview, int]],
    dsts: Sequence[memoryview],
    codec: Codec,
    staged: bool,
    timing: tuple[dict[str, float], float] | None = None,
) -> list[int | Exception]:
    """Worker side: each value ``src[:n]`` into ``dsts[i]``, decoded when it is encoded; its size or why not.

    ``staged``: ``src`` is a staging buffer (a raw value is copied into ``dst``); else ``src`` is
    ``dst`` itself, and an encoded value is copied out into a per-thread scratch first.
    ``timing``: a read trace's record of this group and the read's start (``decode_start`` and
    ``decode_end`` are recorded, in seconds after it, and ``decode_cpu``, this thread's CPU seconds).
    """
    if timing is None:
        return _land_all(jobs, dsts, codec, staged)
    rec, t0 = timing
    rec["decode_start"] = time.perf_counter() - t0
    cpu = time.thread_time()
    try:
        return _land_all(jobs, dsts, codec, staged)
    finally:
        rec["decode_end"] = time.perf_counter() - t0
        rec["decode_cpu"] = time.thread_time() - cpu


def _land_all(
    jobs: Sequence[tuple[int, memoryview, int]], dsts: Sequence[memoryview], codec: Codec, staged: bool
) -> list[int | Exception]:
    out: list[int | Exception] = []
    for i, src, n in jobs:
        dst = dsts[i]
        try:
            header = parse_codec_header(src[:n])
            if header is None:
                if staged:
                    np.copyto(np.frombuffer(dst, np.uint8, n), np.frombuffer(src, np.uint8, n))
                out.append(n)
                continue
            if header.decoded_len > dst.nbytes:
                out.append(
                    _TooSmall(f"buffer of {dst.nbytes} bytes is smaller than the {header.decoded_len}-byte value")
                )
                continue
            encoded = src[:n]
            if not staged:  # the encoded value, out of the buffer it decodes into
                encoded = _scratch(n)
                encoded[:] = src[:n]
            out.append(_Decoded(decode_value(encoded, dst, header, codec)))
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
