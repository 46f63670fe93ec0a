"""Tests of the file:// backend: contract basics plus what only a directory of files can get wrong."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import logging
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from lmcache_conformance import BackendTests

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.file import FileBackend
from lmcache.backends.registry import open_backend
from lmcache.errors import (
    BackendClosedError,
    BackendError,
    ConfigError,
    InvalidBufferError,
    UnsupportedOperationError,
)
from lmcache.keys import CacheKey
from lmcache.serde import frame


def make_key(i: int, model: str = "file-test") -> CacheKey:
    return CacheKey(model, 1, 0, hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest(), "float16")


def make_value(i: int, nbytes: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def file_of(root: Path, key: CacheKey) -> Path:
    digest = key.digest()
    return root / digest[:2] / f"{digest}.kv"


async def corrupt_on_disk(backend: FileBackend, key: CacheKey, how: str = "flip_payload") -> None:
    """Damage the stored file of ``key`` without using the backend (a bypass hook)."""
    path = file_of(Path(backend.settings.path), key)
    data = bytearray(path.read_bytes())
    if how == "flip_payload":
        data[-1] ^= 0x01
    elif how == "flip_header":
        data[20] ^= 0x40  # inside the payload length field, covered by the header checksum
    elif how == "truncate":
        data = data[: len(data) - 7]
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(data))


def page_aligned(nbytes: int) -> memoryview:
    """A zeroed, page-aligned buffer (anonymous mmap), like an engine's preallocated KV buffers."""
    return memoryview(mmap.mmap(-1, max(nbytes, 1)))[:nbytes]


def leftovers(root: Path, pattern: str = "*.tmp") -> list[Path]:
    return list(root.rglob(pattern))


@pytest.fixture
async def store(tmp_path: Path):
    backend = FileBackend.from_url(f"file://{tmp_path}/kv")
    async with backend:
        yield backend


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "file:///var/lib/lmcache",
        "file:///var/lib/lmcache?capacity=200GiB",
        "file:///var/lib/lm%20cache?capacity=1MiB&fsync=always&o_direct=true&workers=8",
        "file:///d?fsync=data",
        "file:///d?read_only=true",
    ],
)
def test_url_round_trips(url: str) -> None:
    backend = FileBackend.from_url(url)
    assert backend.url == url
    assert FileBackend.from_url(backend.url).settings == backend.settings


def test_url_options_parse() -> None:
    b = FileBackend.from_url("file://localhost/srv/kv/?capacity=2GiB&fsync=always&o_direct=1&workers=2")
    assert b.settings.path == "/srv/kv"
    assert b.settings.capacity == 2 << 30
    assert (b.settings.fsync, b.settings.o_direct, b.settings.workers) == ("always", True, 2)
    assert b.capabilities.bounded and b.capabilities.persistent and b.capabilities.shared
    assert not FileBackend.from_url("file:///srv/kv").capabilities.bounded
    assert FileBackend.from_url("file:///srv/kv", capacity="1MiB").settings.capacity == 1 << 20


