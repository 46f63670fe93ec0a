"""Tests of ``redis+cluster://`` against a real 3-primary Redis Cluster (tests/servers.py makes it)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import AsyncIterator

import pytest
import redis
from lmcache_conformance import BackendTests
from redis.cluster import ClusterNode, RedisCluster

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.redis_cluster import RedisClusterBackend
from lmcache.backends.registry import open_backend
from lmcache.errors import BackendUnavailableError, ConfigError
from lmcache.keys import CacheKey

MiB = 1 << 20


def key(i: int) -> CacheKey:
    return CacheKey("test-model", 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


def unique_prefix() -> str:
    return f"lmcache:t-{uuid.uuid4().hex[:10]}:"


def raw_cluster(b: RedisClusterBackend) -> RedisCluster:
    s = b.settings
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in s.nodes], username=s.username, password=s.password)


@contextlib.asynccontextmanager
async def opened(url: str, **overrides: object) -> AsyncIterator[RedisClusterBackend]:
    b = open_backend(url, **overrides)
    assert isinstance(b, RedisClusterBackend)
    try:
        await b.open()
        yield b
    finally:
        await b.aclose()


class TestRedisClusterConformance(BackendTests):
    """The shared suite against the cluster; each test gets its own key prefix."""

    # Payloads are received straight into dst: a cancelled get may leave part of a value there.
    cancelled_dst_all_or_nothing = False

    @pytest.fixture
    def backend_url(self, redis_cluster_url: str) -> str:
        return RedisClusterBackend.from_url(redis_cluster_url, prefix=unique_prefix()).url

    @pytest.fixture
    def secret_url(self) -> str:
        return "redis+cluster://alice:cluster-pw@127.0.0.1:7000,127.0.0.1:7001"

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        assert isinstance(backend, RedisClusterBackend)
        raw = raw_cluster(backend)
        try:
            return raw.get(backend.key_name(key))
        finally:
            raw.close()

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        assert isinstance(backend, RedisClusterBackend)
        raw = raw_cluster(backend)
        try:
            raw.set(backend.key_name(key), data)
        finally:
            raw.close()

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, RedisClusterBackend)
        name = backend.key_name(key)
        raw = raw_cluster(backend)
        try:
            stored = raw.get(name)
            assert stored is not None
            raw.set(name, stored[: len(stored) // 2])  # truncated
        finally:
            raw.close()


async def test_values_spread_over_every_primary(redis_cluster_url: str) -> None:
    n = 60
    async with opened(redis_cluster_url, prefix=unique_prefix(), max_batch_bytes=64 * 1024) as b:
        keys = [key(i) for i in range(n)]
        vals = [value(i, 10_000 + i) for i in range(n)]
        assert [r.status for r in await b.put(keys, vals)] == [PutStatus.STORED] * n
        dsts = [bytearray(20_000) for _ in keys]
        assert await b.get_into(keys, dsts) == [len(v) for v in vals]
        assert all(bytes(d[: len(v)]) == v for d, v in zip(dsts, vals, strict=True))
        # Each primary holds some of them (key names carry no hash tag).
        per_node = []
        for host, port in b.settings.nodes:
            with redis.Redis(host=host, port=port) as node:
                per_node.append(sum(1 for _ in node.scan_iter(match=b.settings.prefix + "*")))
        assert sum(per_node) == n
        assert all(c > 0 for c in per_node), per_node
        listed = sorted([k async for k in b.list_keys()], key=str)
        assert listed == sorted(keys, key=str)
        await b.delete(keys[::2])
        assert await b.contains(keys[:4]) == [False, True, False, True]


async def test_any_one_startup_node_finds_the_cluster(redis_cluster_url: str) -> None:
    full = RedisClusterBackend.from_url(redis_cluster_url)
    host, port = full.settings.nodes[-1]
    await full.aclose()
    prefix = unique_prefix()
    async with (
        opened(f"redis+cluster://{host}:{port}", prefix=prefix) as one,
        opened(redis_cluster_url, prefix=prefix) as everyone,
    ):
        await one.put([key(i) for i in range(20)], [b"v%d" % i for i in range(20)])
        assert await everyone.contains([key(i) for i in range(21)]) == [True] * 20 + [False]


async def test_large_values_across_nodes(redis_cluster_url: str) -> None:
    n, size = 12, 2 * MiB
    async with opened(
        redis_cluster_url, prefix=unique_prefix(), max_batch_bytes=4 * MiB, max_inflight_bytes=8 * MiB
    ) as b:
        keys = [key(i) for i in range(n)]
        vals = [value(i, size) for i in range(n)]
        assert all(r.status is PutStatus.STORED for r in await b.put(keys, vals))
        dsts = [bytearray(size) for _ in keys]
        assert await b.get_into(keys, dsts) == [size] * n
        assert dsts == [bytearray(v) for v in vals]


def test_url_forms() -> None:
    b = RedisClusterBackend.from_url("redis+cluster://u:p%3Aw@h1:7000,h2:7001,[::1]:7002/?prefix=a%3A&timeout=3")
    s = b.settings
    assert s.nodes == (("h1", 7000), ("h2", 7001), ("::1", 7002))
    assert (s.username, s.password, s.prefix, s.timeout) == ("u", "p:w", "a:", 3.0)
    assert RedisClusterBackend.from_url(b.url).settings == s
    assert "p:w" not in repr(b) and "p%3Aw" not in repr(b)
    assert isinstance(open_backend("redis+cluster://h:1"), RedisClusterBackend)


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",
        "redis+cluster://h1:7000,h2",
        "redis+cluster://h1:7000,h2:notaport",
        "redis+cluster://h1:70000",
        "redis+cluster://h1:7000/3",
        "redis+cluster://h1:7000?db=1",
        "redis+cluster://h1:7000?bogus=1",
        "redis+cluster://h1:7000?ssl_ca_certs=%2Fca.pem",
    ],
)
def test_bad_cluster_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisClusterBackend.from_url(url)


async def test_unreachable_cluster_is_unavailable() -> None:
    from servers import free_port

    b = RedisClusterBackend.from_url(
        f"redis+cluster://127.0.0.1:{free_port()},127.0.0.1:{free_port()}", connect_timeout=0.5, retries=0
    )
    with pytest.raises(BackendUnavailableError):
        await asyncio.wait_for(b.open(), 60)
    await b.aclose()


async def test_busy_cluster_waits_instead_of_failing(redis_cluster_url: str) -> None:
    # A cluster node's pool raises MaxConnectionsError when exhausted: the backend must queue.
    async with opened(redis_cluster_url, prefix=unique_prefix(), max_connections=2) as b:

        async def worker(i: int) -> None:
            await b.put([key(i), key(1000 + i)], [value(i, 20_000), value(1000 + i, 100)])
            dst = bytearray(20_000)
            assert await b.get_into([key(i)], [dst]) == [20_000]
            assert dst == value(i, 20_000)
            await b.ping()

        async def lister() -> int:
            return sum([1 async for _ in b.list_entries()])

        results = await asyncio.gather(*(worker(i) for i in range(48)), lister(), lister())
        assert all(isinstance(n, int) for n in results[-2:])
        assert b.stats()["hits"] == 48
