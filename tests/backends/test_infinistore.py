"""infinistore://: URL parsing, connection errors and error mapping; the conformance suite where RDMA exists.

The InfiniStore server needs RDMA devices even for TCP clients ("Failed to get RDMA devices list"
otherwise), so the server tests skip when ``/sys/class/infiniband`` is absent. Everything else runs
against no server or against small fake TCP servers that inject faults (accept and hang up, accept
and never answer): the client and its error paths are real.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip(
    "infinistore", reason="the infinistore:// backend needs pip install 'lmcache[infinistore]'", exc_type=ImportError
)

from lmcache_conformance import BackendTests
from servers import ServerProcess, free_port, start_process

from lmcache.backends.base import PutStatus
from lmcache.backends.infinistore import InfiniStoreBackend, map_infinistore_errors
from lmcache.backends.registry import open_backend
from lmcache.errors import (
    BackendClosedError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    InvalidBufferError,
)
from lmcache.keys import CacheKey

MiB = 1 << 20
HANG_GUARD = 120  # a hang guard only: typed errors must come long before this
HAS_RDMA = Path("/sys/class/infiniband").is_dir() and any(Path("/sys/class/infiniband").iterdir())
RDMA_DEVICE = os.environ.get("LMCACHE_TEST_INFINISTORE_DEV", "")


def make_key(i: int) -> CacheKey:
    return CacheKey("test/infinistore", 1, 0, os.urandom(28) + i.to_bytes(4, "little"), "float16")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# URLs


def test_url_defaults_and_round_trip() -> None:
    b = InfiniStoreBackend.from_url("infinistore://10.0.0.5?connection_type=tcp")
    s = b.settings
    assert (s.host, s.port, s.connection_type, s.block_size) == ("10.0.0.5", 22345, "tcp", 0)
    assert b.url == "infinistore://10.0.0.5:22345?connection_type=tcp"
    again = InfiniStoreBackend.from_url(b.url)
    assert again.settings == s and not again.is_open
    assert type(open_backend(b.url)) is InfiniStoreBackend


def test_rdma_options() -> None:
    url = (
        "infinistore://store.example:7000?dev_name=mlx5_0&ib_port=2&link_type=Ethernet"
        "&block_size=2MiB&staging_size=64MiB&connections=2&timeout=3s&prefix=a%3A"
    )
    b = InfiniStoreBackend.from_url(url)
    s = b.settings
    assert (s.connection_type, s.dev_name, s.ib_port, s.link_type) == ("rdma", "mlx5_0", 2, "Ethernet")
    assert (s.block_size, s.staging_size, s.connections, s.timeout, s.prefix) == (2 * MiB, 64 * MiB, 2, 3.0, "a:")
    # A fixed block holds the frame header and the value.
    assert b.capabilities.max_value_bytes == 2 * MiB - 4096
    assert InfiniStoreBackend.from_url(b.url).settings == s


def test_value_limit_without_blocks_follows_staging() -> None:
    b = InfiniStoreBackend.from_url("infinistore://h?connection_type=tcp&staging_size=8MiB")
    assert b.capabilities.max_value_bytes == 8 * MiB - 4096
    assert InfiniStoreBackend.capabilities.max_value_bytes is None


@pytest.mark.parametrize(
    "url",
    [
        "infinistore://h",  # rdma (the default) needs block_size
        "infinistore://h?connection_type=rdma&block_size=1024",
        "infinistore://h?connection_type=tcp&block_size=128MiB&staging_size=64MiB",
        "infinistore://h?connection_type=udp",
        "infinistore://h?connection_type=tcp&link_type=Token-Ring",
        "infinistore://h?connection_type=tcp&no_such_option=1",
        "infinistore://h/path?connection_type=tcp",
        "infinistore://u:p@h?connection_type=tcp",
        "infinistore://?connection_type=tcp",
        "infinistore://h:70000?connection_type=tcp",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        InfiniStoreBackend.from_url(url)


def test_environment_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_INFINISTORE_CONNECTION_TYPE", "tcp")
    monkeypatch.setenv("LMCACHE_INFINISTORE_CONNECTIONS", "7")
    b = InfiniStoreBackend.from_url("infinistore://h?connections=3", timeout=9)
    assert b.settings.connection_type == "tcp"
    assert b.settings.connections == 3 and b.settings.timeout == 9.0


# ---------------------------------------------------------------------------------------------
# Error mapping


@pytest.mark.parametrize(
    "raised",
    [
        Exception("Failed to write to infinistore, ret = -1"),
        OSError(104, "Connection reset by peer"),
        RuntimeError("Failed to initialize remote connection"),
    ],
)
def test_sdk_exceptions_map_to_unavailable(raised: Exception) -> None:
    with pytest.raises(BackendUnavailableError) as info, map_infinistore_errors("doing a thing"):
        raise raised
    assert info.value.__cause__ is raised
    assert "doing a thing" in str(info.value)


def test_sdk_key_not_found_maps_and_our_errors_pass() -> None:
    import infinistore

    with pytest.raises(BackendUnavailableError), map_infinistore_errors("read"):
        raise infinistore.InfiniStoreKeyNotFound("some keys not found")
    with pytest.raises(InvalidBufferError), map_infinistore_errors("read"):
        raise InvalidBufferError("too small")
    with pytest.raises(KeyError), map_infinistore_errors("read"):
        raise KeyError("a programming error is not a backend failure")


# ---------------------------------------------------------------------------------------------
# Connection errors against no server and fake servers


@pytest.mark.timeout(HANG_GUARD)
async def test_no_server_is_unavailable() -> None:
    b = InfiniStoreBackend.from_url(f"infinistore://127.0.0.1:{closed_port()}?connection_type=tcp&connect_timeout=2")
    try:
        with pytest.raises(BackendUnavailableError, match="cannot be reached"):
            await b.open()
        with pytest.raises(BackendUnavailableError):
            await b.contains([make_key(1)])
    finally:
        await b.aclose()
    with pytest.raises(BackendClosedError):
        await b.open()


@pytest.mark.timeout(HANG_GUARD)
async def test_unresolvable_host_is_unavailable() -> None:
    b = InfiniStoreBackend.from_url("infinistore://no-such-host.invalid:22345?connection_type=tcp&connect_timeout=2")
    try:
        with pytest.raises(BackendUnavailableError, match="IPv4"):
            await b.open()
    finally:
        await b.aclose()


class FakeServer:
    """A TCP listener on 127.0.0.1 that accepts and then hangs up at once, or never answers."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.mode == "hangup":
                conn.close()
            else:
                self.conns.append(conn)  # read nothing, answer nothing

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self.sock.close()


