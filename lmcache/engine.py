"""CacheEngine: lookup, store and retrieve of token-prefix KV over a TieredBackend.

Engines are mostly synchronous code, so :class:`CacheEngine` owns an asyncio event loop on a
daemon thread and offers a synchronous facade:

* ``lookup(tokens, budget=None)`` → how many leading tokens are cached (whole chunks only),
  answered within about ``budget`` seconds (default ``config.lookup_budget``): a tier that has
  not answered by then counts as a miss, so a slow or hung tier never stalls an engine step.
* ``retrieve(tokens, dst)`` → copies the cached prefix into the engine's KV (through ``dst``)
  and returns the number of tokens loaded. It blocks only for what the engine needs now.
  Hits in a ``memory://`` first tier are scattered straight from that tier's pool (leased while
  they are copied); other hits are read into pooled chunk buffers first.
* ``store(tokens, src)`` → copies new full chunks out of the engine's KV into pooled chunk
  buffers right away (the engine may reuse its memory as soon as this returns), then puts them
  asynchronously; a later ``lookup`` sees them once the put lands. Chunks already cached are
  never gathered or stored again (that check has the lookup budget too: a chunk a slow tier
  did not confirm in time is gathered and put, which a content-hash cache makes harmless).

The engine side talks to a :class:`KVSource`/:class:`KVDestination`, which moves one chunk
between the engine's own layout and the chunk format ``[num_layers, 2, tokens, kv_heads,
head_dim]`` (the copy engine in ``lmcache.kernels`` does it for paged layouts). A backend
failure never fails a request: it is a miss, counted in :meth:`CacheEngine.stats` (per tier
under ``"tiers"``, with engine-wide totals). A tier that timed out is skipped until it answers
again (the circuit breaker of :class:`~lmcache.tiered.TieredBackend`), so after its first
timeout a hung tier costs ``retrieve`` nothing either.
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
from lmcache.chunk_buffers import ChunkBufferPool
from lmcache.config import LMCacheConfig
from lmcache.errors import BackendError, InvalidArgumentError, LayoutMismatchError, StateError
from lmcache.keys import CacheKey, Chunk, ChunkHasher, KeyScope
from lmcache.layouts import KVGeometry
from lmcache.tiered import TieredBackend

__all__ = ["CacheEngine", "KVDestination", "KVSource"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# The caller stops waiting for a budgeted call after 2 x budget + this (the event loop may be
# busy with a copy when the call is made); the call is then cancelled and counts as a miss.
_BUDGET_SLACK = 0.05
# Per-tier entries of stats()["tiers"]: the same keys for every tier, always.
_TIER_FIELDS = (
    "errors",
    "timeouts",
    "skipped",
    "budget_exceeded",
    "lookup_failures",
    "get_failures",
    "put_failures",
    "writeback_dropped",
)


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
            "rejected_chunks": 0,
            "backend_errors": 0,
            "lookup_budget_exceeded": 0,
        }
        # Failures seen here (the backend raised, or a budgeted call outran the caller's wait);
        # stats() adds each tier's own counts to these.
        self._failures = {"lookup_failures": 0, "get_failures": 0, "put_failures": 0}
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

    def lookup(self, tokens: Any, *, budget: float | None = None) -> int:
        """Number of leading tokens of ``tokens`` whose KV is cached (a chunk boundary).

        Args:
            tokens: The request's token ids.
            budget: Seconds the tiers may take to answer (default ``config.lookup_budget``). A
                tier that has not answered in time counts as a miss for this lookup: the result
                is then what the faster tiers know (possibly 0). The call returns within about
                ``budget`` (at most ``2 * budget + 0.05`` s even when the event loop is busy).

        Raises:
            InvalidArgumentError: ``budget`` is not a positive number of seconds.
        """
        self._check_open()
        limit = self._budget(budget)
        chunks = self.chunks(tokens)
        self.counters["lookups"] += 1
        if not chunks:
            return 0
        keys = [self.scope.key(c.hash) for c in chunks]
        n = self._within(self._lookup_prefix(keys, limit), limit, len(keys))
        if n is None:
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
        keys = [self.scope.key(c.hash) for c in group]
        done, stop = self._retrieve_in_place(group, keys, dst)
        if stop or done == len(group):
            return done
        return done + self._retrieve_copied(group[done:], keys[done:], dst)

    def _retrieve_in_place(self, group: Sequence[Chunk], keys: list[CacheKey], dst: KVDestination) -> tuple[int, bool]:
        """Scatter the leading chunks that tier 0 holds straight from its pool (no chunk buffer).

        Tier 0 of a :class:`TieredBackend` that offers in-place access (``memory://``) lends its
        blocks: each value is read where it lies, with no copy into a chunk buffer first (for a
        4k-token SmolLM2 prefix that copy was 190 MB). The leases count as tier-0 hits, as a
        ``get_into`` would. The rest of the group (a tier-0 miss and everything after it) is left
        to :meth:`_retrieve_copied`, which asks every tier.

        Returns:
            The chunks scattered, and whether to stop there (a value of the wrong size).
        """
        if not isinstance(self.backend, TieredBackend):
            return 0, False
        lent = self._run(self._lease_in_place(keys))
        if lent is None:
            return 0, False
        in_place, leases, views = lent
        done, stop = 0, False
        try:
            for chunk, lease, view in zip(group, leases, views, strict=False):  # leases: a prefix of group
                want = self.geometry.chunk_nbytes(chunk.num_tokens)
                if lease.nbytes != want:
                    self._backend_failed(
                        "retrieve",
                        LayoutMismatchError(f"stored chunk has {lease.nbytes} bytes, this model's chunk has {want}"),
                    )
                    stop = True
                    break
                src = torch.frombuffer(view, dtype=torch.uint8, count=want)
                dst.scatter(
                    chunk.start,
                    chunk.end,
                    src.view(self.geometry.torch_dtype).view(self.geometry.chunk_shape(chunk.num_tokens)),
                )
                self.counters["retrieved_bytes"] += want
                done += 1
        finally:
            self._run(self._release_in_place(in_place, leases))
        return done, stop

    async def _lease_in_place(self, keys: list[CacheKey]) -> tuple[Any, list[Any], list[memoryview]] | None:
        """On the loop thread: tier 0's leases of the leading ``keys`` it holds, and their views.

        None when tier 0 offers no in-place access.
        """
        assert isinstance(self.backend, TieredBackend)
        in_place = self.backend.in_place()
        if in_place is None:
            return None
        # Key by key up to tier 0's first miss: a lease counts as a hit, and the chunks after a
        # miss are read (and counted) by the get_into path.
        leases: list[Any] = []
        for key in keys:
            lease = in_place.lease([key])[0]
            if lease is None:
                break
            leases.append(lease)
        return in_place, leases, [in_place.view(lease) for lease in leases]

    @staticmethod
    async def _release_in_place(in_place: Any, leases: list[Any]) -> None:
        for lease in leases:
            if lease is not None:
                in_place.release(lease)

    def _retrieve_copied(self, group: Sequence[Chunk], keys: list[CacheKey], dst: KVDestination) -> int:
        """Read ``group`` from the tiers into chunk buffers (``get_into``), then scatter them."""
        leases = [self.pool.acquire(shape=self.geometry.chunk_shape(c.num_tokens)) for c in group]
        try:
            views = [lease.tensor() for lease in leases]
            try:
                sizes = self._run(self.backend.get_into(keys, views))
            except BackendError as exc:
                self._backend_failed("retrieve", exc, len(keys))
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
            present: list[bool] | None = []
            if fresh:
                limit = self.config.lookup_budget
                present = self._within(self._contains([k for _, k in fresh], limit), limit, len(fresh))
        except BaseException:
            with self._lock:
                self._inflight.difference_update(k for _, k in fresh)
            raise
        if present is None:  # not known in time: put them all (a put of a held key is EXISTS)
            present = [False] * len(fresh)
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
            self.counters["rejected_chunks"] += len(results) - stored
            self.counters["stored_chunks"] += stored
            self.counters["stored_bytes"] += sum(lease.nbytes for lease, r in zip(leases, results, strict=True) if r.ok)
            return stored
        except BackendError as exc:
            self._backend_failed("store", exc, len(keys))
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
        """Engine counters, per-tier fault counters with engine-wide totals, and the backend's stats.

        The shape is stable (JSON-ready)::

            {
              "lookups": int, "lookup_hit_tokens": int, "retrieves": int, "retrieved_tokens": int,
              "retrieved_bytes": int, "stores": int, "stored_chunks": int, "stored_bytes": int,
              "skipped_chunks": int,     # already cached: not gathered or stored again
              "rejected_chunks": int,    # chunks whose put was rejected (full, too large, a fault)
              "lookup_budget_exceeded": int,  # lookups the caller stopped waiting for (a miss)
              # totals: this engine's own plus every tier's
              "backend_errors": int,     # failed backend calls: errors + timeouts
              "lookup_failures": int,    # keys a lookup (or the check before a store) got no answer for
              "get_failures": int,       # keys a read got no answer for
              "put_failures": int,       # values that did not reach a tier because of a fault
              "tiers": [                 # one per tier, fastest first (empty for a non-tiered backend)
                {"url": str (secrets redacted), "healthy": bool, "suspended": bool,
                 "errors": int, "timeouts": int, "skipped": int, "budget_exceeded": int,
                 "lookup_failures": int, "get_failures": int, "put_failures": int,
                 "writeback_dropped": int},
              ],
              "backend": {...},          # the backend's own stats() (shape up to the backend)
            }

        Per-tier counters are those of :class:`~lmcache.tiered.TierStats` (the failure counters
        count keys); ``skipped`` calls went to a suspended tier, which is skipped until it
        answers again.
        """
        out: dict[str, Any] = dict(self.counters)
        backend = self.backend.stats()
        tiers: list[dict[str, Any]] = []
        if isinstance(self.backend, TieredBackend):
            for entry in backend.get("tiers", []):
                tier: dict[str, Any] = {
                    "url": entry.get("url", ""),
                    "healthy": bool(entry.get("healthy", True)),
                    "suspended": bool(entry.get("suspended", False)),
                }
                tier.update((name, int(entry.get(name, 0))) for name in _TIER_FIELDS)
                tiers.append(tier)
        out["backend_errors"] = self.counters["backend_errors"] + sum(t["errors"] + t["timeouts"] for t in tiers)
        for name, own in self._failures.items():
            out[name] = own + sum(t[name] for t in tiers)
        out["tiers"] = tiers
        out["backend"] = backend
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

    # -- budgeted calls --------------------------------------------------------------------

    def _budget(self, budget: float | None) -> float:
        if budget is None:
            return self.config.lookup_budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0:
            raise InvalidArgumentError(f"a lookup budget is a positive number of seconds, got {budget!r}")
        return float(budget)

    def _within(self, coro: Coroutine[Any, Any, T], budget: float, n: int) -> T | None:
        """Run ``coro`` (itself bounded by ``budget``) on the loop; None if it is not back in time.

        The coroutine answers within about ``budget`` by itself; waiting here is capped as
        well, in case the loop is busy with something else, and then the call is cancelled.
        """
        if self._closed:
            coro.close()
            raise StateError("CacheEngine is closed")
        fut = self._loop.submit(coro)
        try:
            return fut.result(timeout=2 * budget + _BUDGET_SLACK)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            self.counters["lookup_budget_exceeded"] += 1
            self._failures["lookup_failures"] += n
            return None

    async def _lookup_prefix(self, keys: list[CacheKey], budget: float) -> int | None:
        return await self._ask("lookup_prefix", keys, budget)

    async def _contains(self, keys: list[CacheKey], budget: float) -> list[bool] | None:
        return await self._ask("contains", keys, budget)

    async def _ask(self, method: str, keys: list[CacheKey], budget: float) -> Any:
        """Call the backend's ``contains``/``lookup_prefix`` within ``budget``; None when it failed or ran over."""
        call = getattr(self.backend, method)
        try:
            if isinstance(self.backend, TieredBackend):
                return await call(keys, budget=budget)
            return await asyncio.wait_for(call(keys), budget)
        except BackendError as exc:
            self._backend_failed("lookup", exc, len(keys))
        except (TimeoutError, asyncio.TimeoutError):
            if method == "lookup_prefix":  # the pre-store check running over is not a lookup the caller waited on
                self.counters["lookup_budget_exceeded"] += 1
            self._failures["lookup_failures"] += len(keys)
        return None

    def _backend_failed(self, op: str, exc: Exception, n: int = 1) -> None:
        """Count a failure the backend raised to us (``n`` keys of ``op`` got nothing)."""
        self.counters["backend_errors"] += 1
        field = {"lookup": "lookup_failures", "retrieve": "get_failures", "store": "put_failures"}.get(op)
        if field is not None:
            self._failures[field] += n
        if self.counters["backend_errors"] == 1:
            logger.warning("lmcache %s failed, treating it as a miss: %s", op, exc)
        else:
            logger.debug("lmcache %s failed: %s", op, exc)
