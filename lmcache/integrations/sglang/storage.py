"""lmcache as SGLang's HiCache storage (the L3 below GPU and host memory): :class:`LMCacheHiCacheStorage`.

SGLang loads it with ``--hicache-storage-backend dynamic`` and an extra config naming this
module and class (see docs/sglang.md). Who calls what:

* ``__init__(storage_config, kwargs)``: SGLang's storage backend factory, once per rank. It
  parses the extra config (:mod:`lmcache.integrations.sglang.settings`), builds the
  :class:`~lmcache.tiered.TieredBackend` and opens it on an event loop thread of its own.
* ``register_mem_pool_host(pool)``: the cache controller, right after. The pool's class, layout,
  page size, layers, bytes per token and dtype become part of every key's scope, with the model,
  the TP rank (MLA's KV is the same on every rank: all ranks share rank 0's values) and the
  pipeline/context-parallel shard as tags, so two models, ranks or layouts never share a value.
* ``batch_exists(keys)``: the prefetch thread; the number of leading pages present.
* ``batch_get_v1(keys, host_indices)`` / ``batch_set_v1(…)``: zero-copy page moves. The pool's
  own page-address helper (``get_page_buffer_meta``, the one Mooncake and NIXL use) gives each
  page as one or more contiguous segments (MHA ``page_first``: K and V; ``layer_first``: one per
  layer and K/V; MLA ``page_first``: one). Each segment is one lmcache value, read with
  ``get_into`` straight into the pool and written with ``put`` straight from it: no staging copy.
* ``get``/``set``/``batch_get``/``batch_set``/``exists``: the legacy path (``interface_v1`` unset):
  one flat page tensor per key, under keys of their own.

Nothing raised by lmcache reaches SGLang's cache controller from these calls: a failure is a
miss (``False``/``None``/``0``), logged and counted in :meth:`LMCacheHiCacheStorage.stats`.
Construction errors (a bad extra config) are raised, as :class:`~lmcache.errors.ConfigError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, TypeVar

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from lmcache.backends.base import StorageBackend
from lmcache.errors import ConfigError, StateError
from lmcache.integrations.sglang.settings import SGLangSettings
from lmcache.keys import CacheKey, KeyScope
from lmcache.tiered import TieredBackend

__all__ = ["LMCacheHiCacheStorage", "page_digest"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# BLAKE2b personalisation of page-segment digests: SGLang's page hash plus the segment name.
_PERSON = b"sglang-page"
# Host-pool tensors a page segment may lie in (MHA, MLA and the split MLA layout).
_POOL_BUFFERS = ("kv_buffer", "k_buffer", "v_buffer", "index_k_buffer", "index_k_scale_buffer")
# How long a synchronous call waits for the loop before it counts as a failure.
_CALL_TIMEOUT = 300.0
# Pages whose keys are kept (LRU): a few batches' worth of prefetch and backup.
_KEY_CACHE_PAGES = 8192


def page_digest(page_key: str, segment: int | str) -> bytes:
    """The 32-byte chunk hash of one segment of the SGLang page ``page_key``.

    SGLang's page keys are strings (hex SHA-256 chains); a page stored in several contiguous
    segments needs one key per segment, so the segment's name is hashed in.
    """
    text = f"{page_key}\x00{segment}".encode()
    return hashlib.blake2b(text, digest_size=32, person=_PERSON).digest()


class _LoopThread:
    """An asyncio loop on a daemon thread: SGLang's storage threads are synchronous."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="lmcache-sglang-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = _CALL_TIMEOUT) -> T:
        fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()  # the backend sees a cancellation: it writes nothing into our views after it
            raise

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()


