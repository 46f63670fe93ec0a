"""The adapter kit (``lmcache.backends.{base,buffers,concurrency,urls}``): helpers every adapter shares."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import mmap
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from lmcache.backends import base
from lmcache.backends.base import STORED, Capabilities, PutResult, PutStatus, StorageBackend
from lmcache.backends.buffers import buffer_address, is_aligned, page_aligned
from lmcache.backends.concurrency import (
    WorkerAbandoned,
    WorkerGate,
    gather_all,
    gather_settled,
    run_gated,
    run_pooled,
    settle_inflight,
    split_by_size,
    take,
)
from lmcache.backends.urls import server_location, settings_query, split_url, url_host
from lmcache.errors import BackendTimeoutError, ConfigError, InvalidBufferError
from lmcache.keys import CacheKey


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
    with pytest.raises(WorkerAbandoned), gate.held():
        pytest.fail("an abandoned gate was held")


async def test_settle_inflight_waits_for_abandoned_workers_and_counts_the_rest() -> None:
    loop = asyncio.get_running_loop()
    quick, stuck = loop.create_future(), loop.create_future()
    loop.call_later(0.02, quick.set_result, None)
    assert await settle_inflight({quick}, 5) == 0 and quick.done()
    assert await settle_inflight({stuck}, 0.02) == 1
    stuck.cancel()


# -- run_gated / run_pooled: one bounded, abandonable SDK call (mooncake, infinistore) ----------


async def test_run_gated_times_out_keeps_the_worker_out_and_releases_once_it_ends() -> None:
    executor = ThreadPoolExecutor(1)
    started, go_on = threading.Event(), threading.Event()
    touched: list[str] = []
    released: list[str] = []
    inflight: set[asyncio.Future[Any]] = set()

    def worker(gate: WorkerGate) -> str:
        started.set()
        go_on.wait(10)
        if not gate.enter():  # the caller gave up: its buffers are no longer ours
            raise WorkerAbandoned
        try:
            touched.append("dst")
        finally:
            gate.leave()
        return "late"

    try:
        with pytest.raises(BackendTimeoutError, match=r"read on test://x: no answer within 0\.05 s"):
            await run_gated(
                executor, worker, 0.05, lambda: released.append("arena"), what="read on test://x", inflight=inflight
            )
        assert started.is_set() and released == [] and len(inflight) == 1  # still running: keeps its arena
        go_on.set()
        await asyncio.wait(set(inflight))
        await asyncio.sleep(0)  # the done callbacks run on the loop
        assert touched == [] and released == ["arena"]
        # A call that completes releases at once, exactly once.
        assert await run_gated(executor, lambda gate: 7, 5, lambda: released.append("again"), what="w") == 7
        assert released == ["arena", "again"]
    finally:
        go_on.set()
        executor.shutdown(wait=True)


async def test_run_gated_releases_when_the_call_raises_or_cannot_start() -> None:
    executor = ThreadPoolExecutor(1)
    released: list[int] = []

    def boom(gate: WorkerGate) -> None:
        raise KeyError("sdk")

    with pytest.raises(KeyError):
        await run_gated(executor, boom, 5, lambda: released.append(1), what="w")
    executor.shutdown(wait=True)
    with pytest.raises(RuntimeError):  # a shut-down executor: nothing ran, the item comes back
        await run_gated(executor, lambda gate: None, 5, lambda: released.append(2), what="w")
    assert released == [1, 2]


async def test_run_pooled_counts_the_wait_for_an_item_and_gives_it_back() -> None:
    executor = ThreadPoolExecutor(2)
    pool: asyncio.Queue[int] = asyncio.Queue()
    pool.put_nowait(0)
    try:
        assert await run_pooled(executor, pool, lambda gate, idx: idx + 40, 5, what="get on t", item="arena") == 40
        assert pool.qsize() == 1
        held = await take(pool, 1, "t")  # every arena is busy (e.g. held by an abandoned call)
        with pytest.raises(BackendTimeoutError, match=r"get on t: no free arena within 0\.05 s"):
            await run_pooled(executor, pool, lambda gate, idx: idx, 0.05, what="get on t", item="arena")
        pool.put_nowait(held)
        assert pool.qsize() == 1
    finally:
        executor.shutdown(wait=True)


async def test_gather_settled_waits_for_every_job_then_raises_the_first_failure() -> None:
    finished: list[int] = []

    async def slow(i: int) -> int:
        await asyncio.sleep(0.05)
        finished.append(i)
        return i

    async def boom() -> int:
        raise ValueError("first")

    assert await gather_settled([slow(0), slow(1)]) == [0, 1]
    with pytest.raises(ValueError, match="first"):
        await gather_settled([boom(), slow(2)])
    assert finished == [0, 1, 2]  # not cancelled: it settled before the error surfaced


# -- buffers ----------------------------------------------------------------------------------


def test_page_aligned_memory_and_the_alignment_check() -> None:
    arena = page_aligned(3 * 4096 + 5)
    assert arena.nbytes == 3 * 4096 + 5 and buffer_address(arena) % mmap.PAGESIZE == 0
    view = memoryview(arena)
    assert is_aligned(view, 4096) and not is_aligned(view[1:], 4096) and not is_aligned(view[:0])


# -- urls -------------------------------------------------------------------------------------


def test_server_location_takes_host_and_port_and_refuses_the_rest() -> None:
    assert server_location(split_url("sdk://10.0.0.5:1234"), "sdk://h:1") == {"host": "10.0.0.5", "port": 1234}
    assert server_location(split_url("sdk://[::1]?x=1"), "sdk://h:1") == {"host": "::1"}
    for bad in ("sdk://h:1/path", "sdk://u:p@h:1", "sdk://h:1#frag", "sdk://:1", "sdk://h:"):
        with pytest.raises(ConfigError, match="sdk://"):
            server_location(split_url(bad), "sdk://h:1")
    assert url_host("::1") == "[::1]" and url_host("h") == "h"


def test_settings_query_writes_sizes_as_sizes() -> None:
    @dataclasses.dataclass(frozen=True)
    class Settings:
        host: str = "h"
        part: int = 8 << 20
        count: int = 3

    assert settings_query(Settings(part=16 << 20, count=4), skip=("host",), sizes=("part",)) == "part=16MiB&count=4"
    assert settings_query(Settings()) == ""


# -- the kit is what docs/plugins.md says, and base still exports it --------------------------

KIT = ("lmcache.backends.base", "lmcache.backends.buffers", "lmcache.backends.concurrency", "lmcache.backends.urls")


def kit_table() -> dict[str, set[str]]:
    """Module -> names, from the table of docs/plugins.md's "The adapter kit"."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    section = text[text.index("### The adapter kit") :]
    rows = re.findall(r"^\| `(lmcache\.backends\.\w+)` \| (.*) \|$", section, flags=re.M)
    return {module: set(re.findall(r"`(\w+)`", names)) for module, names in rows}


