"""Tests of the memory:// backend: its allocator, its pool, its URL and its concurrency rules."""

from __future__ import annotations

import asyncio
import os
import random
import tracemalloc
from collections.abc import AsyncIterator

import numpy as np
import pytest
from lmcache_conformance import BackendTests

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.memory import DEFAULT_CAPACITY, MemoryBackend, MemorySettings, PoolAllocator
from lmcache.backends.registry import open_backend
from lmcache.errors import BackendClosedError, CapacityError, ConfigError, InvalidBufferError
from lmcache.keys import CacheKey
from lmcache.pool import Refused, Reservation

KiB = 1 << 10
MiB = 1 << 20


def key(i: int) -> CacheKey:
    return CacheKey("test-model", 1, 0, i.to_bytes(32, "big"), "float16")


def value(i: int, n: int) -> bytes:
    return random.Random(i).randbytes(n)


@pytest.fixture
async def mem() -> AsyncIterator[MemoryBackend]:
    b = MemoryBackend.from_url("memory://?capacity=64KiB")
    async with b:
        yield b


async def opened(url: str, **overrides: object) -> MemoryBackend:
    b = MemoryBackend.from_url(url, **overrides)
    await b.open()
    return b


# ---------------------------------------------------------------------------------------------
# The conformance suite


class TestMemoryConformance(BackendTests):
    """The shared suite; the pool fits its largest working set (a 64 MiB batch) with room."""

    @pytest.fixture
    def backend_url(self) -> str:
        return "memory://?capacity=160MiB"

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        # The bytes where they lie in the pool, through a lease (the in-place API). There is no
        # write_raw: values are stored raw (integrity_checked=False), so no damage is detectable.
        assert isinstance(backend, MemoryBackend)
        (lease,) = backend.lease([key])
        if lease is None:
            return None
        try:
            return bytes(backend.view(lease))
        finally:
            backend.release(lease)


# ---------------------------------------------------------------------------------------------
# The allocator alone


def check_allocator(a: PoolAllocator, live: dict[int, int]) -> None:
    """Invariants: live and free blocks tile the arena exactly and free blocks are coalesced."""
    blocks = [(off, a.block_size(n), "live") for off, n in live.items() if n]
    blocks += [(off, size, "free") for off, size in a.free_list()]
    blocks.sort()
    pos = 0
    prev_free = False
    for off, size, kind in blocks:
        assert off == pos, "blocks overlap or leave a gap"
        assert off % a.alignment == 0
        assert not (prev_free and kind == "free"), "two free neighbours were not merged"
        prev_free = kind == "free"
        pos += size
    assert pos == a.size
    assert a.used == sum(a.block_size(n) for n in live.values())
    assert a.free_bytes == sum(size for _, size in a.free_list())


def test_allocator_aligns_offsets_and_sizes() -> None:
    a = PoolAllocator(4096)
    offs = [a.alloc(n) for n in (1, 63, 64, 65, 0, 100)]
    assert offs == [0, 64, 128, 192, 0, 320]
    assert a.used == 64 + 64 + 64 + 128 + 0 + 128
    check_allocator(a, dict(zip([0, 64, 128, 192, 320], [1, 63, 64, 65, 100], strict=True)))


def test_allocator_exact_fit_and_reuse() -> None:
    a = PoolAllocator(1024)
    assert a.alloc(1024) == 0
    assert a.alloc(1) is None
    assert a.largest_free == 0
    a.free(0, 1024)
    assert a.alloc(1000) == 0
    assert a.alloc(64) is None  # 1000 rounds up to 1024: nothing left


def test_allocator_best_fit_prefers_the_smallest_hole() -> None:
    a = PoolAllocator(64 * 20)
    offs = [a.alloc(64 * s) for s in (4, 1, 2, 1, 3, 1)]  # holes of 4, 2, 3 separated by 1s
    assert None not in offs
    for off, s in zip(offs[::2], (4, 2, 3), strict=True):
        a.free(off, 64 * s)
    # 2 blocks fit in holes of 4, 3, 2 and the tail of 6: best fit takes the hole of 2.
    assert a.alloc(128) == offs[2]
    assert a.alloc(192) == offs[4]
    assert a.alloc(256) == offs[0]


