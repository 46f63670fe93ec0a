"""Layer-wise copies of the vLLM connector (``layerwise``), on CPU tensors in vLLM 0.32's block formats.

No vLLM here: :class:`~lmcache.integrations.vllm.layerwise.LayerwiseKV` works on the paged tensors
themselves. Each test compares with the whole-chunk path (:class:`SlotMappedKV` through the same
:class:`CacheEngine`), so the two modes are shown to move the same bytes and to share a cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import ConfigError, InvalidArgumentError
from lmcache.integrations.vllm.layerwise import LayerwiseKV
from lmcache.integrations.vllm.slots import ConnectorSettings, SlotMappedKV, bind_paged_kv
from lmcache.layouts import VLLM_CPU_VEC, VLLM_PAGED, KVGeometry

GEO = KVGeometry(num_layers=3, num_kv_heads=2, head_dim=4, dtype="float32")
BLOCK = 4
NUM_BLOCKS = 16
CHUNK = 8
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(GEO.num_layers)]
TOKENS = list(range(200, 230))  # 30 tokens: 3 full chunks and a 6-token tail (not stored)


@dataclass
class Spec:
    """A load or store as the connector plans it (LoadSpec / SaveSpec)."""

    tokens: list[int]
    start: int
    block_ids: list[int]
    end: int = 0
    req_id: str = "r"


def _cache(seed: int | None) -> list[torch.Tensor]:
    """vLLM 0.32 per-layer KV ``[blocks, kv_heads, block_size, 2 * head_dim]``: random, or zeros."""
    shape = (NUM_BLOCKS, GEO.num_kv_heads, BLOCK, 2 * GEO.head_dim)
    if seed is None:
        return [torch.zeros(shape) for _ in range(GEO.num_layers)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)]


@pytest.fixture(params=[VLLM_CPU_VEC, VLLM_PAGED], ids=lambda layout: layout.name)
def layout(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture
def engine() -> Iterator[CacheEngine]:
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=["memory://?capacity=64MiB"])
    with CacheEngine(GEO, "layerwise-test", config=cfg) as eng:
        yield eng


def _layerwise(cache: list[torch.Tensor], layout: object) -> LayerwiseKV:
    return LayerwiseKV(bind_paged_kv(cache, GEO, BLOCK, layout), cache, NAMES)


def _tokens_kv(cache: list[torch.Tensor], layout: object, block_ids: list[int], start: int, end: int) -> torch.Tensor:
    """Tokens ``[start, end)`` of a request's KV, all layers, as a chunk tensor."""
    out = torch.empty(GEO.chunk_shape(end - start))
    SlotMappedKV(bind_paged_kv(cache, GEO, BLOCK, layout), block_ids).gather(start, end, out)
    return out


SRC_BLOCKS = [0, 1, 2, 3, 4, 5, 6, 7]
DST_BLOCKS = [15, 9, 12, 8, 14, 10, 13, 11]


def _store_whole(engine: CacheEngine, cache: list[torch.Tensor], layout: object) -> None:
    kv = bind_paged_kv(cache, GEO, BLOCK, layout)
    assert engine.store(TOKENS, SlotMappedKV(kv, SRC_BLOCKS)).result(10) == 3


def _store_layerwise(engine: CacheEngine, cache: list[torch.Tensor], layout: object, handed: list[int]) -> None:
    lw = _layerwise(cache, layout)
    try:
        saves = lw.start_saves(engine, [Spec(TOKENS[:24], 0, SRC_BLOCKS)])
        for i in handed:
            saves.layer_done(i)
        [(start, src)] = saves.finish()
        engine.store(TOKENS[:24], src, start=start).result(10)
        saves.release()
    finally:
        lw.close()


def test_layerwise_load_matches_a_whole_chunk_load(engine: CacheEngine, layout: object) -> None:
    """Stored whole-chunk, loaded layer by layer: the same KV, clipped to the planned tokens."""
    src = _cache(1)
    _store_whole(engine, src, layout)
    whole, layered = _cache(7), _cache(7)
    before = [t.clone() for t in layered]
    # vLLM holds tokens [0, 5) itself and the load ends one token short of the hit (23 of 24).
    kv = bind_paged_kv(whole, GEO, BLOCK, layout)
    assert engine.retrieve(TOKENS, SlotMappedKV(kv, DST_BLOCKS, lo=5, hi=23), start=5) == 24
    lw = _layerwise(layered, layout)
    try:
        loads = lw.start_loads(engine, [Spec(TOKENS, 5, DST_BLOCKS, end=23)])
        for i in range(GEO.num_layers):
            loads.wait_layer(i)
            # Layer i is in place once its wait returns.
            got = _tokens_kv(layered, layout, DST_BLOCKS, 5, 23)[i]
            assert torch.equal(got, _tokens_kv(src, layout, SRC_BLOCKS, 5, 23)[i])
        assert loads.results() == [24]
    finally:
        lw.close()
    for a, b in zip(whole, layered, strict=True):
        assert torch.equal(a, b)
    # Tokens vLLM computed itself (before 5) and past the planned end are untouched.
    assert torch.equal(_tokens_kv(layered, layout, DST_BLOCKS, 0, 5), _tokens_kv(before, layout, DST_BLOCKS, 0, 5))
    assert torch.equal(_tokens_kv(layered, layout, DST_BLOCKS, 23, 32), _tokens_kv(before, layout, DST_BLOCKS, 23, 32))


