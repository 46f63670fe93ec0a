"""``check_directory`` (``lmcache fsck``): every kind of damage found, nothing changed without repair."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lmcache.backends.file import FileBackend
from lmcache.backends.file.fsck import check_directory
from lmcache.errors import BackendError
from lmcache.keys import CacheKey
from lmcache.serde import frame


def make_key(i: int) -> CacheKey:
    return CacheKey("fsck-test", 1, 0, hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest(), "float16")


def file_of(root: Path, key: CacheKey) -> Path:
    digest = key.digest()
    return root / digest[:2] / f"{digest}.kv"


def lexists(path: str) -> bool:
    """Whether anything, even a dangling symlink, is at ``path``."""
    return os.path.lexists(path)


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
            out[str(path)] = (st.st_mode, st.st_mtime_ns, data)
    return out


async def fill(root: Path, n: int) -> list[CacheKey]:
    keys = [make_key(i) for i in range(n)]
    values = [np.random.default_rng(i).integers(0, 256, 70_000 + i, dtype=np.uint8) for i in range(n)]
    async with FileBackend.from_url(f"file://{root}") as backend:
        assert all(r.ok for r in await backend.put(keys, values))
    return keys


def damage(root: Path, keys: list[CacheKey]) -> dict[str, str]:
    """One of each kind of damage; returns path -> expected reason."""
    expected: dict[str, str] = {}

    def edit(key: CacheKey, fn: Callable[[bytearray], bytes]) -> Path:
        path = file_of(root, key)
        path.write_bytes(fn(bytearray(path.read_bytes())))
        return path

    def flip(offset: int) -> Callable[[bytearray], bytes]:
        def fn(b: bytearray) -> bytes:
            b[offset] ^= 0x10
            return bytes(b)

        return fn

    expected[str(edit(keys[1], lambda b: bytes(b[:-5000])))] = "torn"  # a partial write
    expected[str(edit(keys[2], lambda b: bytes(b[:30])))] = "torn"  # shorter than a header
    expected[str(edit(keys[3], flip(-1)))] = "checksum"  # only a full read finds this one
    expected[str(edit(keys[4], flip(20)))] = "bad_header"
    expected[str(edit(keys[5], lambda b: b"not a frame at all" + bytes(b[18:])))] = "bad_header"
    moved = file_of(root, make_key(100))
    moved.parent.mkdir(exist_ok=True)
    os.rename(file_of(root, keys[6]), moved)
    expected[str(moved)] = "wrong_key"
    for i, kind in ((101, "dir"), (102, "fifo"), (103, "symlink")):
        path = file_of(root, make_key(i))
        path.parent.mkdir(exist_ok=True)
        if kind == "dir":
            path.mkdir()
            (path / "inner").write_text("x")
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(root / "nowhere")
        expected[str(path)] = "not_a_file"
    shard = file_of(root, keys[0]).parent
    stale = shard / f".{keys[0].digest()}.4242.abcdef.tmp"
    stale.write_bytes(b"half a value")
    expected[str(stale)] = "stale_temp"
    probe = root / ".probe.4242.abcd.tmp"
    probe.write_bytes(b"")
    expected[str(probe)] = "stale_temp"
    not_dir = root / "zz"  # not hex: never judged
    not_dir.write_text("not ours")
    shard_file = root / ("0f" if shard.name != "0f" else "1f")
    if not shard_file.exists():
        shard_file.write_text("a file at a shard's name")
        expected[str(shard_file)] = "not_a_directory"
    return expected


async def test_fsck_finds_every_kind_of_damage_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    keys = await fill(root, 8)
    expected = damage(root, keys)
    # Things that are not damage: a live writer's temp file, another format version, other files.
    shard = file_of(root, keys[0]).parent
    live = shard / f".{keys[0].digest()}.4243.beef.tmp"
    live.write_bytes(b"being written")
    foreign = file_of(root, keys[7])
    data = bytearray(foreign.read_bytes())
    data[4] = frame.FRAME_VERSION + 1
    foreign.write_bytes(bytes(data))
    for name in ("README", "notes.kv", ".editor.tmp"):
        (shard / name).write_text("not ours")
    before = snapshot(root)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = check_directory(str(root))
    finally:
        os.close(fd)
    assert {d.path: d.reason for d in report.damaged} == expected
    assert report.values == 1  # keys[0]; keys[7] is another version's and not judged
    assert report.bytes == 70_000
    assert not any(d.removed for d in report.damaged)
    assert report.remaining == report.damaged
    assert snapshot(root) == before
    as_dict = report.as_dict()
    assert as_dict["damaged"] == len(expected) and as_dict["removed"] == 0
    assert {f["path"] for f in as_dict["files"]} == set(expected)


async def test_fsck_repair_removes_the_damage_and_keeps_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    keys = await fill(root, 8)
    expected = damage(root, keys)
    report = check_directory(str(root), repair=True)
    assert {d.path for d in report.damaged} == set(expected)
    assert all(d.removed for d in report.damaged), report.damaged
    assert not any(lexists(p) for p in expected)
    assert (root / "zz").exists()
    again = check_directory(str(root))
    assert again.damaged == [] and again.values == 2  # keys[0] and keys[7]
    # The backend reopens with nothing to remove, and a put stores each repaired key again.
    async with FileBackend.from_url(f"file://{root}") as backend:
        assert backend.damaged_files() == []
        results = await backend.put(keys[1:7], [b"v" * 10] * 6)
        assert all(r.status.name == "STORED" for r in results)


def test_fsck_of_a_missing_directory_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="No such file"):
        check_directory(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
