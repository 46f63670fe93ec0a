"""lmcache as SGLang's HiCache storage, against the real SGLang package and its own host pools.

The host pools are SGLang's ``MHATokenToKVPoolHost``/``MLATokenToKVPoolHost``, built on CPU from
SGLang's own device pools; the storage is loaded through SGLang's ``StorageBackendFactory`` the
way ``--hicache-storage-backend dynamic`` loads it.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("sglang", reason="sglang is installed by `make setup` (SGLANG in the Makefile)")

from lmcache.backends.memory import MemoryBackend
from lmcache.bench.sglang import host_pool, import_sglang, storage_config
from lmcache.errors import ConfigError

import_sglang()

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

from lmcache.integrations.sglang import LMCacheHiCacheStorage  # noqa: E402

MHA_LAYOUTS = ["page_first", "layer_first", "page_first_direct", "page_head"]
MLA_LAYOUTS = ["page_first", "layer_first"]
POOLS = [("mha", lay) for lay in MHA_LAYOUTS] + [("mla", lay) for lay in MLA_LAYOUTS]
PAGE = 4


def _extra(**kw: Any) -> dict[str, Any]:
    return {
        "backend_name": "lmcache",
        "module_path": "lmcache.integrations.sglang",
        "class_name": "LMCacheHiCacheStorage",
        "interface_v1": 1,
        "tiers": ["memory://?capacity=64MiB"],
        **kw,
    }


@pytest.fixture
def shared_memory() -> Iterator[MemoryBackend]:
    """One memory:// backend several storages borrow (several ranks or models on one store)."""
    b = MemoryBackend.from_url("memory://?capacity=64MiB")
    yield b
    asyncio.run(b.aclose())


def _make(kind: str, layout: str, backend: Any = None, **cfg: Any) -> tuple[LMCacheHiCacheStorage, Any]:
    pool = host_pool(kind, layout, page_size=PAGE)
    extra = cfg.pop("extra", _extra())
    store = LMCacheHiCacheStorage(storage_config(kind, extra=extra, **cfg), {}, backend=backend)
    store.register_mem_pool_host(pool)
    return store, pool


def _fill(pool: Any, n_pages: int, seed: int) -> torch.Tensor:
    idx = pool.alloc(n_pages * PAGE)
    g = torch.Generator().manual_seed(seed)
    for p in range(n_pages):
        page = pool.get_dummy_flat_data_page()
        page.copy_(torch.randn(page.shape, generator=g).to(page.dtype))
        pool.set_from_flat_data_page(int(idx[p * PAGE]), page)
    return idx


def _page(pool: Any, idx: torch.Tensor, p: int) -> torch.Tensor:
    return pool.get_data_page(int(idx[p * PAGE]), flat=True).clone()


@pytest.mark.parametrize(("kind", "layout"), POOLS)
def test_v1_round_trip_through_sglang_host_pool(kind: str, layout: str) -> None:
    store, pool = _make(kind, layout)
    try:
        src = _fill(pool, 3, seed=1)
        keys = [f"{i:064x}" for i in range(3)]
        assert store.batch_exists(keys) == 0
        assert store.batch_set_v1(keys, src) == [True, True, True]
        assert store.batch_exists(keys) == 3
        dst = pool.alloc(3 * PAGE)
        assert store.batch_get_v1(keys, dst) == [True, True, True]
        for p in range(3):
            assert torch.equal(_page(pool, dst, p), _page(pool, src, p))
    finally:
        store.close()


def test_batch_exists_is_the_leading_run() -> None:
    store, pool = _make("mha", "page_first")
    try:
        idx = _fill(pool, 4, seed=2)
        keys = ["a", "b", "c", "d"]
        # Store pages a, b and d: c is missing, so the usable prefix is two pages.
        sel = torch.cat([idx[0 : 2 * PAGE], idx[3 * PAGE : 4 * PAGE]])
        assert store.batch_set_v1(["a", "b", "d"], sel) == [True, True, True]
        assert store.batch_exists(keys) == 2
        assert store.exists("d") and not store.exists("c")
        assert store.batch_get_v1(["a", "c"], pool.alloc(2 * PAGE)) == [True, False]
    finally:
        store.close()


