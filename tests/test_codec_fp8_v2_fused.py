"""fp8 body version 2 decodes keys with RoPE in one C pass (lmcache.serde.dequant_native).

The fused loop (codes to float32, times the scale, plus the centre, RoPE, rounded into the
chunk's dtype, all in registers) must give exactly the bytes of the torch path and of the
two-pass native path it replaces (float32 keys in a scratch, then ``lmc_dq_rope``): one ulp
anywhere fails these tests. Shapes with odd token counts, several heads, D = 64 and 128 and
dims whose half is no multiple of 16 or 8 (the AVX-512 and AVX2 tails), all three dtypes,
several RoPE bases including 0 (no RoPE), and each SIMD level (3: AVX-512 with the AVX512-BF16
rounding instruction, whose NaN and denormal lanes must still round as torch does).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from lmcache.serde import dequant_native, quant
from lmcache.serde.cachegen import rope_tables
from lmcache.serde.codec import ChunkGeometry, decode_value, encode_value, get_codec, parse_codec_header

_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

#: [L, P, T, H, D]: odd token counts, one to five heads, D = 64 and 128, MLA (one part), one
#: layer and head, D = 48 (half 24: an AVX-512 step, then an AVX2 one) and D = 36
#: (half 18: then the scalar tail).
SHAPES = [
    (2, 2, 37, 3, 64),
    (2, 2, 255, 2, 128),
    (1, 2, 9, 1, 64),
    (2, 1, 19, 5, 128),
    (3, 2, 41, 2, 48),
    (2, 2, 23, 3, 36),
]
BASES = [0.0, 2.5, 1e4, 5e5]


@pytest.fixture(autouse=True)
def writes_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 writes body version 2 here, whatever the default."""
    monkeypatch.setattr(quant.Fp8Codec, "body_version", 2)


@pytest.fixture(scope="module")
def lib():
    got = dequant_native.library()
    if got is None:
        pytest.skip("no C compiler: the native decode loops cannot be built here")
    return got


