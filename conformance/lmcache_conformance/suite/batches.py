"""Batch mixin: misses as data, batch order, large batches, duplicates, first writer wins, deletes, prefixes.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import asyncio
import random
from typing import ClassVar

import numpy as np
import pytest

from lmcache.backends.base import PutStatus, StorageBackend

from .base import SuiteBase
from .support import SENTINEL, KiB, expect_bytes, random_key, random_value, untouched

__all__ = ["BatchTests"]


class BatchTests(SuiteBase):
    """What a batch call answers, key by key, in input order.

    Attributes:
        large_batch_values: Small values in the one-batch test (at least 256: batches that
            size are routine for an engine, and bugs hide past 32 or 64).
    """

    large_batch_values: ClassVar[int] = 300

    @pytest.mark.asyncio
    async def test_miss_is_data_and_dst_untouched(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        dsts = [np.full(512, SENTINEL, dtype=np.uint8) for _ in keys]
        assert await backend.contains(keys) == [False, False, False]
        assert await backend.get_into(keys, dsts) == [None, None, None]
        assert all(untouched(d.tobytes()) for d in dsts)
        assert await backend.lookup_prefix(keys) == 0

    @pytest.mark.asyncio
    async def test_empty_batches(self, backend: StorageBackend) -> None:
        assert await backend.contains([]) == []
        assert await backend.get_into([], []) == []
        assert await backend.put([], []) == []
        assert await backend.delete([]) is None
        assert await backend.lookup_prefix([]) == 0

    @pytest.mark.asyncio
    async def test_batch_order_is_preserved(self, backend: StorageBackend) -> None:
        rng = random.Random()
        sizes = [rng.randrange(1, 5000) for _ in range(12)]
        keys = [random_key() for _ in sizes]
        values = [random_value(n) for n in sizes]
        await self.put_all(backend, keys, values)
        order = list(range(len(keys)))
        rng.shuffle(order)
        dsts = [np.full(5000, SENTINEL, dtype=np.uint8) for _ in order]
        got = await backend.get_into([keys[i] for i in order], dsts)
        assert got == [sizes[i] for i in order]
        for i, dst in zip(order, dsts, strict=True):
            expect_bytes(dst[: sizes[i]].tobytes(), values[i])

    @pytest.mark.asyncio
    async def test_large_batch_of_small_values(self, backend: StorageBackend) -> None:
        """Every value of a batch of hundreds is held, read back and deleted, in input order."""
        n = max(256, self.large_batch_values)
        rng = random.Random()
        keys = [random_key() for _ in range(n)]
        values = [random_value(rng.randrange(0, 64)) for _ in keys]
        await self.put_all(backend, keys, values)
        found = await backend.contains(keys)
        lost = [i for i, hit in enumerate(found) if not hit]
        assert not lost, (
            f"large batch: {len(lost)} of {n} values reported STORED are not held "
            f"(the first is value {lost[0]} of the batch)"
        )
        dsts = [np.full(64, SENTINEL, dtype=np.uint8) for _ in keys]
        got = await backend.get_into(keys, dsts)
        assert len(got) == n, f"large batch: get_into of {n} keys returned {len(got)} results"
        wrong = [i for i, (size, v) in enumerate(zip(got, values, strict=True)) if size != len(v)]
        assert not wrong, f"large batch: {len(wrong)} of {n} values read back as {got[wrong[0]]}, first at {wrong[0]}"
        for i, (dst, value) in enumerate(zip(dsts, values, strict=True)):
            expect_bytes(dst[: len(value)].tobytes(), value, f"large batch: value {i} of {n}")
        assert await backend.lookup_prefix(keys) == n, f"large batch: lookup_prefix of {n} held keys"
        # The same keys again, interleaved with as many new ones: statuses in input order.
        fresh = [random_key() for _ in range(n)]
        mixed = [k for pair in zip(keys, fresh, strict=True) for k in pair]
        results = await backend.put(mixed, [b"x"] * len(mixed))
        statuses = [r.status for r in results]
        if not backend.capabilities.bounded or all(r.ok for r in results):
            expected = [PutStatus.EXISTS, PutStatus.STORED] * n
            assert statuses == expected, "large batch: a put of held and new keys reported statuses out of order"
        await backend.delete(keys)
        found = await backend.contains(keys + fresh)
        assert not any(found[:n]), f"large batch: {sum(found[:n])} of {n} deleted values are still held"
        held_fresh = [r.ok for r in results[1::2]]
        assert found[n:] == held_fresh, "large batch: deleting a batch removed other keys"

    @pytest.mark.asyncio
    async def test_mixed_hits_and_misses(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(8)]
        values = [random_value(100 + i) for i in range(8)]
        held = [0, 2, 3, 6]
        await self.put_all(backend, [keys[i] for i in held], [values[i] for i in held])
        assert await backend.contains(keys) == [i in held for i in range(8)]
        dsts = [np.full(200, SENTINEL, dtype=np.uint8) for _ in keys]
        got = await backend.get_into(keys, dsts)
        for i, (n, dst) in enumerate(zip(got, dsts, strict=True)):
            if i in held:
                assert n == len(values[i])
                expect_bytes(dst[:n].tobytes(), values[i])
                assert untouched(dst[n:].tobytes())
            else:
                assert n is None
                assert untouched(dst.tobytes())

    @pytest.mark.asyncio
    async def test_duplicate_keys_in_get(self, backend: StorageBackend) -> None:
        key, other, value = random_key(), random_key(), random_value(777)
        await self.put_all(backend, [key], [value])
        dsts = [np.full(800, SENTINEL, dtype=np.uint8) for _ in range(4)]
        assert await backend.get_into([key, other, key, key], dsts) == [777, None, 777, 777]
        for i in (0, 2, 3):
            expect_bytes(dsts[i][:777].tobytes(), value)
        assert untouched(dsts[1].tobytes())
        assert await backend.contains([key, key, other]) == [True, True, False]

    @pytest.mark.asyncio
    async def test_duplicate_keys_in_put_first_wins(self, backend: StorageBackend) -> None:
        key, other = random_key(), random_key()
        first, second, third = random_value(300), random_value(300), random_value(50)
        results = await self.put_all(backend, [key, other, key], [first, third, second])
        assert [r.status for r in results] == [PutStatus.STORED, PutStatus.STORED, PutStatus.EXISTS]
        expect_bytes(await self.read(backend, key, 300), first)
        expect_bytes(await self.read(backend, other, 300), third)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("same_bytes", [True, False], ids=["same_bytes", "different_bytes"])
    async def test_put_is_idempotent_first_writer_wins(self, backend: StorageBackend, same_bytes: bool) -> None:
        key, value = random_key(), random_value(2048)
        await self.put_all(backend, [key], [value])
        again = value if same_bytes else random_value(1024)
        results = await backend.put([key], [again])
        assert [r.status for r in results] == [PutStatus.EXISTS]
        assert results[0].ok
        expect_bytes(await self.read(backend, key, 4096), value)

    @pytest.mark.asyncio
    async def test_delete_then_miss(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        values = [random_value(100) for _ in keys]
        await self.put_all(backend, keys, values)
        await backend.delete([keys[0], keys[2], keys[0]])  # a duplicate in one delete is fine
        assert await backend.contains(keys) == [False, True, False]
        assert await self.read(backend, keys[0], 100) is None
        expect_bytes(await self.read(backend, keys[1], 100), values[1])
        # A deleted key can be stored again, with new bytes.
        fresh = random_value(60)
        await self.put_all(backend, [keys[0]], [fresh])
        expect_bytes(await self.read(backend, keys[0], 100), fresh)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("ticks", [0, 1, 3])
    async def test_delete_is_not_undone_by_background_work(self, ticks: int) -> None:
        # Backends that finish puts in the background (write-back, replication) must not let
        # that work bring a deleted key back. Races are timing-dependent, and likeliest while a
        # new backend starts its workers: try a few rounds, each on a fresh backend.
        for _ in range(8):
            async with self.fresh_backend() as b:
                keys = [random_key() for _ in range(4)]
                srcs = [random_value(10), random_value(3), b"", random_value(64 * KiB)]
                await self.put_all(b, keys, srcs)
                for _ in range(ticks):
                    await asyncio.sleep(0)
                await b.delete(keys[1:])
                assert await b.contains(keys) == [True, False, False, False], "a deleted key is still held"
                for _ in range(20):
                    await asyncio.sleep(0)
                await asyncio.sleep(0.01)
                assert await b.contains(keys) == [True, False, False, False], "a deleted key came back"
                for key in keys[1:]:
                    assert await self.read(b, key, 64 * KiB) is None, "a deleted key came back"
                expect_bytes(await self.read(b, keys[0], 64 * KiB), srcs[0])

    @pytest.mark.asyncio
    async def test_delete_absent_keys_is_fine(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(3)]
        await backend.delete(keys)
        await backend.delete(keys)
        assert await backend.contains(keys) == [False, False, False]

    @pytest.mark.asyncio
    async def test_contains(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(5)]
        assert await backend.contains(keys) == [False] * 5
        await self.put_all(backend, keys[1:4], [b"a", b"", b"c"])
        assert await backend.contains(keys) == [False, True, True, True, False]
        assert await backend.contains(keys[::-1]) == [False, True, True, True, False][::-1]

    @pytest.mark.asyncio
    async def test_lookup_prefix(self, backend: StorageBackend) -> None:
        keys = [random_key() for _ in range(6)]
        await self.put_all(backend, [keys[0], keys[1], keys[3], keys[4]], [b"0", b"1", b"3", b"4"])
        assert await backend.lookup_prefix(keys) == 2
        assert await backend.lookup_prefix(keys[:2]) == 2
        assert await backend.lookup_prefix(keys[2:]) == 0
        assert await backend.lookup_prefix(keys[3:5]) == 2
        assert await backend.lookup_prefix([keys[5], keys[0]]) == 0
