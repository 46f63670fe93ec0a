"""The codec layer's pipelined read path (lmcache.serde.layer): fetch groups, decode each as it lands.

Real Redis for the data paths: one ``get_into`` batch holding values of several codecs, and one
damaged value among many (a miss for that chunk only). The ordering test wraps a memory backend
with a gate (fault injection: one group is held back until a decode has run), which only a
pipeline that decodes before the whole batch has landed gets through.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import numpy as np
import pytest
import redis
from servers import RedisServer

from lmcache.backends.memory import MemoryBackend
from lmcache.backends.registry import open_backend
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry
from lmcache.serde import layer
from lmcache.serde.codec import decode_value, encode_value, geometry_for, get_codec, make_codec
from lmcache.serde.layer import CodecBackend

GEOM = KVGeometry(4, 2, 32, "bfloat16")
TOKENS = 64
CODECS = ["raw", "zstd", "lz4", "fp8", "int8", "int4", "cachegen"]


def key(i: int) -> CacheKey:
    salt = os.getpid().to_bytes(4, "little") + b"pipe"
    return CacheKey(GEOM.key_model("codec-pipeline"), 1, 0, salt + i.to_bytes(24, "little"), GEOM.dtype)


def kv(seed: int) -> bytes:
    """A bf16 chunk with KV-like statistics (per-channel offsets on keys)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(GEOM.chunk_shape(TOKENS), dtype=np.float32)
    x[:, 0] = x[:, 0] * 2 + rng.standard_normal((GEOM.num_layers, 1, GEOM.num_kv_heads, GEOM.head_dim)) * 4
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


def expected(codec: str, value: bytes, k: CacheKey) -> bytes:
    """What a reader gets for ``value`` written through ``codec``: the decode of its encoding."""
    enc = encode_value(get_codec(codec), memoryview(value), geometry_for(k.model, len(value)))
    if not isinstance(enc, bytes):
        return value
    out = bytearray(len(value))
    decode_value(memoryview(enc), memoryview(out))
    return bytes(out)


@pytest.fixture(params=[1, layer.READ_GROUP_BYTES], ids=["group-per-value", "default-groups"])
def group_bytes(request, monkeypatch) -> int:
    """One value per group (the pipeline at its finest) and the default grouping."""
    monkeypatch.setattr(layer, "READ_GROUP_BYTES", request.param)
    return request.param


async def test_mixed_codecs_in_one_get_batch(redis_server: RedisServer, group_bytes: int) -> None:
    """Values of seven codecs (and a miss) in one batch read through a lossy tier and a raw one."""
    keys = [key(100 + i) for i in range(2 * len(CODECS))]
    values = [kv(100 + i) for i in range(len(keys))]
    codec_of = [CODECS[i % len(CODECS)] for i in range(len(keys))]
    for codec in CODECS:
        async with open_backend(f"{redis_server.url}?codec={codec}") as b:
            mine = [i for i in range(len(keys)) if codec_of[i] == codec]
            assert all(r.ok for r in await b.put([keys[i] for i in mine], [values[i] for i in mine]))
    want = [expected(codec_of[i], values[i], keys[i]) for i in range(len(keys))]
    missing = key(999)
    try:
        for reader in ("fp8", "raw", "cachegen"):  # pipelined (not raw) and in place (raw)
            async with open_backend(f"{redis_server.url}?codec={reader}") as b:
                assert isinstance(b, CodecBackend)
                dsts = [bytearray(len(values[0])) for _ in range(len(keys) + 1)]
                got = await b.get_into([*keys[:3], missing, *keys[3:]], dsts)
                assert got[3] is None and not any(dsts[3])  # a miss leaves its dst untouched
                del got[3], dsts[3]
                assert got == [len(values[0])] * len(keys)
                assert [bytes(d) for d in dsts] == want, reader
                decoded = sum(1 for c in codec_of if c != "raw")
                assert b.stats()["codec_decoded"] == decoded
    finally:
        async with open_backend(redis_server.url) as b:
            await b.delete(keys)


async def test_one_damaged_value_among_many_is_a_miss_for_that_chunk_only(
    redis_server: RedisServer, group_bytes: int
) -> None:
    """A value whose body does not decode and one that fails its checksum: two misses, the rest read."""
    keys = [key(200 + i) for i in range(12)]
    values = [kv(200 + i) for i in range(12)]
    async with open_backend(f"{redis_server.url}?codec=fp8") as b:
        assert all(r.ok for r in await b.put(keys, values))
    # keys[4]: a well-framed value (its checksum is good) whose fp8 body is one byte short.
    async with open_backend(redis_server.url) as raw_tier:
        enc = encode_value(get_codec("fp8"), memoryview(values[4]), geometry_for(keys[4].model, len(values[4])))
        await raw_tier.delete([keys[4]])
        assert (await raw_tier.put([keys[4]], [bytes(enc)[:-1]]))[0].ok
        name = raw_tier.key_name(keys[9])
    # keys[9]: a byte of its stored frame flipped behind the backend's back.
    client = redis.Redis.from_url(redis_server.url)
    try:
        stored = client.get(name)
        client.setrange(name, len(stored) - 1, bytes([stored[-1] ^ 0xFF]))
    finally:
        client.close()
    try:
        async with open_backend(f"{redis_server.url}?codec=fp8") as b:
            dsts = [bytearray(len(values[0])) for _ in keys]
            got = await b.get_into(keys, dsts)
            assert [i for i, n in enumerate(got) if n is None] == [4, 9]
            for i in set(range(12)) - {4, 9}:
                assert bytes(dsts[i]) == expected("fp8", values[i], keys[i])
            st = b.stats()
            assert st["corrupt"] == 2 and st["codec_decoded"] == 10
    finally:
        async with open_backend(redis_server.url) as b:
            await b.delete(keys)


