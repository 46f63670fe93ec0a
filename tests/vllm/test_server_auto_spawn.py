"""``server: auto`` without vLLM: connect-or-spawn of the per-host cache server, and the settings.

Every test points the per-user run folder at its own tmp dir (``XDG_RUNTIME_DIR``), and the
``run_folder`` fixture kills whatever server was started there (its ready file names the pid).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmcache.config import LMCacheConfig
from lmcache.errors import ConfigError
from lmcache.integrations.vllm import server_auto
from lmcache.integrations.vllm.slots import ConnectorSettings

ROOT = Path(__file__).resolve().parents[2]
TIERS = ["memory://?capacity=64MiB"]
_ENSURE = (
    "import json, sys\n"
    "from lmcache.integrations.vllm.server_auto import ensure_server\n"
    "s = ensure_server(json.loads(sys.argv[1]))\n"
    "print(json.dumps([s.socket_path, s.started, s.pid]), flush=True)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _kill(pid: int, sig: int = signal.SIGTERM) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)


def _server_pids(run: Path) -> list[int]:
    """Live ``lmcache server`` processes on ``run``'s socket (from /proc, so strays are found too)."""
    sock = str(run / server_auto.SOCKET_NAME)
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in argv and sock.encode() in argv and _alive(int(d.name)):
            pids.append(int(d.name))
    return pids


