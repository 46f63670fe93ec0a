"""The codec layer's read trace (``CodecBackend.read_trace``): per-group debug timings of pipelined reads.

Real Redis: a cachegen tier read with the trace on records one group per value (groups of one
value here), in the pipeline's order of events; a damaged value and a missing one still leave a
record (the damaged one decoded and failed: a miss for that chunk only; the missing one had
nothing to decode). The bench's tier reads report the trace's summary.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from servers import RedisServer

from lmcache.backends.registry import open_backend
from lmcache.bench.codec import _tier_reads, read_trace_summary
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry
from lmcache.serde import layer
from lmcache.serde.codec import encode_value, geometry_for, get_codec
from lmcache.serde.layer import CodecBackend

GEOM = KVGeometry(4, 2, 32, "bfloat16")
TOKENS = 64


def key(i: int) -> CacheKey:
    salt = os.getpid().to_bytes(4, "little") + b"trce"
    return CacheKey(GEOM.key_model("codec-trace"), 1, 0, salt + i.to_bytes(24, "little"), GEOM.dtype)


def kv(seed: int) -> bytes:
    """A bf16 chunk with KV-like statistics (per-channel offsets on keys)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(GEOM.chunk_shape(TOKENS), dtype=np.float32)
    x[:, 0] = x[:, 0] * 2 + rng.standard_normal((GEOM.num_layers, 1, GEOM.num_kv_heads, GEOM.head_dim)) * 4
    bits = x.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()


@pytest.fixture
def one_value_groups(monkeypatch) -> None:
    """One value per group: a group's record is that value's."""
    monkeypatch.setattr(layer, "READ_GROUP_BYTES", 1)


async def test_a_traced_read_records_each_group_in_pipeline_order(
    redis_server: RedisServer, one_value_groups: None
) -> None:
    keys = [key(i) for i in range(6)]
    values = [kv(i) for i in range(6)]
    codec = get_codec("cachegen")
    sizes = [
        len(encode_value(codec, memoryview(v), geometry_for(k.model, len(v))))
        for k, v in zip(keys, values, strict=True)
    ]
    missing = key(99)
    async with open_backend(f"{redis_server.url}?codec=cachegen") as b:
        assert isinstance(b, CodecBackend)
        try:
            assert all(r.ok for r in await b.put(keys, values))
            dsts = [bytearray(len(values[0])) for _ in range(7)]
            assert b.read_trace is None
            await b.get_into(keys[:1], dsts[:1])  # off by default: nothing recorded anywhere
            assert b.read_trace is None
            b.read_trace = []
            got = await b.get_into([*keys, missing], dsts)
            assert got == [len(values[0])] * 6 + [None]
            trace = sorted(b.read_trace, key=lambda r: r["group"])
            assert [r["group"] for r in trace] == list(range(7))
            for r, n in zip(trace[:6], sizes, strict=True):
                assert r["values"] == 1 and r["wire_bytes"] == n
                # fetched, then decoded on a worker, then settled on the loop
                assert 0 <= r["wire_start"] <= r["wire_end"] <= r["decode_start"] <= r["decode_end"] <= r["done"]
                assert r["decode_cpu"] >= 0
            assert trace[6]["wire_bytes"] == 0 and "decode_start" not in trace[6]  # the miss: nothing to decode
            summary = read_trace_summary(b.read_trace)
            assert summary["total"] == max(r["done"] for r in trace)
            assert summary["decode_cpu"] == pytest.approx(sum(r["decode_cpu"] for r in trace[:6]))
            assert 0 <= summary["first_landed"] <= summary["total"] and summary["tail"] >= 0
        finally:
            await b.delete(keys)


async def test_a_damaged_value_is_traced_and_a_miss_for_that_chunk_only(
    redis_server: RedisServer, one_value_groups: None
) -> None:
    keys = [key(10 + i) for i in range(5)]
    values = [kv(10 + i) for i in range(5)]
    async with open_backend(f"{redis_server.url}?codec=cachegen") as b:
        assert isinstance(b, CodecBackend)
        try:
            assert all(r.ok for r in await b.put(keys, values))
            # keys[2]: a well-framed value (its checksum is good) whose cachegen body is cut short.
            async with open_backend(redis_server.url) as raw_tier:
                geometry = geometry_for(keys[2].model, len(values[2]))
                enc = bytes(encode_value(get_codec("cachegen"), memoryview(values[2]), geometry))
                await raw_tier.delete([keys[2]])
                assert (await raw_tier.put([keys[2]], [enc[: len(enc) // 2]]))[0].ok
            b.read_trace = []
            dsts = [bytearray(len(values[0])) for _ in keys]
            got = await b.get_into(keys, dsts)
            assert [i for i, n in enumerate(got) if n is None] == [2]
            assert b.stats()["corrupt"] == 1
            trace = sorted(b.read_trace, key=lambda r: r["group"])
            assert len(trace) == 5 and all("decode_end" in r for r in trace)  # the damaged one was tried
        finally:
            await b.delete(keys)


async def test_bench_tier_reads_report_where_the_time_goes(redis_server: RedisServer) -> None:
    """``lmcache bench codec``'s tier-read rows carry the trace summary for codec tiers, none for raw."""
    chunks = [kv(40 + i) for i in range(3)]
    reads = await _tier_reads(["raw", "cachegen"], redis_server.url, chunks, GEOM.key_model("bench-trace"), 2)
    assert "read_trace_ms" not in reads["raw"]  # a raw tier reads in place: no pipeline to trace
    t = reads["cachegen"]["read_trace_ms"]
    assert set(t) == {"first_landed", "wire_busy", "decode_cpu", "decode_wall", "worker_wait_max", "tail", "total"}
    assert t["decode_cpu"] > 0 and t["total"] >= t["first_landed"]
