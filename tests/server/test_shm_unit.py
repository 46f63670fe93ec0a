"""Unit checks of the shared-memory helpers: stale-name sweeping and the client arena."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmcache.errors import InvalidArgumentError
from lmcache.server.shm import SHM_DIR, Arena, attach_segment, create_segment, shm_available, sweep_stale

pytestmark = pytest.mark.skipif(not shm_available(), reason="/dev/shm is not available")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_names_of_dead_processes_only() -> None:
    dead = _dead_pid()
    doomed = [f"lmcache-shm-{dead}-0123456789abcdef", f"lmcache-pool-{dead}-fedcba9876543210"]
    alive = f"lmcache-shm-{os.getpid()}-00112233445566ff"
    other = f"not-lmcache-{dead}"
    for name in [*doomed, alive, other]:
        (SHM_DIR / name).write_bytes(b"x")
    try:
        removed = sweep_stale()
        assert set(doomed) <= set(removed)
        assert not any((SHM_DIR / n).exists() for n in doomed)
        assert (SHM_DIR / alive).exists() and (SHM_DIR / other).exists()
    finally:
        for name in [*doomed, alive, other]:
            (SHM_DIR / name).unlink(missing_ok=True)


def test_attach_unlinks_the_name_and_checks_what_it_maps() -> None:
    seg = create_segment(1 << 16)
    try:
        with pytest.raises(InvalidArgumentError, match="bytes, the client said"):
            attach_segment(seg.name, 1 << 17, 1 << 20)
        with pytest.raises(InvalidArgumentError, match="bad shared-memory segment name"):
            attach_segment("../etc/passwd", 1 << 16, 1 << 20)
        server_side = attach_segment(seg.name, 1 << 16, 1 << 20)
        assert not (SHM_DIR / seg.name).exists()  # no name left to leak
        seg.view[:5] = b"hello"
        assert bytes(server_side.view[:5]) == b"hello"  # one segment, two mappings
        server_side.close()
    finally:
        seg.unlink()
        seg.close()


def test_arena_allocates_aligned_regions_and_coalesces() -> None:
    arena = Arena(1024)
    a, b, c = arena.alloc(100), arena.alloc(200), arena.alloc(300)
    assert (a, b, c) == (0, 128, 384)
    assert arena.alloc(1024) is None
    arena.free(b, 200)
    arena.free(a, 100)
    arena.free(c, 300)
    assert arena.used == 0
    assert arena.alloc(1024) == 0  # everything merged back into one region