def test_registry_resolves_file_scheme(tmp_path: Path) -> None:
    assert isinstance(open_backend(f"file://{tmp_path}"), FileBackend)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("file://relative/dir", "names host 'relative'"),
        ("file://host.example/var/kv", "names host"),
        ("file://", "no directory path"),
        ("file:///", "no directory path"),
        ("file:///d?capacity=lots", "capacity"),
        ("file:///d?capacity=0", "capacity"),
        ("file:///d?fsync=sometimes", "fsync"),
        ("file:///d?workers=0", "workers"),
        ("file:///d?colour=red", "unknown option 'colour'"),
        ("file:///d#frag", "fragment"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        FileBackend.from_url(url)
    if "host" in message or "path" in message:
        assert "file:///" in str(info.value)  # the valid form is shown


def test_relative_path_override_rejected() -> None:
    with pytest.raises(ConfigError, match="absolute"):
        FileBackend.from_url("file:///d", path="relative/dir")


def test_from_url_does_no_io(tmp_path: Path) -> None:
    FileBackend.from_url(f"file://{tmp_path}/not-yet")
    assert not (tmp_path / "not-yet").exists()


# -- basics ------------------------------------------------------------------------------------


async def test_put_get_contains_delete(store: FileBackend) -> None:
    keys = [make_key(i) for i in range(6)]
    vals = [make_value(i, n) for i, n in enumerate([0, 1, 63, 4096, 100_000, 1 << 20])]
    assert [r.status for r in await store.put(keys, vals)] == [PutStatus.STORED] * 6
    assert [r.status for r in await store.put(keys[:2], vals[:2])] == [PutStatus.EXISTS] * 2
    dsts = [bytearray(len(v) + 5) for v in vals]
    assert await store.get_into(keys, dsts) == [len(v) for v in vals]
    assert all(bytes(d[: len(v)]) == v and d[len(v) :] == bytes(5) for d, v in zip(dsts, vals, strict=True))
    assert await store.contains([*keys, make_key(99)]) == [True] * 6 + [False]
    await store.delete([keys[0], keys[3], make_key(99)])
    assert await store.contains(keys) == [False, True, True, False, True, True]
    assert not file_of(Path(store.settings.path), keys[3]).exists()
    stats = store.stats()
    assert stats["entries"] == 4
    assert stats["used_bytes"] == sum(len(v) for i, v in enumerate(vals) if i not in (0, 3))
    assert sorted([k async for k in store.list_keys()], key=str) == sorted(
        [keys[1], keys[2], keys[4], keys[5]], key=str
    )


async def test_miss_leaves_dst_untouched(store: FileBackend) -> None:
    dst = bytearray(b"\xaa" * 64)
    assert await store.get_into([make_key(1)], [dst]) == [None]
    assert dst == b"\xaa" * 64
    assert store.stats()["misses"] == 1


async def test_undersized_dst_raises(store: FileBackend, tmp_path: Path) -> None:
    key = make_key(1)
    await store.put([key], [make_value(1, 1000)])
    with pytest.raises(InvalidBufferError):
        await store.get_into([key], [bytearray(999)])
    # A value this instance has never indexed (stored by another process) is sized by the worker.
    async with FileBackend.from_url(f"file://{tmp_path}/kv") as other:
        key2 = make_key(2)
        await store.put([key2], [make_value(2, 1000)])
        with pytest.raises(InvalidBufferError):
            await other.get_into([key2], [bytearray(10)])


async def test_numpy_and_memoryview_buffers(store: FileBackend) -> None:
    key = make_key(5)
    src = np.arange(1000, dtype=np.float32)
    await store.put([key], [src])
    dst = np.zeros(1000, dtype=np.float32)
    assert await store.get_into([key], [dst]) == [4000]
    assert np.array_equal(src, dst)


async def test_closed_is_final(tmp_path: Path) -> None:
    backend = FileBackend.from_url(f"file://{tmp_path}")
    await backend.open()
    await backend.aclose()
    with pytest.raises(BackendClosedError):
        await backend.contains([make_key(1)])


async def test_ping(store: FileBackend) -> None:
    await store.ping()


# -- persistence and sharing -------------------------------------------------------------------


async def test_reopen_keeps_values_and_sizes(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/kv?capacity=10MiB"
    keys = [make_key(i) for i in range(10)]
    vals = [make_value(i, 1000 * (i + 1)) for i in range(10)]
    async with FileBackend.from_url(url) as first:
        await first.put(keys, vals)
        before = first.stats()
    async with FileBackend.from_url(url) as second:
        after = second.stats()
        assert (after["entries"], after["used_bytes"], after["disk_bytes"]) == (
            before["entries"],
            before["used_bytes"],
            before["disk_bytes"],
        )
        assert after["used_bytes"] == sum(map(len, vals))
        dsts = [bytearray(len(v)) for v in vals]
        assert await second.get_into(keys, dsts) == [len(v) for v in vals]
        assert [bytes(d) for d in dsts] == vals
        assert sorted([k async for k in second.list_keys()], key=str) == sorted(keys, key=str)
        assert dict([e async for e in second.list_entries()]) == {k: len(v) for k, v in zip(keys, vals, strict=True)}


async def test_two_instances_share_a_directory(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/kv"
    async with FileBackend.from_url(url) as a, FileBackend.from_url(url) as b:
        key = make_key(7)
        value = make_value(7, 5000)
        assert (await a.put([key], [value]))[0].status is PutStatus.STORED
        assert await b.contains([key]) == [True]
        assert (await b.put([key], [make_value(8, 5000)]))[0].status is PutStatus.EXISTS  # first writer wins
        dst = bytearray(5000)
        assert await b.get_into([key], [dst]) == [5000]
        assert dst == value
        assert b.stats()["used_bytes"] == 5000  # adopted into b's index
        await a.delete([key])
        assert await b.contains([key]) == [False]
        assert b.stats()["entries"] == 0


async def test_concurrent_puts_of_one_key(store: FileBackend) -> None:
    key = make_key(3)
    value = make_value(3, 200_000)
    batches = await asyncio.gather(*(store.put([key], [value]) for _ in range(8)))
    statuses = [b[0].status for b in batches]
    assert statuses.count(PutStatus.STORED) == 1
    assert statuses.count(PutStatus.EXISTS) == 7
    assert store.stats()["used_bytes"] == 200_000
    assert not leftovers(Path(store.settings.path))


async def test_put_recreates_a_removed_directory(store: FileBackend) -> None:
    import shutil

    await store.put([make_key(1)], [b"a" * 100])
    shutil.rmtree(store.settings.path)
    assert (await store.put([make_key(1)], [b"a" * 100]))[0].status is PutStatus.STORED
    dst = bytearray(100)
    assert await store.get_into([make_key(1)], [dst]) == [100]
    assert dst == b"a" * 100


# -- integrity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [10_000, 1 << 20], ids=["small", "large"])
@pytest.mark.parametrize("how", ["flip_payload", "flip_header", "truncate"])
@pytest.mark.parametrize("options", ["", "o_direct=true"])
async def test_damaged_file_is_a_counted_miss(tmp_path: Path, how: str, size: int, options: str) -> None:
    key = make_key(1)
    value = make_value(1, size)
    async with FileBackend.from_url(f"file://{tmp_path}/kv?{options}") as store:
        await store.put([key], [value])
        await corrupt_on_disk(store, key, how)
        dst = page_aligned(size)
        dst[:] = b"\x55" * size
        assert await store.get_into([key], [dst]) == [None]
        if size <= 10_000 or how != "flip_payload":
            # Checked before any byte reaches dst: small values, and every header or length fault.
            assert bytes(dst) == b"\x55" * size
        else:
            # A large value's payload is read straight into dst and checked there: its contents
            # are unspecified after a checksum failure, but never handed out as data.
            assert bytes(dst) != value
        assert store.stats()["corrupt"] == 1
        assert store.stats()["entries"] == 0
        # The bad file is gone, so the value can be stored again and then reads back intact.
        assert await store.contains([key]) == [False]
        assert await store.get_into([key], [dst]) == [None]
        assert store.stats()["corrupt"] == 1  # now a plain miss
        assert (await store.put([key], [value]))[0].status is PutStatus.STORED
        assert await store.get_into([key], [dst]) == [size]
        assert bytes(dst) == value


async def test_file_renamed_onto_another_key_is_a_miss(store: FileBackend) -> None:
    a, b = make_key(1), make_key(2)
    await store.put([a], [make_value(1, 3000)])
    root = Path(store.settings.path)
    file_of(root, b).parent.mkdir(exist_ok=True)
    os.rename(file_of(root, a), file_of(root, b))
    dst = bytearray(3000)
    assert await store.get_into([b], [dst]) == [None]
    assert dst == bytes(3000)
    assert store.stats()["corrupt"] == 1


async def test_read_error_is_a_counted_miss(store: FileBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    key = make_key(4)
    await store.put([key], [make_value(4, 100)])

    def failing_read(fd: int, view: memoryview, offset: int, want: int) -> int:
        raise OSError(errno.EIO, "injected read error")

    monkeypatch.setattr(store, "_read_at", failing_read)  # fault injection: the device fails
    dst = bytearray(b"\x11" * 100)
    assert await store.get_into([key], [dst]) == [None]
    assert dst == b"\x11" * 100
    assert store.stats()["errors"] == 1
    assert file_of(Path(store.settings.path), key).exists()  # an I/O error is not damage


async def test_open_removes_stale_temp_and_invalid_files(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    url = f"file://{root}"
    good, renamed, damaged = make_key(1), make_key(2), make_key(3)
    async with FileBackend.from_url(url) as backend:
        await backend.put([good, renamed, damaged], [make_value(i, 4000) for i in (1, 2, 3)])
    shard = file_of(root, good).parent
    stale = shard / f".{good.digest()}.12345.abcdef.tmp"
    stale.write_bytes(b"partial")
    live = shard / f".{good.digest()}.12346.beef.tmp"
    live.write_bytes(b"being written")
    other = file_of(root, make_key(99))
    other.parent.mkdir(exist_ok=True)
    os.rename(file_of(root, renamed), other)
    data = file_of(root, damaged).read_bytes()
    file_of(root, damaged).write_bytes(data[:100])
    unrelated = [shard / "README", shard / ".editor.tmp", shard / "notes.kv", root / ".swap.tmp"]
    for path in unrelated:
        path.write_text("not ours")
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer holds its temp file locked
        async with FileBackend.from_url(url) as backend:
            assert backend.stats()["entries"] == 1
            assert backend.stats()["used_bytes"] == 4000
            assert [k async for k in backend.list_keys()] == [good]
    finally:
        os.close(fd)
    assert not stale.exists()
    assert live.exists()
    assert not other.exists()
    assert not file_of(root, damaged).exists()
    assert all(path.exists() for path in unrelated)


async def test_foreign_frame_version_is_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    key = make_key(1)
    async with FileBackend.from_url(f"file://{root}") as backend:
        await backend.put([key], [make_value(1, 1000)])
    path = file_of(root, key)
    data = bytearray(path.read_bytes())
    data[4] = frame.FRAME_VERSION + 1
    path.write_bytes(bytes(data))
    async with FileBackend.from_url(f"file://{root}") as backend:
        assert backend.stats()["entries"] == 0
        assert await backend.get_into([key], [bytearray(1000)]) == [None]
        assert backend.stats()["corrupt"] == 0
    assert path.exists()


# -- damage at a key's name, and read-only inspection --------------------------------------------


def lexists(path: Path) -> bool:
    """Whether anything, even a dangling symlink, is at ``path``."""
    return path.is_symlink() or path.exists()


def put_damage_at(path: Path, kind: str, target: Path | None = None) -> None:
    """Put something other than a value file at ``path`` (a bypass: not through the backend)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "directory":
        path.mkdir()
    elif kind == "directory_with_content":
        path.mkdir()
        (path / "inner").write_bytes(b"x" * 10)
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling_symlink":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "symlink_to_a_value":
        assert target is not None
        path.symlink_to(target)
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["directory", "directory_with_content", "fifo", "dangling_symlink", "symlink_to_a_value"]
)
async def test_a_non_file_at_a_keys_name_is_damage(store: FileBackend, kind: str) -> None:
    root = Path(store.settings.path)
    key, other = make_key(7), make_key(8)
    await store.put([other], [make_value(8, 500)])
    put_damage_at(file_of(root, key), kind, target=file_of(root, other))

    assert await store.contains([key]) == [False]
    dst = bytearray(b"\x22" * 600)
    assert await asyncio.wait_for(store.get_into([key], [dst]), 30) == [None]  # a FIFO must not block
    assert dst == b"\x22" * 600
    assert store.stats()["corrupt"] == 1
    # A put replaces the damage with the value instead of reporting EXISTS forever.
    value = make_value(7, 600)
    assert [r.status for r in await store.put([key], [value])] == [PutStatus.STORED]
    assert await store.contains([key]) == [True]
    assert await store.get_into([key], [dst]) == [600]
    assert bytes(dst) == value
    assert file_of(root, key).is_file() and not file_of(root, key).is_symlink()
    assert file_of(root, other).is_file()  # a symlink's target is never touched


async def test_delete_removes_a_directory_at_a_keys_name(store: FileBackend) -> None:
    key = make_key(9)
    put_damage_at(file_of(Path(store.settings.path), key), "directory_with_content")
    await store.delete([key])
    assert not lexists(file_of(Path(store.settings.path), key))


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every entry under ``root``: (mode, size, mtime_ns, content of regular files)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            out[str(path.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, content)
    return out


async def make_damaged_store(root: Path) -> dict[str, CacheKey]:
    """A store with one good value and one of each kind of damage the header scan finds."""
    keys = {name: make_key(i) for i, name in enumerate(["good", "torn", "renamed", "flipped_header", "flipped"], 1)}
    async with FileBackend.from_url(f"file://{root}") as backend:
        await backend.put(list(keys.values()), [make_value(i, 4000) for i in range(1, 6)])
    shard = file_of(root, keys["good"]).parent
    (shard / f".{keys['good'].digest()}.12345.abcdef.tmp").write_bytes(b"partial")  # stale temp
    torn = file_of(root, keys["torn"])
    torn.write_bytes(torn.read_bytes()[:1000])
    target = file_of(root, make_key(99))
    target.parent.mkdir(exist_ok=True)
    os.rename(file_of(root, keys["renamed"]), target)
    for name, how in (("flipped_header", "flip_header"), ("flipped", "flip_payload")):
        path = file_of(root, keys[name])
        data = bytearray(path.read_bytes())
        data[20 if how == "flip_header" else -1] ^= 0x40
        path.write_bytes(bytes(data))
    put_damage_at(file_of(root, make_key(50)), "directory_with_content")
    put_damage_at(file_of(root, make_key(51)), "dangling_symlink")
    return keys


async def test_read_only_open_changes_nothing_and_reports_damage(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    keys = await make_damaged_store(root)
    before = tree_snapshot(root)
    async with FileBackend.from_url(f"file://{root}?read_only=true") as backend:
        damaged = backend.damaged_files()
        reasons = sorted(d.reason for d in damaged)
        assert reasons == ["bad_header", "not_a_file", "not_a_file", "stale_temp", "torn", "wrong_key"], damaged
        assert not any(d.removed for d in damaged)
        assert all(os.path.isabs(d.path) and d.detail for d in damaged)
        assert backend.stats()["damaged_files"] == 6
        assert backend.stats()["read_only"] is True
        # The header scan indexes the good value and the one whose payload is damaged.
        assert sorted([k.to_string() async for k in backend.list_keys()]) == sorted(
            k.to_string() for k in (keys["good"], keys["flipped"])
        )
        await backend.ping()
        dst = bytearray(4000)
        assert await backend.get_into([keys["good"]], [dst]) == [4000]
        assert await backend.get_into([keys["flipped"], keys["torn"]], [dst, dst]) == [None, None]
        assert [r.status for r in await backend.put([make_key(60)], [b"x"])] == [PutStatus.REJECTED]
        with pytest.raises(UnsupportedOperationError):
            await backend.delete([keys["good"]])
    assert tree_snapshot(root) == before


async def test_read_only_never_creates_the_directory(tmp_path: Path) -> None:
    backend = FileBackend.from_url(f"file://{tmp_path}/missing?read_only=true")
    with pytest.raises(BackendError, match="no such cache directory"):
        await backend.open()
    assert not (tmp_path / "missing").exists()


async def test_writable_open_reports_what_it_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "kv"
    await make_damaged_store(root)
    with caplog.at_level(logging.INFO, logger="lmcache.backends.file"):
        async with FileBackend.from_url(f"file://{root}") as backend:
            damaged = backend.damaged_files()
    assert len(damaged) == 6 and all(d.removed for d in damaged)
    assert not any(lexists(Path(d.path)) for d in damaged)
    assert any(r.levelno == logging.WARNING and "damaged value file" in r.getMessage() for r in caplog.records)


# -- capacity ----------------------------------------------------------------------------------


async def test_capacity_rejects_and_survives_reopen(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/kv?capacity=10000"
    keys = [make_key(i) for i in range(4)]
    async with FileBackend.from_url(url) as backend:
        results = await backend.put(keys[:3], [make_value(i, 4000) for i in range(3)])
        assert [r.status for r in results] == [PutStatus.STORED, PutStatus.STORED, PutStatus.REJECTED]
        assert results[2].reason == "capacity"
        assert (await backend.put([keys[3]], [make_value(3, 10_001)]))[0].reason == "too_large"
        assert (await backend.put([keys[0]], [make_value(0, 4000)]))[0].status is PutStatus.EXISTS
        assert backend.stats()["used_bytes"] == 8000
        assert backend.stats()["capacity_bytes"] == 10_000
    async with FileBackend.from_url(url) as backend:
        assert backend.stats()["used_bytes"] == 8000
        assert (await backend.put([keys[2]], [make_value(2, 4000)]))[0].reason == "capacity"
        await backend.delete([keys[0]])
        assert backend.stats()["used_bytes"] == 4000
        assert (await backend.put([keys[2]], [make_value(2, 4000)]))[0].status is PutStatus.STORED
        assert backend.stats()["used_bytes"] == 8000


async def test_capacity_with_concurrent_batches(tmp_path: Path) -> None:
    async with FileBackend.from_url(f"file://{tmp_path}?capacity=10000&workers=4") as backend:
        batches = await asyncio.gather(*(backend.put([make_key(i)], [make_value(i, 3000)]) for i in range(8)))
        stored = sum(b[0].status is PutStatus.STORED for b in batches)
        assert stored == 3
        assert backend.stats()["used_bytes"] == 9000


@pytest.mark.parametrize(("code", "reason"), [(errno.EIO, "error"), (errno.ENOSPC, "capacity")])
async def test_write_failure_is_rejected_and_releases_capacity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, reason: str
) -> None:
    real_writev = os.writev
    failures = {"left": 1}

    def failing_writev(fd, buffers):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(code, os.strerror(code))
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", failing_writev)  # fault injection: one failed write
    async with FileBackend.from_url(f"file://{tmp_path}/kv?capacity=9000") as backend:
        result = (await backend.put([make_key(0)], [make_value(0, 3000)]))[0]
        assert (result.status, result.reason) == (PutStatus.REJECTED, reason)
        assert backend.stats()["errors"] == (1 if reason == "error" else 0)
        # Nothing leaked: neither the reservation nor the temp file.
        assert not leftovers(tmp_path)
        results = await backend.put([make_key(i) for i in range(1, 4)], [make_value(i, 3000) for i in range(1, 4)])
        assert [r.status for r in results] == [PutStatus.STORED] * 3
        assert backend.stats()["used_bytes"] == 9000


# -- durability and I/O modes ------------------------------------------------------------------


@pytest.mark.parametrize("options", ["fsync=data", "fsync=always", "o_direct=true", "o_direct=true&fsync=always"])
async def test_modes_round_trip(tmp_path: Path, options: str) -> None:
    url = f"file://{tmp_path}/kv?{options}"
    keys = [make_key(i) for i in range(5)]
    aligned = page_aligned(1 << 20)  # lets O_DIRECT write straight from it
    aligned[:] = make_value(4, 1 << 20)
    vals: list[object] = [make_value(i, n) for i, n in enumerate([1, 4095, 4096, 123_457])] + [aligned]
    async with FileBackend.from_url(url) as backend:
        assert all(r.ok for r in await backend.put(keys, vals))
    async with FileBackend.from_url(url) as backend:
        dsts = [bytearray(memoryview(v).nbytes) for v in vals]  # type: ignore[arg-type]
        assert await backend.get_into(keys, dsts) == [len(d) for d in dsts]
        assert [bytes(d) for d in dsts] == [bytes(memoryview(v)) for v in vals]  # type: ignore[arg-type]
        # Page-aligned destinations take the O_DIRECT path straight into dst where lengths allow.
        aligned_dsts = [page_aligned(len(d) + 8192) for d in dsts]
        assert await backend.get_into(keys, aligned_dsts) == [len(d) for d in dsts]
        for d, a in zip(dsts, aligned_dsts, strict=True):
            assert bytes(a[: len(d)]) == bytes(d)
            assert bytes(a[len(d) :]) == bytes(8192)  # nothing written past the value
        assert backend.stats()["o_direct"] == ("o_direct" in options)
        assert backend.stats()["used_bytes"] == sum(len(d) for d in dsts)
    for key, dst in zip(keys, dsts, strict=True):
        size = file_of(tmp_path / "kv", key).stat().st_size
        assert size == frame.frame_size(key, len(dst), alignment=4096 if "o_direct" in options else 64)


@pytest.mark.skipif(
    not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK), reason="needs a writable tmpfs at /dev/shm"
)
async def test_o_direct_downgrades_on_tmpfs(caplog: pytest.LogCaptureFixture) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        caplog.set_level(logging.WARNING, logger="lmcache.backends.file")
        async with FileBackend.from_url(f"file://{d}?o_direct=true") as backend:
            if backend.stats()["o_direct"]:
                pytest.skip("this tmpfs accepts O_DIRECT")
            assert "downgraded to buffered I/O" in caplog.text
            key = make_key(1)
            await backend.put([key], [b"x" * 5000])
            dst = bytearray(5000)
            assert await backend.get_into([key], [dst]) == [5000]
            assert dst == b"x" * 5000
            assert backend.url.endswith("o_direct=true")  # the URL keeps what was asked for


async def test_o_direct_refused_downgrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Fault injection: this kernel's filesystems all accept O_DIRECT, so refuse it the way
    # older tmpfs and many FUSE filesystems do (EINVAL at open).
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    caplog.set_level(logging.WARNING, logger="lmcache.backends.file")
    async with FileBackend.from_url(f"file://{tmp_path}?o_direct=true") as backend:
        assert backend.stats()["o_direct"] is False
        assert "downgraded to buffered I/O" in caplog.text
        key = make_key(1)
        assert (await backend.put([key], [b"y" * 7000]))[0].status is PutStatus.STORED
        dst = bytearray(7000)
        assert await backend.get_into([key], [dst]) == [7000]
        assert dst == b"y" * 7000
    assert not leftovers(tmp_path, ".probe*")


# -- cancellation ------------------------------------------------------------------------------


async def test_cancelled_get_never_writes_late(store: FileBackend) -> None:
    n, size = 24, 1 << 20
    keys = [make_key(i) for i in range(n)]
    await store.put(keys, [make_value(i, size) for i in range(n)])
    dsts = [bytearray(size) for _ in range(n)]
    task = asyncio.create_task(store.get_into(keys, dsts))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    snapshot = [bytes(d) for d in dsts]
    # Every worker is idle now: a round trip through all of them proves no job is still running.
    await store.contains(keys)
    await asyncio.sleep(0.05)
    assert [bytes(d) for d in dsts] == snapshot


async def test_cancelled_put_keeps_accounting_exact(tmp_path: Path) -> None:
    async with FileBackend.from_url(f"file://{tmp_path}?capacity=100MiB") as backend:
        keys = [make_key(i) for i in range(24)]
        task = asyncio.create_task(backend.put(keys, [make_value(i, 1 << 20) for i in range(24)]))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stored = [k for k, hit in zip(keys, await backend.contains(keys), strict=True) if hit]
        assert backend.stats()["entries"] == len(stored)
        assert backend.stats()["used_bytes"] == len(stored) << 20
        assert not leftovers(tmp_path)


# -- the conformance suite ---------------------------------------------------------------------


class TestFileConformance(BackendTests):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/kv?capacity=2GiB"

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        assert isinstance(backend, FileBackend)
        path = file_of(Path(backend.settings.path), key)
        return path.read_bytes() if path.exists() else None

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        assert isinstance(backend, FileBackend)
        file_of(Path(backend.settings.path), key).write_bytes(data)  # in place, as a torn write leaves it

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, FileBackend)
        await corrupt_on_disk(backend, key, "flip_payload")


class TestFileConformanceODirect(TestFileConformance):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/kv?o_direct=true&fsync=data&workers=2"

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, FileBackend)
        await corrupt_on_disk(backend, key, "truncate")
