"""fp8 body version 2: keys rotated back by RoPE before centring (lmcache.serde.quant.Fp8Codec).

A chunk whose keys carry steady per-channel offsets *before* RoPE (as real models' keys do) is
coded with the RoPE base found and decodes closer than the same chunk coded without rotating;
version 1 bodies (no RoPE base; what fp8 writes by default until version 2 meets its gate)
still decode, and the default writes them; the C loop and the torch path give the same bytes
for version 2; a damaged version 2 body is a miss, on its own and on a file tier.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lmcache.backends.registry import open_backend
from lmcache.errors import IntegrityError
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry
from lmcache.serde import dequant_native, quant
from lmcache.serde.cachegen import rope_tables
from lmcache.serde.codec import ChunkGeometry, _pack_header, decode_value, encode_value, get_codec, parse_codec_header

_TORCH = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@pytest.fixture(autouse=True)
def writes_v2(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp8 writes version 2 here (the default; pinned so these tests keep testing version 2)."""
    monkeypatch.setattr(quant.Fp8Codec, "body_version", 2)


def roped_chunk(shape: tuple[int, ...], dtype: str = "bfloat16", seed: int = 0, theta: float = 1e5) -> bytes:
    """KV whose keys are steady channel offsets plus noise, rotated by RoPE at their positions."""
    L, _P, T, H, D = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    k = x[:, 0] + 6 * rng.standard_normal((L, 1, H, D), dtype=np.float32)
    cos, sin = rope_tables(T + 40, D, theta)
    cos, sin = cos[40:, None, :], sin[40:, None, :]  # the chunk starts at position 40
    a, b = k[..., : D // 2], k[..., D // 2 :]
    x[:, 0] = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    x[:, :, 0] *= 20  # an attention sink
    return torch.from_numpy(x).to(_TORCH[dtype]).view(torch.uint8).numpy().tobytes()


def as_f32(data: bytes | bytearray, g: ChunkGeometry) -> np.ndarray:
    return torch.frombuffer(bytearray(data), dtype=_TORCH[g.dtype]).float().numpy().reshape(g.shape)


def decode(enc: bytes | memoryview, g: ChunkGeometry) -> bytearray:
    out = bytearray(g.nbytes)
    decode_value(memoryview(enc), memoryview(out))
    return out


def without_rope(monkeypatch: pytest.MonkeyPatch, g: ChunkGeometry, data: bytes) -> bytes:
    """The chunk coded as if no RoPE base explained its keys (a version 2 body with base 0)."""
    with monkeypatch.context() as m:
        m.setattr(quant, "_find_rope", lambda k: 0.0)
        return bytes(encode_value(get_codec("fp8"), memoryview(data), g))


def test_v2_round_trip_finds_the_base_and_codes_keys_closer(monkeypatch: pytest.MonkeyPatch) -> None:
    g = ChunkGeometry(3, 2, 256, 2, 64, "bfloat16")
    data = roped_chunk(g.shape)
    enc = bytes(encode_value(get_codec("fp8"), memoryview(data), g))
    header = parse_codec_header(enc)
    assert header is not None and header.body_version == 2
    body = enc[header.body_offset :]
    assert body[0] == 2 and struct.unpack_from("<f", body, 1)[0] == pytest.approx(1e5)
    assert 1.95 < g.nbytes / len(enc) < 1.96  # the exact key elements spend what 1.95x leaves
    (n,) = struct.unpack_from("<I", body, 5 + 4 * 3 * 2 * 64 + 3 * 255 + 3 * 2 * 2 * 64 * 2)
    assert n > 0
    x = as_f32(data, g)
    got = as_f32(decode(enc, g), g)
    plain = as_f32(decode(without_rope(monkeypatch, g, data), g), g)
    assert np.array_equal(got[:, :, 0], x[:, :, 0])  # the first token, exactly
    err = np.linalg.norm(got[:, 0] - x[:, 0]) / np.linalg.norm(x[:, 0])
    err_plain = np.linalg.norm(plain[:, 0] - x[:, 0]) / np.linalg.norm(x[:, 0])
    assert err < err_plain / 2  # the offsets return once rotated back, and centring removes them
    assert np.linalg.norm(got[:, 1] - x[:, 1]) / np.linalg.norm(x[:, 1]) < 0.05


def fp8_v1_value(data: bytes, g: ChunkGeometry) -> bytes:
    """An fp8 value as body version 1 wrote it: centred keys, per-(token, head) value exponents, no RoPE."""
    L, P, T = g.shape[:3]
    x = torch.frombuffer(bytearray(data), dtype=_TORCH[g.dtype]).float().view(g.shape)
    k = x[:, 0, 1:]
    ck = k.mean(dim=1, keepdim=True).half().float()
    k = k - ck
    sk = (k.abs().amax(dim=1, keepdim=True) / 448).clamp(2**-24, 65504).half().float()
    v = x[:, 1, 1:]
    ev = quant._pow2_exponent(v.abs().amax(dim=3, keepdim=True) / 448)
    y = torch.stack([k / sk, v / torch.exp2(ev.float())], dim=1).clamp(-448, 448)
    first = np.frombuffer(data, dtype=np.uint8).reshape(L, P, T, -1)[:, :, 0]
    body = b"".join(
        [
            bytes([1]),
            ck.half().numpy().tobytes(),
            sk.half().numpy().tobytes(),
            ev.to(torch.int8).numpy().tobytes(),
            first.tobytes(),
            y.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes(),
        ]
    )
    return _pack_header("fp8", g, g.nbytes, 1) + body


def test_v1_bodies_still_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    g = ChunkGeometry(2, 2, 64, 2, 32, "bfloat16")
    data = roped_chunk(g.shape, seed=3)
    v1 = fp8_v1_value(data, g)
    monkeypatch.setattr(quant.Fp8Codec, "body_version", 1)  # what fp8 wrote before v2: the same bytes
    assert bytes(encode_value(get_codec("fp8"), memoryview(data), g)) == v1
    got = decode(v1, g)
    x = as_f32(data, g)
    assert np.array_equal(as_f32(got, g)[:, :, 0], x[:, :, 0])
    assert np.linalg.norm(as_f32(got, g) - x) / np.linalg.norm(x) < 0.1
    with monkeypatch.context() as m:  # the torch path reads it the same
        m.setitem(dequant_native._state, "lib", None)
        assert decode(v1, g) == got


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("shape", [(3, 2, 256, 3, 64), (2, 2, 37, 1, 20), (2, 1, 19, 2, 96)], ids=str)
def test_v2_native_decode_gives_the_torch_bytes(monkeypatch: pytest.MonkeyPatch, shape, dtype: str) -> None:
    if dequant_native.library() is None:
        pytest.skip("no C compiler: the native decode loops cannot be built here")
    g = ChunkGeometry(*shape, dtype)
    enc = bytes(encode_value(get_codec("fp8"), memoryview(roped_chunk(shape, dtype, seed=7)), g))
    header = parse_codec_header(enc)
    assert header is not None and struct.unpack_from("<f", enc, header.body_offset + 1)[0] > 0  # RoPE in play
    calls: list[bool] = []
    rotated: list[bool] = []
    real, real_rope = dequant_native.scaled, dequant_native.rope

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        if calls[-1] and kwargs.get("rope") is not None:
            rotated.append(True)  # the C loop rotated the keys in the same pass
        return calls[-1]

    def spy_rope(*args, **kwargs):
        rotated.append(real_rope(*args, **kwargs))
        return rotated[-1]

    outs = []
    for native, simd in ((False, 2), (True, 2), (True, 1), (True, 0)):
        with monkeypatch.context() as m:
            m.setattr(dequant_native, "SIMD", simd)
            m.setattr(dequant_native, "scaled", spy)
            m.setattr(dequant_native, "rope", spy_rope)
            if not native:
                m.setitem(dequant_native._state, "lib", None)
            outs.append(bytes(decode(enc, g)))
    assert outs[1:] == [outs[0]] * 3
    assert calls.count(True) > 0 and rotated.count(True) > 0  # the C loops did decode (not silently torch)


def test_v2_native_switched_off_decodes_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    g = ChunkGeometry(2, 2, 64, 2, 32, "bfloat16")
    enc = bytes(encode_value(get_codec("fp8"), memoryview(roped_chunk(g.shape, seed=9)), g))
    native = bytes(decode(enc, g))
    with monkeypatch.context() as m:
        m.setenv("LMCACHE_DEQUANT_NATIVE", "0")
        m.setattr(dequant_native, "_state", {})
        assert dequant_native.library() is None
        assert bytes(decode(enc, g)) == native


def _damaged(enc: bytes, what: str) -> bytes:
    header = parse_codec_header(enc)
    assert header is not None
    body = bytearray(enc[header.body_offset :])
    if what == "truncated":
        body = body[:-1]
    elif what == "version byte":
        body[0] = 1
    elif what == "nan base":
        body[1:5] = struct.pack("<f", float("nan"))
    elif what == "negative base":
        body[1:5] = struct.pack("<f", -1e4)
    else:  # the exact key elements: their count, or an index out of order
        L, P, T, H, D = header.geometry.shape
        at = 5 + 4 * L * H * D + L * (T - 1) + L * P * H * D * header.geometry.itemsize
        (n,) = struct.unpack_from("<I", body, at)
        assert n > 1
        if what == "exact count":
            struct.pack_into("<I", body, at, n + 1)
        else:
            struct.pack_into("<I", body, at + 4, 2**32 - 1)
    return enc[: header.body_offset] + bytes(body)


@pytest.mark.parametrize(
    "what", ["truncated", "version byte", "nan base", "negative base", "exact count", "exact index"]
)
def test_a_damaged_v2_body_does_not_decode(what: str) -> None:
    g = ChunkGeometry(2, 2, 256, 2, 64, "bfloat16")
    enc = bytes(encode_value(get_codec("fp8"), memoryview(roped_chunk(g.shape, seed=11)), g))
    with pytest.raises(IntegrityError):
        decode(_damaged(enc, what), g)


async def test_a_corrupted_v2_value_in_a_file_tier_is_a_miss(tmp_path: Path) -> None:
    geom = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=64, dtype="bfloat16")
    data = roped_chunk(geom.chunk_shape(256), seed=13)
    key = CacheKey(geom.key_model("fp8-v2"), 1, 0, os.getpid().to_bytes(4, "little") + bytes(28), geom.dtype)
    async with open_backend(f"file://{tmp_path}?codec=fp8") as b:
        await b.put([key], [data])
        dst = bytearray(len(data))
        assert (await b.get_into([key], [dst]))[0] == len(data)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1000]  # noqa: ASYNC240
    assert len(files) == 1
    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0x40  # inside the codes: only the frame checksum over encoded bytes sees it
    files[0].write_bytes(bytes(raw))
    async with open_backend(f"file://{tmp_path}?codec=fp8") as b:
        assert (await b.get_into([key], [bytearray(len(data))]))[0] is None


