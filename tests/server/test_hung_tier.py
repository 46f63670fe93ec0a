"""A hung ``lmcache server`` (SIGSTOP) as a tier of a CacheEngine: the engine's calls stay fast.

The server is a real child process; stopping it is the fault (the kernel still accepts and
buffers our requests, nobody answers them). Timing assertions are deliberately loose: they tell
"bounded by the lookup budget" from "waited for the tier timeout", nothing finer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import LMServer, start_lm_server

import lmcache
from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.integrations.transformers import ContiguousKV
from lmcache.keys import CacheKey
from lmcache.layouts import KVGeometry

GEO = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32")
TIER_TIMEOUT = 1.0
BUDGET = 0.05


def _kv(seq: int, seed: int) -> ContiguousKV:
    g = torch.Generator().manual_seed(seed)
    shape = (1, GEO.num_kv_heads, seq, GEO.head_dim)
    return ContiguousKV(
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
        [torch.randn(shape, generator=g) for _ in range(GEO.num_layers)],
    )


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.05)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LMServer]:
    srv = start_lm_server(tmp_path / "srv", ["memory://?capacity=64MiB"])
    try:
        yield srv
    finally:
        if srv.proc.proc is not None:  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(srv.proc.proc.pid, signal.SIGCONT)
        srv.proc.stop()


def _engine(server: LMServer) -> CacheEngine:
    cfg = LMCacheConfig.load(
        environ={},
        chunk_size=16,
        tiers=["memory://?capacity=16MiB", server.url("lm")],
        tier_timeout=TIER_TIMEOUT,
        lookup_budget=BUDGET,
    )
    return CacheEngine(GEO, "hung-tier-model", config=cfg)


def _server_holds(server: LMServer, engine: CacheEngine, tokens: list[int]) -> bool:
    async def ask() -> bool:
        async with lmcache.open_backend(server.url("lm")) as b:
            keys = [engine.scope.key(c.hash) for c in engine.chunks(tokens)]
            return all(await b.contains(keys))

    return asyncio.run(ask())


def test_a_stopped_server_tier_costs_the_engine_a_lookup_budget_not_a_timeout(server: LMServer) -> None:
    writer, reader = _engine(server), _engine(server)  # two workers sharing the lm:// tier
    pid = server.proc.proc.pid  # type: ignore[union-attr]
    try:
        seq = list(range(64))
        src = _kv(64, seed=1)
        assert writer.store(seq, src).result(10) == 4
        _wait_until(lambda: _server_holds(server, writer, seq), 10, "the write-back reached the server")
        assert reader.lookup(seq) == 64  # found in the server: the reader's connection is up

        os.kill(pid, signal.SIGSTOP)

        # Lookups: the first one waits its budget, the rest skip the lagging, then suspended tier.
        t0 = time.monotonic()
        times = []
        for _ in range(10):
            t = time.monotonic()
            assert reader.lookup(seq) == 0  # the reader's memory tier is empty; the server is hung
            times.append(time.monotonic() - t)
        total = time.monotonic() - t0
        assert total < 2 * TIER_TIMEOUT, times
        assert max(times) < TIER_TIMEOUT, times  # no lookup waited for the tier timeout
        assert reader.lookup(seq, budget=0.01) == 0

        # Stores: copied out and put into the memory tier; never wait for the hung tier.
        t0 = time.monotonic()
        futures = [reader.store(list(range(1000 * i, 1000 * i + 32)), _kv(32, seed=i)) for i in range(1, 6)]
        assert time.monotonic() - t0 < TIER_TIMEOUT
        assert [f.result(10) for f in futures] == [2] * 5  # landed in tier 0

        def counted() -> bool:
            tier = reader.stats()["tiers"][1]
            return tier["suspended"] and tier["put_failures"] > 0 and tier["timeouts"] >= 1

        _wait_until(counted, 5 * TIER_TIMEOUT, "the hung tier is suspended and its write-backs counted")
        # Retrieves skip the suspended tier at once: a miss, not a wait.
        t0 = time.monotonic()
        assert reader.retrieve(seq, ContiguousKV.empty(GEO, 64)) == 0
        assert time.monotonic() - t0 < TIER_TIMEOUT / 2

        stats = reader.stats()
        lm_tier = stats["tiers"][1]
        assert lm_tier["url"].startswith("lm://127.0.0.1:")
        assert lm_tier["healthy"] is False and lm_tier["suspended"] is True
        assert lm_tier["lookup_failures"] > 0 and lm_tier["get_failures"] > 0 and lm_tier["put_failures"] > 0
        assert lm_tier["skipped"] > 0 and lm_tier["budget_exceeded"] >= 1
        assert stats["tiers"][0]["errors"] == stats["tiers"][0]["timeouts"] == 0  # memory is fine
        assert stats["backend_errors"] >= lm_tier["timeouts"] >= 1
        assert stats["lookup_failures"] >= lm_tier["lookup_failures"]
        assert stats["put_failures"] >= lm_tier["put_failures"]
        assert stats["get_failures"] >= lm_tier["get_failures"]

        os.kill(pid, signal.SIGCONT)

        # A background probe finds it answering again: lookups hit it, reads come from it.
        _wait_until(lambda: reader.lookup(seq) == 64, 10 * TIER_TIMEOUT, "lookups hit the resumed server")
        dst = ContiguousKV.empty(GEO, 64)
        assert reader.retrieve(seq, dst) == 64
        for a, b in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
            assert torch.equal(a, b)
        after = reader.stats()["tiers"][1]
        assert after["suspended"] is False and after["healthy"] is True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        reader.close()
        writer.close()


def test_a_dead_server_tier_shows_in_the_engine_failure_counters(server: LMServer) -> None:
    engine = _engine(server)
    try:
        seq = list(range(48))
        assert engine.store(seq, _kv(48, seed=3)).result(10) == 3
        engine.flush(10)
        server.proc.kill()  # the tier is gone: connections fail at once (errors, not timeouts)
        other = list(range(500, 548))
        assert engine.store(other, _kv(48, seed=4)).result(10) == 3  # tier 0 still takes them

        def counted() -> bool:
            s = engine.stats()
            return s["put_failures"] > 0 and s["tiers"][1]["errors"] > 0

        _wait_until(counted, 10, "the write-backs to the dead tier are counted")
        assert engine.lookup(list(range(2000, 2048))) == 0  # tier 0 misses, tier 1 fails
        assert engine.retrieve(list(range(3000, 3032)), ContiguousKV.empty(GEO, 32)) == 0
        stats = engine.stats()
        dead = stats["tiers"][1]
        assert dead["lookup_failures"] > 0 and dead["get_failures"] > 0 and dead["put_failures"] > 0
        assert dead["healthy"] is False
        assert stats["backend_errors"] >= dead["errors"] > 0
        assert stats["lookup_failures"] > 0 and stats["get_failures"] > 0 and stats["put_failures"] > 0
    finally:
        engine.close()


async def test_a_request_behind_a_frame_a_stopped_server_does_not_take_is_withdrawn(server: LMServer) -> None:
    """Socket path: a put larger than the socket buffers sticks; other requests must not stick behind it."""
    pid = server.proc.proc.pid  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    small = CacheKey("stuck-frame", 1, 0, os.urandom(32), "uint8")
    big = [CacheKey("stuck-frame", 1, 0, os.urandom(32), "uint8") for _ in range(4)]
    async with lmcache.open_backend(server.url("lm", shm="false", timeout=1)) as b:
        await b.put([small], [b"v" * 100])
        os.kill(pid, signal.SIGSTOP)
        try:
            put = asyncio.create_task(b.put(big, [bytes(16 << 20)] * 4))  # 64 MiB: far beyond the buffers
            await asyncio.sleep(0.3)
            assert not put.done()  # its frame is stuck half-way
            t0 = loop.time()
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await asyncio.wait_for(b.contains([small]), 0.2)  # queued behind it: withdrawn
            assert loop.time() - t0 < 0.8
            put.cancel()  # the half frame cannot be taken back: the connection is aborted after `timeout`
            t0 = loop.time()
            with pytest.raises(asyncio.CancelledError):
                await put
            assert loop.time() - t0 < 5
        finally:
            os.kill(pid, signal.SIGCONT)
        assert await b.contains([small]) == [True]  # a fresh connection; the server is fine
