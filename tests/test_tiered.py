"""Tests of TieredBackend: URLs, reads across tiers, promotion, write-back, faults, eviction."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import pytest
from lmcache_conformance import BackendTests

from lmcache.backends.base import PutResult, PutStatus, StorageBackend
from lmcache.backends.memory import MemoryBackend
from lmcache.backends.registry import open_backend
from lmcache.config import LMCacheConfig
from lmcache.errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidArgumentError,
    InvalidBufferError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.policies import LRUPolicy
from lmcache.pool import InPlaceTier, Lease, Refused, Reservation
from lmcache.tiered import TieredBackend, TieredSettings

KiB = 1 << 10


def key(i: int) -> CacheKey:
    return CacheKey("test-model", 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int, n: int = 1 * KiB) -> bytes:
    return random.Random(i).randbytes(n)


async def read(backend: StorageBackend, keys: Sequence[CacheKey], n: int = 1 * KiB) -> list[bytes | None]:
    bufs = [bytearray(n) for _ in keys]
    got = await backend.get_into(keys, bufs)
    return [None if g is None else bytes(b[:g]) for g, b in zip(got, bufs, strict=True)]


async def holds(backend: StorageBackend, keys: Sequence[CacheKey]) -> list[bool]:
    return await backend.contains(keys)


class Faulty(StorageBackend):
    """Fault injection only: wraps a real backend and raises, hangs or blocks on demand."""

    schemes: ClassVar[tuple[str, ...]] = ("faulty",)

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__()
        self.inner = inner
        self.capabilities = inner.capabilities  # type: ignore[misc]
        # "ok" | "raise" (a BackendError) | "bug" (any other exception) | "hang" | "refuse" (at once)
        self.mode = "ok"
        self.ops: set[str] = {"contains", "get", "put", "delete", "ping"}
        self.put_gate: asyncio.Event | None = None  # when set, puts wait for it
        self.put_entered = asyncio.Event()
        self.calls: list[str] = []

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Faulty:
        raise ConfigError("test-only backend")

    @property
    def url(self) -> str:
        return "faulty://?inner=" + quote(self.inner.url, safe="")

    async def _fault(self, op: str) -> None:
        self.calls.append(op)
        if op not in self.ops:
            return
        if self.mode == "raise":
            raise PermanentBackendError(f"injected {op} failure")
        if self.mode == "bug":
            raise KeyError(f"injected {op} bug")
        if self.mode == "refuse":
            raise BackendUnavailableError(f"injected {op}: connection refused")
        if self.mode == "hang":
            await asyncio.Event().wait()

    async def _open(self) -> None:
        await self.inner.open()

    async def _close(self) -> None:
        await self.inner.aclose()

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        await self._fault("contains")
        return await self.inner.contains(keys)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        await self._fault("get")
        return await self.inner.get_into(keys, dsts)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        await self._fault("put")
        self.put_entered.set()
        if self.put_gate is not None:
            await self.put_gate.wait()
        return await self.inner.put(keys, srcs)

    async def _delete(self, keys: list[CacheKey]) -> None:
        await self._fault("delete")
        await self.inner.delete(keys)

    async def _ping(self) -> None:
        await self._fault("ping")
        await self.inner.ping()

    def _extra_stats(self) -> dict[str, Any]:
        return self.inner.stats()

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for k in self.inner.list_keys():
            yield k


def mem(capacity: str = "1MiB") -> MemoryBackend:
    return MemoryBackend.from_url(f"memory://?capacity={capacity}")


@pytest.fixture
async def stack() -> AsyncIterator[tuple[TieredBackend, MemoryBackend, MemoryBackend]]:
    """Two real memory tiers, borrowed by the TieredBackend (the test closes them)."""
    fast, slow = mem(), mem()
    t = TieredBackend([fast, slow])
    async with fast, slow, t:
        yield t, fast, slow


def tier_stats(t: TieredBackend, i: int) -> dict[str, Any]:
    return t.stats()["tiers"][i]


def tiered_url(*tiers: str, **options: object) -> str:
    query = ["tier=" + quote(u, safe="") for u in tiers] + [f"{k}={v}" for k, v in options.items()]
    return "tiered://?" + "&".join(query)


class TestTieredMemoryFileConformance(BackendTests):
    """The whole conformance suite against a memory + file stack."""

    @pytest.fixture
    def backend_url(self, tmp_path) -> str:
        return tiered_url("memory://?capacity=256MiB", f"file://{tmp_path}/kv")


class TestTieredSmallMemoryConformance(BackendTests):
    """The suite again with an 8 MiB memory tier: eviction and promotion run under its checks."""

    @pytest.fixture
    def backend_url(self, tmp_path) -> str:
        return tiered_url("memory://?capacity=8MiB", f"file://{tmp_path}/kv", eviction_policy="s3fifo")


# ---------------------------------------------------------------------------------------------
# Construction and URLs


def test_url_round_trip_with_encoded_tier_urls() -> None:
    inner = ["memory://?capacity=2MiB", "memory://?capacity=8MiB&hugepages=false"]
    t = TieredBackend.from_urls(inner, tier_timeout=0.5, write_back_queue=7, eviction_policy="fifo")
    url = t.url
    assert url.startswith("tiered://?tier=memory%3A%2F%2F%3Fcapacity%3D2MiB&tier=")
    again = TieredBackend.from_url(url)
    assert again.url == url
    assert [b.url for b in again.tiers] == [b.url for b in t.tiers] == inner
    assert again.settings == t.settings == TieredSettings(tier_timeout=0.5, write_back_queue=7, eviction_policy="fifo")
    # The registry serves the scheme, and a defaults-only URL has nothing but tiers.
    via_registry = open_backend(url)
    assert isinstance(via_registry, TieredBackend) and via_registry.url == url
    plain = TieredBackend.from_urls(inner)
    assert "tier_timeout" not in plain.url and TieredBackend.from_url(plain.url).url == plain.url
    # Characters that mean something in a query ('+', '&', '=', '%') survive the nesting.
    odd = ["file:///tmp/a+b%20c&d=e?capacity=1MiB&fsync=data", "memory://"]
    nested = TieredBackend.from_urls(odd)
    assert [b.url for b in TieredBackend.from_url(nested.url).tiers] == [b.url for b in nested.tiers]
    assert nested.tiers[0].url == open_backend(odd[0]).url


def test_url_overrides_and_errors() -> None:
    tier = "tier=" + quote("memory://?capacity=1MiB", safe="")
    t = TieredBackend.from_url(f"tiered://?{tier}&tier_timeout=2", tier_timeout="250ms")
    assert t.settings.tier_timeout == 0.25  # keyword overrides win over the query
    with pytest.raises(ConfigError, match="at least one"):
        TieredBackend.from_url("tiered://?tier_timeout=2")
    with pytest.raises(ConfigError, match="given twice"):
        TieredBackend.from_url(f"tiered://?{tier}&tier_timeout=1&tier_timeout=2")
    with pytest.raises(ConfigError, match="unknown option 'bogus'"):
        TieredBackend.from_url(f"tiered://?{tier}&bogus=1")
    with pytest.raises(ConfigError, match="eviction_policy"):
        TieredBackend.from_url(f"tiered://?{tier}&eviction_policy=mru")
    with pytest.raises(ConfigError, match="no host or path"):
        TieredBackend.from_url(f"tiered://somehost/?{tier}")
    with pytest.raises(ConfigError):  # a bad inner URL is a config error too
        TieredBackend.from_url("tiered://?tier=" + quote("memory://?capacity=lots", safe=""))
    with pytest.raises(ConfigError, match="list of URLs"):
        TieredBackend.from_urls("memory://")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="at least one"):
        TieredBackend([])
    m = mem()
    with pytest.raises(ConfigError, match="twice"):
        TieredBackend([m, m])


def test_environment_settings_apply_below_keywords(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_TIERED_WRITE_BACK_BATCH", "3")
    monkeypatch.setenv("LMCACHE_TIERED_TIER_TIMEOUT", "9")
    t = TieredBackend.from_urls(["memory://"], tier_timeout=2)
    assert (t.settings.write_back_batch, t.settings.tier_timeout) == (3, 2.0)
    u = TieredBackend.from_url("tiered://?tier=memory%3A%2F%2F")
    assert (u.settings.write_back_batch, u.settings.tier_timeout) == (3, 9.0)


def test_from_config_uses_the_tiering_fields() -> None:
    cfg = LMCacheConfig.load(
        environ={},
        tiers=["memory://?capacity=4MiB", "memory://?capacity=16MiB"],
        eviction_policy="lfu",
        promote_on_hit=False,
        write_back_queue=9,
        tier_timeout="1.5s",
    )
    t = TieredBackend.from_config(cfg)
    assert [b.url for b in t.tiers] == cfg.tiers
    s = t.settings
    assert (s.eviction_policy, s.promote_on_hit, s.write_back_queue, s.tier_timeout) == ("lfu", False, 9, 1.5)


def test_capabilities_describe_the_stack() -> None:
    t = TieredBackend([mem(), mem()])
    assert t.capabilities.listing and not t.capabilities.persistent and not t.capabilities.shared
    assert t.capabilities.bounded  # tier 0 is: the stack evicts, but may still reject a put
    unbounded_top = TieredBackend.from_urls(["file:///tmp/lmcache-never-opened", "memory://"])
    assert not unbounded_top.capabilities.bounded and unbounded_top.capabilities.persistent
    assert type(t).capabilities is not t.capabilities  # the class default is untouched


def test_repr_redacts_tier_credentials() -> None:
    m = mem()

    class Secretive(Faulty):
        @property
        def url(self) -> str:
            return "faulty://user:hunter2@host/"

    t = TieredBackend([m, Secretive(mem())])
    assert "hunter2" not in repr(t)
    assert "user:***@host" in repr(t)


# ---------------------------------------------------------------------------------------------
# Reads, writes, promotion


async def test_put_lands_in_tier0_and_reaches_tier1_after_flush(stack) -> None:
    t, fast, slow = stack
    keys = [key(i) for i in range(4)]
    results = await t.put(keys, [value(i) for i in range(4)])
    assert [r.status for r in results] == [PutStatus.STORED] * 4
    assert await holds(fast, keys) == [True] * 4
    assert await t.flush(timeout=30)
    assert await read(slow, keys) == [value(i) for i in range(4)]
    st = tier_stats(t, 1)
    assert st["writeback_queued"] == 4 and st["writeback_written"] == 4 and st["writeback_dropped"] == 0
    # A second put of the same keys is EXISTS (tier 0's answer) and queues nothing new.
    assert [r.status for r in await t.put(keys, [value(i) for i in range(4)])] == [PutStatus.EXISTS] * 4
    assert tier_stats(t, 1)["writeback_queued"] == 4


async def test_put_result_is_tier0s_and_the_source_may_be_reused(stack) -> None:
    t, fast, slow = stack
    src = bytearray(value(1))
    assert (await t.put([key(1)], [src]))[0].status is PutStatus.STORED
    src[:] = b"\0" * len(src)  # the caller reuses its buffer before write-back ran
    await t.flush()
    assert await read(slow, [key(1)]) == [value(1)]
    # A value tier 0 can never hold is rejected (tier 0's verdict) without evicting anything.
    big = bytes(2 << 20)
    r = (await t.put([key(2)], [big]))[0]
    assert r.status is PutStatus.REJECTED and r.reason in ("too_large", "capacity")
    assert await holds(fast, [key(1)]) == [True]
    assert tier_stats(t, 0)["evictions"] == 0


async def test_reads_fall_through_tiers_in_batches_and_promote(stack) -> None:
    t, fast, slow = stack
    await fast.put([key(0)], [value(0)])
    await slow.put([key(1), key(2)], [value(1), value(2)])
    got = await read(t, [key(0), key(1), key(3), key(2)])
    assert got == [value(0), value(1), None, value(2)]
    st0, st1 = tier_stats(t, 0), tier_stats(t, 1)
    assert (st0["hits"], st0["misses"]) == (1, 3)
    assert (st1["hits"], st1["misses"]) == (2, 1)
    assert st0["promotions"] == 2
    # Promoted: now in tier 0 with the same bytes.
    assert await read(fast, [key(1), key(2)]) == [value(1), value(2)]
    assert slow.stats()["get_requests"] == 3  # one batch of the three tier-0 misses


async def test_promotion_can_be_turned_off() -> None:
    fast, slow = mem(), mem()
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(promote_on_hit=False)) as t:
        await slow.put([key(1)], [value(1)])
        assert await read(t, [key(1)]) == [value(1)]
        assert await holds(fast, [key(1)]) == [False]
        assert tier_stats(t, 0)["promotions"] == 0


async def test_a_hit_in_tier2_is_promoted_to_tier0_and_written_back_to_tier1() -> None:
    a, b, c = mem(), mem(), mem()
    async with a, b, c, TieredBackend([a, b, c]) as t:
        await c.put([key(5)], [value(5)])
        assert await read(t, [key(5), key(5)]) == [value(5), value(5)]  # duplicates are fine
        assert await holds(a, [key(5)]) == [True]
        await t.flush()
        assert await read(b, [key(5)]) == [value(5)]
        assert tier_stats(t, 1)["writeback_written"] == 1
        assert tier_stats(t, 2)["writeback_queued"] == 0  # it already held the value


async def test_contains_and_lookup_prefix_see_the_union(stack) -> None:
    t, fast, slow = stack
    await fast.put([key(0), key(2)], [value(0), value(2)])
    await slow.put([key(1), key(4)], [value(1), value(4)])
    keys = [key(i) for i in range(5)]
    assert await t.contains(keys) == [True, True, True, False, True]
    assert await t.lookup_prefix(keys) == 3
    assert await t.lookup_prefix([key(3)]) == 0


async def test_delete_removes_from_every_tier(stack) -> None:
    t, fast, slow = stack
    await t.put([key(1), key(2)], [value(1), value(2)])
    await t.flush()
    await t.delete([key(1), key(9)])
    assert await holds(fast, [key(1), key(2)]) == [False, True]
    assert await holds(slow, [key(1), key(2)]) == [False, True]
    assert await t.contains([key(1)]) == [False]


async def test_a_delete_cancels_a_pending_write_back() -> None:
    fast, inner = mem(), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(write_back_batch=1)) as t:
        await t.put([key(1), key(2)], [value(1), value(2)])
        await slow.put_entered.wait()  # the writer is now inside tier 1's put of key(1)
        await t.delete([key(1), key(2)])  # key(1) is in flight, key(2) still queued
        slow.put_gate.set()
        await t.flush()
        assert await holds(inner, [key(1), key(2)]) == [False, False]
        assert await t.contains([key(1), key(2)]) == [False, False]


async def test_a_promotion_racing_a_delete_does_not_bring_the_value_back() -> None:
    inner, slow = mem(), mem()
    fast = Faulty(inner)
    fast.put_gate = asyncio.Event()  # the promotion put into tier 0 waits here
    async with fast, slow, TieredBackend([fast, slow]) as t:
        await slow.put([key(1)], [value(1)])
        reading = asyncio.ensure_future(read(t, [key(1)]))
        await fast.put_entered.wait()  # the read has its value and is promoting it
        await t.delete([key(1)])
        fast.put_gate.set()
        assert await reading == [value(1)]  # the read itself came before the delete
        assert await t.contains([key(1)]) == [False]
        assert await holds(inner, [key(1)]) == [False]


async def test_too_small_dst_is_the_callers_error(stack) -> None:
    t, _, slow = stack
    await slow.put([key(1)], [value(1)])
    with pytest.raises(InvalidBufferError):
        await t.get_into([key(1)], [bytearray(10)])


async def test_aclose_flushes_write_back_and_closes_owned_tiers_only() -> None:
    t = TieredBackend.from_urls(["memory://?capacity=1MiB", "memory://?capacity=1MiB"])
    await t.open()
    fast, slow = t.tiers
    await t.put([key(1)], [value(1)])
    # Keep the slow tier alive past aclose to check it got the value: borrow it in a 2nd stack.
    await t.aclose()
    assert fast.is_closed and slow.is_closed
    assert tier_stats(t, 1)["writeback_written"] == 1

    borrowed_fast, borrowed_slow = mem(), mem()
    t2 = TieredBackend([borrowed_fast, borrowed_slow])
    async with t2:
        await t2.put([key(1)], [value(1)])
    assert borrowed_fast.is_open and borrowed_slow.is_open  # borrowed: left to their owner
    assert await read(borrowed_slow, [key(1)]) == [value(1)]  # aclose flushed first
    await borrowed_fast.aclose()
    await borrowed_slow.aclose()

    owned = [mem(), mem()]
    async with TieredBackend(owned, own_tiers=True) as t3:
        await t3.ping()
    assert all(b.is_closed for b in owned)


async def test_aclose_gives_up_on_a_stuck_write_back_within_close_timeout() -> None:
    fast, inner = mem(), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()  # never set: the writer is stuck
    settings = TieredSettings(close_timeout=0.05, tier_timeout=60)
    t = TieredBackend([fast, slow], settings, own_tiers=True)
    await t.open()
    await t.put([key(i) for i in range(3)], [value(i) for i in range(3)])
    await t.aclose()
    st = tier_stats(t, 1)
    assert st["writeback_written"] == 0
    assert st["writeback_dropped"] >= 1  # what was still queued is counted as dropped
    assert fast.is_closed and slow.is_closed


# ---------------------------------------------------------------------------------------------
# Faults


async def test_a_raising_tier0_is_a_counted_miss_and_reads_go_on(caplog: pytest.LogCaptureFixture) -> None:
    inner, slow = mem(), mem()
    fast = Faulty(inner)
    async with fast, slow, TieredBackend([fast, slow]) as t:
        await inner.put([key(1)], [value(1)])
        await slow.put([key(1), key(2)], [value(1), value(2)])
        fast.mode = "raise"
        with caplog.at_level(logging.WARNING, logger="lmcache"):
            for _ in range(3):
                assert await read(t, [key(1), key(2), key(3)]) == [value(1), value(2), None]
        st0 = tier_stats(t, 0)
        assert st0["errors"] >= 3 and st0["healthy"] is False
        assert t.stats()["tier_errors"] == st0["errors"]
        assert tier_stats(t, 1)["hits"] == 6
        # Logged once per tier and operation, however often it happened.
        get_logs = [r for r in caplog.records if "get failed" in r.getMessage()]
        assert len(get_logs) == 1 and "PermanentBackendError" in get_logs[0].getMessage()
        # A put into a failing tier 0 is rejected as an error, not raised.
        r = (await t.put([key(7)], [value(7)]))[0]
        assert r.status is PutStatus.REJECTED and r.reason == "error"
        assert await t.contains([key(2)]) == [True]
        fast.mode = "ok"
        assert await read(t, [key(1)]) == [value(1)]
        assert tier_stats(t, 0)["healthy"] is True


@pytest.mark.parametrize("mode", ["raise", "bug"])
async def test_a_raising_slower_tier_is_a_miss(mode: str) -> None:
    fast, inner = mem(), mem()
    slow = Faulty(inner)
    async with fast, slow, TieredBackend([fast, slow]) as t:
        await inner.put([key(1)], [value(1)])
        slow.mode = mode
        assert await read(t, [key(1)]) == [None]
        assert await t.contains([key(1)]) == [False]
        await t.delete([key(1)])  # does not raise either
        assert tier_stats(t, 1)["errors"] == 3


async def test_a_hanging_tier_becomes_a_miss_within_the_timeout() -> None:
    fast, inner = mem(), mem()
    slow = Faulty(inner)
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_timeout=0.05)) as t:
        await inner.put([key(1)], [value(1)])
        await fast.put([key(0)], [value(0)])
        slow.mode = "hang"
        # pytest-timeout would catch a hang; the per-tier counters prove which path ran.
        assert await read(t, [key(0), key(1)]) == [value(0), None]
        assert tier_stats(t, 1)["timeouts"] == 1
        # Within tier_retry_after the hung tier is not waited for again: an immediate miss.
        assert await t.contains([key(0), key(1)]) == [True, False]
        assert await t.lookup_prefix([key(0), key(1)]) == 1
        st = tier_stats(t, 1)
        assert (st["timeouts"], st["skipped"], st["errors"], st["healthy"]) == (1, 2, 0, False)
        await t.ping()  # pings always probe; tier 0 answers, so the stack is up
        assert tier_stats(t, 1)["timeouts"] == 2
        slow.mode = "ok"
        await t.ping()  # a successful probe lifts the suspension
        assert await read(t, [key(1)]) == [value(1)]
        assert tier_stats(t, 1)["healthy"] is True


async def test_without_retry_after_every_call_waits_for_the_timeout() -> None:
    fast, slow = mem(), Faulty(mem())
    settings = TieredSettings(tier_timeout=0.02, tier_retry_after=0)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        slow.mode = "hang"
        for _ in range(2):
            assert await read(t, [key(1)]) == [None]
        st = tier_stats(t, 1)
        assert (st["timeouts"], st["skipped"]) == (2, 0)


async def test_a_hung_tier_stays_skipped_until_a_background_probe_gets_an_answer() -> None:
    fast, slow = mem(), Faulty(mem())
    settings = TieredSettings(tier_timeout=0.05, tier_retry_after=0.1)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        await slow.inner.put([key(1)], [value(1)])
        slow.mode = "hang"
        assert await read(t, [key(1)]) == [None]  # the one timeout
        await asyncio.sleep(0.15)  # past tier_retry_after: the next call starts a probe
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for _ in range(5):  # still skipped: no caller waits to learn the tier is still hung
            assert await read(t, [key(1)]) == [None]
            assert await t.contains([key(1)]) == [False]
        assert loop.time() - t0 < 0.25  # loose; the call log below is the proof
        st = tier_stats(t, 1)
        assert st["suspended"] is True and st["skipped"] == 10
        assert st["get_failures"] == 6 and st["lookup_failures"] == 5
        await asyncio.sleep(0.1)
        assert slow.calls.count("get") == 1 and slow.calls.count("ping") == 1  # one probe, in the background
        assert tier_stats(t, 1)["timeouts"] == 2  # the read, then the probe
        slow.mode = "ok"
        for _ in range(100):  # the next probe answers and lifts the suspension
            if await t.contains([key(1)]) == [True]:
                break
            await asyncio.sleep(0.02)
        assert await read(t, [key(1)]) == [value(1)]
        assert tier_stats(t, 1)["suspended"] is False and tier_stats(t, 1)["healthy"] is True


async def test_a_refusing_tier_is_suspended_like_a_hung_one_and_probed_back() -> None:
    fast, slow = mem(), Faulty(mem())
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_retry_after=60)) as t:
        await slow.inner.put([key(1)], [value(1)])
        slow.mode = "refuse"  # fails fast, as a server with nothing listening does
        for _ in range(5):
            assert await read(t, [key(1)]) == [None]
            assert await t.contains([key(1)]) == [False]
        assert all(r.ok for r in await t.put([key(2)], [value(2)]))
        await t.flush(timeout=30)
        st = tier_stats(t, 1)
        # One call found it down; every later one skipped it instead of paying again.
        assert slow.calls.count("get") == 1 and slow.calls.count("contains") == 0 and slow.calls.count("put") == 0
        assert (st["errors"], st["suspended"], st["skipped"]) == (1, True, 9)
        assert st["writeback_dropped"] == 1
    fast, slow = mem(), Faulty(mem())
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_retry_after=0.05)) as t:
        await slow.inner.put([key(1)], [value(1)])
        slow.mode = "refuse"
        assert await read(t, [key(1)]) == [None]
        slow.mode = "ok"  # back: a background probe (not a caller) finds out and lifts the suspension
        for _ in range(500):
            if await t.contains([key(1)]) == [True]:
                break
            await asyncio.sleep(0.01)
        assert await read(t, [key(1)]) == [value(1)]
        assert tier_stats(t, 1)["suspended"] is False and "ping" in slow.calls


async def test_a_tier_that_cannot_be_reached_at_open_is_suspended() -> None:
    class Refusing(Faulty):
        async def _open(self) -> None:
            self.calls.append("open")
            raise BackendUnavailableError("connection refused")

    fast, down = mem(), Refusing(mem())
    async with fast, TieredBackend([fast, down], TieredSettings(tier_retry_after=60)) as t:
        for i in range(5):
            assert await read(t, [key(i)]) == [None]
        # Today's stack tried to connect again on every call (each paying the client's retries).
        assert down.calls == ["open"]
        assert tier_stats(t, 1)["skipped"] == 5


async def test_calls_in_flight_to_a_tier_found_down_are_released_with_the_first() -> None:
    fast, slow = mem(), Faulty(mem())
    settings = TieredSettings(tier_timeout=1.0, tier_retry_after=60)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        slow.mode = "hang"
        first = asyncio.ensure_future(read(t, [key(1)]))
        await asyncio.sleep(0.3)  # a second caller arrives while the first still waits
        second = asyncio.ensure_future(t.contains([key(2)]))
        for _ in range(100):
            if "contains" in slow.calls:
                break
            await asyncio.sleep(0)
        assert "contains" in slow.calls
        assert await first == [None]  # its timeout trips the breaker...
        for _ in range(20):  # ...which releases the second caller now, not 0.3 s later
            if second.done():
                break
            await asyncio.sleep(0)
        assert second.done() and second.result() == [False]
        assert tier_stats(t, 1)["timeouts"] == 2 and tier_stats(t, 1)["suspended"] is True


class GatedContains(Faulty):
    """Fault injection: ``contains`` waits for ``gate`` (a slow tier that answers when let)."""

    def __init__(self, inner: StorageBackend) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        await self.gate.wait()
        return await super()._contains(keys)


async def test_a_budgeted_lookup_answers_in_time_and_the_late_tier_call_finishes_in_the_background() -> None:
    fast, slow = mem(), GatedContains(mem())
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_timeout=5)) as t:
        await fast.put([key(0)], [value(0)])
        await slow.inner.put([key(1)], [value(1)])
        keys = [key(0), key(1), key(2)]
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await t.contains(keys, budget=0.1) == [True, False, False]  # what tier 0 knows
        assert await t.lookup_prefix(keys, budget=0.1) == 1  # tier 1 is still busy: skipped
        assert loop.time() - t0 < 2.5  # not the tier timeout (5 s)
        st = tier_stats(t, 1)
        assert (st["budget_exceeded"], st["skipped"], st["lookup_failures"], st["timeouts"]) == (1, 1, 4, 0)
        slow.gate.set()  # the late call answers: no failure, and the tier is asked again
        for _ in range(100):
            if await t.lookup_prefix(keys, budget=0.5) == 2:
                break
            await asyncio.sleep(0.01)
        assert await t.lookup_prefix(keys, budget=0.5) == 2
        assert tier_stats(t, 1)["healthy"] is True and tier_stats(t, 1)["timeouts"] == 0
        with pytest.raises(InvalidArgumentError):
            await t.contains(keys, budget=-1)


async def test_a_budgeted_lookup_on_a_hung_tier_trips_the_breaker_once() -> None:
    fast, slow = mem(), Faulty(mem())
    settings = TieredSettings(tier_timeout=0.2, tier_retry_after=60)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        slow.mode = "hang"
        for _ in range(20):
            assert await t.lookup_prefix([key(1)], budget=0.01) == 0
            await asyncio.sleep(0.02)  # 0.4 s in all: the first call timed out in the background
        st = tier_stats(t, 1)
        assert st["timeouts"] == 1 and st["suspended"] is True
        assert st["budget_exceeded"] == 1 and st["skipped"] == 19 and st["lookup_failures"] == 20
        assert slow.calls.count("contains") == 1


async def test_a_suspended_tier_drops_its_write_backs_instead_of_pinning_them_in_tier0() -> None:
    fast, slow = mem(), Faulty(mem())
    settings = TieredSettings(tier_timeout=0.05, tier_retry_after=60, write_back_batch=1)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        slow.mode = "hang"
        keys = [key(i) for i in range(6)]
        assert all(r.ok for r in await t.put(keys[:3], [value(i) for i in range(3)]))
        assert await t.flush(timeout=5)  # one batch timed out; the queued ones were dropped
        st = tier_stats(t, 1)
        assert st["suspended"] is True and st["timeouts"] == 1
        assert all(r.ok for r in await t.put(keys[3:], [value(i) for i in range(3, 6)]))
        st = tier_stats(t, 1)
        assert st["writeback_written"] == 0 and st["writeback_pending"] == 0
        assert st["writeback_dropped"] + st["writeback_failed"] == 6 and st["put_failures"] == 6
        assert t.stats()["writeback_pending"] == 0 and not t._pending  # nothing pinned in tier 0
        assert slow.calls.count("put") == 1


async def test_a_timed_out_tier0_is_not_promoted_into() -> None:
    inner, slow = mem(), mem()
    fast = Faulty(inner)
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_timeout=0.02)) as t:
        await slow.put([key(1)], [value(1)])
        fast.mode = "hang"
        assert await read(t, [key(1)]) == [value(1)]
        assert fast.calls == ["get"]  # no promotion put into the tier that just hung
        assert tier_stats(t, 0)["timeouts"] == 1


async def test_ping_fails_only_when_no_tier_answers() -> None:
    a, b = Faulty(mem()), Faulty(mem())
    async with a, b, TieredBackend([a, b]) as t:
        a.mode = "raise"
        await t.ping()
        assert t.stats()["healthy_tiers"] == 1
        b.mode = "raise"
        with pytest.raises(BackendUnavailableError, match="no tier answered"):
            await t.ping()


async def test_open_survives_a_tier_that_cannot_open() -> None:
    class Broken(Faulty):
        async def _open(self) -> None:
            raise PermanentBackendError("disk gone")

    fast, broken = mem(), Broken(mem())
    async with fast, TieredBackend([fast, broken]) as t:
        await t.put([key(1)], [value(1)])
        assert await read(t, [key(1), key(2)]) == [value(1), None]
        assert tier_stats(t, 1)["errors"] >= 2
    with pytest.raises(PermanentBackendError, match="disk gone"):
        async with TieredBackend([Broken(mem())]):
            pass


async def test_a_full_write_back_queue_drops_and_counts() -> None:
    fast, inner = mem(), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()
    settings = TieredSettings(write_back_queue=2, write_back_batch=1)
    async with fast, slow, TieredBackend([fast, slow], settings) as t:
        keys = [key(i) for i in range(6)]
        results = await t.put(keys, [value(i) for i in range(6)])
        assert all(r.status is PutStatus.STORED for r in results)  # puts never wait for tier 1
        st = tier_stats(t, 1)
        assert st["writeback_queued"] == 2 and st["writeback_dropped"] == 4
        assert t.stats()["writeback_pending"] == 2
        slow.put_gate.set()
        assert await t.flush(timeout=30)
        assert await holds(inner, keys) == [True, True, False, False, False, False]
        assert tier_stats(t, 1)["writeback_written"] == 2


# ---------------------------------------------------------------------------------------------
# Eviction


async def lru_stack(policy: Any = None) -> tuple[TieredBackend, MemoryBackend, MemoryBackend]:
    # 4 KiB of pool: exactly four 1 KiB values (1 KiB is a multiple of the 64-byte alignment).
    fast, slow = mem("4KiB"), mem()
    t = TieredBackend([fast, slow], policy=policy)
    await t.open()
    return t, fast, slow


async def close_all(*backends: StorageBackend) -> None:
    for b in backends:
        await b.aclose()


async def test_lru_keeps_recently_used_keys_and_evicts_the_oldest() -> None:
    t, fast, slow = await lru_stack()
    try:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])
        await t.flush()
        assert await read(t, [key(0)]) == [value(0)]  # key 0 is now the most recent
        await t.put([key(4), key(5)], [value(4), value(5)])
        assert await holds(fast, [key(i) for i in range(6)]) == [True, False, False, True, True, True]
        assert tier_stats(t, 0)["evictions"] == 2
        # Evicted from the fast tier, still served from the slow one (and promoted back).
        await t.flush()
        assert await read(t, [key(1)]) == [value(1)]
        assert tier_stats(t, 1)["hits"] == 1
        assert await holds(fast, [key(1), key(3)]) == [True, False]  # key 3 was now the oldest
    finally:
        await close_all(t, fast, slow)


async def test_fifo_policy_ignores_reads() -> None:
    t, fast, slow = await lru_stack(policy="fifo")
    try:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])
        await t.flush()
        await read(t, [key(0)])
        await t.put([key(4)], [value(4)])
        assert await holds(fast, [key(0), key(1), key(4)]) == [False, True, True]
    finally:
        await close_all(t, fast, slow)


async def test_a_policy_factory_is_used_per_bounded_tier() -> None:
    made: list[LRUPolicy] = []

    def factory() -> LRUPolicy:
        made.append(LRUPolicy())
        return made[-1]

    fast, slow = mem("4KiB"), mem("4KiB")
    async with fast, slow, TieredBackend([fast, slow], policy=factory) as t:
        assert len(made) == 2
        await t.put([key(1)], [value(1)])
        await t.flush()
        assert key(1) in made[0] and key(1) in made[1]
        assert tier_stats(t, 0)["tracked_bytes"] == 1 * KiB


async def test_pinned_keys_become_evictable_only_when_their_write_back_ends() -> None:
    fast, inner = mem("4KiB"), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()  # never set: tier 1 hangs on puts, its write-back times out
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_timeout=0.05)) as t:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])
        # Tier 0 is full of values not yet copied out. The put waits (up to tier_timeout) for
        # write-back to free room, none comes, and it is rejected: nothing unwritten is evicted.
        # (It is also written around tier 0 into tier 1, whose puts hang too: still rejected.)
        r = (await t.put([key(4)], [value(4)]))[0]
        assert r.status is PutStatus.REJECTED and r.reason == "capacity"
        assert tier_stats(t, 0)["writeback_stalls"] == 1 and tier_stats(t, 0)["evictions"] == 0
        assert await holds(fast, [key(i) for i in range(4)]) == [True] * 4
        # The write-back and the write-around end in timeouts (counted); then the values may go.
        await t.flush()
        st1 = tier_stats(t, 1)
        assert st1["timeouts"] == 2 and st1["writeback_failed"] == 4 and st1["writeback_written"] == 0
        assert (await t.put([key(4)], [value(4)]))[0].status is PutStatus.STORED
        assert tier_stats(t, 0)["evictions"] >= 1


async def test_promotion_never_waits_for_write_back_room() -> None:
    fast, inner = mem("4KiB"), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(tier_timeout=60)) as t:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])  # tier 0 full, pinned
        await slow.put_entered.wait()  # and the writer is stuck
        await inner.put([key(9)], [value(9)])
        assert await read(t, [key(9)]) == [value(9)]  # returns now, not after 60 s
        st0 = tier_stats(t, 0)
        assert (st0["promotions"], st0["writeback_stalls"], st0["evictions"]) == (0, 0, 0)
        slow.put_gate.set()


async def test_a_put_into_a_tier0_full_of_unwritten_values_waits_for_write_back() -> None:
    fast, inner = mem("4KiB"), mem()
    slow = Faulty(inner)
    slow.put_gate = asyncio.Event()
    async with fast, slow, TieredBackend([fast, slow]) as t:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])
        await slow.put_entered.wait()  # the writer holds the first batch, stuck at the gate
        pending_put = asyncio.ensure_future(t.put([key(4)], [value(4)]))
        for _ in range(100):  # let the put run until it waits for write-back
            if tier_stats(t, 0)["writeback_stalls"]:
                break
            await asyncio.sleep(0)
        assert not pending_put.done()
        slow.put_gate.set()  # tier 1 can take writes again: the waiting put gets its room
        assert (await pending_put)[0].status is PutStatus.STORED
        st = tier_stats(t, 0)
        assert st["writeback_stalls"] == 1 and st["evictions"] >= 1
        assert await holds(inner, [key(i) for i in range(4)]) == [True] * 4
        assert await read(t, [key(i) for i in range(5)]) == [value(i) for i in range(5)]


async def test_capacity_rejection_without_proactive_gauges_evicts_and_retries() -> None:
    class NoGauges(Faulty):
        def _extra_stats(self) -> dict[str, Any]:
            return {}  # forces the reactive path: put, rejected("capacity"), evict, retry

    inner = mem("4KiB")
    fast, slow = NoGauges(inner), mem()
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(eviction_policy="fifo")) as t:
        await t.put([key(i) for i in range(4)], [value(i) for i in range(4)])
        await t.flush()
        puts_before = fast.calls.count("put")
        assert (await t.put([key(4)], [value(4)]))[0].status is PutStatus.STORED
        assert fast.calls.count("put") == puts_before + 2  # the rejected try and the retry
        assert await holds(inner, [key(0), key(4)]) == [False, True]
        assert tier_stats(t, 0)["evictions"] == 1


# ---------------------------------------------------------------------------------------------
# A memory + file stack (the usual CPU + SSD deployment)


def file_url(path: Any, capacity: str | None = None) -> str:
    return f"file://{path}" + (f"?capacity={capacity}" if capacity else "")


async def test_a_put_batch_larger_than_tier0_is_written_around_it(tmp_path) -> None:
    MiB = 1 << 20
    urls = ["memory://?capacity=4MiB", file_url(tmp_path / "kv")]
    keys = [key(i) for i in range(16)]
    vals = [value(i, MiB) for i in range(16)]
    async with TieredBackend.from_urls(urls) as t:
        results = await t.put(keys, vals)
        assert [r.status for r in results] == [PutStatus.STORED] * 16  # today: 4 stored, 12 rejected
        fast, disk = t.tiers
        in_fast = await fast.contains(keys)
        assert 0 < sum(in_fast) <= 4
        assert tier_stats(t, 1)["written_around"] == 16 - sum(in_fast)
        await t.flush(timeout=30)
        assert await disk.contains(keys) == [True] * 16
        assert await read(t, keys, MiB) == vals


async def test_a_value_no_tier_can_take_keeps_tier0s_rejection() -> None:
    fast, slow = mem("4KiB"), mem("4KiB")
    async with fast, slow, TieredBackend([fast, slow]) as t:
        r = (await t.put([key(1)], [value(1, 8 * KiB)]))[0]
        assert r.status is PutStatus.REJECTED and r.reason in ("capacity", "too_large")
        assert tier_stats(t, 1)["written_around"] == 0


def test_a_stack_follows_the_event_loop_it_is_used_from(tmp_path) -> None:
    t = TieredBackend.from_urls(["memory://?capacity=1MiB", file_url(tmp_path / "kv")], close_timeout=5)

    async def first() -> None:
        assert (await t.put([key(1)], [value(1)]))[0].ok
        assert await t.flush(timeout=30)
        await t.put([key(2)], [value(2)])  # left queued when this loop ends

    async def second() -> list[bool]:
        # Today: the put says stored but never reaches tier 1, and aclose() waits out
        # close_timeout, then fails with "Event loop is closed".
        assert (await t.put([key(3)], [value(3)]))[0].ok
        assert await t.flush(timeout=30)
        held = await t.tiers[1].contains([key(1), key(2), key(3)])
        await t.aclose()
        return held

    asyncio.run(first())
    # key(2)'s write-back, queued (or taken by the writer) when the first loop ended, is not lost.
    assert asyncio.run(second()) == [True, True, True]
    assert tier_stats(t, 1)["writeback_dropped"] == 0


async def test_memory_file_stack_persists_through_a_restart(tmp_path) -> None:
    urls = ["memory://?capacity=1MiB", file_url(tmp_path / "kv")]
    async with TieredBackend.from_urls(urls) as t:
        await t.put([key(i) for i in range(3)], [value(i) for i in range(3)])
        url = t.url
    # aclose() flushed the write-back: a fresh process-like stack finds the values on disk.
    async with TieredBackend.from_url(url) as again:
        assert again.capabilities.persistent
        assert await again.lookup_prefix([key(0), key(1), key(2), key(3)]) == 3
        assert await read(again, [key(1)]) == [value(1)]
        assert tier_stats(again, 1)["hits"] == 1 and tier_stats(again, 0)["promotions"] == 1
        assert await read(again.tiers[0], [key(1)]) == [value(1)]


async def test_a_persistent_tier_is_seeded_so_old_values_are_evicted_first(tmp_path) -> None:
    root = tmp_path / "kv"
    async with TieredBackend.from_urls([file_url(root)]) as first:
        await first.put([key(i) for i in range(3)], [value(i) for i in range(3)])
    # Restart with a 4 KiB file tier: it holds the 3 old values and must evict them before new ones.
    async with TieredBackend.from_urls(["memory://?capacity=1MiB", file_url(root, "4KiB")]) as t:
        st = tier_stats(t, 1)
        assert st["tracked_keys"] == 3 and st["tracked_bytes"] == 3 * KiB  # sizes from used_bytes
        await t.put([key(10), key(11)], [value(10), value(11)])
        await t.flush()
        disk = t.tiers[1]
        old = await holds(disk, [key(0), key(1), key(2)])
        assert sorted(old) == [False, True, True]  # one old value (in listing order) made room
        assert await holds(disk, [key(10), key(11)]) == [True, True]
        assert tier_stats(t, 1)["evictions"] == 1
        assert tier_stats(t, 1)["writeback_written"] == 2


# ---------------------------------------------------------------------------------------------
# Buffers, listing and concurrency


async def test_write_back_reuses_its_staging_buffers(stack) -> None:
    t, _, slow = stack
    batch = t.settings.write_back_batch
    await t.put([key(i) for i in range(batch)], [value(i) for i in range(batch)])
    await t.flush()
    warm = tier_stats(t, 1)["staging_bytes"]
    assert 0 < warm <= batch * KiB
    for round_ in range(1, 5):
        ks = range(round_ * 100, round_ * 100 + batch)
        await t.put([key(i) for i in ks], [value(i) for i in ks])
        await t.flush()
    assert tier_stats(t, 1)["staging_bytes"] == warm  # no new buffers once warm
    assert tier_stats(t, 1)["writeback_written"] == 5 * batch
    assert await read(slow, [key(401)]) == [value(401)]


async def test_list_keys_is_the_union_of_the_tiers(stack) -> None:
    t, fast, slow = stack
    await fast.put([key(1), key(2)], [value(1), value(2)])
    await slow.put([key(2), key(3)], [value(2), value(3)])
    listed = [k async for k in t.list_keys()]
    assert sorted(listed, key=lambda k: k.chunk_hash) == [key(1), key(2), key(3)]
    entries = dict([e async for e in t.list_entries()])
    assert set(entries) == {key(1), key(2), key(3)}


async def test_concurrent_traffic_with_eviction_never_loses_a_stored_value() -> None:
    # An 8 KiB tier 0 under constant eviction; every value it accepted must still be served
    # (from tier 1) once write-back drained: pinning keeps unwritten values from being evicted.
    fast, slow = mem("8KiB"), mem("4MiB")
    stored: set[int] = set()
    async with fast, slow, TieredBackend([fast, slow], TieredSettings(write_back_batch=4)) as t:

        async def worker(w: int) -> None:
            rng = random.Random(w)
            for _ in range(40):
                i = rng.randrange(120)
                if rng.random() < 0.5:
                    r = (await t.put([key(i)], [value(i)]))[0]
                    if r.ok:
                        stored.add(i)
                else:
                    got = await read(t, [key(i)])
                    assert got[0] in (None, value(i))

        await asyncio.gather(*(worker(w) for w in range(12)))
        assert await t.flush(timeout=60)
        ids = sorted(stored)
        assert ids and tier_stats(t, 0)["evictions"] > 0
        assert await read(t, [key(i) for i in ids]) == [value(i) for i in ids]
        assert t.stats()["tier_writeback_dropped"] == 0


async def test_each_slower_tier_has_its_own_writer() -> None:
    # A stuck tier 2 must not hold back write-back to tier 1.
    a, b, inner_c = mem(), mem(), mem()
    c = Faulty(inner_c)
    c.put_gate = asyncio.Event()
    async with a, b, c, TieredBackend([a, b, c]) as t:
        await t.put([key(1), key(2)], [value(1), value(2)])
        await c.put_entered.wait()  # tier 2's writer is stuck inside its put
        for _ in range(100):
            if tier_stats(t, 1)["writeback_written"] == 2:
                break
            await asyncio.sleep(0)
        assert await read(b, [key(1), key(2)]) == [value(1), value(2)]
        assert await holds(inner_c, [key(1)]) == [False]
        c.put_gate.set()
        await t.flush()
        assert await read(inner_c, [key(1), key(2)]) == [value(1), value(2)]


# ---------------------------------------------------------------------------------------------
# The in-place seam (what the cache server's fast path uses) and the operator facade


async def test_a_commit_through_in_place_is_tracked_and_written_back_like_a_put(stack) -> None:
    t, fast, slow = stack
    tier0 = t.in_place()
    assert isinstance(tier0, InPlaceTier)
    res = tier0.reserve(key(1), 1 * KiB)
    assert isinstance(res, Reservation)
    tier0.view(res)[:] = value(1)
    assert await t.contains([key(1)]) == [False]  # invisible until committed
    assert tier0.commit(res)
    assert await holds(fast, [key(1)]) == [True]
    assert await t.flush(timeout=30)
    assert await read(slow, [key(1)]) == [value(1)]  # queued for write-back by the commit itself
    assert tier_stats(t, 1)["writeback_written"] == 1
    assert t.stats()["stored"] == 1
    assert tier0.reserve(key(1), 1 * KiB) is Refused.EXISTS


async def test_a_lease_through_in_place_counts_as_a_tier0_hit(stack) -> None:
    t, _, _ = stack
    await t.put([key(2)], [value(2)])
    hits = tier_stats(t, 0)["hits"]
    tier0 = t.in_place()
    assert tier0 is not None
    lease, miss = tier0.lease([key(2), key(3)])
    assert isinstance(lease, Lease) and miss is None
    assert bytes(tier0.view(lease)) == value(2)
    tier0.release(lease)
    assert tier_stats(t, 0)["hits"] == hits + 1
    assert t.stats()["hits"] >= 1 and t.stats()["bytes_read"] >= 1 * KiB


async def test_in_place_is_none_where_tier0_keeps_no_pool(tmp_path) -> None:
    t = TieredBackend.from_urls([f"file://{tmp_path}/kv", "memory://?capacity=1MiB"])
    assert t.in_place() is None


async def test_the_admin_facade_pins_against_eviction_and_moves(stack) -> None:
    t, fast, slow = stack
    admin = t.admin()
    assert admin.pin([key(4)], 60) == 1 and set(admin.pinned()) == {key(4)}
    assert admin.unpin([key(4), key(5)]) == 1 and admin.pinned() == {}
    await slow.put([key(6)], [value(6)])
    assert await admin.move([key(6)], [1 * KiB], 0) == [True]
    assert await holds(fast, [key(6)]) == [True] and await holds(slow, [key(6)]) == [False]