def test_bench_codec_counts_near_ties() -> None:
    """The bench's quality rows say how many positions are near-ties (where top-1 can flip under any noise)."""
    pytest.importorskip("transformers")
    from lmcache.bench.codec import bench_codecs

    result = bench_codecs(
        ["raw", "fp8"],
        docs=1,
        doc_tokens=256,
        question_tokens=8,
        decode_steps=4,
        repeat=1,
        models=("random-125m",),
        progress=False,
    )
    rows = result["models"]["random-125m"]["codecs"]
    assert rows["raw"]["near_ties"] == rows["fp8"]["near_ties"]  # raw's leads: the same positions
    assert 0 <= rows["fp8"]["near_ties"] <= rows["fp8"]["positions"] == 12


def test_bench_codec_first_doc_picks_another_document_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--first-doc N``: the documents (and questions) after the first N, to report on a set not fitted on."""
    pytest.importorskip("transformers")
    from lmcache.bench import codec as bc
    from lmcache.bench import realmodel

    model, _, _ = bc._random_model_prompts(1, 1, 8, 8)
    monkeypatch.setattr(bc, "_load_smollm2", lambda: (model, None))
    monkeypatch.setattr(realmodel, "real_documents", lambda tok, count, n: [[i + 1] * n for i in range(count)])
    seen: list[int] = []
    kv_of = bc._kv_of
    monkeypatch.setattr(bc, "_kv_of", lambda m, ids: (seen.append(ids[0]), kv_of(m, ids))[1])
    result = bc.bench_codecs(
        ["raw"],
        docs=2,
        doc_tokens=64,
        question_tokens=4,
        decode_steps=2,
        chunk_size=32,
        repeat=1,
        models=("smollm2",),
        progress=False,
        first_doc=5,
    )
    assert seen == [6, 7]  # documents 5 and 6 (0-based); 7 and 8 are their questions
    assert result["models"]["smollm2"]["first_doc"] == 5
