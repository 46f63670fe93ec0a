"""``lmcache bench backend`` on ``redis://`` and ``unix://``: the raw redis-py baseline runs next to the backend.

Real server (the session ``redis_server`` fixture), real CLI in a subprocess; no timing thresholds.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
from servers import RedisServer

from lmcache.backends.registry import open_backend
from lmcache.bench import backend as bench_backend
from lmcache.bench.backend import Workload
from lmcache.bench.baselines.redis import RawRedisBaseline, WireBaseline, make

SMALL = ["--value-size", "1MiB", "--total", "16MiB", "--repeat", "1", "--keys-tokens", "0"]


def run_bench(url: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache", "bench", "backend", "--url", url, *SMALL, "--json", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "raw-redis-py" in proc.stdout
    assert "backend / wire: put" in proc.stdout
    return json.loads(out.read_text())


def check_with_raw_baseline(data: dict[str, Any]) -> None:
    assert data["baseline"]["name"] == "raw-redis-py"
    assert data["params"]["value_size"] == 1 << 20
    assert data["params"]["count"] == 16
    # The wire ceiling (a raw-socket RESP client) runs in the same rounds.
    assert [e["name"] for e in data["extra_baselines"]] == ["wire"]
    for system in ("backend", "baseline", "wire"):
        for op in ("put", "get"):
            m = data["median"][system][op]
            assert m["gbps"] > 0
            assert 0 < m["p50_ms"] <= m["p99_ms"]
    for op in ("put", "get"):
        assert data["ratio"][f"{op}_gbps"] > 0
        assert data["ratio"][f"{op}_gbps_vs_wire"] > 0
    # Every system ran in every round, warmup included.
    assert len(data["rounds"]) == 2
    for r in data["rounds"]:
        assert sorted(r["order"]) == ["backend", "baseline", "wire"]


def keys_left(url: str) -> list[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return list(client.scan_iter(match="lmcache:*"))
    finally:
        client.close()


def test_redis_url_runs_raw_redis_py_baseline(redis_server: RedisServer, tmp_path: Path) -> None:
    before = set(keys_left(redis_server.url))
    data = run_bench(redis_server.url, tmp_path / "redis.json")
    check_with_raw_baseline(data)
    assert data["scheme"] == "redis"
    assert data["baseline"]["max_connections"] == 16  # the backend's default pool size
    # Neither the backend's nor the baseline's keys are left behind.
    assert set(keys_left(redis_server.url)) <= before


def test_unix_url_runs_raw_redis_py_baseline(redis_server: RedisServer, tmp_path: Path) -> None:
    sock = redis_server.extra.get("unix")
    if not sock:
        pytest.skip("the Redis server under test has no local Unix socket")
    data = run_bench(f"unix://{sock}?db=3&max_connections=4", tmp_path / "unix.json")
    check_with_raw_baseline(data)
    assert data["scheme"] == "unix"
    assert data["baseline"]["max_connections"] == 4  # follows the URL's pool size


def test_baseline_registered_for_every_standalone_scheme() -> None:
    for scheme in ("redis", "rediss", "unix", "valkey", "valkeys"):
        assert scheme in bench_backend.baseline_schemes()
    assert "redis+cluster" not in bench_backend.baseline_schemes()


def test_make_follows_backend_settings_and_declines_others() -> None:
    w = Workload(4096, 2, 1)
    b = open_backend("redis://127.0.0.1:6399/0?max_connections=3&max_batch_bytes=8KiB&max_batch_keys=7")
    made = make(b, w)
    assert made is not None
    base, wire = made
    assert isinstance(base, RawRedisBaseline)
    info = base.describe()
    assert (info["max_connections"], info["max_batch_bytes"], info["max_batch_keys"]) == (3, 8192, 7)
    assert isinstance(wire, WireBaseline)
    assert wire.describe()["connections"] == 3  # the backend's connections, capped by max_connections
    assert make(open_backend("redis+cluster://127.0.0.1:7000"), w) is None
    assert make(open_backend("memory://"), w) is None


# ---------------------------------------------------------------------------------------------
# The wire baseline's sockets: the backend's own setup (connect_socket), RESP of its own on them


def _resp(sock: Any, *args: bytes) -> bytes:
    sock.sendall(b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args))
    return sock.recv(256)


def test_connect_socket_is_authenticated_and_on_the_database(redis_acl_server: RedisServer) -> None:
    # The default user is off on this server: a socket without AUTH would get NOAUTH.
    b = open_backend(redis_acl_server.url.replace("/0", "/2"))
    sock = b.connect_socket()
    try:
        assert _resp(sock, b"PING") == b"+PONG\r\n"
        assert _resp(sock, b"SET", b"lmcache:wire-db-probe", b"x") == b"+OK\r\n"
    finally:
        sock.close()
    client = redis.Redis.from_url(redis_acl_server.url.replace("/0", "/2"))
    try:
        assert client.get("lmcache:wire-db-probe") == b"x"  # SELECT 2 happened on the socket
        client.delete("lmcache:wire-db-probe")
    finally:
        client.close()


async def test_connect_socket_speaks_tls_and_the_wire_baseline_runs_on_it(redis_tls_server: RedisServer) -> None:
    b = open_backend(redis_tls_server.url, ssl_ca_certs=redis_tls_server.extra["ca"], connections=2)
    sock = b.connect_socket()
    try:
        assert isinstance(sock, ssl.SSLSocket)
        assert _resp(sock, b"PING") == b"+PONG\r\n"
    finally:
        sock.close()
    w = Workload(8192, 4, 2)
    made = make(b, w)
    assert made is not None
    wire = made[1]
    await wire.open()
    try:
        for slots in w.batches:
            await wire.put_batch(slots, [w.srcs[s] for s in slots])
        lengths: list[int | None] = []
        for slots in w.batches:
            lengths += await wire.get_batch(slots, [w.dsts[s] for s in slots])
        w.verify("wire over TLS", lengths)
        await wire.end_round()
    finally:
        await wire.aclose()