@pytest.mark.parametrize("module", KIT)
def test_each_kit_module_exports_what_the_plugin_page_lists(module: str) -> None:
    mod = importlib.import_module(module)
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []
    own = {n for n in mod.__all__ if getattr(getattr(mod, n), "__module__", module) == module}
    assert kit_table()[module] == own


def test_base_keeps_exporting_what_plugins_imported_before_the_split() -> None:
    before = {
        "EXISTS", "STORED", "BackendCounters", "Capabilities", "PutResult", "PutStatus", "StorageBackend",
        "WorkerAbandoned", "WorkerGate", "as_readable", "as_writable", "check_dst_size", "gather_all",
        "parse_backend_url", "rejected", "run_blocking", "settings_query", "split_by_size", "split_url",
        "redact_url",
    }  # fmt: skip
    assert before <= set(base.__all__)
    for name in before:
        assert hasattr(base, name)


# -- device buffers go through the template to the backend's device hooks ---------------------


class _DeviceRecorder(StorageBackend):
    """A backend that declares device buffers and records what each hook receives.

    ``meta`` tensors stand in for device memory: they are real non-CPU tensors without storage,
    so the test sees the template's routing on any host; no bytes move.
    """

    schemes = ("devrec",)
    capabilities = Capabilities(device_buffers=True, integrity_checked=False)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[int], list[str]]] = []
        self.sizes: dict[CacheKey, int] = {}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> _DeviceRecorder:
        return cls()

    @property
    def url(self) -> str:
        return "devrec://"

    def _note(self, hook: str, keys: list[CacheKey], bufs: list[Any]) -> None:
        kinds = [
            type(b).__name__ if isinstance(b, memoryview) else f"{b.device.type}:{b.dtype}:{b.dim()}" for b in bufs
        ]
        self.calls.append((hook, [k.chunk_hash[0] for k in keys], kinds))

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return [k in self.sizes for k in keys]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        self._note("_get_into", keys, dsts)
        return [self.sizes.get(k) for k in keys]

    async def _get_into_device(self, keys: list[CacheKey], dsts: list[Any]) -> list[int | None]:
        self._note("_get_into_device", keys, dsts)
        return [self.sizes.get(k) for k in keys]

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        self._note("_put", keys, srcs)
        self.sizes.update((k, s.nbytes) for k, s in zip(keys, srcs, strict=True))
        return [STORED] * len(keys)

    async def _put_device(self, keys: list[CacheKey], srcs: list[Any]) -> list[PutResult]:
        self._note("_put_device", keys, srcs)
        self.sizes.update((k, s.nbytes) for k, s in zip(keys, srcs, strict=True))
        return [STORED] * len(keys)

    async def _delete(self, keys: list[CacheKey]) -> None:
        for k in keys:
            self.sizes.pop(k, None)


