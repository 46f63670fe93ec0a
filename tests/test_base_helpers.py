"""The batching helpers every remote adapter shares (``lmcache.backends.base``)."""

from __future__ import annotations

import asyncio

import pytest

from lmcache.backends.base import WorkerGate, gather_all, split_by_size


def test_split_by_size_bounds_bytes_and_items() -> None:
    assert split_by_size([], 10) == []
    assert split_by_size([4, 4, 4], 8) == [range(0, 2), range(2, 3)]
    assert split_by_size([20, 1, 1], 8) == [range(0, 1), range(1, 3)]  # a lone big item
    assert split_by_size([1] * 5, 100, max_items=2) == [range(0, 2), range(2, 4), range(4, 5)]


async def test_gather_all_returns_in_order_and_leaves_nothing_running() -> None:
    async def ok(i: int) -> int:
        await asyncio.sleep(0.01 * (3 - i))
        return i

    assert await gather_all([ok(i) for i in range(3)]) == [0, 1, 2]
    finished: list[int] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            finished.append(1)

    async def boom() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await gather_all([slow(), boom()])
    assert finished == [1]  # the sibling was cancelled and awaited before the error surfaced


def test_an_abandoned_gate_keeps_the_worker_out() -> None:
    gate = WorkerGate()
    assert gate.enter()
    gate.leave()
    gate.abandon()
    assert not gate.enter()
