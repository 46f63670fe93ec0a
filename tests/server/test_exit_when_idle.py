"""``lmcache server --exit-when-idle``: a server nobody uses stops itself; a live client keeps it.

The server vLLM's ``server: auto`` starts runs with it, so a host is not left with a cache server
(and its memory tier) after every vLLM is gone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from conftest import start_lm_server

import lmcache
from lmcache.keys import CacheKey


def _exited(proc: object, within: float) -> bool:
    popen = proc.proc  # type: ignore[attr-defined]
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            return True
        time.sleep(0.1)
    return False


def test_a_server_without_clients_stops_itself_and_cleans_up(tmp_path: Path) -> None:
    server = start_lm_server(tmp_path / "s", ["memory://?capacity=16MiB"], extra=["--exit-when-idle", "1"])
    try:
        assert _exited(server.proc, 30), "the idle server kept running"
        assert server.proc.proc is not None and server.proc.proc.returncode == 0
        assert not Path(server.unix).exists()  # a graceful stop: the socket is gone
        assert not (server.folder / "ready.json").exists()
    finally:
        server.proc.stop()


async def test_a_live_client_process_keeps_it_between_sessions(tmp_path: Path) -> None:
    server = start_lm_server(tmp_path / "s", ["memory://?capacity=16MiB"], extra=["--exit-when-idle", "2"])
    try:
        key = CacheKey("idle-exit", 1, 0, os.urandom(32), "uint8")
        async with lmcache.open_backend(server.url("lm+unix")) as backend:
            assert (await backend.put([key], [b"v" * 100]))[0].ok
        # This process no longer has a session but is alive (a vLLM between requests, its idle
        # session closed): the server stays, well past the limit.
        assert not _exited(server.proc, 8), server.proc.log_tail()
        async with lmcache.open_backend(server.url("lm+unix")) as backend:
            assert await backend.contains([key]) == [True]
    finally:
        server.proc.stop()


def test_zero_means_never(tmp_path: Path) -> None:
    server = start_lm_server(tmp_path / "s", ["memory://?capacity=16MiB"], extra=["--exit-when-idle", "0"])
    try:
        assert not _exited(server.proc, 3)
    finally:
        server.proc.stop()


def test_a_negative_limit_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"exit_when_idle|exit-when-idle"):
        start_lm_server(tmp_path / "s", ["memory://?capacity=16MiB"], extra=["--exit-when-idle", "-1"])
