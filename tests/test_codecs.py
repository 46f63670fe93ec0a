"""Codecs on real data paths: the file tier, a real Redis, memory://, through TieredBackend.

Values are chunks of KV in the chunk format, keyed as the engine keys them (the geometry identity
in the key's model field), so lossy codecs see the geometry they would see in production.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from lmcache_conformance import BackendTests
from servers import RedisServer

from lmcache.backends.registry import open_backend
from lmcache.config import LMCacheConfig
from lmcache.errors import ConfigError, IntegrityError
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry
from lmcache.serde.codec import (
    ChunkGeometry,
    CodecSettings,
    _pack_header,
    decode_value,
    encode_value,
    geometry_for,
    get_codec,
    make_codec,
    parse_codec_header,
    split_codec_query,
)
from lmcache.serde.layer import CodecBackend
from lmcache.serde.quant import Fp8Codec
from lmcache.tiered import TieredBackend

GEOM = KVGeometry(4, 2, 32, "bfloat16")
TOKENS = 64
LOSSLESS = ["raw", "zstd", "lz4"]


def key(i: int, geom: KVGeometry = GEOM) -> CacheKey:
    """An engine-style key: the geometry identity is part of its model field."""
    salt = os.getpid().to_bytes(4, "little")
    return CacheKey(geom.key_model("codec-test"), 1, 0, salt + i.to_bytes(28, "little"), geom.dtype)


def kv(seed: int, geom: KVGeometry = GEOM, tokens: int = TOKENS) -> bytes:
    """A bf16 chunk with KV-like statistics (per-channel offsets for keys, smaller values)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(geom.chunk_shape(tokens), dtype=np.float32)
    x[:, 0] = x[:, 0] * 2 + rng.standard_normal((geom.num_layers, 1, geom.num_kv_heads, geom.head_dim)) * 4
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


async def read(backend, keys: list[CacheKey], size: int) -> list[bytes | None]:
    dsts = [bytearray(size) for _ in keys]
    got = await backend.get_into(keys, dsts)
    return [None if n is None else bytes(d[:n]) for n, d in zip(got, dsts, strict=True)]


# ---------------------------------------------------------------------------------------------
# The codec header and registry


def test_geometry_comes_from_the_key_and_the_size() -> None:
    g = geometry_for(key(1).model, len(kv(1)))
    assert g == ChunkGeometry(4, 2, TOKENS, 2, 32, "bfloat16")
    assert geometry_for("plain-model", 1000) == ChunkGeometry.flat(1000)
    assert geometry_for(key(1).model, 1001).dtype == "uint8"  # not whole tokens: plain bytes


def test_a_raw_value_is_never_mistaken_for_an_encoded_one() -> None:
    g = ChunkGeometry(1, 1, 1, 1, 64, "uint8")
    head = _pack_header("zstd", g, 64)
    assert parse_codec_header(head + b"x") is not None
    damaged = bytearray(head)
    damaged[10] ^= 1
    assert parse_codec_header(bytes(damaged)) is None  # its own check fails: data, not a header
    assert parse_codec_header(b"LMCC" + bytes(100)) is None


def test_codec_options_are_typed_and_split_from_any_url() -> None:
    url, opts = split_codec_query("redis://h:6379/0?connections=4&codec=int4&codec_group=32")
    assert url == "redis://h:6379/0?connections=4" and opts == {"codec": "int4", "codec_group": "32"}
    assert make_codec(opts).settings.codec_group == 32
    with pytest.raises(ConfigError, match="codec_group"):
        make_codec({"codec": "int4", "codec_group": "3"})
    with pytest.raises(ConfigError, match="codec_levle"):
        make_codec({"codec": "zstd", "codec_levle": "3"})
    with pytest.raises(ConfigError, match="unknown codec 'nope'"):
        make_codec({"codec": "nope"})
    with pytest.raises(ConfigError, match="codec"):
        open_backend("memory://?codec=nope")


# ---------------------------------------------------------------------------------------------
# Tiers


@pytest.mark.parametrize("codec", LOSSLESS)
async def test_file_tier_round_trip_is_exact(tmp_path: Path, codec: str) -> None:
    vals = [kv(i) for i in range(3)]
    keys = [key(i) for i in range(3)]
    async with TieredBackend.from_urls([f"file://{tmp_path}?codec={codec}"]) as t:
        assert [r.ok for r in await t.put(keys, vals)] == [True] * 3
        assert await read(t, keys, len(vals[0])) == vals
        st = t.tiers[0].stats()
        assert st["codec"] == codec
        if codec != "raw":
            assert st["codec_encoded"] == 3 and st["used_bytes"] < 3 * len(vals[0])  # stored smaller
    # A fresh stack configured raw still reads them (the codec is named in each value).
    async with TieredBackend.from_urls([f"file://{tmp_path}"]) as t:
        assert await read(t, keys, len(vals[0])) == vals