def test_allocator_coalesces_both_neighbours() -> None:
    a = PoolAllocator(64 * 3)
    x, y, z = a.alloc(64), a.alloc(64), a.alloc(64)
    assert (x, y, z) == (0, 64, 128)
    a.free(x, 64)
    a.free(z, 64)
    assert a.free_blocks == 2
    assert a.alloc(128) is None  # 128 free, but in two pieces
    a.free(y, 64)
    assert a.free_blocks == 1
    assert a.largest_free == 192
    assert a.alloc(192) == 0


def test_allocator_random_workload_keeps_invariants_and_returns_everything() -> None:
    rng = random.Random(1234)
    a = PoolAllocator(64 * KiB)
    live: dict[int, int] = {}
    for step in range(3000):
        if live and (rng.random() < 0.45 or a.free_bytes < 1024):
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        else:
            n = rng.choice((0, 1, 64, 100, 2048, 4096, rng.randrange(1, 8192)))
            off = a.alloc(n)
            if off is None:
                assert a.largest_free < a.block_size(n)
            elif n:
                assert off not in live
                live[off] = n
        if step % 97 == 0:
            check_allocator(a, live)
    for off, n in list(live.items()):
        a.free(off, n)
    assert a.used == 0
    assert a.free_list() == [(0, 64 * KiB)]


def test_allocator_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError):
        PoolAllocator(100)  # not a multiple of the alignment
    with pytest.raises(ValueError):
        PoolAllocator(128, alignment=48)


# ---------------------------------------------------------------------------------------------
# Basic behaviour


async def test_put_get_round_trip_and_first_writer_wins(mem: MemoryBackend) -> None:
    vals = [value(i, n) for i, n in enumerate((0, 1, 63, 64, 65, 4096))]
    res = await mem.put([key(i) for i in range(6)], vals)
    assert [r.status for r in res] == [PutStatus.STORED] * 6
    again = await mem.put([key(3)], [b"x" * 64])
    assert again[0].status is PutStatus.EXISTS
    dsts = [bytearray(b"\xee" * 5000) for _ in range(7)]
    got = await mem.get_into([key(i) for i in range(7)], dsts)
    assert got == [0, 1, 63, 64, 65, 4096, None]
    for i, v in enumerate(vals):
        assert bytes(dsts[i][: len(v)]) == v
        assert bytes(dsts[i][len(v) :]) == b"\xee" * (5000 - len(v))
    assert dsts[6] == bytearray(b"\xee" * 5000)  # a miss leaves its buffer untouched
    assert await mem.contains([key(0), key(5), key(6)]) == [True, True, False]


async def test_accepts_numpy_and_torch_buffers(mem: MemoryBackend) -> None:
    src = np.arange(512, dtype=np.float32)
    await mem.put([key(1)], [src])
    dst = np.zeros(512, dtype=np.float32)
    assert await mem.get_into([key(1)], [dst]) == [src.nbytes]
    assert np.array_equal(dst, src)
    torch = pytest.importorskip("torch")
    t_dst = torch.zeros(512, dtype=torch.float32)
    assert await mem.get_into([key(1)], [t_dst]) == [src.nbytes]
    assert np.array_equal(t_dst.numpy(), src)


async def test_undersized_buffer_raises_before_writing_any(mem: MemoryBackend) -> None:
    await mem.put([key(1), key(2)], [value(1, 100), value(2, 200)])
    big, small = bytearray(300), bytearray(199)
    with pytest.raises(InvalidBufferError):
        await mem.get_into([key(1), key(2)], [big, small])
    assert big == bytearray(300)
    assert small == bytearray(199)


async def test_list_keys_and_stats(mem: MemoryBackend) -> None:
    await mem.put([key(i) for i in range(3)], [value(i, 100) for i in range(3)])
    assert {k async for k in mem.list_keys()} == {key(0), key(1), key(2)}
    assert {e async for e in mem.list_entries()} == {(key(0), 100), (key(1), 100), (key(2), 100)}
    s = mem.stats()
    assert s["capacity_bytes"] == 64 * KiB
    assert s["entries"] == 3
    assert s["used_bytes"] == 3 * 128
    assert s["free_bytes"] == 64 * KiB - 3 * 128
    assert s["largest_free_block"] == 64 * KiB - 3 * 128
    # Deleting while listing is safe: the listing is a snapshot.
    async for k in mem.list_keys():
        await mem.delete([k])
    assert mem.stats()["entries"] == 0


