"""cachegen's C decode loops write the reference path's bytes at every SIMD level (issue 21, stop 22).

The C decoder has four loops (``cachegen_native.SIMD_LEVELS``: scalar, AVX-512 fetching the
table entries with ``vpgatherdd``, AVX-512 fetching them with scalar loads, AVX2) and builds each
layer-part's decode tables as it reaches it (reusing a precise tokens' table that an earlier
layer-part had). Each must decode every body version (1, 2, 3), dtype, with and without RoPE
and anchors, on rows that are not whole vectors and streams that wrap inside rows, to exactly
the numpy fallback's bytes: one element one ulp off fails these tests.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cachegen import as_float, chunk, numpy_decode, rope_chunk

from lmcache.serde import cachegen, cachegen_native
from lmcache.serde.codec import ChunkGeometry
from lmcache.serde.quant import from_float

LEVELS = cachegen_native.SIMD_LEVELS
_PARAMS_SIZE = 8  # format, bits, anchor, outliers, streams: what version 1 has before version 2's theta

#: Odd token and head counts (at least 97 tokens, so a sink token counts as an outlier: precise
#: rows); rows of 30 (a vector and a tail), 192 (whole vectors) and 21; RoPE pairs of 32 (the
#: AVX-512 and AVX2 rotations) and of 5 (the scalar one); MLA (one part).
GEOMETRIES = [
    ChunkGeometry(3, 2, 97, 3, 10, "bfloat16"),
    ChunkGeometry(2, 2, 101, 3, 64, "bfloat16"),
    ChunkGeometry(2, 2, 99, 3, 64, "float16"),
    ChunkGeometry(2, 2, 103, 3, 64, "float32"),
    ChunkGeometry(2, 2, 301, 3, 7, "bfloat16"),  # 1024 streams wrap inside rows of 21
    ChunkGeometry(2, 1, 107, 1, 80, "float16"),
    ChunkGeometry(2, 2, 109, 1, 10, "float32"),
    ChunkGeometry(2, 2, 113, 3, 48, "bfloat16"),  # RoPE pairs of 24: the AVX2 rotation, AVX-512's scalar one
]


@pytest.fixture(scope="module")
def lib():
    lib = cachegen_native.library()
    if lib is None:
        pytest.fail("the C coder did not build (is cc installed?)")
    return lib


def _ids(g: ChunkGeometry) -> str:
    return "x".join(map(str, g.shape)) + g.dtype


def body_of(g: ChunkGeometry, version: int, rope: bool, anchor: int) -> bytes:
    """A body of ``version`` (1: version 2's without the RoPE base) on KV with a sink token."""
    seed = g.tokens * 7 + version + 3 * anchor
    data = rope_chunk(g, seed) if rope else chunk(g, seed)
    x = as_float(data, g)
    if rope:
        x[:, 1, 2] *= 40  # a sink token in the values (precise in keys too; RoPE still explains the keys)
    body = cachegen._encode(x, g, 4, anchor, rope=rope and version > 1, version=max(2, version)).body
    if version == 1:
        assert body[_PARAMS_SIZE : _PARAMS_SIZE + 4] == b"\0\0\0\0"  # theta 0: keys not rotated
        body = bytes([cachegen.FORMAT_V1]) + body[1:_PARAMS_SIZE] + body[_PARAMS_SIZE + 4 :]
    return body


def c_decode(lib, body: bytes, g: ChunkGeometry, simd: int) -> bytes:
    """The C decoder's bytes at ``simd``, in the chunk's dtype (float16 rounded by torch, as the codec does)."""
    p = cachegen.parse_body(memoryview(body), g)
    if g.dtype == "bfloat16":
        out = np.empty(g.numel, dtype=np.uint16)
        cachegen._c_decode(lib, p, cachegen_native.OUT_BF16, out, simd=simd)
        return out.tobytes()
    tmp = np.empty(g.numel, dtype=np.float32)
    cachegen._c_decode(lib, p, cachegen_native.OUT_F32, tmp, simd=simd)
    if g.dtype == "float32":
        return tmp.tobytes()
    out16 = bytearray(g.nbytes)
    from_float(torch.from_numpy(tmp), g, memoryview(out16))
    return bytes(out16)


def first_difference(a: bytes, b: bytes) -> str:
    idx = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
    return f"first differing byte {idx} of {len(a)}"


def _cases() -> list:
    """(geometry, version, rope, anchor) where the encoder can write that body: RoPE only rotates
    mean-mode keys (anchor 0) of version 2 and later bodies with K and V parts and even dims."""
    return [
        pytest.param(g, version, rope, anchor, id=f"{_ids(g)}-v{version}-{'rope' if rope else 'plain'}-a{anchor}")
        for g in GEOMETRIES
        for version in (1, 2, 3)
        for rope in (False, True)
        for anchor in (0, 5)
        if not (rope and (anchor or version == 1 or g.parts == 1 or g.dim % 2))
    ]


@pytest.mark.parametrize(("g", "version", "rope", "anchor"), _cases())
def test_every_level_decodes_the_reference_bytes(lib, g: ChunkGeometry, version: int, rope: bool, anchor: int) -> None:
    body = body_of(g, version, rope, anchor)
    p = cachegen.parse_body(memoryview(body), g)
    assert bool(p.rope_theta) == rope
    assert p.outliers.size or anchor  # precise rows: their tables are built (and shared in version 3)
    expected = numpy_decode(memoryview(body), g)
    for simd in LEVELS:
        got = c_decode(lib, body, g, simd)
        assert got == expected, f"simd level {simd}: {first_difference(got, expected)}"
    out = bytearray(g.nbytes)
    cachegen.CacheGenCodec().decode_body_version(memoryview(body), g, memoryview(out), version)
    assert bytes(out) == expected


@pytest.mark.parametrize("simd", LEVELS)
def test_every_level_decodes_the_reference_symbols(lib, simd: int) -> None:
    g = GEOMETRIES[0]
    p = cachegen.parse_body(memoryview(body_of(g, 3, False, 5)), g)
    out = np.empty(g.numel, dtype=np.uint8)
    cachegen._c_decode(lib, p, cachegen_native.OUT_SYMBOLS, out, simd=simd)
    assert np.array_equal(out, cachegen._decode_symbols(p, None))


@pytest.mark.parametrize("simd", LEVELS)
def test_a_frequency_table_not_summing_to_4096_is_refused_at_every_level(lib, simd: int) -> None:
    g = GEOMETRIES[0]
    p = cachegen.parse_body(memoryview(body_of(g, 3, False, 0)), g)
    bad = p.freq.copy()
    bad[5, int(np.argmax(bad[5]))] += 1  # sums to 4097: a table the builder would overrun
    out = np.empty(g.numel, dtype=np.uint16)
    with pytest.raises(ValueError, match="frequency tables"):
        cachegen_native.decode(
            lib,
            p.states,
            p.words,
            bad,
            shape=p.shape,
            regular=p.regular,
            anchor=p.anchor,
            lane_params=(p.pscale, p.ref, p.step),
            out_kind=cachegen_native.OUT_BF16,
            out=out,
            simd=simd,
        )


def test_c_half_to_float_is_numpys_for_every_float16(lib) -> None:
    """The parser's C float16 conversion (means, version 1-2 steps) is numpy's for all 65536 bit patterns."""
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    got = cachegen_native.half_to_float(lib, halves)
    assert np.array_equal(got.view(np.uint32), halves.astype(np.float32).view(np.uint32))


def test_c_log_values_are_the_numpy_parsers(lib) -> None:
    """Version 3's log codes expand to the same float32 in C as in numpy, at both ends of the base range."""
    base = np.array([cachegen._LOG_LO, cachegen._LOG_HI - 255, 0, -37], dtype=np.int16)
    codes = np.random.default_rng(5).integers(0, 256, (base.size, 301)).astype(np.uint8)
    codes[:, :2] = (0, 255)
    got = cachegen_native.log_values(lib, base, codes, cachegen._LOG_VALUES, cachegen._LOG_LO)
    want = cachegen._from_log(base.astype(np.int64)[:, None] + codes.astype(np.int64)).reshape(-1)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
