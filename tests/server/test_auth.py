"""Auth is on by default: a generated token in a private file, found by same-user clients only.

The attack test runs a second Unix user (``nobody``) against a server over loopback TCP: it
must not read, write, clear or poison the cache, nor read the token file.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LMServer, start_lm_server

import lmcache
from lmcache.errors import AuthError
from lmcache.keys import CacheKey
from lmcache.serde.frame import encode_header
from lmcache.server.auth import discover_tcp_token, discover_unix_token

NOBODY = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder every user may traverse (pytest's tmp_path is private to root): only the modes
    lmcache itself sets then stand between another user and the token files."""
    folder = Path(tempfile.mkdtemp(prefix="lmcache-auth-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def private_server(shared_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LMServer]:
    """A server started without a token, its token folder under ``shared_tmp``."""
    runtime = shared_tmp / "run"
    runtime.mkdir(mode=0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))  # the child and this process alike
    server = start_lm_server(shared_tmp / "srv", ["memory://?capacity=64MiB"])
    try:
        yield server
    finally:
        server.proc.stop()


def _http_port(server: LMServer) -> int:
    return int(server.http.rsplit(":", 1)[1])


def test_a_generated_token_lives_in_private_files_removed_at_shutdown(private_server: LMServer) -> None:
    runtime = Path(os.environ["XDG_RUNTIME_DIR"]) / "lmcache"
    files = [runtime / f"{private_server.port}.token", runtime / f"{_http_port(private_server)}.token"]
    files.append(Path(private_server.unix + ".token"))
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    tokens = set()
    for f in files:
        st = f.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid(), f
        tokens.add(f.read_text().strip())
    assert len(tokens) == 1 and len(tokens.pop()) >= 32
    assert discover_tcp_token(private_server.port) == discover_unix_token(private_server.unix)
    private_server.proc.stop()
    assert not [f for f in files if f.exists()], "token files left behind after a clean shutdown"


async def test_same_user_clients_find_the_token_others_are_refused(private_server: LMServer) -> None:
    for url in (private_server.url("lm", shm="false"), private_server.url("lm+unix")):
        assert "token" not in url
        async with lmcache.open_backend(url) as b:  # no token given: discovered
            key = CacheKey("auth", 1, 0, os.urandom(32), "uint8")
            assert (await b.put([key], [b"mine"]))[0].ok
    with private_server.raw(hello=False) as c:  # what any other local user can send
        with pytest.raises(AuthError, match="wrong or missing token"):
            c.hello(None)
        assert c.closed_by_server()
    with private_server.raw(hello=False) as c, pytest.raises(AuthError):
        c.hello("guess")


def test_no_auth_lets_clients_in_and_logs_a_warning(tmp_path: Path) -> None:
    server = start_lm_server(tmp_path / "srv", ["memory://?capacity=16MiB"], extra=["--no-auth"])
    try:
        with server.raw(hello=False) as c:
            c.hello(None)
            c.ping()
        assert "--no-auth" in server.proc.log_path.read_text()
    finally:
        server.proc.stop()


# ---------------------------------------------------------------------------------------------
# A second Unix user


_ATTACK = textwrap.dedent(
    """
    import asyncio, json, socket, sys, urllib.error, urllib.request
    import lmcache
    from lmcache.keys import CacheKey
    from lmcache.server import protocol as P
    from lmcache.server.auth import discover_tcp_token

    cfg = json.loads(sys.argv[1])
    out = {}

    for path in cfg["token_files"]:
        try:
            open(path).read()
            out["read:" + path] = "read"
        except OSError as exc:
            out["read:" + path] = type(exc).__name__
    out["discovered"] = discover_tcp_token(cfg["port"])

    def frames_without_auth(token):
        # HELLO (no or a guessed token) and a PUT pipelined behind it: the PUT must never land.
        s = socket.create_connection(("127.0.0.1", cfg["port"]), timeout=10)
        meta = {"client": "nobody"} if token is None else {"client": "nobody", "token": token}
        frame = bytes.fromhex(cfg["frame"])
        s.sendall(P.encode_frame_head(P.Op.HELLO, 1, P.encode_meta(meta)))
        put = {"keys": [cfg["key"]], "sizes": [len(frame)]}
        s.sendall(P.encode_frame_head(P.Op.PUT, 2, P.encode_meta(put), len(frame)) + frame)
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        return got

    for token in (None, "guess"):
        got = frames_without_auth(token)
        fh = P.parse_frame_head(got[:32], 1 << 20, 1 << 20)
        out[f"hello:{token}"] = P.decode_meta(got[32 : 32 + fh.meta_len]).get("kind")

    async def backend():
        b = lmcache.open_backend(f"lm://127.0.0.1:{cfg['port']}?shm=false")
        try:
            r = await b.put([CacheKey.from_string(cfg["key"])], [bytes.fromhex(cfg["value"])])
            return "put:" + r[0].status.value
        except Exception as exc:
            return type(exc).__name__
        finally:
            await b.aclose()

    out["backend"] = asyncio.run(backend())

    for path in ("/clear", "/stats"):
        req = urllib.request.Request(cfg["http"] + path, data=b"{}" if path == "/clear" else None)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                out["http" + path] = resp.status
        except urllib.error.HTTPError as exc:
            out["http" + path] = exc.code

    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(cfg["unix"])
        out["unix"] = "connected"
    except OSError as exc:
        out["unix"] = type(exc).__name__
    print(json.dumps(out))
    """
)


def _as_nobody() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a second user (setpriv)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    argv = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable]
    probe = subprocess.run([*argv, "-c", "import lmcache.server.client"], check=False, capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"user nobody cannot run this venv's python: {probe.stderr.decode()[-300:]}")
    return argv


