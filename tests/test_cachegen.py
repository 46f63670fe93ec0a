"""The ``cachegen`` codec's coders: C (scalar and AVX-512) and numpy agree byte for byte.

The C coder (``lmcache/serde/_cachegen.c``) is what decodes at GB/s; the numpy coder is the
fallback where no C compiler exists. Both must write the same encoded bytes and decode them to
the same chunk bytes, for every dtype, with and without anchors and outliers, and on awkward
geometries (rows that are not a multiple of 16 values, one token, MLA). The Triton dequantize
kernel (the GPU decode path) is checked against the CPU path under ``TRITON_INTERPRET=1`` in a
child process, as tests/test_kernels.py checks the copy kernels.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache.errors import IntegrityError
from lmcache.serde import cachegen, cachegen_native
from lmcache.serde.codec import ChunkGeometry, decode_value, encode_value, make_codec, parse_codec_header
from lmcache.serde.quant import from_float

HAS_TRITON = importlib.util.find_spec("triton") is not None
_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

GEOMETRIES = [
    ChunkGeometry(3, 2, 40, 2, 24, "bfloat16"),  # rows of 48: three AVX-512 vectors
    ChunkGeometry(2, 2, 33, 3, 7, "bfloat16"),  # rows of 21: a vector and a scalar tail
    ChunkGeometry(2, 1, 16, 1, 80, "float16"),  # MLA
    ChunkGeometry(4, 2, 1, 2, 16, "float32"),  # one token
    ChunkGeometry(2, 2, 700, 1, 8, "bfloat16"),  # 1024 streams wrap inside rows
]


def chunk(g: ChunkGeometry, seed: int, sink: bool = True) -> bytes:
    """KV-like values: per-channel offsets and spreads, and an attention-sink token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g.shape, generator=gen) * (
        0.2 + 3 * torch.rand(g.layers, g.parts, 1, g.heads, g.dim, generator=gen)
    )
    x = x + torch.randn(g.layers, g.parts, 1, g.heads, g.dim, generator=gen) * 2
    if sink and g.tokens > 8:
        x[:, :, 2] *= 40
    return x.to(_TORCH[g.dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def as_float(data: bytes, g: ChunkGeometry) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=_TORCH[g.dtype]).float().view(g.shape)


@pytest.fixture(scope="module")
def lib():
    lib = cachegen_native.library()
    if lib is None:
        pytest.fail("the C coder did not build (is cc installed?)")
    return lib


def numpy_decode(body: memoryview, g: ChunkGeometry) -> bytes:
    """The numpy fallback's decode of a body."""
    p = cachegen.parse_body(body, g)
    out = bytearray(g.nbytes)
    from_float(torch.from_numpy(cachegen._dequantize(p, cachegen._decode_symbols(p, None))), g, memoryview(out))
    return bytes(out)


def c_decode(lib, body: memoryview, g: ChunkGeometry, simd: bool) -> bytes:
    """The C decoder's output, AVX-512 or scalar, straight in the chunk's dtype where it can."""
    p = cachegen.parse_body(body, g)
    tmp = np.empty(g.numel, dtype=np.uint16 if g.dtype == "bfloat16" else np.float32)
    kind = cachegen_native.OUT_BF16 if g.dtype == "bfloat16" else cachegen_native.OUT_F32
    cachegen._c_decode(lib, p, kind, tmp, simd=simd)
    if g.dtype != "float16":
        return tmp.tobytes()
    out = bytearray(g.nbytes)
    from_float(torch.from_numpy(tmp), g, memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("anchor", [0, 5])
@pytest.mark.parametrize("g", GEOMETRIES, ids=lambda g: "x".join(map(str, g.shape)) + g.dtype)
def test_c_and_numpy_coders_write_and_read_the_same_bytes(lib, g: ChunkGeometry, anchor: int) -> None:
    data = chunk(g, seed=g.tokens + anchor)
    x = as_float(data, g)
    enc_c = cachegen._encode(x.clone(), g, 4, anchor, native=True)
    enc_np = cachegen._encode(x.clone(), g, 4, anchor, native=False)
    assert enc_c.body == enc_np.body
    body = memoryview(enc_c.body)
    expected = numpy_decode(body, g)
    assert c_decode(lib, body, g, simd=False) == expected
    assert c_decode(lib, body, g, simd=True) == expected
    out = bytearray(g.nbytes)
    cachegen.CacheGenCodec().decode_body(body, g, memoryview(out))  # the codec's own path
    assert bytes(out) == expected
    err = (as_float(expected, g) - x).pow(2).mean() / x.pow(2).mean()
    assert float(err) < 0.2


def test_c_symbols_equal_numpy_symbols(lib) -> None:
    g = GEOMETRIES[0]
    p = cachegen.parse_body(memoryview(cachegen._encode(as_float(chunk(g, 3), g), g, 5, 0).body), g)
    assert np.array_equal(cachegen._decode_symbols(p, lib), cachegen._decode_symbols(p, None))


@pytest.mark.parametrize("native", [True, False])
def test_damaged_words_are_refused_by_both_coders(lib, native: bool, monkeypatch) -> None:
    g = GEOMETRIES[0]
    body = bytearray(cachegen._encode(as_float(chunk(g, 4), g), g, 4, 0).body)
    if not native:
        monkeypatch.setattr(cachegen_native, "library", lambda: None)
    codec = cachegen.CacheGenCodec()
    out = memoryview(bytearray(g.nbytes))
    n_words = (len(body) - cachegen.parse_body(memoryview(bytes(body)), g).words.nbytes) // 1
    truncated = bytes(body[:-2])  # one word short: the stated count no longer fits
    with pytest.raises(ValueError, match="truncated"):
        codec.decode_body(memoryview(truncated), g, out)
    flipped = bytearray(body)
    # A word changed: the streams end in the wrong states. (rANS carries no check of its own: now
    # and then a changed word decodes to other symbols and the right end states; the value's
    # checksum, over the encoded bytes, is what catches damage in storage.)
    flipped[n_words + 12] ^= 0x5A
    with pytest.raises(ValueError, match="rANS"):
        codec.decode_body(memoryview(bytes(flipped)), g, out)


#: A value the format-1 cachegen (before the C coder) wrote for ``ChunkGeometry(1, 2, 32, 1, 8,
#: "bfloat16")``: its body starts with its bits (4), not with the format byte.
FORMAT_1_VALUE = base64.b64decode(
    "TE1DQwEICAABAAAAAgAAACAAAAABAAAACAAAAAAEAAAAAAAAY2FjaGVnZW5iZmxvYXQxNlINDCZ0dV65BAAAAAABAAEAAQAB"
    "AAEAAQABAAEAAQABAAEAAQABAAEAAQABAOmstax6rDus7Ktmq9eqQapBKtcqZivsKzsseiy1LOks3jHaMdUxzjHJMcQxvzG6Mb"
    "oxvzHEMckxzjHVMdox3jEAAQAAEHoMALAC0AEgAUABAAEQAeAA4ADgADABkAGwAQABAAAQeQwAsAGQATAB4ADgAOAAEAEAAUAB"
    "IAHQAbACHKA7fY8CAQCYQGjWvsE2lUeAAQBhYMzdPOHKs7PxMdhDJzfNRhfIsXpnBOTEiAEA+ah/lZqoRtzxGQEANTkOeGQAAA"
    "AAAAAA9xPjY/VK85tIfEeMLE1PDowt5UwvzeDc5Bu+bKrbnmr4Spr5/WhbJy4c8zk5ekWKKSLzUiVphPmtSY6YhCGP0LYQQQFK"
    "UMsgKTDaoWPhyBEqMTXQpMA4QWgGbYYcR2iHGPjud3y4frh//LXbuDytXB8Mfx14fdhNwN3Aq3B8rxsXDRUsfOunuiC80JtfHL"
    "X7hXvZmvmZDDTisjkjGdKpEstZyALIAtiQ0KLQovDw8FHwUUCgoPJAopCVcJZwlnAG0PbQB9AH0Ac="
)


def test_a_format_1_value_is_refused_not_misread() -> None:
    header = parse_codec_header(FORMAT_1_VALUE)
    assert header is not None and header.codec == "cachegen" and header.body_version == 0
    with pytest.raises(IntegrityError, match="body version 0"):
        decode_value(memoryview(FORMAT_1_VALUE), memoryview(bytearray(header.geometry.nbytes)))
    with pytest.raises(IntegrityError):
        cachegen.decode_into_tensor(FORMAT_1_VALUE, torch.empty(header.geometry.shape, dtype=torch.bfloat16))
    # Even read as this format's body (as a reader that ignored the header's version would), it is refused.
    with pytest.raises(ValueError, match="format 1"):
        cachegen.parse_body(memoryview(FORMAT_1_VALUE)[header.body_offset :], header.geometry)


def test_values_record_the_current_body_version() -> None:
    g = GEOMETRIES[0]
    enc = bytes(encode_value(make_codec({"codec": "cachegen"}), memoryview(chunk(g, 5)), g))
    header = parse_codec_header(enc)
    assert header.body_version == 3 and enc[header.body_offset] == cachegen.FORMAT


#: A value the body-version-1 cachegen wrote (format 0xC2, no RoPE field) for ``chunk(ChunkGeometry(2,
#: 2, 16, 1, 8, "bfloat16"), 21)``, and the SHA-256 of what it decoded to.
VERSION_1_VALUE = base64.b64decode(
    "TE1DQwEICAECAAAAAgAAABAAAAABAAAACAAAAAAEAAAAAAAAY2FjaGVnZW5iZmxvYXQxNmgp5A6Vy6nSwgQAAAAAEADSSY7J"
    "sMhwQsFAqUEcSs9IPsbOydnD+jTMtAVCpzlYyRbCgkU0QSRJ8EQuSADIfkczxSjM7ciuSfRAOskAyHhIdkd2R3ZHdkd2R3ZH"
    "dkd2R8FE7UlkPUo3BjdNQJE+rEf6RfpF+kX6RfpF+kX6RfpF+kgjUAFMIFDGRSlOIEy2TQABAAAQbioAIAAAACAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAIAGAB8ACYANAAAAAAAAAAAAAQAAAAAAAIAAAAAAAIAAAAAAAAAAAACAAAAAAAAAAAAAAACAA"
    "AAEAABBwHwBgAEAAIAAAAAAAAAAAAAAAAAAAAAAAAACAAKAAQAMgAWAHIAHAACAAAAAgAAAAAAAAAAAAAAAAAAAAIAAgAAAB"
    "AAAQcCsAIAAAAAAAAAAAAAAAAAAAAAAAIAAAAAAAAADAAUAHwAMgAiAAAAAAACAAAAAAAAAAAAAAAAAAIAAgACAAAAAAACAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAIAAAAQAAEHoLAKAAAAAAAAAAQABgDmAAAAAAAAAAYACAUGUAh7xXFiZtAgC9KrYA/udWfd7D"
    "AQAhxxhTBqYCAEvgygaoLIYCPq4XHLSJcwudGQ8Ad3EAKKHYAQA+Q7EQNQAAAAAAAAAxoHM/e4QYARzqXiVi9AF/vo1ZIIdQ"
    "gLxZLUEkoeZyFB31thgzbG2177uCQaQdgJkQS4CZWr5RA0svu1IxWlwIuuHOUYu6AEJg/EfP5s8gWgDF18aAC6C+AKQgQkD+"
    "IB7gG0DhIH2AHKAP"
)
VERSION_1_DECODED_SHA256 = "244be53bc5d12e4f7ca8247a314e2c04658aed04a70befca1afcd627f5a67209"


def test_a_version_1_value_still_decodes_to_what_it_did() -> None:
    header = parse_codec_header(VERSION_1_VALUE)
    assert header is not None and header.body_version == 1
    assert VERSION_1_VALUE[header.body_offset] == cachegen.FORMAT_V1
    g = header.geometry
    out = bytearray(g.nbytes)
    decode_value(memoryview(VERSION_1_VALUE), memoryview(out), None, make_codec({"codec": "cachegen"}))
    assert hashlib.sha256(bytes(out)).hexdigest() == VERSION_1_DECODED_SHA256
    tensor = torch.empty(g.shape, dtype=torch.bfloat16)
    cachegen.decode_into_tensor(VERSION_1_VALUE, tensor)
    assert tensor.view(torch.uint8).numpy().tobytes() == bytes(out)
    # a version 1 body under a version 2 header (or the reverse) is refused, not misread
    with pytest.raises(ValueError, match="format"):
        cachegen.parse_body(memoryview(VERSION_1_VALUE)[header.body_offset :], g, 2)


def rope_chunk(g: ChunkGeometry, seed: int, theta: float = 1e5, start: int = 1000) -> bytes:
    """KV whose keys are RoPE-rotated (rotate-half pairs, base ``theta``) from steady per-channel offsets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g.shape, generator=gen) * 0.5
    x[:, 0] += torch.randn(g.layers, 1, g.heads, g.dim, generator=gen) * 4  # offsets before RoPE
    h = g.dim // 2
    inv = theta ** (-torch.arange(h, dtype=torch.float64) * 2 / g.dim)
    ang = (torch.arange(g.tokens, dtype=torch.float64)[:, None] + start) * inv[None, :]
    c, s = ang.cos().float()[None, :, None, :], ang.sin().float()[None, :, None, :]
    a, b = x[:, 0, ..., :h].clone(), x[:, 0, ..., h:].clone()
    x[:, 0, ..., :h], x[:, 0, ..., h:] = a * c - b * s, b * c + a * s
    return x.to(_TORCH[g.dtype]).contiguous().view(torch.uint8).numpy().tobytes()


ROPE_GEOMETRIES = [
    ChunkGeometry(3, 2, 64, 2, 32, "bfloat16"),  # pairs of 16: the AVX-512 rotation
    ChunkGeometry(2, 2, 40, 3, 24, "bfloat16"),  # pairs of 12: the scalar rotation
    ChunkGeometry(2, 2, 48, 1, 16, "float32"),
    ChunkGeometry(2, 2, 48, 2, 16, "float16"),
]


@pytest.mark.parametrize("g", ROPE_GEOMETRIES, ids=lambda g: "x".join(map(str, g.shape)) + g.dtype)
def test_rope_keys_are_found_and_every_decoder_agrees(lib, g: ChunkGeometry) -> None:
    data = rope_chunk(g, seed=g.tokens)
    x = as_float(data, g)
    enc = cachegen._encode(x.clone(), g, 4, 0, native=True)
    assert enc.body == cachegen._encode(x.clone(), g, 4, 0, native=False).body
    body = memoryview(enc.body)
    assert cachegen.parse_body(body, g).rope_theta == 1e5
    expected = numpy_decode(body, g)
    assert c_decode(lib, body, g, simd=False) == expected
    assert c_decode(lib, body, g, simd=True) == expected
    out = bytearray(g.nbytes)
    cachegen.CacheGenCodec().decode_body(body, g, memoryview(out))
    assert bytes(out) == expected
    # keys coded as they were before RoPE: a smaller error than coding them rotated, same bits
    plain = cachegen._encode(x.clone(), g, 4, 0, rope=False).body
    assert cachegen.parse_body(memoryview(plain), g).rope_theta == 0.0
    err_rope = float((as_float(expected, g) - x).pow(2).mean())
    err_plain = float((as_float(numpy_decode(memoryview(plain), g), g) - x).pow(2).mean())
    assert err_rope < 0.5 * err_plain


def test_keys_without_rope_structure_are_not_rotated() -> None:
    g = GEOMETRIES[0]
    body = cachegen._encode(as_float(chunk(g, 3), g), g, 4, 0).body
    assert cachegen.parse_body(memoryview(body), g).rope_theta == 0.0
    anchored = cachegen._encode(as_float(rope_chunk(g, 3), g), g, 4, 5).body  # anchors: never rotated
    assert cachegen.parse_body(memoryview(anchored), g).rope_theta == 0.0


async def test_a_format_1_value_in_a_store_is_a_counted_miss() -> None:
    from lmcache.backends.registry import open_backend
    from lmcache.keys import CacheKey
    from lmcache.layouts import KVGeometry

    geom = KVGeometry(1, 1, 8, "bfloat16")
    key = CacheKey(geom.key_model("cachegen-test"), 1, 0, os.getpid().to_bytes(32, "little"), geom.dtype)
    size = parse_codec_header(FORMAT_1_VALUE).geometry.nbytes
    async with open_backend("memory://?capacity=1MiB&codec=cachegen") as b:
        await b.inner.put([key], [FORMAT_1_VALUE])  # as the old lmcache stored it
        got = await b.get_into([key], [bytearray(size)])
        assert got == [None]
        assert b.stats()["corrupt"] == 1


def test_without_a_compiler_the_numpy_coder_is_used(tmp_path: Path) -> None:
    """A child process with no C compiler: the codec still round-trips, writing the same bytes."""
    g = GEOMETRIES[1]
    data = chunk(g, 7)
    codec = make_codec({"codec": "cachegen"})
    enc = bytes(encode_value(codec, memoryview(data), g))
    dec = bytearray(g.nbytes)
    decode_value(memoryview(enc), memoryview(dec), None, codec)
    (tmp_path / "in.bin").write_bytes(data)
    code = (
        "import sys; from pathlib import Path\n"
        "from lmcache.serde import cachegen_native\n"
        "from lmcache.serde.codec import ChunkGeometry, decode_value, encode_value, make_codec\n"
        "assert cachegen_native.library() is None\n"
        f"g = ChunkGeometry{(*g.shape, g.dtype)!r}\n"
        "d = Path(sys.argv[1]); data = (d / 'in.bin').read_bytes()\n"
        "c = make_codec({'codec': 'cachegen'})\n"
        "enc = bytes(encode_value(c, memoryview(data), g)); (d / 'enc.bin').write_bytes(enc)\n"
        "out = bytearray(g.nbytes); decode_value(memoryview(enc), memoryview(out), None, c)\n"
        "(d / 'dec.bin').write_bytes(bytes(out))\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "LMCACHE_NATIVE_DIR": str(tmp_path / "native")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "enc.bin").read_bytes() == enc
    assert (tmp_path / "dec.bin").read_bytes() == bytes(dec)


def test_layer_report_accounts_for_the_body() -> None:
    g = ChunkGeometry(6, 2, 256, 2, 64, "bfloat16")
    data = chunk(g, 9)
    rows = cachegen.layer_report(data, g)
    assert [(r["planned_key_bits"], r["planned_value_bits"]) for r in rows] == cachegen.plan_bits(6, 2, 4)
    body = cachegen._encode(as_float(data, g), g, 4, 0).body
    values = g.numel // g.layers
    total_bits = sum((r["key_bits"] + r["value_bits"]) / 2 * values + r["side_bits"] * values for r in rows)
    assert total_bits == pytest.approx(8 * len(body), rel=0.02)  # rANS spends what the tables say
    assert rows[0]["key_bits"] > rows[-1]["key_bits"]  # shallow layers get finer bins


# --- the Triton dequantize kernel (GPU decode path), under the interpreter -----------------------


def triton_matches_cpu() -> None:
    """Run in a child with TRITON_INTERPRET=1: decode_into_tensor (Triton) == the CPU decode."""
    from lmcache.kernels import cachegen_triton

    assert cachegen_triton.interpreted()
    cases = [(g, anchor, chunk(g, seed=11 + anchor)) for g in GEOMETRIES[:4] for anchor in (0, 5)]
    cases += [(g, 0, rope_chunk(g, seed=13)) for g in ROPE_GEOMETRIES]  # body version 2, keys rotated
    for g, anchor, data in cases:
        codec = make_codec({"codec": "cachegen", "codec_anchor": str(anchor)})
        enc = bytes(encode_value(codec, memoryview(data), g))
        if enc[:4] != b"LMCC":
            assert g.tokens == 1  # too small to gain: stored raw
            continue
        expected = bytearray(g.nbytes)
        decode_value(memoryview(enc), memoryview(expected), None, codec)
        out = torch.full(g.shape, 7.0, dtype=_TORCH[g.dtype])
        cachegen.decode_into_tensor(enc, out)
        assert out.view(torch.uint8).numpy().tobytes() == bytes(expected), (g, anchor)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'lmcache[triton]'")
def test_triton_dequantize_matches_the_cpu_decoder_under_interpreter() -> None:
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    code = "import test_cachegen as t; t.triton_matches_cpu(); print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=600
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_decode_into_a_cpu_tensor_outside_the_interpreter_uses_the_cpu_path(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = GEOMETRIES[0]
    data = chunk(g, 12)
    codec = make_codec({"codec": "cachegen"})
    enc = bytes(encode_value(codec, memoryview(data), g))
    expected = bytearray(g.nbytes)
    decode_value(memoryview(enc), memoryview(expected), None, codec)
    out = torch.empty(g.shape, dtype=torch.bfloat16)
    cachegen.decode_into_tensor(enc, out)
    assert out.view(torch.uint8).numpy().tobytes() == bytes(expected)
    with pytest.raises(IntegrityError):
        cachegen.decode_into_tensor(enc[:-3], out)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'lmcache[triton]'")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted in this process")
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("out_type", ["i16", "fp16", "fp32"])
def test_triton_dequantize_compiles_for_cuda_without_fma(out_type: str, rope: bool, tmp_path, monkeypatch) -> None:
    """Ahead-of-time compile for sm_90 with fusion off (as launched): no FMA, so GPU rounding is the CPU's."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmcache.kernels import _cachegen_jit

    signature = {"sym": "*u8", "regular": "*u8", "pscale": "*fp32", "ref": "*fp32", "step": "*fp32"}
    signature |= {"out": f"*{out_type}", "n": "i64", "tokens": "i32", "hd": "i32", "anchor": "i32"}
    signature |= {"rcos": "*fp32", "rsin": "*fp32", "parts": "i32", "dim": "i32"}
    signature |= {"ANCHORED": "constexpr", "BF16_BITS": "constexpr", "BLOCK": "constexpr", "ROPE": "constexpr"}
    constexprs = {"ANCHORED": False, "BF16_BITS": out_type == "i16", "BLOCK": 1024, "ROPE": rope}
    src = ASTSource(fn=_cachegen_jit.dequantize_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    assert "st.global" in ptx and "fma.rn.f32" not in ptx


def test_plan_is_the_measured_one_shifted_by_codec_bits_and_never_clips() -> None:
    plan = cachegen.plan_bits(30, 2, 4)
    # measured on SmolLM2-135M: values of layers 2-10 get more bits than the thirds gave them,
    # keys of the first layers fewer, the last values 1.5 bits (docs/codecs.md, the bit plan)
    assert plan[0] == (3.0, 2.5) and plan[5] == (3.0, 4.5) and plan[18] == (4.0, 2.5) and plan[29] == (3.0, 1.5)
    assert sum(sum(r) for r in plan) / 60 == pytest.approx(3.0, abs=0.05)
    assert cachegen.plan_bits(30, 2, 5)[5] == (4.0, 5.5)  # codec_bits shifts the whole plan
    assert cachegen.plan_bits(30, 2, 3)[29] == (2.0, 1.5)  # never under 1.5 bits (1 at codec_bits=1)
    assert min(min(r) for r in cachegen.plan_bits(30, 2, 1)) == 1.0
    assert cachegen.plan_bits(15, 2, 4) == plan[1::2]  # other depths: the same relative depth
    assert cachegen.plan_bits(4, 1, 4)[0] == (plan[3][0],)  # an MLA latent is planned as keys
    assert max(max(r) for r in cachegen.plan_bits(30, 2, 8)) == 6.0  # 8-bit symbols clip past 6 bits
    # codec_bits=8 therefore codes at least as precisely as codec_bits=5 (it used to clip at ~2 sigma)
    g = ChunkGeometry(3, 2, 64, 2, 16, "float32")
    data = chunk(g, 13, sink=False)
    x = as_float(data, g)
    errs = []
    for bits in (5, 8):
        body = cachegen._encode(x.clone(), g, bits, 0).body
        errs.append(float((as_float(numpy_decode(memoryview(body), g), g) - x).pow(2).mean()))
    assert errs[1] <= errs[0]


def test_damaged_values_never_crash_the_c_decoder(lib) -> None:
    """Random byte flips and cuts anywhere in a value: it decodes (to something) or is refused."""
    g = GEOMETRIES[1]
    codec = make_codec({"codec": "cachegen", "codec_anchor": "4"})
    enc = bytes(encode_value(codec, memoryview(chunk(g, 21)), g))
    rng = np.random.default_rng(0)
    refused = 0
    for trial in range(300):
        bad = bytearray(enc)
        if trial % 3 == 0:
            bad = bad[: int(rng.integers(1, len(bad)))]
        for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 4))):
            bad[pos] ^= int(rng.integers(1, 256))
        try:
            decode_value(memoryview(bytes(bad)), memoryview(bytearray(g.nbytes)), None, codec)
        except IntegrityError:
            refused += 1
    assert refused > 250  # nearly every damaged value is caught (none may crash the process)
