"""Engine independence: a client SIGKILLed mid-traffic leaves the server consistent and clean.

A child process puts and reads batches over the shared-memory path, reporting each stored batch
on stdout; it is SIGKILLed while still working. The server must drop its session and shared
memory (server stats, and no segment name of that PID in /dev/shm), keep serving, and a new
client process must read back every batch the dead one reported stored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from conftest import LMServer

CLIENT = r"""
import asyncio, sys
import numpy as np
import lmcache
from lmcache.keys import CacheKey

url, run, mode, upto = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
SIZE, BATCH = 256 << 10, 8

def batch(i):
    keys = [CacheKey("kill-" + run, 1, 0, (i * BATCH + j).to_bytes(32, "little"), "uint8") for j in range(BATCH)]
    vals = [np.random.default_rng(i * BATCH + j).bytes(SIZE) for j in range(BATCH)]
    return keys, vals

async def main():
    b = lmcache.open_backend(url)
    async with b:
        assert b.shm_active and b.pool_active, "expected the shared-memory path"
        dsts = [bytearray(SIZE) for _ in range(BATCH)]
        if mode == "write":
            i = 0
            while True:
                keys, vals = batch(i)
                assert all(r.ok for r in await b.put(keys, vals))
                print(f"stored {i}", flush=True)
                await b.get_into(keys, dsts)  # keep reads in flight too
                i += 1
        else:
            for i in range(upto + 1):
                keys, vals = batch(i)
                got = await b.get_into(keys, dsts)
                assert got == [SIZE] * BATCH, (i, got)
                assert [bytes(d) for d in dsts] == vals, i
            print("verified", upto, flush=True)

asyncio.run(main())
"""


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"lmcache-shm-{pid}-")]


def test_sigkilled_client_leaks_nothing_and_data_survives(lm_server: LMServer, tmp_path: Path) -> None:
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    run = uuid.uuid4().hex[:8]
    url = lm_server.url("lm+unix")
    before = lm_server.server_stats()["server"]
    writer = subprocess.Popen(
        [sys.executable, str(script), url, run, "write", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    last = -1
    try:
        assert writer.stdout is not None
        while last < 20:
            line = writer.stdout.readline()
            assert line, f"the writer died: {writer.stderr.read() if writer.stderr else ''}"
            last = int(line.split()[1])
        live = lm_server.server_stats()["server"]
        assert live["shm_segments"] >= before["shm_segments"] + 1  # the writer's segment is mapped
        os.kill(writer.pid, signal.SIGKILL)  # mid-traffic: it never stops putting and reading
    finally:
        if writer.poll() is None:
            os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    # The server notices the dead connection and drops its session and mapping.
    deadline = time.monotonic() + 10
    while True:
        stats = lm_server.server_stats()["server"]
        if stats["shm_segments"] == before["shm_segments"] and stats["sessions"] == before["sessions"] + 0:
            break
        assert time.monotonic() < deadline, f"the killed client's session lingers: {stats}"
        time.sleep(0.05)
    assert stats["shm_released"] >= before["shm_released"] + 1
    assert stats["pinned_keys"] == 0
    assert stats["leases"] == before["leases"] == 0, "the killed client's pool leases were not released"
    assert stats["reservations"] == before["reservations"] == 0, "the killed client's put reservations remain"
    assert _segments_of(writer.pid) == [], "a shared-memory segment name of the killed client is left"
    # A new client process gets hits for everything stored before the kill.
    out = subprocess.run(
        [sys.executable, str(script), url, run, "verify", str(last)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert f"verified {last}" in out.stdout
    assert _segments_of(writer.pid) == []
