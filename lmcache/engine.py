"""CacheEngine: lookup, store and retrieve of token-prefix KV over a TieredBackend.

Engines are mostly synchronous code, so :class:`CacheEngine` owns an asyncio event loop on a
daemon thread and offers a synchronous facade:

* ``lookup(tokens)`` → how many leading tokens are cached (whole chunks only).
* ``retrieve(tokens, dst)`` → copies the cached prefix into the engine's KV (through ``dst``)
  and returns the number of tokens loaded. It blocks only for what the engine needs now.
* ``store(tokens, src)`` → copies new full chunks out of the engine's KV into pooled chunk
  buffers right away (the engine may reuse its memory as soon as this returns), then puts them
  asynchronously; a later ``lookup`` sees them once the put lands. Chunks already cached are
  never gathered or stored again.

The engine side talks to a :class:`KVSource`/:class:`KVDestination`, which moves one chunk
between the engine's own layout and the chunk format ``[num_layers, 2, tokens, kv_heads,
head_dim]`` (the copy engine in ``lmcache.kernels`` does it for paged layouts). A backend
failure never fails a request: it is a miss, counted in :meth:`CacheEngine.stats`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import torch

from lmcache.backends.base import StorageBackend
from lmcache.config import LMCacheConfig
from lmcache.errors import BackendError, LayoutMismatchError, StateError
from lmcache.keys import CacheKey, Chunk, ChunkHasher, KeyScope
from lmcache.layouts import KVGeometry
from lmcache.memory import ChunkBufferPool
from lmcache.tiered import TieredBackend

__all__ = ["CacheEngine", "KVDestination", "KVSource"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class KVSource(Protocol):
    """Something chunk KV can be gathered from (an engine's KV for one sequence)."""

    def gather(self, start: int, end: int, out: torch.Tensor) -> None:
        """Copy tokens ``[start, end)`` into ``out`` (``[layers, 2, end-start, heads, dim]``)."""


class KVDestination(Protocol):
    """Something chunk KV can be scattered into (an engine's KV for one sequence)."""

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        """Copy ``src`` (``[layers, 2, end-start, heads, dim]``) into tokens ``[start, end)``."""


class _LoopThread:
    """An asyncio loop running on a daemon thread, with blocking and fire-and-forget calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lmcache-engine-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class CacheEngine:
    """Token-prefix KV caching for one engine worker.

    Args:
        geometry: The KV geometry of the model (layers, KV heads, head dim, dtype).
        model_id: Identifies the model's weights (name or fingerprint); part of every key.
        config: lmcache settings (tiers, chunk size…); defaults to :meth:`LMCacheConfig.load`.
        backend: Use this backend instead of building a :class:`TieredBackend` from
            ``config.tiers`` (it is then borrowed: not closed by :meth:`close`).
        world_size: Tensor-parallel world size of the engine.
        rank: This worker's rank.
        pool_chunks: Chunk buffers in the staging pool (bounds memory in flight).
    """

    def __init__(
        self,
        geometry: KVGeometry,
        model_id: str,
        *,
        config: LMCacheConfig | None = None,
        backend: StorageBackend | None = None,
        world_size: int = 1,
        rank: int = 0,
        pool_chunks: int = 16,
    ) -> None:
        self.config = config if config is not None else LMCacheConfig.load()
        self.geometry = geometry
        self.hasher = ChunkHasher(
            self.config.chunk_size, save_partial_chunks=self.config.save_partial_chunks, seed=self.config.hash_seed
        )
        self.scope = KeyScope.create(
            geometry.key_model(model_id),
            world_size=world_size,
            rank=rank,
            dtype=geometry.dtype,
            tags=self.config.tags,
        )
        self._owns_backend = backend is None
        self.backend: StorageBackend = backend if backend is not None else TieredBackend.from_config(self.config)
        # Leases are held across a put to slow tiers, so waiting for one beats failing at once.
        self.pool = ChunkBufferPool.for_geometry(
            geometry, pool_chunks, chunk_tokens=self.config.chunk_size, default_timeout=60.0, default_ttl=300.0
        )
        self._loop = _LoopThread()
        # Chunk buffers are views of one long-lived allocation: backends that register memory for
        # transfers (nixl://) do it once for all of it. No I/O: an unopened backend applies it on open.
        try:
            self._loop.run(self.backend.register_host_memory(self.pool.storage), timeout=60)
        except Exception as exc:  # a hint: without it calls still work, per call
            logger.warning("registering the chunk pool with the lmcache backend failed: %s", exc)
        self._pending: set[concurrent.futures.Future[int]] = set()
        self._inflight: set[CacheKey] = set()
        self._lock = threading.Lock()
        self._closed = False
        self.counters = {
            "lookups": 0,
            "lookup_hit_tokens": 0,
            "retrieves": 0,
            "retrieved_tokens": 0,
            "retrieved_bytes": 0,
            "stores": 0,
            "stored_chunks": 0,
            "stored_bytes": 0,
            "skipped_chunks": 0,
            "backend_errors": 0,
        }
        self._run(self.backend.open())

    # -- facade --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StateError("CacheEngine is closed")

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise StateError("CacheEngine is closed")
        return self._loop.run(coro)

    def chunks(self, tokens: Any) -> list[Chunk]:
        """The chunks of ``tokens`` this engine keys (full chunks, plus the tail if configured)."""
        return self.hasher.chunks(tokens)

    def lookup(self, tokens: Any) -> int:
        """Number of leading tokens of ``tokens`` whose KV is cached (a chunk boundary)."""
        self._check_open()
        chunks = self.chunks(tokens)
        self.counters["lookups"] += 1
        if not chunks:
            return 0
        keys = [self.scope.key(c.hash) for c in chunks]
        try:
            n = self._run(self.backend.lookup_prefix(keys))
        except BackendError as exc:
            self._backend_failed("lookup", exc)
            return 0
        hit = chunks[n - 1].end if n else 0
        self.counters["lookup_hit_tokens"] += hit
        return hit

    def retrieve(self, tokens: Any, dst: KVDestination, *, max_tokens: int | None = None, start: int = 0) -> int:
        """Load the cached prefix of ``tokens`` into ``dst``.

        Args:
            tokens: The request's token ids.
            dst: Receives each hit chunk, in order.
            max_tokens: Load at most this many tokens (rounded down to a chunk boundary).
            start: The caller already holds tokens ``[0, start)`` (e.g. an engine's own prefix
                cache): chunks ending at or before ``start`` are neither fetched nor scattered.
                A chunk straddling ``start`` is loaded whole; ``dst`` may skip its first tokens.

        Returns:
            The end of the last chunk loaded (0 when none was): the chunks are contiguous from
            the first one ending after ``start`` and stop at the first miss.
        """
        self._check_open()
        self._check_kv(dst)
        chunks = [c for c in self.chunks(tokens) if c.end > start]
        if max_tokens is not None:
            chunks = [c for c in chunks if c.end <= max_tokens]
        self.counters["retrieves"] += 1
        loaded = 0
        batch = max(1, self.pool.num_slots // 2)
        for i in range(0, len(chunks), batch):
            group = chunks[i : i + batch]
            got = self._retrieve_group(group, dst)
            loaded += got
            if got < len(group):
                break
        tokens_loaded = chunks[loaded - 1].end if loaded else 0
        self.counters["retrieved_tokens"] += tokens_loaded - chunks[0].start if loaded else 0
        return tokens_loaded

    def _retrieve_group(self, group: Sequence[Chunk], dst: KVDestination) -> int:
        leases = [self.pool.acquire(shape=self.geometry.chunk_shape(c.num_tokens)) for c in group]
        try:
            keys = [self.scope.key(c.hash) for c in group]
            views = [lease.tensor() for lease in leases]
            try:
                sizes = self._run(self.backend.get_into(keys, views))
            except BackendError as exc:
                self._backend_failed("retrieve", exc)
                return 0
            done = 0
            for chunk, lease, size in zip(group, leases, sizes, strict=True):
                if size is None:
                    break
                if size != lease.nbytes:
                    self._backend_failed(
                        "retrieve",
                        LayoutMismatchError(f"stored chunk has {size} bytes, this model's chunk has {lease.nbytes}"),
                    )
                    break
                dst.scatter(chunk.start, chunk.end, views[done])
                self.counters["retrieved_bytes"] += size
                done += 1
            return done
        finally:
            for lease in leases:
                lease.release()

    def store(self, tokens: Any, src: KVSource, *, start: int = 0) -> concurrent.futures.Future[int]:
        """Store the chunks of ``tokens`` that are not cached yet.

        The KV is copied out of ``src`` before this returns; the puts complete in the
        background. Chunks ending at or before ``start`` are assumed cached already.

        Returns:
            A future of the number of chunks stored (also awaited by :meth:`flush`).
        """
        self._check_open()
        self._check_kv(src)
        self.counters["stores"] += 1
        chunks = [c for c in self.chunks(tokens) if c.end > start]
        keys = [self.scope.key(c.hash) for c in chunks]
        with self._lock:
            fresh = [(c, k) for c, k in zip(chunks, keys, strict=True) if k not in self._inflight]
            self._inflight.update(k for _, k in fresh)
        try:
            present = self._run(self.backend.contains([k for _, k in fresh])) if fresh else []
        except BackendError as exc:
            self._backend_failed("store", exc)
            present = [False] * len(fresh)
        except BaseException:
            with self._lock:
                self._inflight.difference_update(k for _, k in fresh)
            raise
        todo = [(c, k) for (c, k), there in zip(fresh, present, strict=True) if not there]
        self.counters["skipped_chunks"] += len(chunks) - len(todo)
        with self._lock:
            self._inflight.difference_update(k for (c, k), there in zip(fresh, present, strict=True) if there)
        # Gather and put in groups: a group's leases return to the pool once its put lands, so a
        # sequence longer than the pool streams through it instead of deadlocking on itself.
        group_size = max(1, self.pool.num_slots // 2)
        futures = []
        for g in range(0, len(todo), group_size):
            group = todo[g : g + group_size]
            leases = []
            try:
                for c, _ in group:
                    lease = self.pool.acquire(shape=self.geometry.chunk_shape(c.num_tokens))
                    leases.append(lease)
                    src.gather(c.start, c.end, lease.tensor())
            except BaseException:
                for lease in leases:
                    lease.release()
                with self._lock:
                    self._inflight.difference_update(k for _, k in todo[g:])
                raise
            futures.append(self._loop.submit(self._put_chunks([k for _, k in group], leases)))
        fut = self._loop.submit(self._sum_results(futures))
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        return fut

    @staticmethod
    async def _sum_results(futures: list[concurrent.futures.Future[int]]) -> int:
        return sum([await asyncio.wrap_future(f) for f in futures])

    async def _put_chunks(self, keys: list[CacheKey], leases: list[Any]) -> int:
        try:
            if not keys:
                return 0
            results = await self.backend.put(keys, [lease.tensor() for lease in leases])
            stored = sum(1 for r in results if r.ok)
            self.counters["stored_chunks"] += stored
            self.counters["stored_bytes"] += sum(lease.nbytes for lease, r in zip(leases, results, strict=True) if r.ok)
            return stored
        except BackendError as exc:
            self._backend_failed("store", exc)
            return 0
        finally:
            for lease in leases:
                lease.release()
            with self._lock:
                self._inflight.difference_update(keys)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every store issued so far has landed (in the first tier)."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        """Engine counters and the backend's stats."""
        out: dict[str, Any] = dict(self.counters)
        out["backend"] = self.backend.stats()
        return out

    def close(self) -> None:
        """Flush pending stores, close the backend (if owned) and stop the loop thread."""
        if self._closed:
            return
        self.flush(timeout=30)
        if not self._owns_backend:
            try:  # a borrowed backend outlives this engine: it must forget our pool
                self._loop.run(self.backend.unregister_host_memory(self.pool.storage), timeout=60)
            except Exception as exc:
                logger.warning("unregistering the chunk pool from the lmcache backend failed: %s", exc)
        if self._owns_backend:
            try:
                self._loop.run(self.backend.aclose(), timeout=60)
            except Exception as exc:  # closing must not raise into an engine's shutdown path
                logger.warning("closing the lmcache backend failed: %s", exc)
        self._closed = True
        self._loop.stop()

    def __enter__(self) -> CacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_kv(self, kv: Any) -> None:
        geometry = getattr(kv, "geometry", None)
        if geometry is not None and geometry != self.geometry:
            raise LayoutMismatchError(
                f"the engine KV has geometry {geometry.identity}, this cache engine serves {self.geometry.identity}"
            )

    def _backend_failed(self, op: str, exc: Exception) -> None:
        self.counters["backend_errors"] += 1
        if self.counters["backend_errors"] == 1:
            logger.warning("lmcache %s failed, treating it as a miss: %s", op, exc)
        else:
            logger.debug("lmcache %s failed: %s", op, exc)
