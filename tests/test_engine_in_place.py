"""CacheEngine.retrieve scatters tier-0 hits of a ``memory://`` tier straight from its pool.

A hit in a memory tier used to be copied into a chunk buffer (``get_into``) and then scattered;
now the value is leased where it lies and scattered from there. These tests check that the
scattered tensor is the pool's own memory, that the bytes are the stored ones, that a tier-0
miss falls back to the other tiers for that chunk and the rest, that hits are counted once,
and that every lease is given back (also when the scatter raises).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.integrations.transformers import ContiguousKV
from lmcache.layouts import KVGeometry

GEO = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")
CHUNK = 16
TOKENS = list(range(100, 180))  # 5 full chunks


def _kv(seq: int, seed: int = 0) -> ContiguousKV:
    g = torch.Generator().manual_seed(seed)
    shape = (1, GEO.num_kv_heads, seq, GEO.head_dim)
    return ContiguousKV(
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
    )


class Recorder:
    """A destination that writes into a ContiguousKV and remembers where each source lay."""

    geometry = GEO

    def __init__(self, seq: int, fail_at: int | None = None) -> None:
        self.kv = ContiguousKV.empty(GEO, seq)
        self.sources: list[tuple[int, int]] = []  # (start, data_ptr of the source)
        self.fail_at = fail_at

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        if start == self.fail_at:
            raise RuntimeError("injected scatter failure")
        self.sources.append((start, src.data_ptr()))
        self.kv.scatter(start, end, src)


def _engine(tmp_path: Path, *tiers: str) -> CacheEngine:
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=list(tiers) or ["memory://?capacity=16MiB"])
    return CacheEngine(GEO, "in-place", config=cfg)


def _pool_range(engine: CacheEngine) -> range:
    pool = engine.backend.tiers[0]._pool  # type: ignore[attr-defined]
    base = np.frombuffer(pool, dtype=np.uint8).ctypes.data
    return range(base, base + pool.nbytes)


def _same(a: ContiguousKV, b: ContiguousKV, n: int) -> bool:
    return all(torch.equal(x[:, :, :n], y[:, :, :n]) for x, y in zip(a.keys + a.values, b.keys + b.values, strict=True))


def _used(engine: CacheEngine) -> int:
    return engine.backend.tiers[0].stats()["used_bytes"]


def _keys(engine: CacheEngine) -> list[Any]:
    return [engine.scope.key(c.hash) for c in engine.chunks(TOKENS)]


def test_memory_hits_are_scattered_from_the_pool_itself(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    try:
        src = _kv(len(TOKENS))
        engine.store(TOKENS, src).result(10)
        dst = Recorder(len(TOKENS))
        assert engine.retrieve(TOKENS, dst) == 80
        pool = _pool_range(engine)
        # Before: every source was a chunk buffer of the engine's staging pool, not the tier's pool.
        assert [s for s, _ in dst.sources] == [0, 16, 32, 48, 64]
        assert all(ptr in pool for _, ptr in dst.sources)
        assert _same(src, dst.kv, 80)
        tier0 = engine.stats()["backend"]["tiers"][0]
        assert tier0["hits"] == 5
        assert engine.stats()["retrieved_bytes"] == 5 * GEO.chunk_nbytes(CHUNK)
        # Every lease went back: once the keys are deleted their blocks are free again.
        engine._run(engine.backend.delete(_keys(engine)))
        assert _used(engine) == 0
    finally:
        engine.close()


def test_a_tier0_miss_reads_that_chunk_and_the_rest_from_the_next_tier(tmp_path: Path) -> None:
    engine = _engine(tmp_path, "memory://?capacity=16MiB", f"file://{tmp_path}/t")
    try:
        src = _kv(len(TOKENS))
        engine.store(TOKENS, src).result(10)
        engine.flush(10)
        engine._run(engine.backend.tiers[0].delete([_keys(engine)[2]]))  # chunk 2 only in file://
        dst = Recorder(len(TOKENS))
        assert engine.retrieve(TOKENS, dst) == 80
        assert _same(src, dst.kv, 80)
        pool = _pool_range(engine)
        assert [ptr in pool for _, ptr in dst.sources] == [True, True, False, False, False]
        tiers = engine.stats()["backend"]["tiers"]
        # Chunks 0-1 leased from tier 0; 2 read from file://; 3-4 read from tier 0 by get_into.
        assert tiers[0]["hits"] == 4
        assert tiers[1]["hits"] == 1
    finally:
        engine.close()


def test_a_value_of_the_wrong_size_stops_the_load(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    try:
        engine.store(TOKENS, _kv(len(TOKENS))).result(10)
        key = _keys(engine)[1]
        tier0 = engine.backend.tiers[0]
        engine._run(tier0.delete([key]))
        engine._run(tier0.put([key], [memoryview(bytes(100))]))
        dst = Recorder(len(TOKENS))
        assert engine.retrieve(TOKENS, dst) == 16
        assert [ptr in _pool_range(engine) for _, ptr in dst.sources] == [True]  # chunk 0 from the pool
        assert engine.stats()["backend_errors"] == 1
        engine._run(engine.backend.delete(_keys(engine)))
        assert _used(engine) == 0
    finally:
        engine.close()


def test_leases_are_given_back_when_the_scatter_raises(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    try:
        engine.store(TOKENS, _kv(len(TOKENS))).result(10)
        dst = Recorder(len(TOKENS), fail_at=32)
        with pytest.raises(RuntimeError, match="injected"):
            engine.retrieve(TOKENS, dst)
        assert [ptr in _pool_range(engine) for _, ptr in dst.sources] == [True, True]  # leased, then raised
        engine._run(engine.backend.delete(_keys(engine)))
        assert _used(engine) == 0
    finally:
        engine.close()
