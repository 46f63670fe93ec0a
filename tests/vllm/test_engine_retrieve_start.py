"""CacheEngine.retrieve(start=...): the vLLM connector loads only what vLLM's prefix cache lacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.integrations.transformers import ContiguousKV
from lmcache.layouts import KVGeometry

GEO = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")


class _Recorder:
    """A KV destination that records which token ranges it received."""

    geometry = GEO

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        self.ranges.append((start, end))


@pytest.fixture
def engine(tmp_path: Path):
    cfg = LMCacheConfig.load(environ={}, chunk_size=16, tiers=["memory://?capacity=16MiB"])
    eng = CacheEngine(GEO, "m", config=cfg)
    yield eng
    eng.close()


def _src(seq: int) -> ContiguousKV:
    g = torch.Generator().manual_seed(1)
    shape = (1, GEO.num_kv_heads, seq, GEO.head_dim)
    return ContiguousKV(
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
    )


def test_start_skips_chunks_the_caller_holds(engine: CacheEngine) -> None:
    tokens = list(range(64))
    engine.store(tokens, _src(64)).result(10)
    rec = _Recorder()
    assert engine.retrieve(tokens, rec, start=20) == 64
    # The chunk [0, 16) ends before start: not loaded; [16, 32) straddles it: loaded whole.
    assert rec.ranges == [(16, 32), (32, 48), (48, 64)]
    assert engine.stats()["retrieved_tokens"] == 48


def test_start_past_every_chunk_loads_nothing(engine: CacheEngine) -> None:
    tokens = list(range(32))
    engine.store(tokens, _src(32)).result(10)
    rec = _Recorder()
    assert engine.retrieve(tokens, rec, start=32) == 0
    assert rec.ranges == []


def test_start_stops_at_first_miss(engine: CacheEngine) -> None:
    tokens = list(range(64))
    engine.store(tokens[:32], _src(32)).result(10)
    rec = _Recorder()
    assert engine.retrieve(tokens, rec, start=16, max_tokens=64) == 32
    assert rec.ranges == [(16, 32)]