@pytest.fixture
def run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private per-user run folder for this test; every server started there is killed after it."""
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    run = xdg / "lmcache"
    yield run
    for pid in _server_pids(run):
        _kill(pid)


def _ensure_in_subprocess(tiers: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _ENSURE, json.dumps(tiers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _roundtrip(url: str) -> bytes | None:
    """Put one value through ``url`` (token found beside the socket) and read it back."""
    import asyncio

    from lmcache.backends.registry import open_backend
    from lmcache.keys import CacheKey

    async def go() -> bytes | None:
        key = CacheKey("m", 1, 0, bytes(range(32)), "float32")
        async with open_backend(url) as backend:
            await backend.put([key], [b"x" * 1000])
            buf = bytearray(4096)
            (n,) = await backend.get_into([key], [memoryview(buf)])
            return None if n is None else bytes(buf[:n])

    return asyncio.run(go())


def test_two_racing_starts_make_one_server(run_folder: Path) -> None:
    """Two processes call ensure_server at once: one starts the server, the other connects to it."""
    procs = [_ensure_in_subprocess(TIERS) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert {r[0] for r in results} == {str(run_folder / server_auto.SOCKET_NAME)}
    assert sorted(r[1] for r in results) == [False, True]
    started_pid = next(r[2] for r in results if r[1])
    assert _server_pids(run_folder) == [started_pid]
    # Tier URLs (which may hold passwords) travel in its environment, not in argv (ps shows argv).
    assert b"memory://" not in Path(f"/proc/{started_pid}/cmdline").read_bytes()
    assert b"LMCACHE_TIERS=memory://?capacity=64MiB" in Path(f"/proc/{started_pid}/environ").read_bytes()
    # A third caller in this process connects without starting anything.
    again = server_auto.ensure_server(TIERS)
    assert not again.started and again.socket_path == results[0][0]
    assert _server_pids(run_folder) == [started_pid]
    # Clients of this user find the token beside the socket.
    assert _roundtrip(again.url) == b"x" * 1000


def test_server_outlives_the_process_that_started_it(run_folder: Path) -> None:
    """The starter is SIGKILLed: the server (own session) keeps serving what was stored."""
    starter = _ensure_in_subprocess(TIERS)
    out, err = starter.communicate(timeout=120)
    assert starter.returncode == 0, err
    sock, started, pid = json.loads(out.strip().splitlines()[-1])
    assert started
    assert os.getsid(pid) == pid  # its own session: signals to the starter's group miss it
    assert _roundtrip(f"lm+unix://{sock}") == b"x" * 1000
    # A vLLM-like parent killed hard while the server runs: a process group kill of the parent.
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _alive(pid)
    again = server_auto.ensure_server(TIERS)
    assert not again.started


def test_a_killed_servers_leftovers_do_not_block_a_new_start(run_folder: Path) -> None:
    """SIGKILL leaves the socket, token and ready files: the next start replaces them and clients get in."""
    first = server_auto.ensure_server(TIERS)
    assert first.started and first.pid is not None
    _kill(first.pid, signal.SIGKILL)
    sock = Path(first.socket_path)
    assert sock.exists() and (run_folder / server_auto.READY_NAME).exists()  # stale, left behind
    # The leader thread shows as a zombie while its other threads still exit and hold the socket.
    deadline = time.monotonic() + 15
    while server_auto.socket_alive(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server_auto.socket_alive(sock)
    second = server_auto.ensure_server(TIERS)
    assert second.started and second.pid != first.pid
    assert _roundtrip(second.url) == b"x" * 1000  # the new token, not the stale one


def test_a_server_that_cannot_start_is_reported_with_its_log(run_folder: Path) -> None:
    from lmcache.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="exited"):
        server_auto.ensure_server(["nosuchscheme://x"], start_timeout=60)
    assert (run_folder / server_auto.LOG_NAME).exists()


def test_settings_server_auto_uses_the_per_host_server(run_folder: Path) -> None:
    settings = ConnectorSettings.from_extra_config(
        {"server": "auto", "server_capacity": "32MiB", "tiers": ["memory://?capacity=1GiB"], "chunk_size": 16},
        environ={},
    )
    assert settings.server_tiers_to_start() == ["memory://?capacity=32MiB"]
    config = settings.shared_config("m", cross_process=True)
    sock = run_folder / server_auto.SOCKET_NAME
    # The process-local memory tier is dropped; no file:// tier is added.
    assert config.tiers == [f"lm+unix://{sock}"]
    assert server_auto.socket_alive(sock)
    assert len(_server_pids(run_folder)) == 1


def test_settings_named_server_and_other_tiers_behind_it(tmp_path: Path) -> None:
    settings = ConnectorSettings.from_extra_config(
        {"server": "lm+unix:///run/x.sock", "tiers": ["memory://", f"file://{tmp_path}"]}, environ={}
    )
    assert settings.shared_config("m", cross_process=True).tiers == ["lm+unix:///run/x.sock", f"file://{tmp_path}"]
    # Without a server the file:// fallback stays.
    plain = ConnectorSettings(LMCacheConfig.load(environ={}, tiers=["memory://"]), shared_dir=str(tmp_path))
    assert plain.shared_config("m", cross_process=True).tiers == ["memory://", f"file://{tmp_path}/m"]


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"server": "redis://x"}, "server"),
        ({"server": 1}, "server"),
        ({"server_capacity": "lots"}, "server_capacity"),
        ({"server_tiers": ["nosuchscheme://x"]}, "server_tiers"),
        ({"eviction_check_interval": -1}, "eviction_check_interval"),
        ({"eviction_check_keys": 0}, "eviction_check_keys"),
    ],
)
def test_bad_server_settings_name_the_key(extra: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        ConnectorSettings.from_extra_config(extra, environ={})


def test_the_started_server_exits_when_idle_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMCACHE_SERVER_EXIT_WHEN_IDLE", raising=False)
    cmd = server_auto._server_command(Path("/run/x/server.sock"))
    assert float(cmd[cmd.index("--exit-when-idle") + 1]) == server_auto.EXIT_WHEN_IDLE == 600
    # The server reads LMCACHE_SERVER_EXIT_WHEN_IDLE itself (it inherits the environment): no flag
    # may override it.
    monkeypatch.setenv("LMCACHE_SERVER_EXIT_WHEN_IDLE", "0")
    assert "--exit-when-idle" not in server_auto._server_command(Path("/run/x/server.sock"))
