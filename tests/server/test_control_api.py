"""The HTTP control API, its CLI (``lmcache server-ctl``) and Prometheus /metrics, on a real server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.request
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from conftest import LMServer, start_lm_server

import lmcache
from lmcache.cli import main as cli_main
from lmcache.keys import CacheKey, ChunkHasher, KeyScope
from lmcache.server.ctl import local_token

VALUE = 1 << 20


@pytest.fixture(scope="module")
def two_tier_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    """Tier 0: 6 MiB of memory (room for 5 values); tier 1: a file tier."""
    folder = tmp_path_factory.mktemp("lm-two-tier")
    server = start_lm_server(folder, ["memory://?capacity=6MiB", f"file://{folder / 'files'}?capacity=256MiB"])
    try:
        yield server
    finally:
        server.proc.stop()


@pytest_asyncio.fixture
async def client(two_tier_server: LMServer) -> AsyncIterator[lmcache.StorageBackend]:
    b = lmcache.open_backend(two_tier_server.url("lm+unix"))
    async with b:
        yield b


def _authorized(req: urllib.request.Request) -> urllib.request.Request:
    """Add the token a same-user client finds in the server's token file for the HTTP port."""
    token = local_token(req.full_url)
    assert token, "the server wrote no token file for its HTTP port"
    req.add_header("Authorization", f"Bearer {token}")
    return req


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(_authorized(urllib.request.Request(url)), timeout=10) as resp:
        return resp.status, resp.read().decode()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(_authorized(req), timeout=30) as resp:
        return json.loads(resp.read())


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _keys(n: int, model: str = "ctl") -> list[CacheKey]:
    return [CacheKey(model, 1, 0, os.urandom(32), "uint8") for _ in range(n)]


async def test_health_and_stats(two_tier_server: LMServer) -> None:
    code, text = _get(two_tier_server.http + "/health")
    body = json.loads(text)
    assert code == 200 and body["status"] == "ok" and len(body["tiers"]) == 2
    stats = json.loads(_get(two_tier_server.http + "/stats")[1])
    assert {"server", "backend"} <= set(stats) and len(stats["backend"]["tiers"]) == 2


async def test_lookup_by_tokens_reports_hits_per_tier(two_tier_server: LMServer, client) -> None:
    tokens = list(range(1000, 1000 + 3 * 256 + 17))
    scope = KeyScope.create("lookup-model", tags={"tenant": "a"})
    keys = ChunkHasher(256).keys(tokens, scope)
    assert len(keys) == 3
    await client.put(keys[:2], [b"x" * 100, b"y" * 100])
    body = {"tokens": tokens, "model": "lookup-model", "tags": {"tenant": "a"}}
    got = _post(two_tier_server.http + "/lookup", body)
    assert got["chunks"] == 3 and got["hit_chunks"] == 2 and got["hit_tokens"] == 512
    assert got["tiers"][0]["hit_tokens"] == 512
    by_keys = _post(two_tier_server.http + "/lookup", {"keys": [k.to_string() for k in keys]})
    assert by_keys["hit_chunks"] == 2
    other_tenant = _post(two_tier_server.http + "/lookup", {**body, "tags": {"tenant": "b"}})
    assert other_tenant["hit_chunks"] == 0


async def test_stats_count_gets_served_over_shared_memory(two_tier_server: LMServer, client) -> None:
    if not client.pool_active:
        pytest.skip("no shared memory here (/dev/shm): gets go over the socket")
    keys = _keys(3)
    await client.put(keys, [os.urandom(4096)] * 3)
    before = json.loads(_get(two_tier_server.http + "/stats")[1])["backend"]
    dsts = [bytearray(4096) for _ in range(4)]
    assert await client.get_into(keys + _keys(1), dsts) == [4096, 4096, 4096, None]
    after = json.loads(_get(two_tier_server.http + "/stats")[1])["backend"]
    assert after["get_requests"] - before["get_requests"] == 4
    assert after["hits"] - before["hits"] == 3
    assert after["misses"] - before["misses"] == 1
    assert after["bytes_read"] - before["bytes_read"] >= 3 * 4096  # stored frames: header + value
    assert after["tiers"][0]["hits"] - before["tiers"][0]["hits"] == 3
    _, text = _get(two_tier_server.http + "/metrics")
    for name in ("skipped", "lookup_failures", "get_failures", "put_failures"):  # fault counters are exported
        assert re.search(rf'^lmcache_tier_{name}_total{{tier="1",', text, re.M), name


async def test_pinned_keys_survive_eviction(two_tier_server: LMServer, client) -> None:
    pinned, others = _keys(1), _keys(12)
    await client.put(pinned, [os.urandom(VALUE)])
    got = _post(two_tier_server.http + "/pin", {"keys": [pinned[0].to_string()], "ttl": 600})
    assert got["pinned"] == 1
    for k in others:  # 12 MiB through a 6 MiB tier 0: everything unpinned is evicted from it
        assert (await client.put([k], [os.urandom(VALUE)]))[0].ok
    per_tier = _post(two_tier_server.http + "/lookup", {"keys": [pinned[0].to_string(), others[0].to_string()]})
    assert per_tier["tiers"][0]["hit_chunks"] == 1  # the pinned key is still in memory
    first = _post(two_tier_server.http + "/lookup", {"keys": [others[0].to_string()]})
    assert first["tiers"][0]["hit_chunks"] == 0  # an unpinned early key was evicted from memory
    assert _post(two_tier_server.http + "/unpin", {"keys": [pinned[0].to_string()]})["unpinned"] == 1