class LMCacheHiCacheStorage(HiCacheStorage):
    """SGLang ``HiCacheStorage`` over an lmcache :class:`~lmcache.tiered.TieredBackend`.

    Args:
        storage_config: SGLang's per-rank storage config; its ``extra_config`` carries lmcache's
            settings (see :class:`~lmcache.integrations.sglang.settings.SGLangSettings`).
        kwargs: What SGLang's factory passes beside it (unused).
        backend: Use this backend instead of building one from the settings' ``tiers`` (it is
            then borrowed: not closed by :meth:`close`). For tests and benchmarks.

    Raises:
        ConfigError: A bad extra config, or no model identity (neither ``model_id`` in the
            extra config nor SGLang's ``model_name``).
    """

    def __init__(
        self,
        storage_config: HiCacheStorageConfig,
        kwargs: Mapping[str, Any] | None = None,
        *,
        backend: StorageBackend | None = None,
    ) -> None:
        self.storage_config = storage_config
        self.settings = SGLangSettings.from_extra_config(storage_config.extra_config)
        model_id = self.settings.model_id or storage_config.model_name
        if not model_id:
            raise ConfigError("lmcache needs a model identity: set model_id in the extra config")
        self.model_id: str = model_id
        self._owns_backend = backend is None
        self.backend: StorageBackend = (
            backend if backend is not None else TieredBackend.from_config(self.settings.config)
        )
        self.mem_pool_host: Any = None
        self._scope: KeyScope | None = None
        self._segments_per_page = 1
        self._bounds: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        # SGLang asks batch_exists and then batch_get_v1 (or batch_set_v1) for the same pages:
        # their keys are derived once (a key also caches its text, which tiers ask for).
        self._key_cache: OrderedDict[str, tuple[CacheKey, ...]] = OrderedDict()
        self._key_lock = threading.Lock()  # guards both caches
        self._view_cache: OrderedDict[int, tuple[memoryview, ...]] = OrderedDict()
        self._closed = False
        self.counters = {
            "exists_calls": 0,
            "exists_pages": 0,
            "get_pages": 0,
            "get_hits": 0,
            "set_pages": 0,
            "set_stored": 0,
            "failures": 0,
        }
        self._loop = _LoopThread()
        try:
            self._loop.run(self.backend.open())
        except BaseException:
            self._loop.stop()
            raise

    # -- registration ------------------------------------------------------------------------

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Take SGLang's host KV pool: the source and destination of the v1 calls, and the scope."""
        super().register_mem_pool_host(mem_pool_host)
        pool = mem_pool_host
        cfg = self.storage_config
        parts = [
            type(pool).__name__,
            str(getattr(pool, "layout", "?")),
            f"page{getattr(pool, 'page_size', '?')}",
            f"layers{getattr(pool, 'layer_num', '?')}",
            f"bpt{getattr(pool, 'size_per_token', '?')}",
        ]
        tags = dict(self.settings.config.tags)
        if cfg.pp_size > 1:
            tags["sglang.pp"] = f"{cfg.pp_rank}/{cfg.pp_size}"
        if cfg.attn_cp_size > 1:
            tags["sglang.cp"] = f"{cfg.attn_cp_rank}/{cfg.attn_cp_size}"
        if cfg.dcp_size > 1:
            tags["sglang.dcp"] = f"{cfg.dcp_rank}/{cfg.dcp_size}/{cfg.logical_page_size}"
        # MLA's latent KV is replicated on every TP rank (SGLang writes it from one): one value
        # serves all ranks. MHA ranks hold different heads, so the rank is part of the key.
        rank = 0 if cfg.is_mla_model else cfg.tp_rank
        # A pool without a dtype (a bare one, as in SGLang's own storage tests) is stored as bytes.
        dtype = str(getattr(pool, "dtype", "bytes")).removeprefix("torch.")
        with self._key_lock:
            self._key_cache.clear()  # keys of another scope
            self._view_cache.clear()  # views of another pool
        self._scope = KeyScope.create(
            f"{self.model_id}|sglang:{':'.join(parts)}",
            world_size=max(cfg.tp_size, 1),
            rank=rank,
            dtype=dtype,
            tags=tags,
        )
        self._bounds = []
        for name in _POOL_BUFFERS:
            buf = getattr(pool, name, None)
            if isinstance(buf, torch.Tensor) and buf.numel() and buf.device.type == "cpu":
                self._bounds.append((buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()))
        if self.settings.zero_copy:
            ptrs, _ = pool.get_page_buffer_meta(torch.arange(pool.page_size, dtype=torch.int64))
            if not ptrs:
                raise ConfigError(f"SGLang's host pool {type(pool).__name__} gives no page segments")
            self._segments_per_page = len(ptrs)
        # Hint for backends that register memory for transfers (nixl://): the whole pool, once.
        for lo, hi in self._bounds:
            try:
                self._loop.run(self.backend.register_host_memory(self._view(lo, hi - lo)), timeout=60)
            except Exception as exc:  # without it every call still works
                logger.warning("registering SGLang's host pool with lmcache failed: %s", exc)

    # -- helpers -----------------------------------------------------------------------------

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this storage's event loop thread and wait for it.

        Raises:
            StateError: The storage is closed.
        """
        if self._closed:
            coro.close()
            raise StateError("LMCacheHiCacheStorage is closed")
        return self._loop.run(coro)

    @property
    def scope(self) -> KeyScope | None:
        """The key scope (set by :meth:`register_mem_pool_host`)."""
        return self._scope

    @staticmethod
    def _view(ptr: int, nbytes: int) -> memoryview:
        return memoryview((ctypes.c_char * nbytes).from_address(ptr)).cast("B")

    def _segment_names(self) -> Sequence[int | str]:
        return range(self._segments_per_page) if self.settings.zero_copy else ("flat",)

    def keys_for(self, page_keys: Sequence[str]) -> list[CacheKey]:
        """The lmcache keys of the segments of ``page_keys``, page-major (page 0's first).

        Raises:
            StateError: No host pool is registered yet (the scope is not known).
        """
        if self._scope is None:
            raise StateError("no host pool registered yet")
        scope = self._scope
        names = self._segment_names()
        out: list[CacheKey] = []
        cache = self._key_cache
        with self._key_lock:
            for k in page_keys:
                keys = cache.get(k)
                if keys is None:
                    keys = tuple(scope.key(page_digest(k, s)) for s in names)
                    cache[k] = keys
                    if len(cache) > _KEY_CACHE_PAGES:
                        cache.popitem(last=False)
                else:
                    cache.move_to_end(k)
                out.extend(keys)
        return out

    def page_views(self, n_pages: int, host_indices: torch.Tensor) -> list[memoryview]:
        """Views of the pool's memory for ``n_pages`` pages at ``host_indices``, page-major.

        Raises:
            StateError: No host pool is registered yet.
            ValueError: The indices do not cover the pages, or a segment lies outside the pool.
        """
        pool = self.mem_pool_host
        if pool is None:
            raise StateError("no host pool registered yet")
        if host_indices.numel() != n_pages * pool.page_size:
            raise ValueError(f"{host_indices.numel()} host indices for {n_pages} pages of {pool.page_size} tokens")
        page_size = pool.page_size
        host_indices = host_indices.cpu()
        starts = host_indices[::page_size].tolist()
        per = self._segments_per_page
        # A page's segments depend only on where it starts in the pool, whose tensors never
        # move: the views of recently used pages are kept, SGLang reuses its host slots.
        found: list[tuple[memoryview, ...] | None] = []
        with self._key_lock:
            for start in starts:
                hit = self._view_cache.get(start)
                if hit is not None:
                    self._view_cache.move_to_end(start)
                found.append(hit)
        missing = [i for i, hit in enumerate(found) if hit is None]
        if missing:
            idx = torch.cat([host_indices[i * page_size : (i + 1) * page_size] for i in missing])
            ptrs, sizes = pool.get_page_buffer_meta(idx)
            if len(ptrs) != len(missing) * per or len(sizes) != len(ptrs):
                raise ValueError(f"the pool gave {len(ptrs)} segments for {len(missing)} pages")
            made = []
            for ptr, size in zip(ptrs, sizes, strict=True):
                # The pool computes the addresses; a view is only ever made inside its own tensors.
                if not any(lo <= ptr and ptr + size <= hi for lo, hi in self._bounds):
                    raise ValueError(f"segment at {ptr:#x} (+{size}) lies outside the host pool")
                made.append(self._view(ptr, size))
            with self._key_lock:
                for j, i in enumerate(missing):
                    found[i] = views_i = tuple(made[j * per : (j + 1) * per])
                    self._view_cache[starts[i]] = views_i
                while len(self._view_cache) > _KEY_CACHE_PAGES:
                    self._view_cache.popitem(last=False)
        return [v for page in found if page is not None for v in page]

    def _failed(self, op: str, exc: BaseException) -> None:
        with self._lock:
            self.counters["failures"] += 1
        logger.warning("lmcache HiCache storage: %s failed, counted as a miss: %r", op, exc)

    def _count(self, **inc: int) -> None:
        with self._lock:
            for name, n in inc.items():
                self.counters[name] += n

    # -- zero-copy (v1) ----------------------------------------------------------------------

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many leading pages of ``keys`` are stored (all their segments); 0 on any failure."""
        if not keys:
            return 0
        try:
            flat = self.keys_for(keys)
            per = len(self._segment_names())
            if isinstance(self.backend, TieredBackend):
                n = self.run(self.backend.lookup_prefix(flat, budget=self.settings.config.lookup_budget))
            else:
                n = self.run(self.backend.lookup_prefix(flat))
            pages = n // per
        except Exception as exc:
            self._failed("batch_exists", exc)
            return 0
        self._count(exists_calls=1, exists_pages=pages)
        return pages

    def exists(self, key: str) -> bool:
        """Whether page ``key`` is stored."""
        return self.batch_exists([key]) == 1

    def batch_get_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Read pages straight into the host pool at ``host_indices``; one flag per page."""
        n = len(keys)
        if n == 0:
            return []
        try:
            views = self.page_views(n, host_indices)
            got = self.run(self.backend.get_into(self.keys_for(keys), views))
        except Exception as exc:
            self._failed("batch_get_v1", exc)
            return [False] * n
        per = self._segments_per_page
        ok = [all(got[i * per + j] == len(views[i * per + j]) for j in range(per)) for i in range(n)]
        self._count(get_pages=n, get_hits=sum(ok))
        return ok

    def batch_set_v1(
        self, keys: list[str], host_indices: torch.Tensor, extra_info: HiCacheStorageExtraInfo | None = None
    ) -> list[bool]:
        """Write pages straight from the host pool at ``host_indices``; one flag per page."""
        n = len(keys)
        if n == 0:
            return []
        try:
            views = self.page_views(n, host_indices)
            results = self.run(self.backend.put(self.keys_for(keys), views))
        except Exception as exc:
            self._failed("batch_set_v1", exc)
            return [False] * n
        per = self._segments_per_page
        ok = [all(results[i * per + j].ok for j in range(per)) for i in range(n)]
        self._count(set_pages=n, set_stored=sum(ok))
        return ok

    # -- legacy (flat page tensors) ----------------------------------------------------------

    @staticmethod
    def _bytes_of(tensor: torch.Tensor) -> memoryview:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError("page tensors must be contiguous CPU tensors")
        return memoryview(tensor.view(torch.uint8).numpy()).cast("B")

    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        """Read page ``key`` into the flat tensor ``target_location``; ``None`` on a miss."""
        return self.batch_get([key], [target_location])[0]

    def batch_get(
        self, keys: list[str], target_locations: Any | None = None, target_sizes: Any | None = None
    ) -> list[torch.Tensor | None]:
        """Read pages into their flat tensors; ``None`` for each miss."""
        n = len(keys)
        if n == 0:
            return []
        try:
            if target_locations is None or len(target_locations) != n:
                raise ValueError("batch_get needs one target tensor per key")
            views = [self._bytes_of(t) for t in target_locations]
            got = self.run(self.backend.get_into(self.keys_for(keys), views))
        except Exception as exc:
            self._failed("batch_get", exc)
            return [None] * n
        out = [t if g == len(v) else None for t, g, v in zip(target_locations, got, views, strict=True)]
        self._count(get_pages=n, get_hits=sum(o is not None for o in out))
        return out

    def set(
        self, key: str, value: Any | None = None, target_location: Any | None = None, target_sizes: Any | None = None
    ) -> bool:
        """Store the flat page tensor ``value`` under ``key``."""
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store flat page tensors; ``True`` when every one is stored (or already was)."""
        n = len(keys)
        if n == 0:
            return True
        try:
            if values is None or len(values) != n:
                raise ValueError("batch_set needs one value per key")
            srcs = [self._bytes_of(v.contiguous()) for v in values]
            results = self.run(self.backend.put(self.keys_for(keys), srcs))
        except Exception as exc:
            self._failed("batch_set", exc)
            return False
        stored = sum(r.ok for r in results)
        self._count(set_pages=n, set_stored=stored)
        return stored == n

    # -- housekeeping ------------------------------------------------------------------------

    def clear(self) -> None:
        """Delete this scope's values from every tier that can list its keys (best effort)."""
        scope = self._scope
        if scope is None:
            return

        async def _clear() -> int:
            mine = []
            async for key in self.backend.list_keys():
                if (key.model, key.world_size, key.rank, key.dtype, key.tags) == (
                    scope.model,
                    scope.world_size,
                    scope.rank,
                    scope.dtype,
                    scope.tags,
                ):
                    mine.append(key)
            await self.backend.delete(mine)
            return len(mine)

        try:
            logger.info("lmcache HiCache storage: cleared %d values", self.run(_clear()))
        except Exception as exc:
            self._failed("clear", exc)

    def stats(self) -> dict[str, Any]:
        """This adapter's counters, and the backend's under ``"backend"``."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        try:
            out["backend"] = self.backend.stats()
        except Exception as exc:  # stats are for humans: never fail a caller over them
            out["backend"] = {"error": repr(exc)}
        return out

    def flush(self, timeout: float | None = None) -> None:
        """Wait until write-backs to slower tiers have landed (TieredBackend only)."""
        if isinstance(self.backend, TieredBackend):
            self.run(self.backend.flush(timeout))

    def close(self) -> None:
        """Flush, close the backend if it was built here, and stop the loop thread. Idempotent."""
        if self._closed:
            return
        try:
            if self._owns_backend:
                self._loop.run(self.backend.aclose(), timeout=60)
        except Exception as exc:
            logger.warning("closing lmcache's backend failed: %s", exc)
        finally:
            self._closed = True
            self._loop.stop()