def test_layerwise_store_is_the_whole_chunk_value(layout: object) -> None:
    """Stored layer by layer, the chunks are byte for byte those a whole-chunk store writes."""
    src = _cache(2)
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=["memory://?capacity=64MiB"])
    values = []
    for mode in ("whole", "layerwise"):
        with CacheEngine(GEO, "layerwise-test", config=cfg) as eng:
            if mode == "whole":
                _store_whole(eng, src, layout)
            else:
                _store_layerwise(eng, src, layout, list(range(GEO.num_layers)))
            eng.flush(10)
            assert eng.lookup(TOKENS) == 24
            keys = [eng.scope.key(c.hash) for c in eng.chunks(TOKENS)[:3]]
            bufs = [torch.empty(GEO.chunk_shape(CHUNK)) for _ in keys]
            assert eng._run(eng.backend.get_into(keys, bufs)) == [b.numel() * 4 for b in bufs]
            values.append(bufs)
    for a, b in zip(*values, strict=True):
        assert torch.equal(a, b)


def test_stored_layerwise_loads_whole_chunk(engine: CacheEngine, layout: object) -> None:
    """The modes share a cache: a layer-wise store is a hit for a whole-chunk load, layers not handed over included."""
    src = _cache(3)
    _store_layerwise(engine, src, layout, [0, 2])  # layer 1 never handed over: gathered at finish
    engine.flush(10)
    dst = _cache(None)
    kv = bind_paged_kv(dst, GEO, BLOCK, layout)
    assert engine.retrieve(TOKENS, SlotMappedKV(kv, DST_BLOCKS, hi=24)) == 24
    assert torch.equal(_tokens_kv(dst, layout, DST_BLOCKS, 0, 24), _tokens_kv(src, layout, SRC_BLOCKS, 0, 24))


def test_layerwise_store_skips_what_the_tiers_hold(engine: CacheEngine, layout: object) -> None:
    """Chunks already cached (the leading run) are neither gathered nor put again."""
    src = _cache(4)
    kv = bind_paged_kv(src, GEO, BLOCK, layout)
    engine.store(TOKENS[:16], SlotMappedKV(kv, SRC_BLOCKS)).result(10)
    lw = _layerwise(src, layout)
    try:
        saves = lw.start_saves(engine, [Spec(TOKENS[:24], 0, SRC_BLOCKS)])
        for i in range(GEO.num_layers):
            saves.layer_done(i)
        [(start, staged)] = saves.finish()
        assert start == 16
        stored = engine.counters["stored_chunks"]
        engine.store(TOKENS[:24], staged, start=start).result(10)
        assert engine.counters["stored_chunks"] == stored + 1
        saves.release()
    finally:
        lw.close()


def test_a_short_load_reports_where_it_stopped(engine: CacheEngine, layout: object) -> None:
    """Only the first chunk is cached: the layer-wise load says so (the connector reports the rest)."""
    src = _cache(5)
    kv = bind_paged_kv(src, GEO, BLOCK, layout)
    engine.store(TOKENS[:8], SlotMappedKV(kv, SRC_BLOCKS)).result(10)
    dst = _cache(None)
    lw = _layerwise(dst, layout)
    try:
        loads = lw.start_loads(engine, [Spec(TOKENS[:24], 0, DST_BLOCKS, end=24)])
        assert loads.results() == [8]
    finally:
        lw.close()
    assert torch.equal(_tokens_kv(dst, layout, DST_BLOCKS, 0, 8), _tokens_kv(src, layout, SRC_BLOCKS, 0, 8))


def test_a_failing_copy_fails_the_loads_and_releases_the_forward(engine: CacheEngine, layout: object) -> None:
    """A block table too short for the load: the load fails as a whole, no layer wait hangs."""
    src = _cache(6)
    _store_whole(engine, src, layout)
    lw = _layerwise(_cache(None), layout)
    try:
        loads = lw.start_loads(engine, [Spec(TOKENS, 0, [3], end=24)])
        for i in range(GEO.num_layers):
            loads.wait_layer(i)
        [result] = loads.results()
        assert isinstance(result, InvalidArgumentError)
    finally:
        lw.close()


def test_layer_names_must_match_the_cache(layout: object) -> None:
    cache = _cache(None)
    with pytest.raises(InvalidArgumentError):
        LayerwiseKV(bind_paged_kv(cache, GEO, BLOCK, layout), cache, NAMES[:2])


def test_layerwise_setting_is_off_by_default_and_parsed() -> None:
    assert ConnectorSettings.from_extra_config({}, environ={}).layerwise is False
    assert ConnectorSettings.from_extra_config({"layerwise": "on"}, environ={}).layerwise is True
    with pytest.raises(ConfigError, match="layerwise"):
        ConnectorSettings.from_extra_config({"layerwise": "sometimes"}, environ={})