async def test_another_user_cannot_read_write_clear_or_poison(private_server: LMServer, shared_tmp: Path) -> None:
    argv = _as_nobody()
    victim = lmcache.open_backend(private_server.url("lm", shm="false"))
    async with victim:
        kept = CacheKey("victim", 1, 0, os.urandom(32), "uint8")
        assert (await victim.put([kept], [b"victim-value-0"]))[0].ok
        target = CacheKey("victim", 1, 0, os.urandom(32), "uint8")  # the key the victim asks for next
        poison = b"attacker-bytes" * 10
        # The attacker's raw frame is a well-formed value frame for the key: if it were stored, the
        # victim's client would take it as a normal hit (the checksum proves integrity, not origin).
        frame = encode_header(target, poison) + poison
        runtime = Path(os.environ["XDG_RUNTIME_DIR"]) / "lmcache"
        cfg = {
            "port": private_server.port,
            "http": private_server.http,
            "unix": private_server.unix,
            "key": target.to_string(),
            "frame": frame.hex(),
            "value": poison.hex(),
            "token_files": [
                str(runtime / f"{private_server.port}.token"),
                str(runtime / f"{_http_port(private_server)}.token"),
                private_server.unix + ".token",
            ],
        }
        script = shared_tmp / "attack.py"
        script.write_text(_ATTACK)
        script.chmod(0o644)
        done = await asyncio.to_thread(
            subprocess.run, [*argv, str(script), json.dumps(cfg)], capture_output=True, timeout=120, cwd=shared_tmp
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        got = json.loads(done.stdout.decode().strip().splitlines()[-1])

        for path in cfg["token_files"]:
            assert got["read:" + path] == "PermissionError", got
        assert got["discovered"] is None
        assert got["hello:None"] == "auth" and got["hello:guess"] == "auth", got
        assert got["backend"] == "AuthError", got
        assert got["http/clear"] == 401 and got["http/stats"] == 401, got
        assert got["unix"] == "PermissionError", got

        # The victim sees a miss for the key the attacker tried to fill, never its bytes...
        dst = bytearray(4096)
        assert await victim.get_into([target], [dst]) == [None]
        # ... stores its own value there and reads that back; and nothing was cleared.
        assert (await victim.put([target], [b"victim-value-1"]))[0].ok
        assert await victim.get_into([target, kept], [dst, bytearray(64)]) == [14, 14]
        assert bytes(dst[:14]) == b"victim-value-1"
