"""``lmcache server`` from a YAML config, clients reconnecting across a restart, and ``lmcache bench``."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from conftest import LMServer, start_lm_server

import lmcache
from lmcache.cli import main as cli_main
from lmcache.keys import CacheKey
from lmcache.server.ctl import call


async def test_yaml_config_and_reconnect_after_restart(tmp_path: Path) -> None:
    files = tmp_path / "files"
    config = tmp_path / "lmcache.yaml"
    config.write_text(f'tiers: ["memory://?capacity=64MiB", "file://{files}?capacity=64MiB"]\nchunk_size: 16\n')
    server = start_lm_server(tmp_path / "srv", [], extra=["--config", str(config)])
    try:
        b = lmcache.open_backend(server.url("lm+unix"))
        async with b:
            keys = [CacheKey("restart", 1, 0, os.urandom(32), "uint8") for _ in range(4)]
            values = [os.urandom(10_000 + i) for i in range(4)]
            assert all(r.ok for r in await b.put(keys, values))
            old_pid = server.pid
            server.proc.stop()  # SIGTERM: the server flushes write-back into the file tier
            # ... and removes its shared tier-0 pool from /dev/shm.
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"lmcache-pool-{old_pid}-")]
            server.proc.start()
            # The same backend reconnects on its next call (transparently: every operation is
            # idempotent) and reads the values back from the file tier.
            dsts = [bytearray(20_000) for _ in keys]
            assert await b.get_into(keys, dsts) == [len(v) for v in values]
            assert [bytes(d[: len(v)]) for d, v in zip(dsts, values, strict=True)] == values
            http = json.loads((server.folder / "ready.json").read_text())["http"][1]
            health = await asyncio.to_thread(call, f"http://127.0.0.1:{http}", "/health")
            assert health["status"] == "ok" and len(health["tiers"]) == 2
    finally:
        server.proc.stop()


@pytest.mark.parametrize(("shm", "baseline"), [("true", "memcpy-shm"), ("false", "raw-socket")])
def test_bench_backend_against_lm(lm_server: LMServer, tmp_path: Path, shm: str, baseline: str) -> None:
    out = tmp_path / "bench.json"
    argv = ["bench", "backend", "--url", lm_server.url("lm", shm=shm), "--total", "8MiB", "--value-size", "1MiB"]
    argv += ["--repeat", "1", "--warmup", "0", "--keys-tokens", "0", "--json", str(out)]
    assert cli_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["baseline"]["name"] == baseline
    assert result["ratio"]["put_gbps"] is not None and result["ratio"]["get_gbps"] is not None
    assert result["backend_stats"]["shm"] is (shm == "true")


async def test_no_shm_server_falls_back_to_the_socket(tmp_path: Path) -> None:
    server = start_lm_server(tmp_path / "srv", ["memory://?capacity=32MiB"], extra=["--no-shm"])
    try:
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"lmcache-pool-{server.pid}-")]
        b = lmcache.open_backend(server.url("lm+unix"))  # asks for shm; the server declines
        async with b:
            keys = [CacheKey("no-shm", 1, 0, os.urandom(32), "uint8") for _ in range(3)]
            values = [os.urandom(100_000) for _ in keys]
            assert all(r.ok for r in await b.put(keys, values))
            dsts = [bytearray(100_000) for _ in keys]
            assert await b.get_into(keys, dsts) == [100_000] * 3  # tier-0 hits sent in place
            assert [bytes(d) for d in dsts] == values
            assert not b.shm_active and b.stats()["shm"] is False
            assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"lmcache-shm-{os.getpid()}-")]
    finally:
        server.proc.stop()