async def test_redis_tier_round_trip(redis_server: RedisServer) -> None:
    vals = [kv(10 + i) for i in range(4)]
    keys = [key(10 + i) for i in range(4)]
    async with open_backend(redis_server.url + "?codec=zstd") as b:
        assert isinstance(b, CodecBackend)
        assert [r.ok for r in await b.put(keys, vals)] == [True] * 4
        assert await read(b, keys, len(vals[0])) == vals
        assert b.stats()["codec_decoded"] == 4
        await b.delete(keys)


async def test_mixed_codecs_in_one_store(tmp_path: Path) -> None:
    size = len(kv(0))
    for i, codec in enumerate(LOSSLESS):
        async with open_backend(f"file://{tmp_path}?codec={codec}") as b:
            await b.put([key(i)], [kv(i)])
    # One reader, configured with yet another codec, decodes every value whatever wrote it.
    async with TieredBackend.from_urls(["memory://?capacity=1MiB", f"file://{tmp_path}"], codec="lz4") as t:
        assert await read(t, [key(i) for i in range(3)], size) == [kv(i) for i in range(3)]
        # Promoted into memory:// as the decoded chunk: read again from tier 0, same bytes.
        assert await read(t.tiers[0], [key(i) for i in range(3)], size) == [kv(i) for i in range(3)]


async def test_unknown_codec_is_a_counted_miss_named_in_the_log(tmp_path: Path, caplog) -> None:
    size = len(kv(0))
    g = geometry_for(key(0).model, size)
    alien = _pack_header("martian9", g, size) + b"\x01" * 100  # as a plugin we lack would write it
    async with open_backend(f"file://{tmp_path}") as plain:
        await plain.put([key(0)], [alien])
    async with TieredBackend.from_urls([f"file://{tmp_path}"]) as t:
        with caplog.at_level(logging.WARNING):
            assert await read(t, [key(0)], size) == [None]
        assert t.tiers[0].stats()["codec_unknown"] == 1
        assert "martian9" in caplog.text


async def test_corrupted_encoded_bytes_are_a_miss() -> None:
    """memory:// has no frame checksum: the codec's own failure to decode is what catches it."""
    size = len(kv(0))
    async with open_backend("memory://?capacity=1MiB&codec=zstd") as b:
        assert isinstance(b, CodecBackend)
        await b.put([key(1)], [kv(1)])
        stored = (await read(b.inner, [key(1)], size))[0]
        assert stored is not None and len(stored) < size
        damaged = bytearray(stored)
        damaged[len(damaged) // 2 :] = bytes(len(damaged) - len(damaged) // 2)
        await b.inner.put([key(2)], [bytes(damaged)])
        assert await read(b, [key(2)], size) == [None]
        assert b.stats()["corrupt"] == 1
        assert await read(b, [key(1)], size) == [kv(1)]


async def test_corrupted_encoded_bytes_in_a_file_are_a_miss(tmp_path: Path) -> None:
    size = len(kv(0))
    async with open_backend(f"file://{tmp_path}?codec=lz4") as b:
        await b.put([key(1)], [kv(1)])
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 1000]  # noqa: ASYNC240
    assert len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-10] ^= 0xFF  # inside the encoded body: the frame checksum over encoded bytes catches it
    files[0].write_bytes(bytes(data))
    async with open_backend(f"file://{tmp_path}?codec=lz4") as b:
        assert await read(b, [key(1)], size) == [None]


def test_config_codec_is_the_default_of_tiers_outside_the_process(tmp_path: Path) -> None:
    cfg = LMCacheConfig.load(
        environ={},
        tiers=["memory://?capacity=1MiB", f"file://{tmp_path}/a", f"file://{tmp_path}/b?codec=lz4"],
        codec="zstd",
    )
    t = TieredBackend.from_config(cfg)
    mem, a, b = t.tiers
    assert not isinstance(mem, CodecBackend)  # in-process: stays raw
    assert isinstance(a, CodecBackend) and a.codec.name == "zstd"
    assert isinstance(b, CodecBackend) and b.codec.name == "lz4"  # the tier's own wins
    assert [x.url for x in TieredBackend.from_url(t.url).tiers] == [x.url for x in t.tiers]
    with pytest.raises(ConfigError, match="codec"):
        LMCacheConfig.load(environ={}, codec="nope")


def test_settings_defaults() -> None:
    assert CodecSettings().codec == "raw" and get_codec("raw").name == "raw"


