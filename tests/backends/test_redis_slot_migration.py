"""``redis+cluster://`` during a real slot migration: ``ASK`` while a slot moves, ``MOVED`` after.

A private 3-primary cluster (three local ``redis-server`` processes, this module's own: the test
moves a slot and must not disturb the session's shared cluster) migrates one slot the way
``redis-cli --cluster reshard`` does: ``CLUSTER SETSLOT <slot> IMPORTING`` on the target,
``MIGRATING`` on the source, ``MIGRATE … KEYS`` of part of the slot's keys, and at the end
``CLUSTER SETSLOT <slot> NODE <target>`` on every primary. Every key of the test shares one slot
through a hash tag in the key prefix. The backend's slot map is left stale on purpose: every
redirection it sees is one the servers really sent.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from redis.crc import key_slot
from servers import READY_TIMEOUT, ServerProcess, free_port, port_is_free, redis_server_binary, start_redis, wait_for

from lmcache.backends.base import PutStatus
from lmcache.backends.redis_cluster import RedisClusterBackend
from lmcache.backends.registry import open_backend
from lmcache.keys import CacheKey

KiB = 1 << 10


def key(i: int) -> CacheKey:
    return CacheKey("slot-migration", 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int) -> bytes:
    # Sizes on both sides of the data path's 64 KiB read buffer.
    return random.Random(i).randbytes(1000 + 97 * KiB * (i % 3))


def _cluster_ok(cli: str, port: int) -> bool:
    out = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        check=False,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout
    return "cluster_state:ok" in out


@pytest.fixture(scope="module")
def private_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Ports of a fresh 3-primary cluster that only this module uses (it moves slots around)."""
    binary = redis_server_binary()
    cli = shutil.which("redis-cli")
    if binary is None or cli is None:
        pytest.skip("a slot migration needs a local redis-server and redis-cli: apt-get install -y redis-server")
    tmp = tmp_path_factory.mktemp("redis-migration")
    procs: list[ServerProcess] = []
    try:
        for i in range(3):
            port = free_port(lambda p: p + 10000 < 65536 and port_is_free(p + 10000))
            node_dir = tmp / f"node{i}"
            node_dir.mkdir()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(port + 10000),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            procs.append(start_redis(binary, node_dir, port=port, args=args, name="migration"))
        ports = [p.port for p in procs]
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in ports],
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for port in ports:
            wait_for(lambda port=port: _cluster_ok(cli, port), READY_TIMEOUT, f"cluster node {port}")
        yield ports  # type: ignore[misc]
    finally:
        for p in procs:
            p.stop()


@contextlib.asynccontextmanager
async def opened(url: str, **overrides: object) -> AsyncIterator[RedisClusterBackend]:
    b = open_backend(url, **overrides)
    assert isinstance(b, RedisClusterBackend)
    try:
        await b.open()
        yield b
    finally:
        await b.aclose()


def _node_id(node: redis.Redis) -> str:
    return str(node.execute_command("CLUSTER", "MYID"), "ascii")


def _owner(node: redis.Redis, slot: int) -> int:
    """The port of the primary that serves ``slot``, as ``node`` sees the cluster."""
    for start, end, primary, *_ in node.execute_command("CLUSTER", "SLOTS"):
        if start <= slot <= end:
            return int(primary[1])
    raise AssertionError(f"slot {slot} is not served")


def _exists_or_ask(node: redis.Redis, name: bytes) -> int | str:
    """``EXISTS`` on a node; ``"ASK"`` where it redirects (a key of a migrating slot it no longer has)."""
    try:
        return int(node.exists(name))
    except redis.exceptions.AskError:
        return "ASK"


def _asking_exists(port: int, name: bytes) -> bool:
    """``EXISTS`` on a node importing the slot (after ``ASKING``, on the same connection)."""
    conn = redis.Connection(host="127.0.0.1", port=port)
    try:
        conn.send_command("ASKING")
        assert conn.read_response() == b"OK"
        conn.send_command("EXISTS", name)
        return bool(conn.read_response())
    finally:
        conn.disconnect()


