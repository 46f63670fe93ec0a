"""Fixtures for the cache server tests: real ``python -m lmcache server`` child processes.

Each server binds port 0 and a Unix socket in a temp folder and writes its addresses to a ready
file; the fixture polls that file and a HELLO/PING over the socket, and stops the server by PID.
Auth is on by default: a server started without ``token`` generates one, and the fixtures (like
any client of the same user) read it from the token file it wrote.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

pytest.importorskip("aiohttp", reason="the server extra is not installed (pip install 'lmcache[server]')")
pytest.importorskip("prometheus_client", reason="the server extra is not installed (pip install 'lmcache[server]')")

from rawclient import RawClient
from servers import ServerProcess, start_process

from lmcache.server.auth import discover_unix_token


class LMServer:
    """A running ``lmcache server`` and its addresses."""

    def __init__(self, proc: ServerProcess, folder: Path, token: str | None) -> None:
        self.proc = proc
        self.folder = folder
        self.token = token
        info = json.loads((folder / "ready.json").read_text())
        self.port: int = info["tcp"][1]
        self.unix: str = info["unix"]
        self.http: str = f"http://127.0.0.1:{info['http'][1]}"
        self.pid: int = info["pid"]

    @property
    def auth_token(self) -> str | None:
        """The token clients must send: the configured one, else the one the server generated."""
        return self.token if self.token is not None else discover_unix_token(self.unix)

    def url(self, scheme: str = "lm", **query: object) -> str:
        """A client URL for this server (``lm`` or ``lm+unix``) with query options."""
        base = f"lm://127.0.0.1:{self.port}" if scheme == "lm" else f"lm+unix://{self.unix}"
        q = dict(query)
        if self.token is not None:
            q.setdefault("token", self.token)
        if q:
            base += "?" + "&".join(f"{k}={v}" for k, v in q.items())
        return base

    def raw(self, *, hello: bool = True, token: str | None = "default") -> RawClient:
        """A raw protocol client (TCP), HELLO sent unless ``hello=False``."""
        c = RawClient(("127.0.0.1", self.port))
        if hello:
            c.hello(self.auth_token if token == "default" else token)
        return c

    def server_stats(self) -> dict:
        with self.raw() as c:
            return c.stats()


def start_lm_server(
    folder: Path, tiers: Sequence[str], *, token: str | None = None, extra: Sequence[str] = ()
) -> LMServer:
    """Start a server child process with ``tiers`` and wait until it answers."""
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "ready.json"
    argv = [sys.executable, "-m", "lmcache", "-v", "server", "--port", "0", "--http-port", "0"]
    argv += ["--unix-socket", str(folder / "lm.sock"), "--ready-file", str(ready)]
    for t in tiers:
        argv += ["--tier", t]
    if token is not None:
        (folder / "token").write_text(token)
        argv += ["--token-file", str(folder / "token")]
    argv += list(extra)

    def probe() -> bool:
        if not ready.exists():
            return False
        info = json.loads(ready.read_text())
        with RawClient(("127.0.0.1", info["tcp"][1])) as c:
            c.hello(token if token is not None else discover_unix_token(info["unix"]))
            c.ping()
        return True

    proc = start_process("lmcache-server", argv, folder, probe)
    return LMServer(proc, folder, token)


@pytest.fixture(scope="session")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    """One shared server (memory tier of 1 GiB) for the conformance suites."""
    server = start_lm_server(tmp_path_factory.mktemp("lm-server"), ["memory://?capacity=1GiB"])
    try:
        yield server
    finally:
        server.proc.stop()


@pytest.fixture(scope="session")
def lm_token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    """A server that requires a token."""
    server = start_lm_server(
        tmp_path_factory.mktemp("lm-token-server"), ["memory://?capacity=64MiB"], token="s3cr3t-t0ken"
    )
    try:
        yield server
    finally:
        server.proc.stop()