async def test_redis_mixed_codecs_and_lossy_promotion(redis_server: RedisServer) -> None:
    """fp8, int4 and zstd values side by side in one Redis; a raw stack reads them all, lossy ones close."""
    size = len(kv(0))
    keys = [key(20 + i) for i in range(3)]
    for k, codec in zip(keys, ["fp8", "int4", "zstd"], strict=True):
        async with open_backend(f"{redis_server.url}?codec={codec}") as b:
            assert (await b.put([k], [kv(k.chunk_hash[4])]))[0].ok
    try:
        async with TieredBackend.from_urls(["memory://?capacity=1MiB", redis_server.url]) as t:
            got = await read(t, keys, size)
            assert got[2] == kv(keys[2].chunk_hash[4])  # lossless: exact
            for k, value, limit in zip(keys[:2], got[:2], [0.05, 0.15], strict=True):
                want = np.frombuffer(kv(k.chunk_hash[4]), np.uint16).astype(np.uint32) << 16
                have = np.frombuffer(value, np.uint16).astype(np.uint32) << 16
                a, b = want.view(np.float32), have.view(np.float32)
                assert value != kv(k.chunk_hash[4]) and np.linalg.norm(a - b) / np.linalg.norm(a) < limit
            # Promoted into memory:// as the decoded chunk (what the engine got), not the encoded bytes.
            assert await read(t.tiers[0], keys, size) == got
            assert t.tiers[1].stats()["codec_decoded"] == 3
    finally:
        async with open_backend(redis_server.url) as b:
            await b.delete(keys)


def test_engine_through_a_lossy_file_tier(tmp_path: Path) -> None:
    """CacheEngine with an fp8 file tier (no memory tier): retrieve gives the KV back, quantized."""
    import torch

    from lmcache.engine import CacheEngine
    from lmcache.integrations.transformers import ContiguousKV

    geo = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype="bfloat16")
    gen = torch.Generator().manual_seed(0)
    shape = (1, geo.num_kv_heads, 64, geo.head_dim)
    src = ContiguousKV(
        [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(geo.num_layers)],
        [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(geo.num_layers)],
    )
    cfg = LMCacheConfig.load(environ={}, chunk_size=32, tiers=[f"file://{tmp_path}/kv"], codec="fp8", lookup_budget=30)
    tokens = list(range(64))
    with CacheEngine(geo, "m", config=cfg) as eng:
        assert eng.store(tokens, src).result(30) == 2
        eng.flush()
        dst = ContiguousKV.empty(geo, 64)
        assert eng.retrieve(tokens, dst) == 64
        tier = eng.backend.tiers[0].stats()
        for want, got in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
            a, b = want.float(), got.float()
            assert not torch.equal(a, b) and float((a - b).norm() / a.norm()) < 0.05
    assert tier["codec"] == "fp8" and tier["codec_encoded"] == 2 and tier["codec_decoded"] == 2


class TestCodecBackendConformance(BackendTests):
    """A codec-wrapped backend keeps the whole StorageBackend contract (values without a geometry
    in their key are compressed as plain bytes by zstd)."""

    @pytest.fixture
    def backend_url(self) -> str:
        return "memory://?capacity=256MiB&codec=zstd"


# ---------------------------------------------------------------------------------------------
# Body format versions: values written before a codec changed its format keep decoding


def _bf16(x: np.ndarray) -> bytes:
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def _as_f32(data: bytes) -> np.ndarray:
    return (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)


