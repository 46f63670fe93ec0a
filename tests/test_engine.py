from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import InvalidArgumentError, LayoutMismatchError, StateError
from lmcache.integrations.transformers import ContiguousKV
from lmcache.layouts import KVGeometry

GEO = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")


def _kv(seq: int, seed: int = 0) -> ContiguousKV:
    g = torch.Generator().manual_seed(seed)
    shape = (1, GEO.num_kv_heads, seq, GEO.head_dim)
    return ContiguousKV(
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
    )


@pytest.fixture
def engine(tmp_path: Path):
    cfg = LMCacheConfig.load(environ={}, chunk_size=16, tiers=["memory://?capacity=64MiB", f"file://{tmp_path}/t"])
    eng = CacheEngine(GEO, "test-model", config=cfg)
    yield eng
    eng.close()


def test_store_lookup_retrieve_round_trip(engine: CacheEngine) -> None:
    tokens = list(range(100))
    src = _kv(100)
    assert engine.lookup(tokens) == 0
    assert engine.store(tokens, src).result(10) == 6  # six full chunks of 16; the tail is not stored
    assert engine.lookup(tokens) == 96
    assert engine.lookup(tokens[:40]) == 32
    dst = ContiguousKV.empty(GEO, 100)
    assert engine.retrieve(tokens, dst) == 96
    for a, b in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
        assert torch.equal(a[:, :, :96], b[:, :, :96])


def test_never_stores_what_is_already_there(engine: CacheEngine) -> None:
    tokens = list(range(64))
    engine.store(tokens, _kv(64)).result(10)
    assert engine.stats()["stored_chunks"] == 4
    # The same prefix plus one more chunk: only the new chunk is gathered and stored.
    longer = [*tokens, *range(1000, 1016)]
    assert engine.store(longer, _kv(80)).result(10) == 1
    assert engine.stats()["stored_chunks"] == 5
    assert engine.stats()["skipped_chunks"] == 4
    # start= says the first chunks are known to be cached: not even looked up.
    assert engine.store(longer, _kv(80), start=64).result(10) == 0


def test_different_prefix_is_a_miss(engine: CacheEngine) -> None:
    engine.store(list(range(64)), _kv(64)).result(10)
    assert engine.lookup([7, *range(1, 64)]) == 0


def test_retrieve_stops_at_first_missing_chunk(engine: CacheEngine) -> None:
    tokens = list(range(64))
    engine.store(tokens, _kv(64)).result(10)
    keys = [engine.scope.key(c.hash) for c in engine.chunks(tokens)]
    engine._run(engine.backend.delete([keys[2]]))
    dst = ContiguousKV.empty(GEO, 64)
    assert engine.retrieve(tokens, dst) == 32


def test_partial_chunks_when_configured(tmp_path: Path) -> None:
    cfg = LMCacheConfig.load(environ={}, chunk_size=16, save_partial_chunks=True, tiers=["memory://?capacity=16MiB"])
    with CacheEngine(GEO, "m", config=cfg) as eng:
        tokens = list(range(40))
        src = _kv(40)
        assert eng.store(tokens, src).result(10) == 3
        dst = ContiguousKV.empty(GEO, 40)
        assert eng.retrieve(tokens, dst) == 40
        assert torch.equal(dst.keys[1], src.keys[1])


def test_bad_tokens_and_closed_engine(engine: CacheEngine) -> None:
    with pytest.raises(InvalidArgumentError):
        engine.lookup([1.5, 2.5])
    with pytest.raises(InvalidArgumentError):
        engine.lookup(torch.ones(4, dtype=torch.float32))
    engine.close()
    with pytest.raises(StateError):
        engine.lookup([1, 2, 3])


def test_wrong_destination_shape_is_a_typed_error(engine: CacheEngine) -> None:
    tokens = list(range(32))
    engine.store(tokens, _kv(32)).result(10)
    wrong = ContiguousKV.empty(KVGeometry(3, 2, 4, "float32"), 32)  # head_dim 4 instead of 8
    with pytest.raises(LayoutMismatchError):
        engine.retrieve(tokens, wrong)
    with pytest.raises(LayoutMismatchError):
        engine.store(tokens, wrong)