@pytest.fixture
def fake_server(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    server = FakeServer(request.param)
    try:
        yield server
    finally:
        server.close()


@pytest.mark.timeout(HANG_GUARD)
@pytest.mark.parametrize("fake_server", ["hangup"], indirect=True)
async def test_server_that_hangs_up_is_unavailable_and_counted(fake_server: FakeServer) -> None:
    b = open_backend(f"infinistore://127.0.0.1:{fake_server.port}?connection_type=tcp&connections=1&timeout=10")
    try:
        await b.open()  # the SDK's connect is a plain TCP connect: it succeeds
        errors = b.stats()["errors"]
        with pytest.raises(BackendUnavailableError):
            await b.contains([make_key(1)])
        with pytest.raises(BackendUnavailableError):
            await b.put([make_key(2)], [b"v" * 100])
        # Reads ask check_exist first, which fails cleanly (r_tcp is never reached).
        with pytest.raises(BackendUnavailableError):
            await b.get_into([make_key(3)], [bytearray(100)])
        assert b.stats()["errors"] == errors + 3
        assert b.is_open
    finally:
        await b.aclose()


@pytest.mark.timeout(HANG_GUARD)
@pytest.mark.parametrize("fake_server", ["silent"], indirect=True)
async def test_server_that_never_answers_times_out_and_dst_stays_clean(fake_server: FakeServer) -> None:
    b = open_backend(f"infinistore://127.0.0.1:{fake_server.port}?connection_type=tcp&connections=1&timeout=0.5")
    try:
        await b.open()
        dst = bytearray(b"\xa5" * 100)
        with pytest.raises(BackendTimeoutError):
            await b.get_into([make_key(1)], [dst])
        # The only connection is still busy with the abandoned call: the next call waits for it
        # and times out too, instead of sharing the socket.
        with pytest.raises(BackendTimeoutError):
            await b.contains([make_key(2)])
    finally:
        fake_server.close()  # hang up: the blocked SDK call returns with an error
        await asyncio.sleep(0.2)
        await b.aclose()
    assert dst == bytearray(b"\xa5" * 100)


# ---------------------------------------------------------------------------------------------
# A real server (needs RDMA devices)


@pytest.fixture(scope="module")
def infinistore_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if not HAS_RDMA:
        pytest.skip("the InfiniStore server needs RDMA devices (/sys/class/infiniband is absent)")
    binary = shutil.which("infinistore") or str(Path(sys.executable).parent / "infinistore")
    service, manage = free_port(), free_port()
    argv = [
        binary, "--host", "127.0.0.1", "--service-port", str(service), "--manage-port", str(manage),
        "--prealloc-size", "1", "--log-level", "warning",
    ]  # fmt: skip
    if RDMA_DEVICE:
        argv += ["--dev-name", RDMA_DEVICE]

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", service), timeout=1):
            return True

    proc = start_process(f"infinistore-{service}", argv, tmp_path_factory.mktemp("infinistore"), ready, service)
    try:
        yield proc
    finally:
        proc.stop()


NO_RDMA = "the InfiniStore server needs RDMA devices (/sys/class/infiniband is absent)"


@pytest.mark.skipif(HAS_RDMA, reason="RDMA devices present: TestInfiniStoreTcp runs the suite")
def test_conformance_suite_needs_rdma() -> None:
    """Stands in for the conformance suite where it cannot run, so the skip is one line with its reason."""
    pytest.skip(NO_RDMA)


@pytest.mark.skipif(not HAS_RDMA, reason=NO_RDMA)
class TestInfiniStoreTcp(BackendTests):
    """The conformance suite over InfiniStore's TCP path (the server still needs an RDMA device)."""

    large_value_bytes = 2 * MiB

    @pytest.fixture
    def backend_url(self, infinistore_server: ServerProcess) -> str:
        return f"infinistore://127.0.0.1:{infinistore_server.port}?connection_type=tcp&staging_size=64MiB"


@pytest.mark.skipif(not HAS_RDMA, reason=NO_RDMA)
async def test_rdma_round_trip(infinistore_server: ServerProcess) -> None:
    dev = f"&dev_name={RDMA_DEVICE}" if RDMA_DEVICE else ""
    b = open_backend(f"infinistore://127.0.0.1:{infinistore_server.port}?block_size=1MiB&staging_size=16MiB{dev}")
    try:
        keys = [make_key(i) for i in range(3)]
        values = [os.urandom(1000), os.urandom(MiB - 4096), os.urandom(10)]
        assert [r.status for r in await b.put(keys, values)] == [PutStatus.STORED] * 3
        dsts = [bytearray(MiB) for _ in keys]
        assert await b.get_into([*keys, make_key(9)], [*dsts, bytearray(10)]) == [len(v) for v in values] + [None]
        assert all(bytes(d[: len(v)]) == v for d, v in zip(dsts, values, strict=True))
    finally:
        await b.aclose()


if not HAS_RDMA:
    # Collected, the ~100 suite tests would each report the same skip; the stand-in above reports it once.
    del TestInfiniStoreTcp
