"""What an acknowledged put to ``lmcache server`` is worth: ``ack=durable`` and ``ack=memory``.

* ``ack=durable`` (the server's ``--ack durable`` or a client's ``?ack=durable``): a put returns
  once its values are on the server's last persistent tier, so after a SIGKILL of the server a
  new server over the same ``file://`` directory serves every acknowledged value, byte for byte.
* ``ack=memory`` (the default): a put returns once the server has published the values, so any
  other client reads them right away. The shared-memory put on one connection used to return
  as soon as its one-way ``COMMIT`` was on the socket; a request of the same connection that
  keeps the server busy (here: a ``contains`` stuck on a hung tier) then left the values
  invisible to other clients after the put had returned.

Servers are real child processes (``conftest.start_lm_server``); the hung tier is a second
server stopped with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LMServer, start_lm_server
from servers import RedisServer

import lmcache
from lmcache.backends.base import PutResult, PutStatus
from lmcache.backends.file import FileBackend
from lmcache.backends.memory import MemoryBackend
from lmcache.errors import ConfigError
from lmcache.keys import CacheKey
from lmcache.tiered import TieredBackend, TieredSettings

N_VALUES = 240
BATCH = 16


def _values(tag: str, n: int, size: int = 24 << 10) -> tuple[list[CacheKey], list[bytes]]:
    keys = [CacheKey(f"durable-{tag}", 1, 0, os.urandom(32), "uint8") for _ in range(n)]
    # Sizes differ a little, so that a value served under the wrong key could not pass.
    return keys, [os.urandom(size + 16 * (i % 7)) for i in range(n)]


async def _put_all(url: str, keys: list[CacheKey], values: list[bytes]) -> None:
    async with lmcache.open_backend(url) as b:
        for i in range(0, len(keys), BATCH):
            got = await b.put(keys[i : i + BATCH], [memoryview(v) for v in values[i : i + BATCH]])
            assert all(r.status is PutStatus.STORED for r in got), got


async def _get_all(url: str, keys: list[CacheKey], values: list[bytes]) -> list[bytes | None]:
    out: list[bytes | None] = []
    async with lmcache.open_backend(url) as b:
        for i in range(0, len(keys), BATCH):
            dsts = [bytearray(len(v) + 64) for v in values[i : i + BATCH]]
            sizes = await b.get_into(keys[i : i + BATCH], [memoryview(d) for d in dsts])
            out += [None if n is None else bytes(d[:n]) for d, n in zip(dsts, sizes, strict=True)]
    return out


@pytest.mark.parametrize(
    ("where", "scheme", "query", "tier0"),
    [
        # The server says durable; socket puts are received straight into tier-0 blocks.
        ("server", "lm", {"shm": "false"}, "64MiB"),
        # The client asks for it; shm puts into the server's pool (reserve, fill, COMMIT).
        ("client", "lm+unix", {}, "64MiB"),
        # A tier 0 too small for the whole run: puts evict, some go through the client's segment.
        ("client", "lm", {}, "2MiB"),
    ],
    ids=["server-flag-socket", "client-url-shm-pool", "client-url-small-tier0"],
)
def test_durable_puts_survive_sigkill(tmp_path: Path, where: str, scheme: str, query: dict, tier0: str) -> None:
    kv_dir = tmp_path / "kv"
    kv_dir.mkdir()
    tiers = [f"memory://?capacity={tier0}", f"file://{kv_dir}"]
    extra = ["--ack", "durable"] if where == "server" else []
    q = dict(query)
    if where == "client":
        q["ack"] = "durable"
    keys, values = _values(where + tier0, N_VALUES)

    first = start_lm_server(tmp_path / "first", tiers, extra=extra)
    try:
        asyncio.run(_put_all(first.url(scheme, **q), keys, values))
        first.proc.kill()  # SIGKILL right after the last acknowledgement: no flush on the way out
    finally:
        first.proc.stop()

    second = start_lm_server(tmp_path / "second", tiers)
    try:
        got = asyncio.run(_get_all(second.url("lm", shm="false"), keys, values))
    finally:
        second.proc.stop()
    missing = [i for i, g in enumerate(got) if g is None]
    assert not missing, f"{len(missing)} of {N_VALUES} durable puts lost in the crash"
    assert all(g == v for g, v in zip(got, values, strict=True)), "a value came back different"


def test_durable_without_a_persistent_tier_is_memory(tmp_path: Path) -> None:
    """With only a memory tier there is nothing to wait for: durable puts are answered as memory ones."""
    server = start_lm_server(tmp_path / "srv", ["memory://?capacity=16MiB"], extra=["--ack", "durable"])
    try:
        keys, values = _values("memory-only", 32)
        asyncio.run(_put_all(server.url("lm+unix", ack="durable"), keys, values))
        assert asyncio.run(_get_all(server.url("lm", shm="false"), keys, values)) == values
        assert server.server_stats()["server"]["not_durable"] == 0
    finally:
        server.proc.stop()


def test_ack_is_a_url_option() -> None:
    b = lmcache.open_backend("lm+unix:///run/lm.sock?ack=durable")
    assert b.settings.ack == "durable" and "ack=durable" in b.url
    assert lmcache.open_backend("lm://127.0.0.1:8198").settings.ack == "memory"
    with pytest.raises(ConfigError, match="ack"):
        lmcache.open_backend("lm://127.0.0.1:8198?ack=disk")


def test_durable_put_that_cannot_persist_is_rejected(tmp_path: Path, redis_private_server: RedisServer) -> None:
    """The persistent tier hangs: a durable put reports its values rejected, not stored."""
    cfg = tmp_path / "server.yaml"
    cfg.write_text("tier_timeout: 1\n")
    server = start_lm_server(
        tmp_path / "srv",
        ["memory://?capacity=16MiB", redis_private_server.url],
        extra=["--config", str(cfg), "--ack", "durable"],
    )
    redis = redis_private_server.process
    assert redis is not None and redis.proc is not None
    try:
        healthy_keys, healthy = _values("redis-up", 4, size=4096)
        asyncio.run(_put_all(server.url("lm", shm="false"), healthy_keys, healthy))
        os.kill(redis.proc.pid, signal.SIGSTOP)
        keys, values = _values("redis-hung", 4, size=4096)

        async def put() -> list[PutResult]:
            async with lmcache.open_backend(server.url("lm", shm="false")) as b:
                return await b.put(keys, [memoryview(v) for v in values])

        results = asyncio.run(put())
        assert [(r.status, r.reason) for r in results] == [(PutStatus.REJECTED, "not_durable")] * 4
        assert server.server_stats()["server"]["not_durable"] == 4
        # Not durable, but in memory all the same: the server still serves them.
        assert asyncio.run(_get_all(server.url("lm", shm="false"), keys, values)) == values
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis.proc.pid, signal.SIGCONT)
        server.proc.stop()


@pytest.fixture
def behind_hung_tier(tmp_path: Path) -> Iterator[tuple[LMServer, LMServer]]:
    """A server whose second tier is another server, which the test may stop (SIGSTOP)."""
    lower = start_lm_server(tmp_path / "lower", ["memory://?capacity=16MiB"])
    cfg = tmp_path / "upper.yaml"
    cfg.write_text("tier_timeout: 3\n")
    upper = None
    try:
        upper = start_lm_server(
            tmp_path / "upper",
            ["memory://?capacity=64MiB", lower.url("lm", shm="false", timeout=60)],
            extra=["--config", str(cfg)],
        )
        yield upper, lower
    finally:
        if lower.proc.proc is not None:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(lower.proc.proc.pid, signal.SIGCONT)
        if upper is not None:
            upper.proc.stop()
        lower.proc.stop()


def test_memory_ack_put_is_readable_by_another_client_at_once(behind_hung_tier: tuple[LMServer, LMServer]) -> None:
    """An ``ack=memory`` shm put on one connection returns only after the server published it."""
    upper, lower = behind_hung_tier
    keys, values = _values("visible", 4)
    absent = CacheKey("durable-visible", 1, 0, os.urandom(32), "uint8")

    async def run() -> list[int | None]:
        async with (
            lmcache.open_backend(upper.url("lm+unix", connections=1)) as writer,
            lmcache.open_backend(upper.url("lm", shm="false")) as reader,
        ):
            if not writer.stats()["shm_pool"]:
                pytest.skip("no shared memory here (/dev/shm): the one-way COMMIT was on the shm path only")
            await reader.ping()
            assert lower.proc.proc is not None
            os.kill(lower.proc.proc.pid, signal.SIGSTOP)  # tier 1 hangs from now on
            put = asyncio.create_task(writer.put(keys, [memoryview(v) for v in values]))
            # Same connection, sent while the put waits for its reservation: the server then
            # works on this (a tier-1 lookup that hangs until tier_timeout) before the COMMIT.
            busy = asyncio.create_task(writer.contains([absent]))
            results = await put
            assert all(r.status is PutStatus.STORED for r in results), results
            dsts = [bytearray(len(v) + 64) for v in values]
            sizes = await reader.get_into(keys, [memoryview(d) for d in dsts])
            assert await busy == [False]
            return sizes

    sizes = asyncio.run(run())
    assert sizes == [len(v) for v in values], "a put that returned was not readable by another client"


def test_wait_persisted_requeues_a_dropped_write_back(tmp_path: Path) -> None:
    """A value whose write-back was dropped (full queue) is written back again, then reported held."""

    async def run() -> tuple[list[bool], list[bool], list[bool]]:
        memory = MemoryBackend.from_url("memory://?capacity=64MiB")
        disk = FileBackend.from_url(f"file://{tmp_path}/kv")
        async with TieredBackend(
            [memory, disk], TieredSettings(write_back_queue=1, write_back_batch=1), own_tiers=True
        ) as t:
            keys, values = _values("requeue", 24, size=4096)
            got = await t.put(keys, [memoryview(v) for v in values])  # most write-backs are dropped
            assert all(r.ok for r in got)
            before = await disk.contains(keys)
            held = await t.wait_persisted(keys, [len(v) for v in values], timeout=60)
            return before, held, await disk.contains(keys)

    before, held, after = asyncio.run(run())
    assert not all(before), "the test needs write-backs that were dropped"
    assert held == after == [True] * len(held)
