"""lm:// and lm+unix:// pass the backend conformance suite against a real server process.

Variants: TCP over the socket, a Unix socket over the socket, and the shared-memory fast path
over a Unix socket and over loopback TCP. The corrupt-value hook damages the stored frame
through a raw protocol connection, not through the backend under test.
"""

from __future__ import annotations

import pytest
from conftest import LMServer
from lmcache_conformance import BackendTests

from lmcache.backends.base import StorageBackend
from lmcache.keys import CacheKey
from lmcache.server.client import LMServerBackend


class _LMTests(BackendTests):
    scheme = "lm"
    query: dict[str, object] = {}  # noqa: RUF012 - per-class constant
    expect_shm = False

    @pytest.fixture
    def backend_url(self, lm_server: LMServer) -> str:
        self._server = lm_server
        return lm_server.url(self.scheme, **self.query)

    @pytest.fixture
    def secret_url(self, lm_server: LMServer) -> str:
        return lm_server.url(self.scheme, **self.query, token="not-a-real-s3cret")

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        with self._server.raw() as raw:
            return raw.get_frame(key.to_string(), 1 << 24)

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        with self._server.raw() as raw:
            raw.delete([key.to_string()])
            assert raw.put_frame(key.to_string(), data) == "stored"

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        with self._server.raw() as raw:
            frame = raw.get_frame(key.to_string(), 1 << 24)
            assert frame is not None
            damaged = bytearray(frame)
            damaged[-1] ^= 0xFF  # a payload byte: the checksum must catch it
            raw.delete([key.to_string()])
            assert raw.put_frame(key.to_string(), bytes(damaged)) == "stored"

    async def test_data_path(self, backend: StorageBackend) -> None:
        """The variant really uses the data path it claims to test."""
        assert isinstance(backend, LMServerBackend)
        await backend.ping()
        assert backend.shm_active is self.expect_shm
        assert backend.stats()["shm"] is self.expect_shm
        # The shared server's tier 0 is memory://, so shm clients read its hits from its pool.
        assert backend.pool_active is self.expect_shm


class TestLMTcp(_LMTests):
    query = {"shm": "false"}  # noqa: RUF012


class TestLMUnix(_LMTests):
    scheme = "lm+unix"
    query = {"shm": "false"}  # noqa: RUF012


class TestLMUnixShm(_LMTests):
    scheme = "lm+unix"
    expect_shm = True


class TestLMTcpShm(_LMTests):
    expect_shm = True
    query = {"shm_size": "64MiB"}  # noqa: RUF012


class TestLMUnixShmTwoConnections(_LMTests):
    """Requests spread over two connections: a shm put waits for its commit (no one-way commit)."""

    scheme = "lm+unix"
    expect_shm = True
    query = {"connections": "2"}  # noqa: RUF012


def _pool_rss_bytes() -> int:
    """Resident bytes of this process's mappings of server pools (from /proc/self/smaps)."""
    total, in_pool = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                in_pool = "lmcache-pool-" in line
            elif in_pool and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.parametrize("prefault", [True, False])
async def test_a_resident_pool_is_mapped_up_front(tmp_path, prefault: bool) -> None:
    """A prefaulted pool is mapped whole at connect (no page faults inside copies); a lazy one
    is not (mapping it would allocate memory the server chose not to commit)."""
    from conftest import start_lm_server

    size = 64 << 20
    server = start_lm_server(tmp_path / "srv", [f"memory://?capacity={size}&prefault={str(prefault).lower()}"])
    try:
        backend = LMServerBackend.from_url(server.url("lm+unix"))
        async with backend:
            await backend.ping()
            assert backend.pool_active
            rss = _pool_rss_bytes()
            if prefault:
                assert rss >= size * 0.95, f"only {rss} of {size} pool bytes mapped"
            else:
                assert rss < size // 4, f"{rss} pool bytes mapped for a lazy pool"
    finally:
        server.proc.stop()


async def test_a_header_failing_mid_frame_closes_the_connection_not_the_stream(
    lm_server: LMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: a socket put whose second header cannot be built has sent half a
    frame; the connection is dropped (never reused out of step) and the next call reconnects."""
    import os

    import lmcache.server.client as client_mod

    real = client_mod.encode_header
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> bytes:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real(*args, **kwargs)

    keys = [CacheKey("mid-frame", 1, 0, os.urandom(32), "uint8") for _ in range(3)]
    values = [os.urandom(100_000) for _ in keys]
    async with LMServerBackend.from_url(lm_server.url("lm", shm="false")) as b:
        monkeypatch.setattr(client_mod, "encode_header", flaky)
        with pytest.raises(RuntimeError):
            await b.put(keys, values)
        monkeypatch.setattr(client_mod, "encode_header", real)
        assert all(r.ok for r in await b.put(keys, values))
        dsts = [bytearray(len(v)) for v in values]
        assert await b.get_into(keys, dsts) == [len(v) for v in values]
        assert [bytes(d) for d in dsts] == values


class _TrickleSocket:
    """A socket whose ``send`` takes at most a few bytes (fault injection: a full buffer)."""

    def __init__(self, sock: object, limit: int) -> None:
        self._sock = sock
        self._limit = limit

    def send(self, data: bytes | memoryview) -> int:
        return self._sock.send(bytes(data)[: self._limit])  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


async def test_a_control_frame_sent_in_part_is_finished_before_any_other() -> None:
    """Control frames go out inline when nothing else is sending; one the socket takes only
    part of is finished by a task that holds the send lock, so no other frame cuts in."""
    import asyncio
    import socket

    from lmcache.server.client import _Conn

    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        owner = LMServerBackend.from_url("lm+unix:///nonexistent.sock")
        conn = _Conn(owner, _TrickleSocket(a, 5))  # type: ignore[arg-type]
        first, second = b"F" * 40, b"S" * 40
        rest = conn._send_inline(first)
        assert isinstance(rest, asyncio.Task), "a partial send must leave a task sending the rest"
        assert conn._send_inline(second) is False, "another frame got in while the first was half sent"
        await rest
        assert not conn.send_lock.locked()
        conn.sock = a  # a socket with room: whole frames go out inline
        assert conn._send_inline(second) is True
        got = b""
        while len(got) < 80:
            got += b.recv(80 - len(got))
        assert got == first + second
    finally:
        a.close()
        b.close()