def test_capabilities() -> None:
    caps = MemoryBackend.capabilities
    assert caps.bounded and caps.listing
    assert not (caps.persistent or caps.shared or caps.integrity_checked or caps.device_buffers)


async def test_closed_backend_is_final() -> None:
    b = await opened("memory://?capacity=4KiB")
    await b.put([key(1)], [b"abc"])
    await b.aclose()
    with pytest.raises(BackendClosedError):
        await b.contains([key(1)])
    with pytest.raises(BackendClosedError):
        await b.open()


# ---------------------------------------------------------------------------------------------
# Capacity, rejection and reuse of space


async def test_exact_fit_then_capacity_rejection_without_eviction() -> None:
    async with MemoryBackend.from_url("memory://?capacity=4KiB") as b:
        assert (await b.put([key(1)], [value(1, 4 * KiB)]))[0].status is PutStatus.STORED
        res = await b.put([key(2)], [b"x"])
        assert res[0].status is PutStatus.REJECTED
        assert res[0].reason == "capacity"
        assert await b.contains([key(1)]) == [True]  # never evicts on its own
        dst = bytearray(4 * KiB)
        assert await b.get_into([key(1)], [dst]) == [4 * KiB]
        assert bytes(dst) == value(1, 4 * KiB)
        assert b.stats()["rejected"] == 1


async def test_value_larger_than_capacity_is_too_large() -> None:
    async with MemoryBackend.from_url("memory://?capacity=4KiB") as b:
        res = await b.put([key(1), key(2)], [bytes(4 * KiB + 1), bytes(10)])
        assert res[0].status is PutStatus.REJECTED
        assert res[0].reason == "too_large"
        assert res[1].status is PutStatus.STORED


async def test_capacity_is_rounded_up_to_the_alignment() -> None:
    async with MemoryBackend.from_url("memory://?capacity=100") as b:
        assert b.stats()["capacity_bytes"] == 128
        assert (await b.put([key(1)], [bytes(100)]))[0].status is PutStatus.STORED


async def test_fill_delete_all_fill_again_reuses_the_whole_pool(mem: MemoryBackend) -> None:
    rng = random.Random(7)
    for rnd in range(3):
        sizes = []
        i = 0
        while True:  # fill with mixed sizes until a put is rejected
            n = rng.randrange(1, 3000)
            res = await mem.put([key(rnd * 10_000 + i)], [value(i, n)])
            if not res[0].ok:
                assert res[0].reason == "capacity"
                break
            sizes.append(n)
            i += 1
        # At most one block's worth of slack: the pool was really full.
        assert mem.stats()["free_bytes"] < 3072
        assert len(sizes) > 15
        await mem.delete([key(rnd * 10_000 + j) for j in range(i)])
        s = mem.stats()
        assert (s["used_bytes"], s["entries"], s["free_blocks"]) == (0, 0, 1)
        assert s["largest_free_block"] == 64 * KiB


async def test_fragmentation_is_reported_and_healed_by_coalescing(mem: MemoryBackend) -> None:
    n = 64 * KiB // 1024
    await mem.put([key(i) for i in range(n)], [value(i, 1024) for i in range(n)])
    await mem.delete([key(i) for i in range(0, n, 2)])  # free every other block
    s = mem.stats()
    assert s["free_bytes"] == 32 * KiB
    assert s["largest_free_block"] == 1024
    res = await mem.put([key(1000)], [bytes(2048)])
    assert res[0].reason == "capacity"  # half the pool is free, but in 1 KiB pieces
    res = await mem.put([key(1001)], [bytes(1024)])
    assert res[0].status is PutStatus.STORED  # exact fit into a hole
    await mem.delete([key(i) for i in range(1, n, 2)] + [key(1001)])
    assert mem.stats()["largest_free_block"] == 64 * KiB
    res = await mem.put([key(1002)], [bytes(64 * KiB)])
    assert res[0].status is PutStatus.STORED