def test_v1_moves_pages_straight_between_pool_and_backend(shared_memory: MemoryBackend) -> None:
    """Every buffer handed to the backend lies inside SGLang's host pool: no staging copies."""
    seen: list[tuple[int, int]] = []
    get_into, put = shared_memory.get_into, shared_memory.put

    def record(bufs: Any) -> None:
        for b in bufs:
            seen.append((ctypes.addressof(ctypes.c_char.from_buffer(b)), len(b)))

    async def spy_get(keys: Any, dsts: Any) -> Any:
        record(dsts)
        return await get_into(keys, dsts)

    async def spy_put(keys: Any, srcs: Any) -> Any:
        record(srcs)
        return await put(keys, srcs)

    shared_memory.get_into, shared_memory.put = spy_get, spy_put  # type: ignore[method-assign]
    store, pool = _make("mha", "page_first", backend=shared_memory)
    try:
        idx = _fill(pool, 2, seed=3)
        assert store.batch_set_v1(["x", "y"], idx) == [True, True]
        assert store.batch_get_v1(["x", "y"], pool.alloc(2 * PAGE)) == [True, True]
        lo = pool.kv_buffer.data_ptr()
        hi = lo + pool.kv_buffer.numel() * pool.kv_buffer.element_size()
        assert len(seen) == 8  # 2 pages x (K, V) x (put, get)
        assert all(lo <= addr and addr + n <= hi for addr, n in seen)
    finally:
        store.close()


def test_keys_are_scoped_by_model_and_rank(shared_memory: MemoryBackend) -> None:
    a, pool_a = _make("mha", "page_first", backend=shared_memory, tp_rank=0, tp_size=2)
    b, _ = _make("mha", "page_first", backend=shared_memory, tp_rank=1, tp_size=2)
    c, _ = _make("mha", "page_first", backend=shared_memory, tp_rank=0, tp_size=2, extra=_extra(model_id="other"))
    try:
        assert a.batch_set_v1(["k"], _fill(pool_a, 1, seed=4)) == [True]
        assert a.batch_exists(["k"]) == 1
        assert b.batch_exists(["k"]) == 0  # another rank holds other heads
        assert c.batch_exists(["k"]) == 0  # another model
    finally:
        for s in (a, b, c):
            s.close()


def test_mla_values_are_shared_by_tp_ranks(shared_memory: MemoryBackend) -> None:
    w, pool = _make("mla", "page_first", backend=shared_memory, tp_rank=0, tp_size=2)
    r, pool_r = _make("mla", "page_first", backend=shared_memory, tp_rank=1, tp_size=2)
    try:
        src = _fill(pool, 1, seed=5)
        assert w.batch_set_v1(["m"], src) == [True]
        dst = pool_r.alloc(PAGE)
        assert r.batch_get_v1(["m"], dst) == [True]
        assert torch.equal(_page(pool_r, dst, 0), _page(pool, src, 0))
    finally:
        w.close()
        r.close()


class _Broken(MemoryBackend):
    """Fault injection: every data call raises."""

    async def _contains(self, keys: Any) -> Any:
        raise OSError("disk on fire")

    async def _get_into(self, keys: Any, dsts: Any) -> Any:
        raise OSError("disk on fire")

    async def _put(self, keys: Any, srcs: Any) -> Any:
        raise OSError("disk on fire")


def test_failures_are_misses_never_exceptions() -> None:
    broken = _Broken.from_url("memory://?capacity=1MiB")
    store, pool = _make("mha", "page_first", backend=broken)
    try:
        idx = _fill(pool, 2, seed=6)
        assert store.batch_set_v1(["a", "b"], idx) == [False, False]
        assert store.batch_exists(["a", "b"]) == 0
        assert store.batch_get_v1(["a", "b"], idx) == [False, False]
        assert store.batch_set(["a"], [pool.get_dummy_flat_data_page()]) is False
        assert store.get("a", pool.get_dummy_flat_data_page()) is None
        # Indices that do not cover the pages: a miss too, not an assertion inside SGLang's pool.
        assert store.batch_get_v1(["a", "b"], idx[:PAGE]) == [False, False]
        assert store.stats()["failures"] >= 6
    finally:
        store.close()
        asyncio.run(broken.aclose())


def test_legacy_flat_page_path() -> None:
    extra = _extra()
    del extra["interface_v1"]
    store, pool = _make("mha", "layer_first", extra=extra)
    try:
        idx = _fill(pool, 2, seed=7)
        pages = [pool.get_data_page(int(idx[p * PAGE]), flat=True) for p in range(2)]
        assert store.batch_set(["p", "q"], pages) is True
        assert store.batch_exists(["p", "q", "r"]) == 2
        out = store.batch_get(["p", "q", "r"], [pool.get_dummy_flat_data_page() for _ in range(3)])
        assert out[2] is None
        assert torch.equal(out[0], pages[0]) and torch.equal(out[1], pages[1])
    finally:
        store.close()


