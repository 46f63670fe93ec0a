"""The vLLM connector's vLLM-free parts: slot-mapped KV over vLLM-CPU's ``vec`` block format, settings.

The format itself is checked against vLLM-CPU's own cache kernel in test_vllm_layouts.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import ConfigError, InvalidArgumentError, LayoutMismatchError
from lmcache.integrations.vllm.slots import (
    ConnectorSettings,
    SlotMappedKV,
    acquire_engine,
    bind_paged_kv,
    blocks_covering,
    release_engine,
)
from lmcache.layouts import VLLM_CPU_VEC, VLLM_PAGED, KVGeometry

GEO = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float32")
BLOCK = 4
NUM_BLOCKS = 6


def _packed_cache(seed: int = 0) -> list[torch.Tensor]:
    """vLLM-CPU 0.32 per-layer KV: ``[blocks, kv_heads, block_size, 2 * head_dim]``."""
    g = torch.Generator().manual_seed(seed)
    shape = (NUM_BLOCKS, GEO.num_kv_heads, BLOCK, 2 * GEO.head_dim)
    return [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)]


def _vllm_kv(layer: torch.Tensor, block: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of one token as vLLM-CPU's ``vec`` ISA stores them ([heads, head_dim] each).

    Per block and head: K as ``[head_dim, block_size]`` (transposed), then V as ``[block_size, head_dim]``.
    """
    b, h, s, w = layer.shape
    d = w // 2
    parts = layer.reshape(b, h, 2, s * d)[block]
    return parts[:, 0].reshape(h, d, s)[:, :, offset], parts[:, 1].reshape(h, s, d)[:, offset]


def _bind(cache: list[torch.Tensor]):
    return bind_paged_kv(cache, GEO, BLOCK, VLLM_CPU_VEC)


def test_cpu_layout_binds_in_the_named_layout() -> None:
    kv = _bind(_packed_cache())
    assert kv.layout == VLLM_CPU_VEC
    assert (kv.num_blocks, kv.block_size, kv.geometry) == (NUM_BLOCKS, BLOCK, GEO)
    # The same tensors in vLLM's GPU content layout read other values: the layout must be named.
    other = bind_paged_kv(_packed_cache(), GEO, BLOCK, VLLM_PAGED)
    a, b = torch.empty(GEO.chunk_shape(3)), torch.empty(GEO.chunk_shape(3))
    kv.gather(torch.tensor([1, 2, 3]), a)
    other.gather(torch.tensor([1, 2, 3]), b)
    assert not torch.equal(a, b)


def test_other_shapes_are_rejected() -> None:
    bad = [torch.zeros(NUM_BLOCKS, GEO.num_kv_heads, BLOCK, 3 * GEO.head_dim) for _ in range(2)]
    with pytest.raises(LayoutMismatchError):
        _bind(bad)
    strided = [torch.zeros(NUM_BLOCKS, BLOCK, GEO.num_kv_heads, 2 * GEO.head_dim).transpose(1, 2) for _ in range(2)]
    with pytest.raises(LayoutMismatchError):  # the kernel needs each block's interior contiguous
        _bind(strided)


