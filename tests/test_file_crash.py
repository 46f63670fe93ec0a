"""A process killed mid-burst leaves a file:// store that reopens with only intact values."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lmcache.backends.file import FileBackend
from lmcache.keys import CacheKey

# The child and the parent derive keys and values from the index alone, so the parent knows
# exactly what each key must hold without any channel but the store itself.
_COMMON = textwrap.dedent(
    """
    import hashlib
    from lmcache.keys import CacheKey

    def key_of(i):
        chunk_hash = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()
        return CacheKey("crash-test", 1, 0, chunk_hash, "float16")

    def value_of(i):
        # 64 KiB .. 512 KiB, unaligned lengths; cheap to build, so the writer spends its time in put
        size = 64 * 1024 + (i * 7919) % (448 * 1024)
        block = hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64).digest()
        return (block * (size // 64 + 1))[:size]
    """
)

_CHILD = _COMMON + textwrap.dedent(
    """
    import asyncio, sys
    from lmcache.backends.file import FileBackend

    async def main(url, batch, first):
        backend = FileBackend.from_url(url)
        await backend.open()
        i = first
        while True:  # until killed
            idx = list(range(i, i + batch))
            results = await backend.put([key_of(j) for j in idx], [value_of(j) for j in idx])
            stored = [j for j, r in zip(idx, results) if r.ok]
            print("stored", *stored, flush=True)
            i += batch

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
    """
)

_RACER = _COMMON + textwrap.dedent(
    """
    import asyncio, sys
    from lmcache.backends.file import FileBackend

    async def main(url, n, go_file, reverse):
        import os, time
        async with FileBackend.from_url(url) as backend:
            print("ready", flush=True)
            while not os.path.exists(go_file):  # start both writers together
                time.sleep(0.001)
            stored = []
            order = list(range(n))[::-1] if reverse else list(range(n))
            for i in range(0, n, 4):
                idx = order[i : i + 4]
                results = await backend.put([key_of(j) for j in idx], [value_of(j) for j in idx])
                stored += [j for j, r in zip(idx, results) if r.status.value == "stored"]
                assert all(r.ok for r in results), results
            print(*stored, flush=True)

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "reverse"))
    """
)

namespace: dict[str, object] = {}
exec(_COMMON, namespace)
key_of = namespace["key_of"]
value_of = namespace["value_of"]


def _run_and_kill(url: str, first: int, delay: float) -> set[int]:
    """Run a writer from key ``first``; SIGKILL it ``delay`` s after its 5th batch; acked indices."""
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, url, "8", str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acknowledged: set[int] = set()
    try:
        assert child.stdout is not None
        for _ in range(5):
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"writer exited early: {child.stderr.read() if child.stderr else ''}")
            acknowledged.update(int(x) for x in line.split()[1:])
        # The kill lands at an arbitrary point of the following batches: values in every stage
        # (temp file being written, being published, published but not yet acknowledged).
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        assert child.stdout is not None
        for line in child.stdout:  # acknowledgements printed before the kill landed
            acknowledged.update(int(x) for x in line.split()[1:])
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL
    return acknowledged


@pytest.mark.parametrize("options", ["workers=4", "workers=4&o_direct=true"])
async def test_sigkill_mid_burst_leaves_only_intact_values(tmp_path: Path, options: str) -> None:
    root = tmp_path / "kv"
    url = f"file://{root}?{options}"
    acknowledged: set[int] = set()
    attempted: list[int] = []
    for round_no, delay in enumerate([0.0005, 0.002, 0.006]):
        first = round_no * 10_000
        acked = _run_and_kill(url, first, delay)
        acknowledged |= acked
        attempted.extend(range(first, max(acked) + 1 + 64))  # anything the writer could have started

    keys: list[CacheKey] = [key_of(i) for i in attempted]  # type: ignore[operator]
    on_disk = {p.stem for p in root.rglob("*.kv")}
    async with FileBackend.from_url(url) as backend:
        held = await backend.contains(keys)
        dsts = [bytearray(512 * 1024) for _ in keys]
        got = await backend.get_into(keys, dsts)
        wrong = [
            i
            for i, n in zip(attempted, got, strict=True)
            if n is not None and bytes(dsts[attempted.index(i)][:n]) != value_of(i)  # type: ignore[operator]
        ]
        assert not wrong, f"values read back with wrong content: {wrong}"
        hits = {i for i, n in zip(attempted, got, strict=True) if n is not None}
        # A SIGKILL loses no acknowledged put: the page cache outlives the process.
        assert acknowledged <= hits
        assert hits == {i for i, h in zip(attempted, held, strict=True) if h}
        assert len(hits) >= 3 * 40
        assert backend.stats()["corrupt"] == 0
        assert backend.stats()["entries"] == len(on_disk) == len(hits)
    # Stale temp files of the killed writers (no lock holds them any more) were cleaned at open.
    assert not list(root.rglob("*.tmp"))


def _race(url: str, n: int, go: Path) -> list[set[int]]:
    """Run two writers of the same ``n`` keys at once, in opposite orders; what each stored."""
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, url, str(n), str(go), order], stdout=subprocess.PIPE, text=True)
        for order in ("forward", "reverse")
    ]
    try:
        for r in racers:
            assert r.stdout is not None
            assert r.stdout.readline().strip() == "ready"
        go.touch()
        outputs = [r.communicate(timeout=120)[0] for r in racers]
    finally:
        for r in racers:
            if r.poll() is None:
                r.kill()
                r.wait()
    assert [r.returncode for r in racers] == [0, 0]
    return [{int(x) for x in out.split()} for out in outputs]


async def test_two_processes_racing_on_the_same_keys(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    url = f"file://{root}?workers=2"
    n = 48
    stored = _race(url, n, tmp_path / "go")
    # First writer wins: every key was stored by exactly one of the two processes.
    assert stored[0].isdisjoint(stored[1])
    assert stored[0] | stored[1] == set(range(n))
    assert stored[0] and stored[1]  # opposite orders: each got some keys first
    async with FileBackend.from_url(url) as backend:
        keys = [key_of(i) for i in range(n)]  # type: ignore[operator]
        dsts = [bytearray(512 * 1024) for _ in keys]
        got = await backend.get_into(keys, dsts)
        for i, size in enumerate(got):
            assert size is not None
            assert bytes(dsts[i][:size]) == value_of(i)  # type: ignore[operator]
        assert backend.stats()["entries"] == n
    assert not list(root.rglob("*.tmp"))
