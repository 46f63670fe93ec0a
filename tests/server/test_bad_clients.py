"""Misbehaving clients get a clear error and are disconnected; the server keeps serving others."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import pytest
from conftest import LMServer

import lmcache
from lmcache.errors import AuthError, InvalidArgumentError
from lmcache.keys import CacheKey
from lmcache.server import protocol as P


def _error_reply(c) -> dict:
    fh, meta, _ = c.recv()
    assert fh.flags & P.FLAG_ERROR
    return meta


def _still_serving(server: LMServer) -> None:
    with server.raw() as other:
        other.ping()


def test_garbage_gets_protocol_error_and_disconnect(lm_server: LMServer) -> None:
    with lm_server.raw() as bystander, lm_server.raw(hello=False) as c:
        c.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 8)
        meta = _error_reply(c)
        assert meta["kind"] == "protocol" and "magic" in meta["message"]
        assert c.closed_by_server()
        bystander.ping()  # a session opened before is unaffected
    _still_serving(lm_server)


def test_oversized_frame_is_refused_before_reading(lm_server: LMServer) -> None:
    with lm_server.raw() as c:
        head = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Op.PUT, 0, 7, 2, 0, P.DEFAULT_MAX_FRAME_BYTES + 1)
        c.send_raw(head + b"{}")  # the data is never sent: the server must not wait for it
        meta = _error_reply(c)
        assert meta["kind"] == "protocol" and "exceeds the max frame size" in meta["message"]
        assert c.closed_by_server()
    _still_serving(lm_server)


def test_oversized_meta_and_bad_version(lm_server: LMServer) -> None:
    with lm_server.raw() as c:
        c.send_raw(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Op.GET, 0, 1, 1 << 30, 0, 0))
        assert "meta" in _error_reply(c)["message"]
        assert c.closed_by_server()
    with lm_server.raw(hello=False) as c:
        c.send_raw(P.HEADER.pack(P.MAGIC, 99, P.Op.HELLO, 0, 1, 0, 0, 0))
        assert "version 99" in _error_reply(c)["message"]
    _still_serving(lm_server)


def test_bad_meta_is_a_bad_request_and_the_session_goes_on(lm_server: LMServer) -> None:
    with lm_server.raw() as c:
        with pytest.raises(InvalidArgumentError, match=r"meta\.keys"):
            c.call(P.Op.CONTAINS, {"keys": "not-a-list"})
        with pytest.raises(InvalidArgumentError, match="bad key"):
            c.call(P.Op.CONTAINS, {"keys": ["no-such-key-format"]})
        with pytest.raises(InvalidArgumentError, match="sizes"):
            c.call(P.Op.PUT, {"keys": [_key()], "sizes": [10]}, b"12345")
        with pytest.raises(InvalidArgumentError, match="shared-memory"):
            c.send(P.Op.GET, {"keys": [_key()], "spans": [[0, 10]]}, flags=P.FLAG_SHM)
            _, meta, _ = c.recv()
            raise P.error_from_reply(meta)
        c.ping()  # same connection still works


def test_hello_must_come_first(lm_server: LMServer) -> None:
    with lm_server.raw(hello=False) as c:
        with pytest.raises(AuthError, match="first message must be HELLO"):
            c.call(P.Op.PING, {})
        assert c.closed_by_server()


def test_wrong_token_is_refused(lm_token_server: LMServer) -> None:
    with lm_token_server.raw(hello=False) as c:
        with pytest.raises(AuthError, match="wrong or missing token"):
            c.hello("wrong")
        assert c.closed_by_server()
    with lm_token_server.raw(hello=False) as c, pytest.raises(AuthError):
        c.hello(None)
    with lm_token_server.raw() as c:  # the right token
        c.ping()


async def test_backend_with_wrong_token_raises_auth_error(lm_token_server: LMServer) -> None:
    b = lmcache.open_backend(lm_token_server.url("lm", token="nope"))
    try:
        with pytest.raises(AuthError):
            await b.open()
    finally:
        await b.aclose()
    good = lmcache.open_backend(lm_token_server.url("lm"))
    async with good:
        await good.ping()
        assert "s3cr3t-t0ken" not in repr(good)


def test_http_unknown_tier_and_bad_body(lm_server: LMServer) -> None:
    token = lm_server.auth_token
    code, body = _post(lm_server.http + "/move", {"keys": [_key()], "to_tier": 7}, token)
    assert code == 400 and "to_tier=7: no such tier" in body["error"]
    code, body = _post(lm_server.http + "/lookup", {"nothing": 1}, token)
    assert code == 400 and "keys or tokens" in body["error"]
    code, body = _post(lm_server.http + "/pin", {"keys": [_key()], "ttl": -1}, token)
    assert code == 400 and "ttl" in body["error"]
    _still_serving(lm_server)


def test_http_needs_bearer_token(lm_token_server: LMServer) -> None:
    code, body = _post(lm_token_server.http + "/lookup", {"keys": []})
    assert code == 401 and "bearer" in body["error"]
    code, _ = _post(lm_token_server.http + "/lookup", {"keys": []}, token="s3cr3t-t0ken")
    assert code == 200


def _key() -> str:
    return CacheKey("bad-clients", 1, 0, os.urandom(32), "uint8").to_string()


def _post(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_one_way_commit_of_no_reservation_is_counted_not_answered(lm_server: LMServer) -> None:
    """The shm put's COMMIT is one-way (FLAG_NOREPLY): a bad one gets no reply on the stream
    (the client reads none), is counted as a bad request, and the session goes on."""
    with lm_server.raw() as c:
        before = c.stats()["server"]["bad_requests"]
        c.send(P.Op.COMMIT, {"reservation": 987654}, flags=P.FLAG_NOREPLY)
        rid = c.send(P.Op.PING, {})
        fh, _, _ = c.recv()
        assert fh.request_id == rid and not fh.flags & P.FLAG_ERROR, "the one-way COMMIT was answered"
        assert c.stats()["server"]["bad_requests"] == before + 1