def chunk(shape: tuple[int, ...], dtype: str, theta: float, seed: int) -> memoryview:
    """KV with steady key offsets rotated by RoPE (base ``theta``; none for 0), outliers, zeros and -0.0."""
    L, _P, T, H, D = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    k = x[:, 0] * 2 + 6 * rng.standard_normal((L, 1, H, D), dtype=np.float32)
    if theta:
        cos, sin = rope_tables(T + 17, D, theta)
        cos, sin = cos[17:, None, :], sin[17:, None, :]
        a, b = k[..., : D // 2], k[..., D // 2 :]
        k = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    x[:, 0] = k
    x.reshape(-1)[::89] *= 40.0
    x.reshape(-1)[3::97] = 0.0
    x.reshape(-1)[5::101] = -0.0
    x[:, :, 0] *= 20  # an attention sink (stored exact)
    return memoryview(torch.from_numpy(x).to(_TORCH[dtype]).view(torch.uint8).numpy().tobytes())


def encoded(monkeypatch: pytest.MonkeyPatch, g: ChunkGeometry, theta: float, seed: int) -> bytes:
    """A version 2 value of a chunk coded with RoPE base ``theta`` (0: keys not rotated)."""
    with monkeypatch.context() as m:
        m.setattr(quant, "_find_rope", lambda k: theta)
        enc = bytes(encode_value(get_codec("fp8"), chunk(g.shape, g.dtype, theta, seed), g))
    header = parse_codec_header(enc)
    assert header is not None and header.body_version == 2
    assert struct.unpack_from("<f", enc, header.body_offset + 1)[0] == pytest.approx(theta)
    return enc


def decode(enc: bytes, g: ChunkGeometry) -> bytes:
    out = bytearray(g.nbytes)
    decode_value(memoryview(enc), memoryview(out))
    return bytes(out)


def two_pass_scaled(*args, rope=None, **kwargs) -> bool:
    """``dequant_native.scaled`` as before the fused loop: with RoPE it declines (float32 scratch, then rotate)."""
    return False if rope is not None else _REAL_SCALED(*args, **kwargs)


_REAL_SCALED = dequant_native.scaled


def decode_every_way(enc: bytes, g: ChunkGeometry, monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """The value decoded by torch, by the two-pass native path, and by the fused loop at each SIMD level."""
    outs = {}
    with monkeypatch.context() as m:
        m.setitem(dequant_native._state, "lib", None)
        outs["torch"] = decode(enc, g)
    with monkeypatch.context() as m:
        m.setattr(dequant_native, "scaled", two_pass_scaled)
        outs["two-pass"] = decode(enc, g)
    for simd in (3, 2, 1, 0):
        with monkeypatch.context() as m:
            m.setattr(dequant_native, "SIMD", simd)
            outs[f"fused simd {simd}"] = decode(enc, g)
    return outs


def ulps_apart(a: bytes, b: bytes, dtype: str) -> int:
    """How many elements of two decodes differ (bit patterns)."""
    item = np.uint32 if dtype == "float32" else np.uint16
    return int((np.frombuffer(a, dtype=item) != np.frombuffer(b, dtype=item)).sum())


@pytest.mark.parametrize("theta", BASES, ids=lambda t: f"base{t:g}")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fused_decode_gives_the_torch_bytes(lib, monkeypatch: pytest.MonkeyPatch, shape, dtype: str, theta) -> None:
    g = ChunkGeometry(*shape, dtype)
    enc = encoded(monkeypatch, g, theta, seed=len(SHAPES) * BASES.index(theta) + SHAPES.index(shape))
    outs = decode_every_way(enc, g, monkeypatch)
    differ = {way: ulps_apart(out, outs["torch"], dtype) for way, out in outs.items()}
    assert differ == dict.fromkeys(outs, 0)


def test_a_one_ulp_change_is_caught(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above sees one ulp: rotating with a fused multiply-add (one rounding fewer) differs."""
    g = ChunkGeometry(2, 2, 37, 3, 64, "bfloat16")
    enc = encoded(monkeypatch, g, 1e4, seed=1)
    want = decode_every_way(enc, g, monkeypatch)["torch"]

    def fma_rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, native: bool = False) -> None:
        h = k.shape[-1] // 2
        a, b = k[..., :h].double(), k[..., h:].double()
        c, s = cos[:, None, :].double(), sin[:, None, :].double()
        k[..., :h], k[..., h:] = (a * c - (b * s).float().double()).float(), (b * c + (a * s).float().double()).float()

    with monkeypatch.context() as m:
        m.setitem(dequant_native._state, "lib", None)
        m.setattr(quant, "_rotate_keys", fma_rotate)
        assert ulps_apart(decode(enc, g), want, "bfloat16") > 0


def test_version_2_keys_take_the_fused_loop(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Natively, a version 2 value is one C call for codes, RoPE and the exact elements: no float32 rotate pass."""
    g = ChunkGeometry(3, 2, 256, 2, 64, "bfloat16")  # big enough for exact key elements
    enc = encoded(monkeypatch, g, 1e4, seed=2)
    calls: list[str] = []

    def scaled(*args, **kwargs):
        done = _REAL_SCALED(*args, **kwargs)
        extras = "".join(f"+{k}" for k in ("rope", "exact") if kwargs.get(k) is not None)
        calls.append(f"scaled{extras}:{done}")
        return done

    monkeypatch.setattr(dequant_native, "scaled", scaled)
    monkeypatch.setattr(dequant_native, "rope", lambda *a, **k: calls.append("rope") or False)
    decode(enc, g)
    assert calls == ["scaled+rope+exact:True"]


def test_exact_elements_out_of_order_or_range_are_refused(lib) -> None:
    """The C loop checks every exact index before it writes anything."""
    L, P, T, H, D = 2, 2, 5, 3, 4
    dst = torch.zeros(L, P, T, H, D, dtype=torch.bfloat16)
    codes = np.zeros(dst.numel(), dtype=np.int8)
    sk, sv = torch.ones(L, H, D), torch.ones(L, T, 1, 1)
    vals = memoryview(torch.ones(3, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())

    def put(idx: list[int]) -> bool:
        exact = (np.array(idx, dtype=np.uint32), vals)
        return dequant_native.scaled(dequant_native.CODE_INT8, codes, dst, sk=sk, sv=sv, exact=exact)

    for idx in ([4, 2, 9], [1, 1, 9], [0, 5, L * T * H * D]):
        dst.fill_(7)
        assert put(idx) is False
        assert (dst == 7).all()  # nothing written
    assert put([0, 13, T * H * D + 11]) is True
    assert dst[0, 0, 0, 0, 0] == 1 and dst[0, 0, 1, 0, 1] == 1 and dst[1, 0, 0, 2, 3] == 1
    assert int(dst.count_nonzero()) == 3 and not dst[:, 1].any()


def test_nan_and_denormal_lanes_round_as_torch(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded NaN (either sign) and float32 denormals give torch's bytes at every SIMD level.

    A version 2 body with some key scales NaN or infinite (NaN products, and inf times a zero
    code) and value scale exponents at the bottom of their range (products below 2**-126): the
    AVX512-BF16 instruction would give another NaN and flush the denormals, so those steps must
    round with integers; and torch's float32 -> bfloat16 copy_ (the end of the two-pass path)
    writes NaN as 0xFFFF, so the fused loop does too.
    """
    g = ChunkGeometry(2, 2, 64, 2, 64, "bfloat16")
    enc = bytearray(encoded(monkeypatch, g, 1e4, seed=4))
    header = parse_codec_header(bytes(enc))
    assert header is not None
    L, _P, T, H, D = g.shape
    at = header.body_offset + 5
    ck = np.frombuffer(enc, dtype=np.uint16, count=L * H * D, offset=at).reshape(L, H, D).copy()
    sk = np.frombuffer(enc, dtype=np.uint16, count=L * H * D, offset=at + 2 * L * H * D).reshape(L, H, D).copy()
    ev = np.frombuffer(enc, dtype=np.int8, count=L * (T - 1), offset=at + 4 * L * H * D).reshape(L, T - 1).copy()
    sk[0, 0, 3], sk[0, 1, 40], sk[1, 0, 9] = 0xFE00, 0x7E00, 0x7C00  # -NaN, NaN, inf
    ck[1, 1, 17] = 0xFC00  # -inf centre: -inf, or NaN where the product is +inf
    ev[:, ::3] = -128
    ev[0, 1:3] = -125
    enc[at : at + 2 * L * H * D] = ck.tobytes()
    enc[at + 2 * L * H * D : at + 4 * L * H * D] = sk.tobytes()
    enc[at + 4 * L * H * D : at + 4 * L * H * D + ev.size] = ev.tobytes()
    outs = decode_every_way(bytes(enc), g, monkeypatch)
    got = np.frombuffer(outs["torch"], dtype=np.uint16)
    assert (((got & 0x7F80) == 0x7F80) & ((got & 0x7F) != 0)).any()  # NaN decoded
    assert ((got & 0x7FFF) == 0x7F80).any()  # and infinities
    assert (((got & 0x7F80) == 0) & ((got & 0x7F) != 0)).any()  # bfloat16 denormals decoded
    differ = {way: ulps_apart(out, outs["torch"], "bfloat16") for way, out in outs.items()}
    assert differ == dict.fromkeys(outs, 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("codec", ["fp8 v1", "int8", "int4", "int4?24"])
def test_every_codec_gives_the_torch_bytes_at_each_simd_level(lib, monkeypatch, codec: str, dtype: str) -> None:
    """The other codecs' loops (fp8 version 1, int8, int4) also round bfloat16 with AVX512-BF16 at level 3."""
    from lmcache.serde.codec import make_codec

    name, _, group = codec.partition("?")
    if name == "fp8 v1":
        monkeypatch.setattr(quant.Fp8Codec, "body_version", 1)
        name = "fp8"
    c = make_codec({"codec": name, "codec_group": group}) if group else get_codec(name)
    for shape in [(3, 2, 37, 3, 20), (2, 1, 19, 1, 600), (2, 2, 255, 2, 128)]:
        g = ChunkGeometry(*shape, dtype)
        enc = bytes(encode_value(c, chunk(shape, dtype, 0.0, 3), g))
        assert parse_codec_header(enc) is not None
        outs = {}
        with monkeypatch.context() as m:
            m.setitem(dequant_native._state, "lib", None)
            outs["torch"] = decode(enc, g)
        for simd in (3, 2, 1, 0):
            with monkeypatch.context() as m:
                m.setattr(dequant_native, "SIMD", simd)
                outs[f"simd {simd}"] = decode(enc, g)
        differ = {way: ulps_apart(out, outs["torch"], dtype) for way, out in outs.items()}
        assert differ == dict.fromkeys(outs, 0), shape