class _GatedMemory(MemoryBackend):
    """A memory backend whose reads of ``held`` wait for ``gate`` (set once a decode has run)."""

    held: CacheKey | None = None
    gate: asyncio.Event | None = None

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        if self.held in keys:
            assert self.gate is not None
            await self.gate.wait()
        return await super()._get_into(keys, dsts)


async def test_decode_starts_before_the_batch_has_landed_and_never_on_the_loop(monkeypatch) -> None:
    """The last value is held back until a decode has run: only a pipeline completes this read."""
    monkeypatch.setattr(layer, "READ_GROUP_BYTES", 1)
    loop = asyncio.get_running_loop()
    gate = asyncio.Event()
    threads: list[threading.Thread] = []
    real = layer.decode_value

    def spy(*args: Any, **kwargs: Any) -> int:
        threads.append(threading.current_thread())
        n = real(*args, **kwargs)
        loop.call_soon_threadsafe(gate.set)
        return n

    monkeypatch.setattr(layer, "decode_value", spy)
    inner = _GatedMemory.from_url("memory://?capacity=64MiB")
    b = CodecBackend(inner, make_codec({"codec": "int8"}))
    keys = [key(300 + i) for i in range(6)]
    values = [kv(300 + i) for i in range(6)]
    async with b:
        assert all(r.ok for r in await b.put(keys, values))
        inner.held, inner.gate = keys[-1], gate
        dsts = [bytearray(len(values[0])) for _ in keys]
        # A read that decodes only after every value has landed never opens the gate.
        got = await asyncio.wait_for(b.get_into(keys, dsts), timeout=120)
    assert got == [len(values[0])] * 6
    assert [bytes(d) for d in dsts] == [expected("int8", v, k) for v, k in zip(values, keys, strict=True)]
    assert len(threads) == 6 and threading.main_thread() not in threads
    assert all(t.name.startswith("lmcache-codec") for t in threads)


async def test_bench_tier_reads_report_client_cpu_per_gb(redis_server: RedisServer) -> None:
    """``lmcache bench codec``'s tier-read rows carry this process's CPU time per GB (load-robust)."""
    from lmcache.bench.codec import _tier_reads

    chunks = [kv(400 + i) for i in range(3)]
    reads = await _tier_reads(["raw", "fp8"], redis_server.url, chunks, GEOM.key_model("bench-cpu"), 2)
    for spec in ("raw", "fp8"):
        assert reads[spec]["read_chunks"] == 3
        assert reads[spec]["read_cpu_s_per_gb"] > 0


async def test_a_cancelled_pipelined_read_writes_nothing_after_it_returns(monkeypatch) -> None:
    """Rule 3 through the pipeline: once a cancelled ``get_into`` returns, no group lands or decodes."""
    monkeypatch.setattr(layer, "READ_GROUP_BYTES", 1)
    loop = asyncio.get_running_loop()
    decoded = asyncio.Event()
    real = layer.decode_value

    def spy(*args: Any, **kwargs: Any) -> int:
        n = real(*args, **kwargs)
        loop.call_soon_threadsafe(decoded.set)
        return n

    monkeypatch.setattr(layer, "decode_value", spy)
    inner = _GatedMemory.from_url("memory://?capacity=64MiB")
    b = CodecBackend(inner, make_codec({"codec": "fp8"}))
    keys = [key(500 + i) for i in range(5)]
    values = [kv(500 + i) for i in range(5)]
    async with b:
        assert all(r.ok for r in await b.put(keys, values))
        gate = asyncio.Event()
        inner.held, inner.gate = keys[3], gate
        dsts = [bytearray(len(values[0])) for _ in keys]
        task = asyncio.ensure_future(b.get_into(keys, dsts))
        await asyncio.wait_for(decoded.wait(), timeout=120)  # a first group decoded; the fourth is held back
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        before = [bytes(d) for d in dsts]
        gate.set()  # what was held may now land: nothing may write into the caller's buffers
        layer.codec_executor().submit(lambda: None).result()  # the decode pool has drained
        await asyncio.sleep(0)
        assert [bytes(d) for d in dsts] == before
        assert not any(dsts[3])  # the held group never landed
        inner.held = None
        # The layer still reads normally afterwards (staging buffers handed back, nothing stuck).
        got = await b.get_into(keys, [bytearray(len(values[0])) for _ in keys])
        assert got == [len(values[0])] * 5


def test_staging_keeps_a_bounded_number_of_buffers() -> None:
    staging = layer._Staging(2)
    bufs = [staging.take(n) for n in (10, 30, 20)]
    for buf in bufs:
        staging.give(buf)
    assert sorted(b.size for b in staging._free) == [20, 30]  # the two largest kept
    assert staging.take(25).size == 30 and staging.take(5).size == 20
    assert staging.take(100).size == 100  # none large enough: a new one
    staging.clear()
    assert not staging._free
