"""EvictionWatch (BlockRemoved without vLLM): announced blocks whose chunks no tier holds are found, once.

Tiers are real ``memory://`` backends on an event loop thread; a failing tier is a small fake
(fault injection only).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from lmcache.backends.registry import open_backend
from lmcache.errors import BackendUnavailableError
from lmcache.integrations.vllm.events import EvictionWatch, chunk_keys_of_blocks
from lmcache.keys import CacheKey


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self.submit(coro).result(30)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _DownTier:
    async def contains(self, keys: list[CacheKey]) -> list[bool]:
        raise BackendUnavailableError("down")


def _key(i: int) -> CacheKey:
    return CacheKey("m", 1, 0, bytes([i]) * 32, "float32")


@pytest.fixture
def loop() -> Iterator[_Loop]:
    lp = _Loop()
    yield lp
    lp.loop.call_soon_threadsafe(lp.loop.stop)
    lp.thread.join(10)


@pytest.fixture
def tiers(loop: _Loop) -> Iterator[list[Any]]:
    backends = [open_backend("memory://?capacity=1MiB"), open_backend("memory://?capacity=1MiB")]
    for b in backends:
        loop.run(b.open())
    yield backends
    for b in backends:
        loop.run(b.aclose())


def _drain(watch: EvictionWatch, loop: _Loop, tiers: Any, clock: _Clock) -> list[Any]:
    """Poll until the check started by the first poll is collected."""
    out = list(watch.poll(loop.submit, tiers))
    for _ in range(200):
        if watch._pending is None:
            break
        fut = watch._pending[1]
        concurrent.futures.wait([fut], timeout=10)
        out += watch.poll(loop.submit, tiers)
    return out


def test_blocks_whose_chunk_is_gone_from_every_tier_are_removed_once(loop: _Loop, tiers: list[Any]) -> None:
    clock = _Clock()
    watch = EvictionWatch(1.0, 100, grace=2.0, clock=clock)
    keys = [_key(i) for i in range(4)]
    loop.run(tiers[0].put(keys[:2], [b"a", b"b"]))
    loop.run(tiers[1].put(keys[2:], [b"c", b"d"]))
    # Block "b1" spans chunks 0 and 1; "b2" lies in chunk 2; "b3" in chunk 3.
    watch.track(["b1", "b2", "b3"], [(keys[0], keys[1]), (keys[2],), (keys[3],)])
    # Within the grace period nothing is checked (a store may not have landed yet).
    assert _drain(watch, loop, tiers, clock) == []
    assert watch.checked_keys == 0
    clock.now += 3
    assert _drain(watch, loop, tiers, clock) == []  # all held (chunks 2 and 3 in the second tier)
    assert watch.checked_keys == 4
    loop.run(tiers[0].delete([keys[1]]))  # evicted from the only tier holding it
    loop.run(tiers[1].delete([keys[3]]))
    clock.now += 1.5
    assert sorted(_drain(watch, loop, tiers, clock)) == ["b1", "b3"]
    assert len(watch) == 1
    clock.now += 1.5
    assert _drain(watch, loop, tiers, clock) == []  # reported once


def test_a_tier_that_cannot_answer_is_not_an_eviction(loop: _Loop, tiers: list[Any]) -> None:
    clock = _Clock()
    watch = EvictionWatch(1.0, 100, grace=0.0, clock=clock)
    watch.track(["b1"], [(_key(1),)])  # not stored anywhere, but one tier is down
    assert _drain(watch, loop, [tiers[0], _DownTier()], clock) == []
    assert watch.failed_checks == 1
    clock.now += 2
    assert _drain(watch, loop, tiers, clock) == ["b1"]


def test_checks_are_bounded_in_keys_and_rate(loop: _Loop, tiers: list[Any]) -> None:
    clock = _Clock()
    watch = EvictionWatch(5.0, 3, grace=0.0, max_blocks=8, clock=clock)
    watch.track([f"b{i}" for i in range(10)], [(_key(i),) for i in range(10)])
    assert len(watch) == 8 and watch.dropped_blocks == 2  # the two oldest dropped, without events
    removed = _drain(watch, loop, tiers, clock)
    assert len(removed) == 3 and watch.checks == 1  # max_keys per check
    clock.now += 1  # not due yet
    assert _drain(watch, loop, tiers, clock) == [] and watch.checks == 1
    clock.now += 5
    assert len(_drain(watch, loop, tiers, clock)) == 3 and watch.checks == 2


def test_off_when_interval_is_zero(loop: _Loop, tiers: list[Any]) -> None:
    watch = EvictionWatch(0.0, 10, grace=0.0)
    watch.track(["b1"], [(_key(1),)])
    assert not watch.enabled and len(watch) == 0
    assert watch.poll(loop.submit, tiers) == []


def test_chunk_keys_of_blocks_maps_blocks_to_overlapping_chunks() -> None:
    from lmcache.config import LMCacheConfig
    from lmcache.engine import CacheEngine
    from lmcache.layouts import KVGeometry

    geo = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32")
    cfg = LMCacheConfig.load(environ={}, chunk_size=48, tiers=["memory://?capacity=1MiB"])
    with CacheEngine(geo, "m", config=cfg) as engine:
        tokens = list(range(1, 200))
        keys = [engine.scope.key(c.hash) for c in engine.chunks(tokens[:96])]
        # Blocks of 32 over chunks of 48: block 1 (tokens 32..63) spans chunks 0 and 1.
        got = chunk_keys_of_blocks(engine, tokens, 96, range(3), 32)
        assert got == [(keys[0],), (keys[0], keys[1]), (keys[1],)]