async def test_get_and_put_follow_a_real_slot_migration(private_cluster: list[int]) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in private_cluster)
    prefix = f"lmcache:{{mig-{uuid.uuid4().hex[:8]}}}:"  # the hash tag puts every key in one slot
    nodes = {p: redis.Redis(host="127.0.0.1", port=p) for p in private_cluster}
    try:
        async with opened(url, prefix=prefix, max_batch_bytes=256 * KiB, connections=2) as b:
            keys = [key(i) for i in range(14)]
            vals = [value(i) for i in range(14)]
            names = [b.key_name(k) for k in keys]
            slot = key_slot(names[0])
            assert {key_slot(n) for n in names} == {slot}
            src_port = _owner(nodes[private_cluster[0]], slot)
            dst_port = next(p for p in private_cluster if p != src_port)
            src, dst = nodes[src_port], nodes[dst_port]
            src_id, dst_id = _node_id(src), _node_id(dst)

            assert [r.status for r in await b.put(keys[:8], vals[:8])] == [PutStatus.STORED] * 8
            assert src.exists(*names[:8]) == 8

            # The migration starts; keys 0-3 move, keys 4-7 stay on the source for now.
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *names[:4])
            # (one key per EXISTS: a multi-key command in a slot being migrated gets TRYAGAIN)
            assert [_exists_or_ask(src, n) for n in names[:8]] == ["ASK"] * 4 + [1] * 4
            assert all(_asking_exists(dst_port, n) for n in names[:4])

            # Reads of moved keys get ASK from the source and are served by the target.
            dsts = [bytearray(len(v) + 10) for v in vals[:8]]
            assert await b.get_into(keys[:8], dsts) == [len(v) for v in vals[:8]]
            assert all(bytes(d[: len(v)]) == v for d, v in zip(dsts, vals, strict=False))
            # A key in neither place is a miss (ASK, then nil on the target), not an error.
            assert await b.get_into([keys[13]], [bytearray(10)]) == [None]
            assert await b.contains([*keys[:8], keys[13]]) == [True] * 8 + [False]

            # New keys of a migrating slot are refused by the source (ASK) and land on the target.
            assert [r.status for r in await b.put(keys[8:11], vals[8:11])] == [PutStatus.STORED] * 3
            assert [_exists_or_ask(src, n) for n in names[8:11]] == ["ASK"] * 3
            assert all(_asking_exists(dst_port, n) for n in names[8:11])
            # First writer wins on either side: a key still on the source, one already moved.
            results = await b.put([keys[5], keys[1]], [vals[5], vals[1]])
            assert [r.status for r in results] == [PutStatus.EXISTS, PutStatus.EXISTS]

            # The migration ends; the backend's slot map still names the source: MOVED, refresh.
            src.execute_command("MIGRATE", "127.0.0.1", dst_port, "", 0, 5000, "KEYS", *names[4:8])
            for node in nodes.values():
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            with pytest.raises(redis.exceptions.MovedError):
                src.exists(names[0])
            assert dst.exists(*names) == 11

            dsts = [bytearray(len(v)) for v in vals[:11]]
            assert await b.get_into(keys[:11], dsts) == [len(v) for v in vals[:11]]
            assert [bytes(d) for d in dsts] == vals[:11]
            assert [r.status for r in await b.put(keys[11:13], vals[11:13])] == [PutStatus.STORED] * 2
            assert dst.exists(*names[11:13]) == 2
            assert await b.contains(keys) == [True] * 13 + [False]
            assert sorted([k async for k in b.list_keys()], key=str) == sorted(keys[:13], key=str)
            await b.delete(keys)
            assert dst.exists(*names) == 0
    finally:
        for node in nodes.values():
            node.close()
