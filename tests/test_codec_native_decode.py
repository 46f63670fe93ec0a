"""The C dequantization loops of fp8, int8 and int4 (lmcache.serde.dequant_native).

They must give the torch path's bytes exactly (every dtype, odd shapes, both the AVX2 and the
scalar loop), be what the codecs actually use where they build, and step aside (torch decodes,
same bytes) where they cannot be built.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache.serde import dequant_native, quant
from lmcache.serde.codec import ChunkGeometry, decode_value, encode_value, get_codec, parse_codec_header

_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: Odd shapes: one head, a dim that is no multiple of 8 (SIMD tails), MLA (one part), few tokens
#: and heads * dim past 512 (rows longer than the scalar loop's buffer).
SHAPES = [
    (3, 2, 37, 3, 20),
    (2, 2, 8, 1, 12),
    (2, 1, 19, 1, 600),
    (1, 2, 64, 5, 13),
    (4, 2, 256, 3, 64),
]


@pytest.fixture(scope="module")
def lib():
    got = dequant_native.library()
    if got is None:
        pytest.skip("no C compiler: the native decode loops cannot be built here")
    return got


def chunk(shape: tuple[int, ...], dtype: str, seed: int = 0) -> memoryview:
    """KV-like values: per-channel offsets on keys, a few outliers, exact zeros and -0.0."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    x[:, 0] = x[:, 0] * 2 + rng.standard_normal((shape[0], 1, *shape[3:])).astype(np.float32) * 4
    x.reshape(-1)[::97] *= 30.0
    x.reshape(-1)[5::101] = 0.0
    x.reshape(-1)[7::103] = -0.0
    t = torch.from_numpy(x).to(_TORCH[dtype])
    return memoryview(t.view(torch.uint8).numpy().tobytes())


def decode_four_ways(encoded: bytes | memoryview, g: ChunkGeometry, monkeypatch) -> list[bytes]:
    """The value decoded by torch, and by the C AVX-512, AVX2 and scalar loops (where the CPU has them)."""
    outs = []
    for native, simd in ((False, 2), (True, 2), (True, 1), (True, 0)):
        with monkeypatch.context() as m:
            m.setattr(dequant_native, "SIMD", simd)
            if not native:
                m.setitem(dequant_native._state, "lib", None)
            out = bytearray(g.nbytes)
            decode_value(memoryview(encoded), memoryview(out))
            outs.append(bytes(out))
    return outs


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("codec", ["fp8", "int8", "int4", "int4?24"])
def test_native_decode_gives_the_torch_bytes(lib, monkeypatch, codec: str, shape, dtype: str) -> None:
    name, _, group = codec.partition("?")
    c = get_codec(name)
    if group:  # groups that do not divide the tokens or the dim
        from lmcache.serde.codec import make_codec

        c = make_codec({"codec": name, "codec_group": group})
    g = ChunkGeometry(*shape, dtype)
    enc = encode_value(c, chunk(shape, dtype), g)
    assert parse_codec_header(enc) is not None, "the codec stored the chunk raw: nothing to compare"
    by_torch, *by_c = decode_four_ways(enc, g, monkeypatch)
    assert by_c == [by_torch] * 3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fp8_version_0_bodies_decode_the_same_natively(lib, monkeypatch, dtype: str) -> None:
    """fp8's first body format (no centres, every token coded) goes through the same loop."""
    from lmcache.serde.codec import _pack_header

    g = ChunkGeometry(3, 2, 40, 2, 24, dtype)
    c = get_codec("fp8")
    body = quant._Scaled.encode_body(c, chunk(g.shape, dtype, 3), g)
    assert body is not None
    enc = _pack_header("fp8", g, g.nbytes, 0) + body
    by_torch, *by_c = decode_four_ways(enc, g, monkeypatch)
    assert by_c == [by_torch] * 3


def test_the_codecs_use_the_native_loops(lib, monkeypatch) -> None:
    """Where the library builds, fp8, int8 and int4 decode through it (not silently through torch)."""
    calls: list[str] = []
    for fn in ("scaled", "int4"):
        real = getattr(dequant_native, fn)

        def spy(*args, _real=real, _fn=fn, **kwargs):
            done = _real(*args, **kwargs)
            calls.append(f"{_fn}:{done}")
            return done

        monkeypatch.setattr(dequant_native, fn, spy)
    g = ChunkGeometry(2, 2, 32, 2, 16, "bfloat16")
    for name in ("fp8", "int8", "int4"):
        enc = encode_value(get_codec(name), chunk(g.shape, "bfloat16"), g)
        decode_value(memoryview(enc), memoryview(bytearray(g.nbytes)))
    assert calls == ["scaled:True", "scaled:True", "int4:True"]


def test_without_a_compiler_torch_decodes_the_same_bytes(monkeypatch, tmp_path: Path, caplog) -> None:
    g = ChunkGeometry(2, 2, 33, 3, 20, "bfloat16")
    encoded = {
        name: encode_value(get_codec(name), chunk(g.shape, "bfloat16", 5), g) for name in ("fp8", "int8", "int4")
    }

    def decode_all() -> list[bytes]:
        outs = []
        for enc in encoded.values():
            out = bytearray(g.nbytes)
            decode_value(memoryview(enc), memoryview(out))
            outs.append(bytes(out))
        return outs

    with_native = decode_all() if dequant_native.library() is not None else None
    monkeypatch.setattr(dequant_native, "_state", {})
    monkeypatch.setenv("LMCACHE_NATIVE_DIR", str(tmp_path))  # no cached build to fall back on
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with caplog.at_level(logging.WARNING, logger="lmcache.serde.dequant_native"):
        assert dequant_native.library() is None
    assert "decoding with torch" in caplog.text
    without = decode_all()
    if with_native is not None:
        assert without == with_native
    # And LMCACHE_DEQUANT_NATIVE=0 turns the loops off where a compiler exists.
    monkeypatch.setattr(dequant_native, "_state", {})
    monkeypatch.delenv("CC")
    monkeypatch.setenv("LMCACHE_DEQUANT_NATIVE", "0")
    assert dequant_native.library() is None
    assert decode_all() == without


def test_layouts_the_loops_do_not_take_fall_back(lib) -> None:
    """A destination whose heads * dim rows are not contiguous is left to torch (False, untouched)."""
    g = (2, 2, 4, 3, 8)
    dst = torch.zeros((2, 2, 4, 8, 3), dtype=torch.bfloat16).permute(0, 1, 2, 4, 3)
    codes = np.zeros(int(np.prod(g)), dtype=np.int8)
    sk, sv = torch.ones(2, 3, 8), torch.ones(2, 4, 3, 1)
    assert dequant_native.scaled(dequant_native.CODE_INT8, codes, dst, sk=sk, sv=sv) is False
    assert not dst.any()
    assert dequant_native.scaled(dequant_native.CODE_INT8, codes, dst.contiguous(), sk=sk, sv=sv) is True