async def test_puts_and_gets_do_not_allocate_per_value() -> None:
    n, size = 32, 256 * KiB
    srcs = [np.full(size, i, dtype=np.uint8) for i in range(n)]
    dsts = [np.empty(size, dtype=np.uint8) for _ in range(n)]
    async with MemoryBackend.from_url("memory://?capacity=16MiB") as b:
        await b.put([key(10_000)], [srcs[0]])  # warm up lazily built state
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            for i in range(n):
                await b.put([key(i)], [srcs[i]])
            await b.get_into([key(i) for i in range(n)], dsts)
            peak = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
    # Holding even one value-sized temporary would exceed this; bookkeeping is a few KiB.
    assert peak < size // 4, f"puts/gets allocated {peak} bytes"
    assert all(int(d[0]) == i and int(d[-1]) == i for i, d in enumerate(dsts))


# ---------------------------------------------------------------------------------------------
# Concurrency on the event loop


async def spin_until(cond: object, limit: int = 10_000) -> int:
    """Yield to the loop until ``cond()`` holds; returns how many yields it took."""
    for i in range(limit):
        if cond():  # type: ignore[operator]
            return i
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


async def test_a_put_publishes_its_key_only_after_the_copy() -> None:
    size = 256 * KiB
    data = value(1, size)
    async with MemoryBackend.from_url("memory://?capacity=1MiB&yield_every=4KiB") as b:
        put = asyncio.create_task(b.put([key(1)], [data]))
        polls = 0
        dst = bytearray(size)
        while not put.done():
            # Until the put has finished, readers see a miss, never a partly copied value.
            assert await b.contains([key(1)]) == [False]
            assert await b.get_into([key(1)], [dst]) == [None]
            assert [k async for k in b.list_keys()] == []
            assert b.stats()["entries"] == 0
            polls += 1
            await asyncio.sleep(0)
        assert dst == bytearray(size)
        assert (await put)[0].status is PutStatus.STORED
        assert polls > 8  # the copy really was split across yields
        assert await b.get_into([key(1)], [dst]) == [size]
        assert bytes(dst) == data