def test_the_chunk_pool_is_declared_to_every_tier_and_forgotten_by_a_borrowed_backend(tmp_path: Path) -> None:
    """The engine's staging pool is registered once (nixl:// would register it with NIXL)."""
    import asyncio

    from lmcache import open_backend
    from lmcache.tiered import TieredBackend

    cfg = LMCacheConfig.load(environ={}, chunk_size=16, tiers=["memory://?capacity=64MiB", f"file://{tmp_path}/t"])
    with CacheEngine(GEO, "m", config=cfg) as eng:
        storage = eng.pool.storage
        assert storage is not None
        tiered = eng.backend
        assert isinstance(tiered, TieredBackend)
        tokens = list(range(32))
        eng.store(tokens, _kv(32)).result(10)  # opens the tiers: the registration reaches each of them
        for b in (tiered, *tiered.tiers):
            assert [v.nbytes for v in b._host_memory] == [storage.numel()], b
        out = ContiguousKV.empty(GEO, 32)
        assert eng.retrieve(tokens, out) == 32
    borrowed = open_backend("memory://?capacity=64MiB")
    try:
        with CacheEngine(GEO, "m", config=cfg, backend=borrowed) as eng:
            assert len(borrowed._host_memory) == 1
        assert borrowed._host_memory == [], "a borrowed backend forgets the pool of a closed engine"
    finally:
        asyncio.run(borrowed.aclose())


def test_lookup_budget_is_a_setting_and_an_argument(engine: CacheEngine) -> None:
    from lmcache.errors import ConfigError

    assert LMCacheConfig.load(environ={}).lookup_budget == 0.05
    assert LMCacheConfig.load(environ={"LMCACHE_LOOKUP_BUDGET": "20ms"}).lookup_budget == 0.02
    assert LMCacheConfig.load(environ={"LMCACHE_LOOKUP_BUDGET": "20ms"}, lookup_budget=1).lookup_budget == 1.0
    with pytest.raises(ConfigError, match="lookup_budget"):
        LMCacheConfig.load(environ={}, lookup_budget="0")
    tokens = list(range(64))
    engine.store(tokens, _kv(64)).result(10)
    assert engine.lookup(tokens, budget=2.0) == engine.lookup(tokens) == 64
    for bad in (0, -1, True, "1"):
        with pytest.raises(InvalidArgumentError, match="budget"):
            engine.lookup(tokens, budget=bad)  # type: ignore[arg-type]


_TIER_KEYS = {
    "url",
    "healthy",
    "suspended",
    "errors",
    "timeouts",
    "skipped",
    "budget_exceeded",
    "lookup_failures",
    "get_failures",
    "put_failures",
    "writeback_dropped",
}


def test_stats_have_per_tier_fault_counters_and_totals(tmp_path: Path) -> None:
    import json

    # A budget no busy test machine outruns: this test wants every counter at 0.
    cfg = LMCacheConfig.load(
        environ={}, chunk_size=16, tiers=["memory://?capacity=64MiB", f"file://{tmp_path}/t"], lookup_budget=10
    )
    with CacheEngine(GEO, "test-model", config=cfg) as engine:
        tokens = list(range(64))
        engine.store(tokens, _kv(64)).result(10)
        engine.lookup(list(range(100, 164)))  # a miss: both tiers asked
        stats = engine.stats()
    json.dumps(stats)  # JSON-ready, backend stats included
    assert [set(t) for t in stats["tiers"]] == [_TIER_KEYS, _TIER_KEYS]
    assert stats["tiers"][0]["url"].startswith("memory://") and stats["tiers"][1]["url"].startswith("file://")
    for name in ("backend_errors", "lookup_failures", "get_failures", "put_failures", "lookup_budget_exceeded"):
        assert stats[name] == 0, name
    assert all(t["healthy"] and not t["suspended"] for t in stats["tiers"])


def test_a_non_tiered_backend_has_no_tier_entries_and_budgeted_lookups(tmp_path: Path) -> None:
    import asyncio

    from lmcache import open_backend

    cfg = LMCacheConfig.load(environ={}, chunk_size=16)
    borrowed = open_backend("memory://?capacity=16MiB")
    try:
        with CacheEngine(GEO, "m", config=cfg, backend=borrowed) as eng:
            tokens = list(range(32))
            eng.store(tokens, _kv(32)).result(10)
            assert eng.lookup(tokens, budget=1.0) == 32
            stats = eng.stats()
            assert stats["tiers"] == [] and stats["lookup_failures"] == stats["backend_errors"] == 0
    finally:
        asyncio.run(borrowed.aclose())
