"""The HTTP control API: mutations need the token (even the generated one, even under --no-auth),
bodies must be JSON, and foreign ``Origin``s are refused."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LMServer, start_lm_server

from lmcache.cli import main as cli_main
from lmcache.keys import CacheKey
from lmcache.server.ctl import local_token


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    """A server started with --no-auth."""
    server = start_lm_server(tmp_path_factory.mktemp("lm-no-auth"), ["memory://?capacity=16MiB"], extra=["--no-auth"])
    try:
        yield server
    finally:
        server.proc.stop()


def _request(
    url: str,
    body: bytes | None = None,
    *,
    token: str | None = None,
    ctype: str | None = "application/json",
    origin: str | None = None,
    host: str | None = None,
) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    if ctype is not None and body is not None:
        req.add_header("Content-Type", ctype)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if origin is not None:
        req.add_header("Origin", origin)
    if host is not None:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def _keys_body(n: int = 1) -> bytes:
    keys = [CacheKey("http-sec", 1, 0, os.urandom(32), "uint8").to_string() for _ in range(n)]
    return json.dumps({"keys": keys, "ttl": 5, "to_tier": 0}).encode()


@pytest.mark.parametrize("path", ["/pin", "/unpin", "/clear", "/move"])
def test_mutations_need_the_generated_token(lm_server: LMServer, path: str) -> None:
    assert lm_server.token is None  # started without one: the server made its own
    body = b"{}" if path == "/clear" else _keys_body()
    code, reply = _request(lm_server.http + path, body)
    assert code == 401, reply
    code, _ = _request(lm_server.http + path, body, token="wrong")
    assert code == 401
    code, reply = _request(
        lm_server.http + path, body if path != "/clear" else b'{"model": "nothing-here"}', token=lm_server.auth_token
    )
    assert code == 200, reply


def test_reads_need_the_token_unless_no_auth(lm_server: LMServer, open_server: LMServer) -> None:
    for server, expect in ((lm_server, 401), (open_server, 200)):
        assert _request(server.http + "/stats")[0] == expect
        assert _request(server.http + "/lookup", b'{"keys": []}')[0] == expect
        assert _request(server.http + "/health")[0] == 200


def test_no_auth_still_guards_mutations_with_the_generated_token(open_server: LMServer) -> None:
    code, _ = _request(open_server.http + "/clear", b"{}")
    assert code == 401
    token = local_token(open_server.http)  # same user: found in the token file of the HTTP port
    assert token is not None
    code, reply = _request(open_server.http + "/clear", b"{}", token=token)
    assert code == 200 and "cleared" in reply


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None])
def test_mutations_take_only_json_bodies(lm_server: LMServer, ctype: str | None) -> None:
    # A web page can POST these cross-origin without a preflight; application/json it cannot.
    code, reply = _request(lm_server.http + "/clear", b"{}", token=lm_server.auth_token, ctype=ctype)
    assert code == 415, reply


def test_an_empty_body_is_a_bad_request(lm_server: LMServer) -> None:
    for path in ("/clear", "/pin", "/lookup"):
        code, reply = _request(lm_server.http + path, b"", token=lm_server.auth_token)
        assert code == 400 and "body" in reply["error"], (path, reply)


@pytest.mark.parametrize("origin", ["https://evil.example", "http://127.0.0.1.evil.example", "null"])
def test_only_local_origins_are_accepted(lm_server: LMServer, origin: str) -> None:
    for path, body in (("/clear", b'{"model": "nothing-here"}'), ("/stats", None)):
        code, reply = _request(lm_server.http + path, body, token=lm_server.auth_token, origin=origin)
        assert code == 403 and "origin" in reply["error"], (path, reply)
    port = lm_server.http.rsplit(":", 1)[1]
    for local in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", "http://[::1]:3000"):
        code, reply = _request(
            lm_server.http + "/clear", b'{"model": "nothing-here"}', token=lm_server.auth_token, origin=local
        )
        assert code == 200, (local, reply)


def test_no_auth_reads_for_a_rebound_host_name_need_the_token(open_server: LMServer) -> None:
    # A DNS-rebinding page is same-origin and sends no Origin on a GET: only Host gives it away.
    port = open_server.http.rsplit(":", 1)[1]
    for path, body in (("/stats", None), ("/lookup", b'{"keys": []}')):
        code, reply = _request(open_server.http + path, body, host=f"evil.example:{port}")
        assert code == 403 and "host" in reply["error"], (path, reply)
        token = local_token(open_server.http)
        assert _request(open_server.http + path, body, host=f"evil.example:{port}", token=token)[0] == 200
        for local in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"10.1.2.3:{port}"):
            code, reply = _request(open_server.http + path, body, host=local)
            assert code == 200, (path, local, reply)
    # The open endpoints stay open whatever the Host (Prometheus scrapes by service name).
    assert _request(open_server.http + "/health", host="lmcache.svc.cluster.local")[0] == 200


def test_server_ctl_finds_the_token_on_its_own(
    lm_server: LMServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LMCACHE_SERVER_TOKEN", raising=False)
    assert cli_main(["server-ctl", "clear", "--url", lm_server.http, "--model", "nothing-here"]) == 0
    assert json.loads(capsys.readouterr().out)["cleared"] == 0
    # A wrong explicit token is not silently replaced by the discovered one.
    bad = tmp_path / "token"
    bad.write_text("wrong")
    assert cli_main(["server-ctl", "clear", "--url", lm_server.http, "--token-file", str(bad)]) != 0
