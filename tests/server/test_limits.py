"""What a client can cost the server: nothing before HELLO, bounded time per read, bounded staging.

One server with small limits (``--hello-timeout 1 --read-timeout 2 --idle-timeout 3``, a 1 MiB
staging budget) and a ``file://`` tier 0, so socket puts go through staging buffers.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import LMServer, start_lm_server
from rawclient import RawClient

import lmcache
from lmcache.errors import BackendUnavailableError, CapacityError
from lmcache.keys import CacheKey
from lmcache.server import protocol as P

MiB = 1 << 20


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    folder = tmp_path_factory.mktemp("lm-limits")
    extra = ["--hello-timeout", "1", "--read-timeout", "2", "--idle-timeout", "3"]
    extra += ["--staging-budget", "1MiB", "--staging-wait", "0.5"]
    server = start_lm_server(folder, [f"file://{folder / 'files'}?capacity=64MiB"], extra=extra)
    try:
        yield server
    finally:
        server.proc.stop()


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _key() -> str:
    return CacheKey("limits", 1, 0, os.urandom(32), "uint8").to_string()


def _connection_error(c: RawClient) -> dict | None:
    """The error reply the server sent before closing (None if it just closed), asserting the close."""
    try:
        fh, meta, _ = c.recv()
    except (ConnectionError, OSError):
        return None
    assert fh.flags & P.FLAG_ERROR, "expected an error reply"
    assert c.closed_by_server()
    return meta


# -- before HELLO --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [P.Op.HELLO, P.Op.PUT])
def test_an_unauthenticated_400_mib_frame_is_refused_without_allocating(tight_server: LMServer, op: int) -> None:
    before = _rss(tight_server.pid)
    conns = []
    for _ in range(3):  # each would have cost 400 MiB before the fix
        c = tight_server.raw(hello=False)
        c.send_raw(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, op, 0, 1, 0, 0, 400 * MiB))
        conns.append(c)
    for c in conns:
        meta = _connection_error(c)
        assert meta is not None and meta["kind"] in ("protocol", "auth"), meta
        c.close()
    assert _rss(tight_server.pid) - before < 64 * MiB
    with tight_server.raw() as c:
        c.ping()


def test_unauthenticated_meta_is_capped_too(tight_server: LMServer) -> None:
    with tight_server.raw(hello=False) as c:
        c.send_raw(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Op.HELLO, 0, 1, 15 * MiB, 0, 0))
        meta = _connection_error(c)
        assert meta is not None and "meta" in meta["message"]


def test_a_slow_drip_hello_is_cut_after_hello_timeout(tight_server: LMServer) -> None:
    meta = P.encode_meta({"client": "drip", "pad": "x" * 2000})
    with tight_server.raw(hello=False) as c:
        c.send_raw(P.encode_frame_head(P.Op.HELLO, 1, meta)[: P.HEADER_BYTES])  # the header at once
        cut = False
        deadline = time.monotonic() + 30  # a drip of the whole meta would take 200 s
        for b in meta:
            try:
                c.send_raw(bytes([b]))
            except OSError:
                cut = True
                break
            c.sock.settimeout(0.1)
            try:
                if c.sock.recv(1, socket.MSG_PEEK) is not None:  # an error reply or EOF: cut
                    cut = True
                    break
            except TimeoutError:
                pass
            if time.monotonic() > deadline:
                break
        assert cut, "the server kept waiting for a HELLO that arrives one byte at a time"


# -- after HELLO ---------------------------------------------------------------------------------


def test_a_frame_that_stalls_mid_meta_is_cut(tight_server: LMServer) -> None:
    with tight_server.raw() as c:
        c.send_raw(P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Op.CONTAINS, 0, 9, 200, 0, 0) + b'{"keys": [')
        meta = _connection_error(c)  # the raw client's own timeout is 10 s
        assert meta is None or meta["kind"] == "timeout", meta


def test_a_frame_that_stalls_mid_data_is_cut(tight_server: LMServer) -> None:
    with tight_server.raw() as c:
        head = P.encode_frame_head(P.Op.PUT, 9, P.encode_meta({"keys": [_key()], "sizes": [4096]}), 4096)
        c.send_raw(head + b"x" * 1000)
        meta = _connection_error(c)
        assert meta is None or meta["kind"] == "timeout", meta
        assert tight_server.server_stats()["server"]["timeouts"] >= 1


def test_a_client_that_stops_reading_replies_is_cut(tight_server: LMServer) -> None:
    with tight_server.raw() as watch, tight_server.raw() as reader:
        key = _key()
        assert watch.put_frame(key, b"g" * (512 << 10)) == "stored"
        before = watch.stats()["server"]["timeouts"]
        # 64 replies of 512 KiB: far more than both socket buffers hold, and none is read.
        for _ in range(64):
            reader.send(P.Op.GET, {"keys": [key], "caps": [1 << 20]})
        for _ in range(300):  # read_timeout is 2 s; before the fix the session waited forever
            if watch.stats()["server"]["timeouts"] > before:
                break
            time.sleep(0.1)
        assert watch.stats()["server"]["timeouts"] > before
        reader.sock.settimeout(5)
        with pytest.raises((ConnectionError, OSError, AssertionError)):
            while True:  # what was sent before the cut drains, then the stream ends
                reader.recv()
        watch.ping()  # the server and other sessions carry on


def test_an_idle_session_is_closed(tight_server: LMServer) -> None:
    with tight_server.raw() as c:
        c.ping()
        c.sock.settimeout(15)
        assert c.closed_by_server()


async def test_a_client_reconnects_after_an_idle_close(tight_server: LMServer) -> None:
    async with lmcache.open_backend(tight_server.url("lm", shm="false")) as b:
        key = CacheKey("idle", 1, 0, os.urandom(32), "uint8")
        assert (await b.put([key], [b"v" * 100]))[0].ok
        for _ in range(100):  # until the server has closed the idle connection
            if b.stats()["connections"] == 0:
                break
            await asyncio.sleep(0.2)
        assert b.stats()["connections"] == 0
        assert await b.contains([key]) == [True]  # a new connection, transparently


# -- the staging budget ------------------------------------------------------------------------


def test_a_request_larger_than_the_staging_budget_is_too_large(tight_server: LMServer) -> None:
    with tight_server.raw() as c:
        data = b"z" * (2 * MiB)
        with pytest.raises(CapacityError, match="budget"):
            c.call(P.Op.PUT, {"keys": [_key()], "sizes": [len(data)]}, data)
        c.ping()  # the data was skipped: the session goes on


def test_sessions_share_one_staging_budget(tight_server: LMServer) -> None:
    with tight_server.raw() as holder, tight_server.raw() as other, tight_server.raw() as watch:
        # The holder's put stages 768 KiB and stalls after the first 100 KiB...
        head = P.encode_frame_head(P.Op.PUT, 1, P.encode_meta({"keys": [_key()], "sizes": [768 << 10]}), 768 << 10)
        holder.send_raw(head + b"h" * (100 << 10))
        for _ in range(100):
            if watch.stats()["server"]["staging_bytes"] >= 768 << 10:
                break
            time.sleep(0.05)
        stats = watch.stats()["server"]
        assert stats["staging_bytes"] == 768 << 10 and stats["staging_budget"] == MiB
        # ... so another session's 512 KiB put finds no room: after staging_wait it is told the
        # server is busy (it does not allocate past the budget) and its session goes on.
        data = b"o" * (512 << 10)
        key = _key()
        with pytest.raises(BackendUnavailableError, match="staging budget"):
            other.call(P.Op.PUT, {"keys": [key], "sizes": [len(data)]}, data)
        assert watch.stats()["server"]["staging_bytes"] <= MiB
        # The stalled holder is cut after read_timeout, which frees its share; the put goes in.
        meta = _connection_error(holder)
        assert meta is None or meta["kind"] == "timeout", meta
        for _ in range(100):
            if watch.stats()["server"]["staging_bytes"] == 0:
                break
            time.sleep(0.05)
        assert other.put_frame(key, data) == "stored"
        assert other.stats()["server"]["staging_refused"] >= 1
