from __future__ import annotations

import pytest
import torch

from lmcache.errors import InvalidArgumentError, InvalidBufferError, LayoutMismatchError
from lmcache.keys import KeyScope
from lmcache.layouts import (
    FLASH_ATTN,
    FLASHINFER,
    HF_CONTIGUOUS,
    MLA,
    VLLM_CPU,
    KVGeometry,
    chunk_to_hf,
    detect_layout,
    dtype_name,
    get_layout,
    hf_to_chunk,
)

NB, BS, H, D = 5, 16, 4, 8


def per_layer(layout, layers=3, nb=NB, bs=BS, h=H, d=D, dtype=torch.float32):
    shapes = {
        "flash_attn": (2, nb, bs, h, d),
        "flashinfer": (nb, 2, bs, h, d),
        "vllm_cpu": (2, nb, h, bs, d),
        "mla": (nb, bs, d),
    }
    if layout is HF_CONTIGUOUS:
        return [(torch.randn(nb, h, bs, d, dtype=dtype), torch.randn(nb, h, bs, d, dtype=dtype)) for _ in range(layers)]
    return [torch.randn(shapes[layout.name], dtype=dtype) for _ in range(layers)]


# -- KVGeometry ----------------------------------------------------------------------------------


def test_geometry_identity_is_stable_and_round_trips():
    g = KVGeometry(32, 8, 128, "bfloat16")
    assert g.identity == "kv:L32-H8-D128-bfloat16"
    assert KVGeometry.from_identity(g.identity) == g
    m = KVGeometry.mla(61, 576, torch.bfloat16)
    assert m.identity == "mla:L61-D576-bfloat16"
    assert KVGeometry.from_identity(m.identity) == m


def test_geometry_identity_differs_in_every_field():
    base = KVGeometry(32, 8, 128, "float16")
    variants = [
        KVGeometry(31, 8, 128, "float16"),
        KVGeometry(32, 4, 128, "float16"),
        KVGeometry(32, 8, 64, "float16"),
        KVGeometry(32, 8, 128, "bfloat16"),
        KVGeometry.mla(32, 128, "float16"),
    ]
    ids = {v.identity for v in variants}
    assert base.identity not in ids and len(ids) == len(variants)


def test_geometry_dtype_aliases_normalise():
    assert KVGeometry(2, 2, 4, torch.float16) == KVGeometry(2, 2, 4, "half") == KVGeometry(2, 2, 4, "fp16")
    assert hash(KVGeometry(2, 2, 4, torch.float16)) == hash(KVGeometry(2, 2, 4, "float16"))
    assert dtype_name(torch.bfloat16) == "bfloat16"


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0, 8, 128), {}),
        ((2, -1, 128), {}),
        ((2, 8, 0), {}),
        ((2, 8, 4), {"dtype": "complex64"}),
        ((2, 2, 4), {"is_mla": True}),
    ],
)
def test_geometry_rejects_bad_values(args, kwargs):
    with pytest.raises(InvalidArgumentError):
        KVGeometry(*args, **kwargs)


def test_geometry_from_identity_rejects_garbage():
    with pytest.raises(InvalidArgumentError):
        KVGeometry.from_identity("kv:L3-H2")


def test_geometry_distinguishes_cache_keys():
    a = KVGeometry(32, 8, 128, "float16")
    b = KVGeometry(32, 8, 128, "bfloat16")
    h = bytes(32)
    ka = KeyScope.create(a.key_model("llama-3-8b"), dtype=a.dtype).key(h)
    kb = KeyScope.create(b.key_model("llama-3-8b"), dtype=b.dtype).key(h)
    assert ka != kb and ka.to_string() != kb.to_string()
    assert a.key_model("m") == "m|kv:L32-H8-D128-float16"
    with pytest.raises(InvalidArgumentError):
        a.key_model("")


def test_geometry_chunk_shapes_and_sizes():
    g = KVGeometry(4, 2, 8, "bfloat16")
    assert g.chunk_shape(16) == (4, 2, 16, 2, 8)
    assert g.chunk_nbytes(16) == 4 * 2 * 16 * 2 * 8 * 2
    assert g.tokens_in(g.chunk_nbytes(5)) == 5
    with pytest.raises(LayoutMismatchError):
        g.tokens_in(g.chunk_nbytes(5) + 2)
    m = KVGeometry.mla(3, 10, "float32")
    assert m.chunk_shape(7) == (3, 1, 7, 1, 10)
    assert m.kv_parts == 1


def test_check_chunk():
    g = KVGeometry(2, 2, 4, "float16")
    g.check_chunk(torch.empty(g.chunk_shape(3), dtype=torch.float16), 3)
    with pytest.raises(LayoutMismatchError):
        g.check_chunk(torch.empty(g.chunk_shape(3), dtype=torch.float32))
    with pytest.raises(LayoutMismatchError):
        g.check_chunk(torch.empty(g.chunk_shape(3), dtype=torch.float16), 4)
    with pytest.raises(InvalidBufferError):
        g.check_chunk(torch.empty(2, 2, 4, 2, 3, dtype=torch.float16).transpose(2, 4))