def _key(i: int) -> CacheKey:
    return CacheKey("kit", 1, 0, bytes([i]) * 32, "float16")


async def test_device_buffers_reach_the_device_hooks_in_order_and_are_counted() -> None:
    torch = pytest.importorskip("torch")
    b = _DeviceRecorder()
    keys = [_key(i) for i in range(4)]
    on_device = torch.empty((2, 8), dtype=torch.float16, device="meta")  # 32 bytes, 2-d, not uint8
    srcs = [b"abc", on_device, bytearray(5), on_device]
    results = await b.put([*keys[:3], keys[1]], srcs)  # the last is a duplicate of keys[1]
    assert [r.status for r in results] == [PutStatus.STORED, PutStatus.STORED, PutStatus.STORED, PutStatus.EXISTS]
    assert b.calls == [
        ("_put", [0, 2], ["memoryview", "memoryview"]),
        ("_put_device", [1], ["meta:torch.uint8:1"]),  # flat bytes, as device_bytes() makes them
    ]
    b.calls.clear()
    dsts = [bytearray(3), torch.empty(32, dtype=torch.uint8, device="meta"), bytearray(5), bytearray(1)]
    assert await b.get_into(keys, dsts) == [3, 32, 5, None]
    assert b.calls == [
        ("_get_into", [0, 2, 3], ["memoryview"] * 3),
        ("_get_into_device", [1], ["meta:torch.uint8:1"]),
    ]
    stats = b.stats()
    assert (stats["stored"], stats["exists"], stats["bytes_written"]) == (3, 1, 3 + 32 + 5)
    assert (stats["hits"], stats["misses"], stats["bytes_read"]) == (3, 1, 3 + 32 + 5)
    await b.aclose()


async def test_without_the_capability_a_device_buffer_is_refused_before_any_hook() -> None:
    torch = pytest.importorskip("torch")

    class HostOnly(_DeviceRecorder):
        capabilities = Capabilities(device_buffers=False, integrity_checked=False)

    b = HostOnly()
    with pytest.raises(InvalidBufferError, match="takes host buffers"):
        await b.put([_key(1)], [torch.empty(4, dtype=torch.uint8, device="meta")])
    with pytest.raises(InvalidBufferError, match="contiguous"):  # and with it, a bad tensor is refused too
        await _DeviceRecorder().put([_key(1)], [torch.empty((4, 4), device="meta").t()])
    assert b.calls == []
    await b.aclose()