def test_gather_follows_the_block_table() -> None:
    cache = _packed_cache()
    kv = _bind(cache)
    block_ids = [5, 2, 0]  # tokens 0-3 in block 5, 4-7 in block 2, 8-11 in block 0
    src = SlotMappedKV(kv, block_ids)
    out = torch.empty(GEO.chunk_shape(6))
    src.gather(3, 9, out)
    for i, t in enumerate(range(3, 9)):
        block, offset = block_ids[t // BLOCK], t % BLOCK
        for layer in range(GEO.num_layers):
            k, v = _vllm_kv(cache[layer], block, offset)
            assert torch.equal(out[layer, 0, i], k)
            assert torch.equal(out[layer, 1, i], v)


def test_scatter_clips_to_the_planned_range() -> None:
    cache = _packed_cache()
    before = [t.clone() for t in cache]
    kv = _bind(cache)
    block_ids = [1, 3, 4]
    dst = SlotMappedKV(kv, block_ids, lo=2, hi=7)
    src = torch.randn(GEO.chunk_shape(8))
    dst.scatter(0, 8, src)
    for t in range(12):
        block, offset = block_ids[t // BLOCK], t % BLOCK
        for layer in range(GEO.num_layers):
            k, v = _vllm_kv(cache[layer], block, offset)
            k0, v0 = _vllm_kv(before[layer], block, offset)
            if 2 <= t < 7:
                assert torch.equal(k, src[layer, 0, t]) and torch.equal(v, src[layer, 1, t])
            else:  # below lo (vLLM's own prefix cache) or past hi: untouched
                assert torch.equal(k, k0) and torch.equal(v, v0)
    # Untouched blocks stay untouched.
    for layer in range(GEO.num_layers):
        for b in (0, 2, 5):
            assert torch.equal(cache[layer][b], before[layer][b])


def test_block_table_too_short_is_an_error() -> None:
    kv = _bind(_packed_cache())
    with pytest.raises(InvalidArgumentError):
        SlotMappedKV(kv, [0]).gather(0, 5, torch.empty(GEO.chunk_shape(5)))


def test_blocks_covering() -> None:
    assert blocks_covering([7, 8, 9, 10], 4, 4, 9) == {8, 9}
    assert blocks_covering([7, 8, 9, 10], 4, 3, 4) == {7}
    assert blocks_covering([7, 8], 4, 5, 5) == set()


def test_round_trip_through_the_engine(tmp_path: Path) -> None:
    """Store a request's KV from one block table, load it into another: vLLM sees the same K/V."""
    cfg = LMCacheConfig.load(environ={}, chunk_size=8, tiers=[f"file://{tmp_path}/t"])
    tokens = list(range(100, 116))
    src_cache, dst_cache = _packed_cache(1), [torch.zeros_like(t) for t in _packed_cache(1)]
    with CacheEngine(GEO, "m", config=cfg) as engine:
        engine.store(tokens, SlotMappedKV(_bind(src_cache), [0, 1, 2, 3])).result(10)
        dst = SlotMappedKV(_bind(dst_cache), [5, 4, 3, 2], lo=0, hi=15)
        assert engine.retrieve(tokens, dst) == 16
    for t in range(15):
        for layer in range(GEO.num_layers):
            a = _vllm_kv(src_cache[layer], [0, 1, 2, 3][t // BLOCK], t % BLOCK)
            b = _vllm_kv(dst_cache[layer], [5, 4, 3, 2][t // BLOCK], t % BLOCK)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_settings_from_extra_config(tmp_path: Path) -> None:
    cfg_file = tmp_path / "lmcache.yaml"
    cfg_file.write_text("chunk_size: 128\ntiers: ['memory://?capacity=1GiB']\n")
    s = ConnectorSettings.from_extra_config(
        {"config_file": str(cfg_file), "lmcache.save_partial_chunks": True, "model_id": "m", "stats_dir": "/x"},
        environ={},
    )
    assert s.config.chunk_size == 128
    assert s.config.save_partial_chunks is True
    assert (s.model_id, s.stats_dir) == ("m", "/x")
    # Inline keys win over the file.
    assert (
        ConnectorSettings.from_extra_config(
            {"config_file": str(cfg_file), "chunk_size": 64}, environ={}
        ).config.chunk_size
        == 64
    )


def test_unknown_or_bad_keys_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="chunk_sise"):
        ConnectorSettings.from_extra_config({"chunk_sise": 64}, environ={})
    with pytest.raises(ConfigError, match="chunk_size"):
        ConnectorSettings.from_extra_config({"chunk_size": "lots"}, environ={})
    with pytest.raises(ConfigError, match="model_id"):
        ConnectorSettings.from_extra_config({"model_id": ""}, environ={})


def test_a_file_tier_is_added_only_when_processes_cannot_share_memory(tmp_path: Path) -> None:
    mem = ConnectorSettings.from_extra_config(
        {"tiers": ["memory://?capacity=1GiB"], "shared_dir": str(tmp_path)}, environ={}
    )
    assert mem.shared_config("org/model", cross_process=False).tiers == ["memory://?capacity=1GiB"]
    tiers = mem.shared_config("org/model", cross_process=True).tiers
    assert tiers == ["memory://?capacity=1GiB", f"file://{tmp_path}/org_model"]
    shared = ConnectorSettings.from_extra_config({"tiers": [f"file://{tmp_path}/a"]}, environ={})
    assert shared.shared_config("m", cross_process=True).tiers == [f"file://{tmp_path}/a"]


def test_scheduler_and_worker_in_one_process_share_an_engine() -> None:
    cfg = LMCacheConfig.load(environ={}, tiers=["memory://?capacity=16MiB"])
    worker = acquire_engine(GEO, "m", cfg)
    scheduler = acquire_engine(GEO, "m", cfg, create=False)
    assert scheduler is worker
    other = acquire_engine(GEO, "other-model", cfg, create=False)
    assert other is None
    release_engine(scheduler)
    assert acquire_engine(GEO, "m", cfg, create=False) is worker  # still held by the worker
    release_engine(worker)
    release_engine(worker)
    assert acquire_engine(GEO, "m", cfg, create=False) is None


def test_connector_switches_default_on_and_parse_booleans() -> None:
    s = ConnectorSettings.from_extra_config({}, environ={})
    assert (s.save_decode_tokens, s.async_loading) == (True, True)
    s = ConnectorSettings.from_extra_config({"save_decode_tokens": False, "async_loading": "off"}, environ={})
    assert (s.save_decode_tokens, s.async_loading) == (False, False)
    with pytest.raises(ConfigError, match="async_loading"):
        ConnectorSettings.from_extra_config({"async_loading": 2}, environ={})