# -- layouts -------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [FLASH_ATTN, FLASHINFER, VLLM_CPU, MLA, HF_CONTIGUOUS])
def test_detect_each_layout_with_known_facts(layout):
    layers = per_layer(layout)
    heads = 1 if layout is MLA else H
    assert detect_layout(layers, block_size=BS, num_kv_heads=heads) is layout
    geo, nb, bs = layout.geometry(layers)
    assert (nb, bs) == (NB, BS)
    assert geo == KVGeometry(3, heads, D, "float32", is_mla=layout is MLA)


@pytest.mark.parametrize("layout", [FLASH_ATTN, FLASHINFER, VLLM_CPU, MLA])
def test_part_views_alias_the_engine_tensor(layout):
    layers = per_layer(layout)
    views = layout.part_views(layers[1])
    assert len(views) == (1 if layout is MLA else 2)
    for p, view in enumerate(views):
        assert tuple(view.shape) == (NB, BS, 1 if layout is MLA else H, D)
        view[2, 3, 0, 5] = 1000.0 + p
    # The write landed at block 2, token 3, head 0, dim 5 of the engine's own tensor.
    t = layers[1]
    if layout is FLASH_ATTN:
        got = [t[0, 2, 3, 0, 5], t[1, 2, 3, 0, 5]]
    elif layout is FLASHINFER:
        got = [t[2, 0, 3, 0, 5], t[2, 1, 3, 0, 5]]
    elif layout is VLLM_CPU:
        got = [t[0, 2, 0, 3, 5], t[1, 2, 0, 3, 5]]
    else:
        got = [t[2, 3, 5]]
    assert [float(x) for x in got] == [1000.0 + p for p in range(len(got))]


def test_detect_accepts_dict_and_stacked_tensor():
    layers = per_layer(FLASHINFER)
    assert detect_layout({f"layer.{i}": t for i, t in enumerate(layers)}, block_size=BS) is FLASHINFER
    assert detect_layout(torch.stack(layers), block_size=BS) is FLASHINFER


def test_detect_reports_ambiguity():
    # block_size == num_kv_heads: flash-attn NHD and CPU HND read the same.
    layers = per_layer(FLASH_ATTN, bs=4, h=4)
    with pytest.raises(LayoutMismatchError, match="ambiguous"):
        detect_layout(layers)
    # Two blocks: [2, 2, ...] could be either K/V-first or block-first.
    two_blocks = per_layer(FLASH_ATTN, nb=2)
    with pytest.raises(LayoutMismatchError, match="ambiguous"):
        detect_layout(two_blocks, block_size=BS)


def test_detect_resolves_with_facts():
    layers = per_layer(FLASH_ATTN, bs=8, h=4)
    assert detect_layout(layers, block_size=8) is FLASH_ATTN
    assert detect_layout(layers, num_kv_heads=4) is FLASH_ATTN
    cpu = per_layer(VLLM_CPU, bs=8, h=4)
    assert detect_layout(cpu, block_size=8) is VLLM_CPU


def test_detect_reports_inconsistency():
    layers = per_layer(FLASH_ATTN)
    with pytest.raises(LayoutMismatchError, match="no KV layout fits"):
        detect_layout(layers, block_size=BS + 1)
    with pytest.raises(LayoutMismatchError):
        detect_layout(layers, head_dim=D * 2)
    with pytest.raises(LayoutMismatchError):
        detect_layout(per_layer(MLA), is_mla=False)
    with pytest.raises(LayoutMismatchError):
        detect_layout([torch.zeros(3, 4)])
    with pytest.raises(LayoutMismatchError):
        detect_layout([])


def test_detect_rejects_inconsistent_layers():
    layers = per_layer(FLASH_ATTN)
    layers[2] = torch.zeros(2, NB + 1, BS, H, D)
    with pytest.raises(LayoutMismatchError):
        detect_layout(layers, block_size=BS)
    mixed = per_layer(FLASH_ATTN)
    mixed[1] = mixed[1].half()
    with pytest.raises(LayoutMismatchError):
        detect_layout(mixed, block_size=BS)


def test_hf_pairs_must_match():
    k = torch.zeros(1, H, 10, D)
    with pytest.raises(LayoutMismatchError):
        detect_layout([(k, torch.zeros(1, H, 11, D))])
    with pytest.raises(LayoutMismatchError):
        HF_CONTIGUOUS.part_views(k)


def test_get_layout_names_and_aliases():
    assert get_layout("flash_attn") is FLASH_ATTN
    assert get_layout("FLASHINFER") is FLASHINFER
    assert get_layout("cpu") is VLLM_CPU
    assert get_layout("transformers") is HF_CONTIGUOUS
    assert get_layout(MLA) is MLA
    with pytest.raises(InvalidArgumentError):
        get_layout("paged-magic")


def test_hf_chunk_round_trip():
    layers = [(torch.randn(2, H, 20, D), torch.randn(2, H, 20, D)) for _ in range(3)]
    g = KVGeometry(3, H, D, "float32")
    buf = torch.empty(g.chunk_shape(6))
    hf_to_chunk(layers, 4, 10, buf, batch_index=1)
    back = chunk_to_hf(buf)
    for (k, v), (bk, bv) in zip(layers, back, strict=True):
        assert torch.equal(bk[0], k[1, :, 4:10])
        assert torch.equal(bv[0], v[1, :, 4:10])
    with pytest.raises(LayoutMismatchError):
        hf_to_chunk(layers, 0, 5, buf)