async def test_move_between_tiers(two_tier_server: LMServer, client) -> None:
    keys = _keys(2)
    await client.put(keys, [os.urandom(1000), os.urandom(2000)])
    await client.ping()
    # Wait for write-back into the file tier, then move both out of memory into tier 1 only.
    for _ in range(100):
        look = _post(two_tier_server.http + "/lookup", {"keys": [k.to_string() for k in keys]})
        if look["tiers"][1]["hit_chunks"] == 2:
            break
        await asyncio.sleep(0.05)
    moved = _post(two_tier_server.http + "/move", {"keys": [k.to_string() for k in keys], "to_tier": 1, "from_tier": 0})
    assert moved["moved"] == 2
    look = _post(two_tier_server.http + "/lookup", {"keys": [k.to_string() for k in keys]})
    assert look["tiers"][0]["hit_chunks"] == 0 and look["tiers"][1]["hit_chunks"] == 2
    back = _post(
        two_tier_server.http + "/move", {"keys": [k.to_string() for k in keys], "to_tier": 0, "keep_source": True}
    )
    assert back["moved"] == 2
    look = _post(two_tier_server.http + "/lookup", {"keys": [k.to_string() for k in keys]})
    assert look["tiers"][0]["hit_chunks"] == 2


async def test_clear_by_model(two_tier_server: LMServer, client) -> None:
    doomed, kept = _keys(3, "clear-me"), _keys(2, "keep-me")
    await client.put(doomed + kept, [b"d"] * 3 + [b"k"] * 2)
    got = _post(two_tier_server.http + "/clear", {"model": "clear-me"})
    assert got["cleared"] >= 3
    assert await client.contains(doomed + kept) == [False] * 3 + [True] * 2


async def test_metrics_move_after_operations(two_tier_server: LMServer, client) -> None:
    _, before = _get(two_tier_server.http + "/metrics")
    keys = _keys(3)
    await client.put(keys, [os.urandom(4096)] * 3)
    dsts = [bytearray(4096) for _ in range(4)]
    await client.get_into(keys + _keys(1), dsts)
    _, after = _get(two_tier_server.http + "/metrics")
    assert _metric(after, "lmcache_requests_total", op="put") >= _metric(before, "lmcache_requests_total", op="put") + 1
    assert _metric(after, "lmcache_hit_requests_total") >= _metric(before, "lmcache_hit_requests_total") + 3
    assert _metric(after, "lmcache_miss_requests_total") >= _metric(before, "lmcache_miss_requests_total") + 1
    assert _metric(after, "lmcache_hit_tokens_total") >= _metric(before, "lmcache_hit_tokens_total") + 3 * 256
    assert (
        _metric(after, "lmcache_bytes_total", op="put") >= _metric(before, "lmcache_bytes_total", op="put") + 3 * 4096
    )
    assert _metric(after, "lmcache_request_seconds_count", op="get") > _metric(
        before, "lmcache_request_seconds_count", op="get"
    )
    assert _metric(after, "lmcache_tier_bytes_written_total", tier="0") > _metric(
        before, "lmcache_tier_bytes_written_total", tier="0"
    )
    assert _metric(after, "lmcache_tier_evictions_total", tier="0") >= 1  # earlier tests overfilled tier 0
    assert _metric(after, "lmcache_tier_seconds_count", tier="0", op="put") > _metric(
        before, "lmcache_tier_seconds_count", tier="0", op="put"
    )
    assert (
        _metric(after, "lmcache_tier_value_bytes_sum", tier="0", op="get")
        >= _metric(before, "lmcache_tier_value_bytes_sum", tier="0", op="get") + 3 * 4096
    )
    assert _metric(after, "lmcache_server_resident_bytes") > 0
    assert re.search(r"^lmcache_server_sessions \d", after, re.M)


def test_server_ctl_cli(two_tier_server: LMServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["server-ctl", "health", "--url", two_tier_server.http]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "ok"
    key = _keys(1)[0].to_string()
    assert cli_main(["server-ctl", "pin", "--url", two_tier_server.http, "--key", key, "--ttl", "30"]) == 0
    assert json.loads(capsys.readouterr().out)["pinned"] == 1
    assert cli_main(["server-ctl", "lookup", "--url", two_tier_server.http, "--tokens", "1,2,3", "--model", "m"]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == 0
    assert cli_main(["server-ctl", "move", "--url", two_tier_server.http, "--key", key, "--to-tier", "9"]) == 2
    assert "no such tier" in capsys.readouterr().err
    assert cli_main(["server-ctl", "stats", "--url", two_tier_server.http]) == 0
    assert json.loads(capsys.readouterr().out)["server"]["pinned_keys"] >= 1