def _int4_v0_value(x: np.ndarray, group: int) -> bytes:
    """An int4 value as lmcache wrote it before body versions (keys ``[L, H, D, T]``, codes paired).

    Group sizes that divide the geometry, so no padding is needed.
    """
    L, P, T, H, D = x.shape

    def quant(grouped: np.ndarray) -> tuple[bytes, np.ndarray]:
        lo = grouped.min(-1, keepdims=True).astype(np.float16).astype(np.float32)
        step = ((grouped.max(-1, keepdims=True) - lo) / 15).astype(np.float16).astype(np.float32)
        q = np.clip(np.rint((grouped - lo) / step), 0, 15).astype(np.uint8)
        return np.stack([lo, step]).astype(np.float16).tobytes(), q.reshape(-1)

    mk, qk = quant(x[:, 0].transpose(0, 2, 3, 1).reshape(L, H, D, T // group, group))
    mv, qv = quant(x[:, 1].reshape(L, T, H, D // group, group))
    q = np.concatenate([qk, qv])
    body = struct.pack("<HH", group, group) + mk + mv + (q[0::2] | (q[1::2] << 4)).tobytes()
    g = ChunkGeometry(L, P, T, H, D, "bfloat16")
    return _pack_header("int4", g, g.nbytes) + body


def test_int4_writes_body_version_1_and_still_decodes_version_0() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 2, 32, 2, 16)).astype(np.float32)
    x[:, 0] += 4 * rng.standard_normal((2, 1, 2, 16)).astype(np.float32)
    x = _as_f32(_bf16(x)).reshape(x.shape)  # exactly what the chunk holds
    g = ChunkGeometry(*x.shape, "bfloat16")
    codec = make_codec({"codec": "int4", "codec_group": "16"})
    new = encode_value(codec, memoryview(_bf16(x)), g)
    header = parse_codec_header(new)
    assert header is not None and header.body_version == 1
    old = _int4_v0_value(x, 16)
    assert parse_codec_header(old).body_version == 0
    got_new, got_old = bytearray(g.nbytes), bytearray(g.nbytes)
    decode_value(memoryview(bytes(new)), memoryview(got_new))
    decode_value(memoryview(old), memoryview(got_old))
    # The same quantization in both layouts: the same decoded chunk, close to the original.
    assert got_new == got_old
    err = np.linalg.norm(_as_f32(bytes(got_new)) - x.reshape(-1)) / np.linalg.norm(x)
    assert err < 0.1


@pytest.mark.parametrize("codec_name", ["fp8", "int8", "int4"])
def test_a_body_version_this_lmcache_does_not_know_is_a_miss(codec_name: str) -> None:
    g = ChunkGeometry(2, 2, 32, 2, 16, "bfloat16")
    data = _bf16(np.random.default_rng(4).standard_normal(g.numel))
    codec = make_codec({"codec": codec_name})
    encoded = bytes(encode_value(codec, memoryview(data), g))
    header = parse_codec_header(encoded)
    assert header is not None
    future = _pack_header(codec_name, g, g.nbytes, header.body_version + 7) + encoded[header.body_offset :]
    with pytest.raises(IntegrityError, match="version"):
        decode_value(memoryview(future), memoryview(bytearray(g.nbytes)))


def _fp8_v0_value(x: np.ndarray) -> bytes:
    """An fp8 value as lmcache wrote it before body versions: float16 scales, then every token's codes."""
    import torch

    L, P, T, H, D = x.shape
    t = torch.from_numpy(x)
    sk = (t[:, 0].abs().amax(1, keepdim=True) / 448).clamp(2**-24, 65504).half().float()
    sv = (t[:, 1].abs().amax(3, keepdim=True) / 448).clamp(2**-24, 65504).half().float()
    y = torch.stack([t[:, 0] / sk, t[:, 1] / sv], 1).clamp(-448, 448)
    body = sk.half().numpy().tobytes() + sv.half().numpy().tobytes()
    body += y.to(torch.float8_e4m3fn).view(torch.uint8).numpy().tobytes()
    g = ChunkGeometry(L, P, T, H, D, "bfloat16")
    return _pack_header("fp8", g, g.nbytes) + body


def test_fp8_body_version_1_centres_keys_keeps_the_first_token_and_reads_version_0(monkeypatch) -> None:
    monkeypatch.setattr(Fp8Codec, "body_version", 1)  # version 2 is written by default (test_codec_fp8_v2.py)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 2, 64, 2, 32)).astype(np.float32)
    x[:, 0] += 6 * rng.standard_normal((3, 1, 2, 32)).astype(np.float32)  # keys: large channel offsets
    x[:, :, 0] *= 20  # a first token unlike the others (an attention sink)
    x = _as_f32(_bf16(x)).reshape(x.shape)
    g = ChunkGeometry(*x.shape, "bfloat16")
    codec = make_codec({"codec": "fp8"})
    new = bytes(encode_value(codec, memoryview(_bf16(x)), g))
    assert parse_codec_header(new).body_version == 1
    assert g.nbytes / len(new) > 1.85  # at 256 tokens: the size version 0 had
    old = _fp8_v0_value(x)
    got_new, got_old = bytearray(g.nbytes), bytearray(g.nbytes)
    decode_value(memoryview(new), memoryview(got_new))
    decode_value(memoryview(old), memoryview(got_old))
    a, b = _as_f32(bytes(got_new)).reshape(x.shape), _as_f32(bytes(got_old)).reshape(x.shape)
    assert np.array_equal(a[:, :, 0], x[:, :, 0])  # the first token, exactly
    err_new = np.linalg.norm(a[:, 0] - x[:, 0]) / np.linalg.norm(x[:, 0])
    err_old = np.linalg.norm(b[:, 0] - x[:, 0]) / np.linalg.norm(x[:, 0])
    assert err_old < 0.05 and err_new < err_old / 2  # old values still decode; centred keys are closer