async def test_delete_during_get_does_not_hand_the_block_to_a_put() -> None:
    size = 64 * KiB
    data = value(1, size)
    async with MemoryBackend.from_url("memory://?capacity=64KiB&yield_every=1KiB") as b:
        await b.put([key(1)], [data])
        dst = bytearray(size)
        get = asyncio.create_task(b.get_into([key(1)], [dst]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not get.done()
        await b.delete([key(1)])
        assert await b.contains([key(1)]) == [False]
        # The block is still being read: the new put must not get it.
        res = await b.put([key(2)], [b"\xff" * size])
        assert res[0].reason == "capacity"
        assert await get == [size]
        assert bytes(dst) == data
        assert b.stats()["used_bytes"] == 0  # the last reader freed it
        assert (await b.put([key(2)], [b"\xff" * size]))[0].status is PutStatus.STORED


async def test_delete_while_the_same_key_is_being_put_stays_consistent() -> None:
    size = 64 * KiB
    async with MemoryBackend.from_url("memory://?capacity=256KiB&yield_every=1KiB") as b:
        put = asyncio.create_task(b.put([key(1)], [value(1, size)]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        await b.delete([key(1)])  # nothing published yet: the put is ordered after this
        assert (await put)[0].status is PutStatus.STORED
        assert await b.contains([key(1)]) == [True]
        assert b.stats()["used_bytes"] == size
        await b.delete([key(1)])
        s = b.stats()
        assert (s["used_bytes"], s["entries"], s["free_blocks"]) == (0, 0, 1)


async def test_concurrent_puts_of_one_key_store_it_once() -> None:
    size = 64 * KiB
    first, second = value(1, size), value(2, size)
    async with MemoryBackend.from_url("memory://?capacity=256KiB&yield_every=1KiB") as b:
        p1 = asyncio.create_task(b.put([key(1)], [first]))
        await asyncio.sleep(0)
        p2 = asyncio.create_task(b.put([key(1)], [second]))
        r1, r2 = await p1, await p2
        assert (r1[0].status, r2[0].status) == (PutStatus.STORED, PutStatus.EXISTS)
        dst = bytearray(size)
        await b.get_into([key(1)], [dst])
        assert bytes(dst) == first
        assert b.stats()["used_bytes"] == size


async def test_cancelled_put_releases_its_block_and_lets_a_waiter_store() -> None:
    size = 64 * KiB
    second = value(2, size)
    async with MemoryBackend.from_url("memory://?capacity=128KiB&yield_every=1KiB") as b:
        p1 = asyncio.create_task(b.put([key(1)], [value(1, size)]))
        await asyncio.sleep(0)
        p2 = asyncio.create_task(b.put([key(1)], [second]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        p1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await p1
        assert (await p2)[0].status is PutStatus.STORED
        dst = bytearray(size)
        assert await b.get_into([key(1)], [dst]) == [size]
        assert bytes(dst) == second
        assert b.stats()["used_bytes"] == size  # the cancelled put's block came back


async def test_nothing_writes_into_dst_after_a_cancelled_get_returns() -> None:
    size = 256 * KiB
    async with MemoryBackend.from_url("memory://?capacity=1MiB&yield_every=4KiB") as b:
        await b.put([key(1)], [b"\x01" * size])
        dst = bytearray(size)
        get = asyncio.create_task(b.get_into([key(1)], [dst]))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        get.cancel()
        with pytest.raises(asyncio.CancelledError):
            await get
        snapshot = bytes(dst)
        assert 0 < snapshot.count(1) < size  # it stopped part way
        for _ in range(200):
            await asyncio.sleep(0)
        assert bytes(dst) == snapshot
        assert b.stats()["used_bytes"] == size  # the pin was released, the value kept
        await b.delete([key(1)])
        assert b.stats()["used_bytes"] == 0


async def test_a_large_batch_lets_other_tasks_run() -> None:
    ticks = 0
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    n, size = 64, 64 * KiB
    async with MemoryBackend.from_url("memory://?capacity=8MiB&yield_every=256KiB") as b:
        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = ticks
        await b.put([key(i) for i in range(n)], [bytes(size)] * n)
        during_put = ticks - start
        start = ticks
        await b.get_into([key(i) for i in range(n)], [bytearray(size) for _ in range(n)])
        during_get = ticks - start
        stop = True
        await t
    # 4 MiB copied per call with a yield every 256 KiB: about 16 chances for the ticker each.
    assert during_put >= 8
    assert during_get >= 8


async def test_a_single_huge_value_is_copied_in_slices() -> None:
    size = 1 * MiB
    data = value(3, size)
    async with MemoryBackend.from_url("memory://?capacity=2MiB&yield_every=64KiB") as b:
        put = asyncio.create_task(b.put([key(1)], [data]))
        yields = await spin_until(put.done)
        assert yields >= 8
        dst = bytearray(size)
        get = asyncio.create_task(b.get_into([key(1)], [dst]))
        assert await spin_until(get.done) >= 8
        assert bytes(dst) == data


# ---------------------------------------------------------------------------------------------
# URLs and options


def test_default_url_and_round_trip() -> None:
    b = MemoryBackend.from_url("memory://")
    assert b.settings == MemorySettings()
    assert b.settings.capacity == DEFAULT_CAPACITY == 1 << 30
    assert b.url == "memory://?capacity=1GiB"
    for url in (
        "memory://?capacity=2GiB&prefault=false",
        "memory://?capacity=100&prefault=true&hugepages=false&yield_every=1MiB",
        "memory:///?capacity=3MB",
    ):
        b = MemoryBackend.from_url(url)
        again = MemoryBackend.from_url(b.url)
        assert again.settings == b.settings
        assert again.url == b.url
    assert MemoryBackend.from_url("memory://?capacity=2GiB&prefault=false").url == "memory://?capacity=2GiB"


def test_open_backend_resolves_memory_and_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_MEMORY_CAPACITY", "3MiB")
    b = open_backend("memory://")
    assert isinstance(b, MemoryBackend)
    assert b.settings.capacity == 3 * MiB  # env beats the default
    assert open_backend("memory://?capacity=4MiB").settings.capacity == 4 * MiB  # URL beats env
    b = open_backend("memory://?capacity=4MiB", capacity="5MiB", prefault=True)
    assert (b.settings.capacity, b.settings.prefault) == (5 * MiB, True)  # kwargs beat the URL


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("memory://?capacity=lots", "capacity"),
        ("memory://?capacity=0", "capacity"),
        ("memory://?capacity=-1GiB", "capacity"),
        ("memory://?capacity=1GiB&capacity=2GiB", "twice"),
        ("memory://?prefault=maybe", "prefault"),
        ("memory://?yield_every=0", "yield_every"),
        ("memory://name?capacity=1GiB", "no host"),
        ("memory://host:1234", "no host"),
        ("memory:///var/cache", "no host"),
        ("memory://?capacity=1GiB#frag", "no host"),
    ],
)
def test_bad_urls_raise_config_error(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        MemoryBackend.from_url(url)


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        MemoryBackend.from_url("memory://?capcity=1GiB")
    msg = str(info.value)
    assert "capcity" in msg
    for name in ("capacity", "prefault", "hugepages", "yield_every"):
        assert name in msg


def test_unknown_keyword_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="size"):
        MemoryBackend.from_url("memory://", size="1GiB")


@pytest.mark.parametrize("query", ["prefault=true", "prefault=true&hugepages=false", "hugepages=false"])
async def test_page_options_open_a_working_pool(query: str) -> None:
    async with MemoryBackend.from_url(f"memory://?capacity=2MiB&{query}") as b:
        data = os.urandom(MiB)
        await b.put([key(1)], [data])
        dst = bytearray(MiB)
        assert await b.get_into([key(1)], [dst]) == [MiB]
        assert bytes(dst) == data


async def test_prefault_beyond_available_memory_is_refused() -> None:
    b = MemoryBackend.from_url("memory://?capacity=1TiB&prefault=true")
    with pytest.raises(CapacityError, match="prefault"):
        await b.open()
    await b.aclose()


async def test_closing_during_a_put_fails_that_put() -> None:
    b = await opened("memory://?capacity=1MiB&yield_every=4KiB")
    put = asyncio.create_task(b.put([key(1)], [bytes(256 * KiB)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not put.done()
    await b.aclose()
    with pytest.raises(BackendClosedError):
        await put


@pytest.mark.parametrize("advice", [None, 9999], ids=["no-populate-advice", "kernel-refuses-advice"])
async def test_prefault_falls_back_to_touching_pages(monkeypatch: pytest.MonkeyPatch, advice: int | None) -> None:
    import lmcache.pool.mapping as memory_module

    monkeypatch.setattr(memory_module, "_MADV_POPULATE_WRITE", advice)
    async with MemoryBackend.from_url("memory://?capacity=1MiB&prefault=true") as b:
        await b.put([key(1)], [b"abc"])
        dst = bytearray(3)
        assert await b.get_into([key(1)], [dst]) == [3]
        assert dst == b"abc"


# -- in-place access: leases and reservations (what the cache server uses) ----------------------


async def test_a_lease_reads_in_place_and_outlives_a_delete(mem: MemoryBackend) -> None:
    await mem.put([key(1)], [value(1, 5000)])
    [block] = mem.lease([key(1)])
    assert block is not None and bytes(mem.view(block)) == value(1, 5000)
    await mem.delete([key(1)])
    assert mem.lease([key(1)]) == [None]
    # The block is still pinned: a put of the same size must not be handed its bytes.
    await mem.put([key(2)], [value(2, 5000)])
    assert bytes(mem.view(block)) == value(1, 5000)
    used = mem.stats()["used_bytes"]
    mem.release(block)
    assert mem.stats()["used_bytes"] < used  # the last reader freed it


async def test_a_reservation_is_invisible_until_committed(mem: MemoryBackend) -> None:
    block = mem.reserve(key(3), 4096)
    assert isinstance(block, Reservation)
    assert await mem.contains([key(3)]) == [False]
    assert mem.reserve(key(3), 4096) is Refused.BUSY
    mem.view(block)[:] = value(3, 4096)
    assert mem.commit(block)
    assert mem.reserve(key(3), 4096) is Refused.EXISTS
    dst = bytearray(4096)
    assert await mem.get_into([key(3)], [dst]) == [4096] and bytes(dst) == value(3, 4096)
    assert mem.stats()["stored"] == 1


async def test_an_aborted_reservation_frees_its_block_and_wakes_a_waiting_put(mem: MemoryBackend) -> None:
    used = mem.stats()["used_bytes"]
    block = mem.reserve(key(4), 8192)
    assert isinstance(block, Reservation) and mem.stats()["used_bytes"] > used
    waiting = asyncio.ensure_future(mem.put([key(4)], [value(4, 100)]))
    await asyncio.sleep(0.01)
    assert not waiting.done()  # a put of a reserved key waits for the reservation to settle
    mem.abort(block)
    assert [r.status for r in await waiting] == [PutStatus.STORED]
    assert mem.reserve(key(5), mem.capacity_bytes + 1) is Refused.TOO_LARGE