def test_loaded_by_sglang_dynamic_backend_factory(tmp_path: Any) -> None:
    """What ``--hicache-storage-backend dynamic`` does, with a file:// tier that outlives the process's store."""
    extra = _extra(tiers=[f"file://{tmp_path}/kv"])
    pool = host_pool("mha", "page_first", page_size=PAGE)
    store = StorageBackendFactory.create_backend("dynamic", storage_config("mha", extra=dict(extra)), pool)
    assert isinstance(store, HiCacheStorage) and isinstance(store, LMCacheHiCacheStorage)
    store.register_mem_pool_host(pool)
    src = _fill(pool, 2, seed=8)
    assert store.batch_set_v1(["s", "t"], src) == [True, True]
    store.close()
    again = StorageBackendFactory.create_backend("dynamic", storage_config("mha", extra=dict(extra)), pool)
    again.register_mem_pool_host(pool)
    try:
        dst = pool.alloc(2 * PAGE)
        assert again.batch_get_v1(["s", "t"], dst) == [True, True]
        assert torch.equal(_page(pool, dst, 1), _page(pool, src, 1))
    finally:
        again.close()


def test_extra_config_is_parsed_like_the_vllm_connector(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text("chunk_size: 64\nlookup_budget: 0.5\n")
    monkeypatch.setenv("LMCACHE_LOOKUP_BUDGET", "0.25")
    extra = _extra(config_file=str(cfg_file), **{"lmcache.chunk_size": 128}, model_id="m")
    store = LMCacheHiCacheStorage(storage_config("mha", extra=extra), {})
    try:
        # inline > env > file > defaults
        assert store.settings.config.chunk_size == 128
        assert store.settings.config.lookup_budget == 0.25
        assert store.settings.zero_copy is True
        assert store.model_id == "m"
    finally:
        store.close()
    with pytest.raises(ConfigError, match="no_such_setting"):
        LMCacheHiCacheStorage(storage_config("mha", extra=_extra(no_such_setting=1)), {})
    with pytest.raises(ConfigError, match="save_decode_tokens"):
        LMCacheHiCacheStorage(storage_config("mha", extra=_extra(save_decode_tokens=True)), {})
    with pytest.raises(ConfigError, match="chunk_size"):
        LMCacheHiCacheStorage(storage_config("mha", extra=_extra(chunk_size="lots")), {})
    with pytest.raises(ConfigError, match="model_id"):
        LMCacheHiCacheStorage(storage_config("mha", extra=_extra(), model_name=None), {})


@pytest.mark.parametrize(("is_mla", "tp_rank", "tp_size"), [(False, 0, 1), (True, 0, 1), (False, 1, 4), (True, 3, 8)])
def test_sglang_shipped_storage_test_against_lmcache(
    monkeypatch: pytest.MonkeyPatch, is_mla: bool, tp_rank: int, tp_size: int
) -> None:
    """SGLang ships a v1 storage test (written for Mooncake): run its batch test on lmcache."""
    import_sglang("sglang.srt.mem_cache.storage.mooncake_store.test_mooncake_store")
    from sglang.srt.mem_cache.storage.mooncake_store import test_mooncake_store as shipped

    made: list[LMCacheHiCacheStorage] = []

    def lmcache_store(config: Any) -> LMCacheHiCacheStorage:
        config = dataclasses.replace(config, extra_config=_extra(), model_name="sglang-shipped-test")
        made.append(LMCacheHiCacheStorage(config, {}))
        return made[-1]

    monkeypatch.setattr(shipped, "MooncakeStore", lmcache_store)
    try:
        shipped.test_batch_operation(
            shipped.make_hicache_storage_config(is_mla_model=is_mla, tp_rank=tp_rank, tp_size=tp_size)
        )
    finally:
        for store in made:
            store.close()
    assert made and made[0].stats()["set_stored"] == 13


def test_bench_sglang_small_run(tmp_path: Any) -> None:
    """``lmcache bench sglang`` is registered and moves every page on both sides (no timing checked)."""
    from lmcache.bench import WORKLOADS
    from lmcache.bench.sglang import bench_sglang

    assert WORKLOADS["sglang"] == "lmcache.bench.sglang"
    result = bench_sglang(pages=2, page_size=4, layers=2, heads=2, head_dim=8, repeat=2)
    assert len(result["rounds"]) == 2
    assert set(result["median"]) == {"adapter_set_s", "baseline_put_s", "adapter_get_s", "baseline_get_s"}
    assert result["params"]["bytes_per_batch"] == 2 * 4 * (2 * 2 * 2 * 8 * 2)


def test_reused_host_slots_move_their_current_contents() -> None:
    """SGLang recycles host slots: a page written from a slot again carries what is there now."""
    store, pool = _make("mha", "page_head")
    try:
        idx = _fill(pool, 1, seed=10)
        first = _page(pool, idx, 0)
        assert store.batch_set_v1(["old"], idx) == [True]
        pool.set_from_flat_data_page(int(idx[0]), torch.ones_like(first))
        assert store.batch_set_v1(["new"], idx) == [True]
        out = pool.alloc(2 * PAGE)
        assert store.batch_get_v1(["old", "new"], out) == [True, True]
        assert torch.equal(_page(pool, out, 0), first)
        assert torch.equal(_page(pool, out, 1), torch.ones_like(first))
    finally:
        store.close()
