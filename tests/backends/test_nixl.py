"""nixl:// against a real peer process (two processes, NIXL over UCX), and nixl+posix:// files.

NIXL's agents may listen on all interfaces, so the tests that create agents run only inside a
private network namespace: outside one, :func:`test_nixl_in_private_network_namespace` re-runs
this module under ``unshare --net --fork`` (loopback only) with ``LMCACHE_TEST_NIXL_NETNS=1`` and
``UCX_MODULES=^ib UCX_NET_DEVICES=lo``, and reports its result; it skips when ``unshare`` is not
permitted or NIXL is not installed. URL parsing, the control protocol's codec and the peer's
index and allocator need neither and run everywhere.

Bypass paths (corrupting a stored value, half-finished reservations, malformed messages) talk
to the peer over a raw control socket or touch files directly, never through the backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from lmcache_conformance import BackendTests
from servers import ServerProcess, free_port, run_pytest_in_netns, start_process, unshare_works

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.file import FileBackend
from lmcache.backends.nixl import NixlBackend, NixlPosixBackend
from lmcache.backends.nixl import backend as nixl_backend
from lmcache.backends.nixl import lanes as nixl_lanes
from lmcache.backends.nixl.lanes import CLane, PythonLane
from lmcache.backends.nixl.peer import PeerStore
from lmcache.backends.nixl.wire import (
    FRAME_ALIGN,
    HEAD,
    MAX_BATCH,
    Op,
    ProtocolError,
    Reader,
    Status,
    pack_key,
    pack_keys,
    pack_message,
)
from lmcache.backends.registry import open_backend
from lmcache.bench.backend import BenchParams, run_backend_bench
from lmcache.errors import BackendTimeoutError, BackendUnavailableError, ConfigError
from lmcache.keys import CacheKey
from lmcache.serde import frame

MiB = 1 << 20
NETNS_ENV = "LMCACHE_TEST_NIXL_NETNS"
IN_NETNS = os.environ.get(NETNS_ENV) == "1"
REPO = Path(__file__).resolve().parents[2]
NIXL_HINT = "pip install nixl-cu12 && pip install --no-deps nixl==1.5.1 (or pip install 'lmcache[nixl]')"
HANG_GUARD = 120


def _nixl_missing() -> str | None:
    if any(importlib.util.find_spec(m) is not None for m in ("nixl_cu12", "nixl_cu13")):
        return None
    return f"NIXL is not installed: {NIXL_HINT}"


if IN_NETNS:
    # UCX reads these when NIXL loads it; without ^ib, processes on hosts without InfiniBand crash at exit.
    os.environ.setdefault("UCX_MODULES", "^ib")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")


def make_key(i: int) -> CacheKey:
    return CacheKey("nixl-test", 1, 0, hashlib.blake2b(os.urandom(8) + i.to_bytes(8, "little")).digest()[:32], "uint8")


def file_of(root: Path, key: CacheKey) -> Path:
    digest = key.digest()
    return root / digest[:2] / f"{digest}.kv"


# ---------------------------------------------------------------------------------------------
# No NIXL needed: URLs, the protocol codec, the peer's index and allocator


@pytest.mark.parametrize(
    "url",
    [
        "nixl://127.0.0.1:7400",
        "nixl://peer.example:7400?timeout=5.0&workers=2",
        "nixl://[::1]:7400",
        "nixl://127.0.0.1:7400?progress_thread=true",
        "nixl://127.0.0.1:7400?workers=6&ucx_workers=8",
        "nixl://127.0.0.1:7400?native_lane=off",
    ],
)
def test_peer_url_round_trip(url: str) -> None:
    b = NixlBackend.from_url(url)
    assert b.url == url
    assert type(open_backend(url)) is NixlBackend


def test_posix_url_forms() -> None:
    b = NixlBackend.from_url("nixl:///var/lib/kv?backend=posix&capacity=1GiB")
    assert isinstance(b, NixlPosixBackend)
    assert b.url == "nixl+posix:///var/lib/kv?capacity=1GiB"
    again = open_backend(b.url)
    assert type(again) is NixlPosixBackend and again.url == b.url
    assert NixlPosixBackend.from_url("nixl+posix:///d?timeout=2.5").settings.timeout == 2.5


@pytest.mark.parametrize(
    "url",
    [
        "nixl:///var/lib/kv",  # a path without backend=posix
        "nixl://127.0.0.1",  # no port
        "nixl://127.0.0.1:7400/path",
        "nixl://127.0.0.1:7400?bogus=1",
        "nixl://127.0.0.1:7400?timeout=0",
        "nixl+posix:///d?o_direct=true",
        "nixl+posix://",
        "nixl://127.0.0.1:7400?native_lane=maybe",
        "nixl://127.0.0.1:7400?native_lane=on&ucx_workers=4",  # the native lane is the one-worker path
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        open_backend(url)


def test_reader_checks_every_length() -> None:
    with pytest.raises(ProtocolError):
        Reader(struct.pack("<I", 2) + pack_key(b"a")).keys()  # says two keys, holds one
    with pytest.raises(ProtocolError):
        Reader(struct.pack("<I", MAX_BATCH + 1)).count()
    with pytest.raises(ProtocolError):
        Reader(struct.pack("<H", 0)).key()  # empty key
    with pytest.raises(ProtocolError):
        Reader(struct.pack("<H", 10) + b"abc").key()  # truncated key
    with pytest.raises(ProtocolError):
        Reader(struct.pack("<I", 1 << 30)).blob(limit=1024)
    r = Reader(pack_keys([b"k1", b"key2"]) + b"x")
    assert r.keys() == [b"k1", b"key2"]
    with pytest.raises(ProtocolError):
        r.end()  # trailing bytes


def test_store_reserve_commit_and_capacity() -> None:
    s = PeerStore(1024)
    st, a = s.reserve(b"a", 600, 64)
    assert st == Status.OK and a is not None
    assert not s.contains(b"a"), "a reservation is invisible until its commit"
    assert s.reserve(b"a", 600, 64)[0] == Status.EXISTS
    assert s.reserve(b"b", 600, 64)[0] == Status.CAPACITY
    assert s.reserve(b"c", 2048, 64)[0] == Status.TOO_LARGE
    s.commit(a, ok=True)
    assert s.contains(b"a") and s.entries == 1
    s.delete(b"a")
    assert s.used == 0
    st, b = s.reserve(b"b", 1024, 64)  # the whole pool again: frees coalesced
    assert st == Status.OK and b is not None
    s.commit(b, ok=False)  # an aborted write gives its space back
    assert s.used == 0 and not s.contains(b"b")


def test_store_never_reuses_bytes_still_being_read_or_written() -> None:
    s = PeerStore(1024)
    _, a = s.reserve(b"a", 1024, 64)
    assert a is not None
    s.commit(a, ok=True)
    lease = s.lookup(b"a")
    assert lease is not None
    s.delete(b"a")
    assert not s.contains(b"a")
    assert s.reserve(b"b", 64, 64)[0] == Status.CAPACITY, "a leased value's bytes were handed out"
    s.release(lease)
    assert s.used == 0
    # Deleted while its writer is still transferring: the space stays reserved until the commit.
    _, w = s.reserve(b"w", 1024, 64)
    assert w is not None
    s.delete(b"w")
    assert s.reserve(b"x", 64, 64)[0] == Status.CAPACITY
    s.commit(w, ok=True)
    assert not s.contains(b"w"), "a value deleted during its write came back"
    assert s.used == 0


def test_lane_reports_when_it_takes_up_a_transfer_and_times_out_when_stuck() -> None:
    """A put checksums a group from the moment the lane takes up its transfer (no NIXL needed)."""
    from concurrent.futures import ThreadPoolExecutor

    from lmcache.backends.nixl.lanes import _LaneBatch

    posted: list[str] = []
    lane = ThreadPoolExecutor(max_workers=1)
    gate = threading.Event()
    try:
        batch = _LaneBatch(lane, None, lambda op, local, remote: posted.append(op), [], timeout=0.3)
        lane.submit(gate.wait)  # the lane is busy with another batch's copy
        first, second = threading.Event(), threading.Event()
        batch.post("WRITE", [], [], first)
        batch.post("WRITE", [], [], second)
        with pytest.raises(BackendTimeoutError, match="not started"):
            batch.wait_started(first)
        assert posted == []
        gate.set()
        batch.wait_started(second)
        assert first.is_set() and posted == ["WRITE", "WRITE"]
        assert batch.close() is None
    finally:
        gate.set()
        lane.shutdown(wait=True)


# ---------------------------------------------------------------------------------------------
# The re-exec into a private network namespace


def test_the_poll_timeout_applies_only_to_our_agents() -> None:
    """The progress-thread poll hook sets our agents' ``pthrDelay`` and leaves everyone else's alone."""
    if _nixl_missing() is not None:
        pytest.skip(_nixl_missing())
    from lmcache.backends.nixl import sdk as nixl_sdk

    api = nixl_sdk.import_nixl()
    assert nixl_sdk._hook_poll_timeout(api) and nixl_sdk._hook_poll_timeout(api), "installs once, then reports it"
    config = api.nixlBind.nixlAgentConfig()
    config.pthrDelay = 0
    assert config.pthrDelay == 0, "outside make_agent a config keeps the value it is given"
    nixl_sdk._POLL.us = nixl_sdk.PROGRESS_POLL_US
    try:
        config.pthrDelay = 0
        assert config.pthrDelay == nixl_sdk.PROGRESS_POLL_US
    finally:
        nixl_sdk._POLL.us = None


@pytest.mark.skipif(IN_NETNS, reason="already inside the private network namespace")
@pytest.mark.timeout(1500)
def test_nixl_in_private_network_namespace() -> None:
    """Run the NIXL tests of this module under ``unshare --net`` (NIXL/UCX may bind all interfaces)."""
    why = _nixl_missing() or unshare_works()
    if why is not None:
        pytest.skip(f"nixl:// transfer tests need NIXL and a private network namespace: {why}")
    env = {**os.environ, NETNS_ENV: "1", "UCX_MODULES": "^ib", "UCX_NET_DEVICES": "lo"}
    proc = run_pytest_in_netns(Path(__file__), env, REPO, 1400, "-rs")
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    assert proc.returncode == 0, f"nixl tests inside the namespace failed (exit {proc.returncode}):\n{tail}"
    assert " passed" in proc.stdout, tail


# ---------------------------------------------------------------------------------------------
# With NIXL, inside the namespace
# Defined (and so collected) only inside the namespace: outside it, the test above runs them.

if IN_NETNS and _nixl_missing() is None:

    def _port_open(port: int) -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True

    def _start_peer(workdir: Path, capacity: str, port: int | None = None) -> ServerProcess:
        port = port or free_port()
        argv = [
            sys.executable,
            "-m",
            "lmcache.backends.nixl.peer",
            "--port",
            str(port),
            "--capacity",
            capacity,
            "--debug-ops",
        ]
        return start_process("nixl-peer", argv, workdir, lambda: _port_open(port), port)

    @pytest.fixture(scope="module")
    def nixl_peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
        if not IN_NETNS or _nixl_missing():
            pytest.skip("needs NIXL inside a private network namespace")
        peer = _start_peer(tmp_path_factory.mktemp("nixl-peer"), "1536MiB")
        yield peer
        peer.stop()

    @pytest.fixture
    def small_peer(tmp_path: Path) -> Iterator[ServerProcess]:
        peer = _start_peer(tmp_path / "peer", "1MiB")
        yield peer
        peer.stop()

    class RawControl:
        """A bare control connection to a peer (the bypass path of these tests)."""

        def __init__(self, port: int) -> None:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            self._id = 0

        def call(self, op: int, body: bytes) -> tuple[int, bytes]:
            self._id += 1
            self.sock.sendall(pack_message(op, self._id, body))
            return self.reply()

        def reply(self) -> tuple[int, bytes]:
            head = self._recv(HEAD.size)
            length, _v, op, _f, _id = HEAD.unpack(head)
            return op, self._recv(length)

        def _recv(self, n: int) -> bytes:
            out = b""
            while len(out) < n:
                chunk = self.sock.recv(n - len(out))
                if not chunk:
                    raise ConnectionError("peer closed the connection")
                out += chunk
            return out

        def close(self) -> None:
            self.sock.close()

    def raw_corrupt(port: int, key: CacheKey) -> None:
        raw = RawControl(port)
        try:
            op, body = raw.call(Op.CORRUPT, pack_key(key.to_string().encode()))
            assert (op, body) == (Op.CORRUPT, b"\x01"), "the peer did not hold the value to corrupt"
        finally:
            raw.close()

    class TestNixlPeerConformance(BackendTests):
        pytestmark: ClassVar[list[pytest.MarkDecorator]] = [*BackendTests.pytestmark, pytest.mark.timeout(HANG_GUARD)]

        @pytest.fixture
        def backend_url(self, nixl_peer: ServerProcess) -> str:
            return f"nixl://127.0.0.1:{nixl_peer.port}?workers=2"

        async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
            assert isinstance(backend, NixlBackend)
            raw_corrupt(backend.settings.port, key)

    class TestNixlPeerPythonLaneConformance(TestNixlPeerConformance):
        """The same suite on the Python lane (hosts where the native lane cannot be built)."""

        @pytest.fixture
        def backend_url(self, nixl_peer: ServerProcess) -> str:
            return f"nixl://127.0.0.1:{nixl_peer.port}?workers=2&native_lane=off"

    class TestNixlPosixConformance(BackendTests):
        pytestmark: ClassVar[list[pytest.MarkDecorator]] = [*BackendTests.pytestmark, pytest.mark.timeout(HANG_GUARD)]

        @pytest.fixture
        def backend_url(self, tmp_path: Path) -> str:
            return f"nixl+posix://{tmp_path}/kv?workers=2"

        async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
            assert isinstance(backend, NixlPosixBackend)
            path = file_of(Path(backend.settings.path), key)
            data = bytearray(path.read_bytes())
            data[-1] ^= 0x01
            path.write_bytes(bytes(data))

    @pytest.mark.timeout(HANG_GUARD)
    async def test_two_clients_share_the_peer(nixl_peer: ServerProcess) -> None:
        """Two clients, one with the agent's progress thread and one without (the default)."""
        url = f"nixl://127.0.0.1:{nixl_peer.port}"
        keys = [make_key(i) for i in range(8)]
        values = [os.urandom(n) for n in (0, 1, 4095, 4096, 65537, MiB, 3 * MiB, 123)]
        async with open_backend(url + "?progress_thread=true") as a, open_backend(url) as b:
            assert isinstance(a, NixlBackend) and a.settings.progress_thread
            assert isinstance(b, NixlBackend) and not b.settings.progress_thread
            assert [r.status for r in await a.put(keys, values)] == [PutStatus.STORED] * 8
            assert [r.status for r in await b.put(keys[:2], values[:2])] == [PutStatus.EXISTS] * 2
            dsts = [np.full(len(v) + 11, 0xA5, dtype=np.uint8) for v in values]
            assert await b.get_into(keys, dsts) == [len(v) for v in values]
            for d, v in zip(dsts, values, strict=True):
                assert d[: len(v)].tobytes() == v and set(d[len(v) :].tobytes()) == {0xA5}
            await b.delete(keys[::2])
            assert await a.contains(keys) == [False, True] * 4
            listed = {k async for k in a.list_keys()}
            assert set(keys[1::2]) <= listed and not set(keys[::2]) & listed
            await a.delete(keys)

    @pytest.mark.timeout(HANG_GUARD)
    async def test_a_bounded_peer_rejects_instead_of_evicting(small_peer: ServerProcess) -> None:
        async with open_backend(f"nixl://127.0.0.1:{small_peer.port}") as b:
            big = await b.put([make_key(0)], [os.urandom(2 * MiB)])
            assert big[0].status is PutStatus.REJECTED and big[0].reason == "too_large"
            keys = [make_key(i) for i in range(4)]
            results = await b.put(keys, [os.urandom(300_000) for _ in keys])
            assert [r.status for r in results[:3]] == [PutStatus.STORED] * 3
            assert results[3].status is PutStatus.REJECTED and results[3].reason == "capacity"
            assert await b.contains(keys) == [True, True, True, False]
            await b.delete(keys[:1])
            assert (await b.put(keys[3:], [os.urandom(300_000)]))[0].status is PutStatus.STORED

    @pytest.mark.timeout(HANG_GUARD)
    async def test_a_dropped_connection_frees_its_reservations_and_leases(small_peer: ServerProcess) -> None:
        key = make_key(1)
        raw = RawControl(small_peer.port)
        body = struct.pack("<QI", 7, 1) + pack_key(key.to_string().encode()) + struct.pack("<QI", 900_000, 128)
        op, reply = raw.call(Op.RESERVE, body)
        assert op == Op.RESERVE and reply[4] == Status.OK
        async with open_backend(f"nixl://127.0.0.1:{small_peer.port}") as b:
            assert (await b.put([key], [b"x"]))[0].status is PutStatus.EXISTS, "the raw reservation holds the key"
            raw.close()  # the peer frees what the connection reserved
            for _ in range(100):
                result = (await b.put([key], [os.urandom(900_000)]))[0]
                if result.status is not PutStatus.EXISTS:
                    break
            assert result.status is PutStatus.STORED

    @pytest.mark.timeout(HANG_GUARD)
    async def test_malformed_messages_are_refused_and_the_peer_keeps_serving(nixl_peer: ServerProcess) -> None:
        raw = RawControl(nixl_peer.port)
        # Two keys announced, one sent: the peer answers ERROR and closes this connection only.
        op, reply = raw.call(Op.CONTAINS, struct.pack("<I", 2) + pack_key(b"k"))
        assert op == Op.ERROR and b"truncated" in reply
        raw.close()
        raw = RawControl(nixl_peer.port)
        op, reply = raw.call(99, b"")
        assert op == Op.ERROR and b"unknown operation" in reply
        raw.close()
        raw = RawControl(nixl_peer.port)
        raw.sock.sendall(HEAD.pack(1 << 30, 1, Op.PING, 0, 1))  # an oversized body is never read
        with pytest.raises((ConnectionError, OSError)):
            raw.reply()
        raw.close()
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}") as b:
            await b.ping()

    @pytest.mark.timeout(HANG_GUARD)
    async def test_peer_restart_is_a_typed_error_then_a_reconnect(tmp_path: Path) -> None:
        peer = _start_peer(tmp_path / "peer", "64MiB")
        try:
            async with open_backend(f"nixl://127.0.0.1:{peer.port}?timeout=10") as b:
                key, value = make_key(1), os.urandom(100_000)
                assert (await b.put([key], [value]))[0].ok
                peer.kill()
                with pytest.raises(BackendUnavailableError):
                    await b.contains([key])
                peer.start()
                assert await b.contains([key]) == [False], "a restarted peer starts empty"
                assert (await b.put([key], [value]))[0].status is PutStatus.STORED
                dst = bytearray(100_000)
                assert await b.get_into([key], [dst]) == [100_000] and bytes(dst) == value
                assert b.stats()["connects"] == 2
        finally:
            peer.stop()

    @pytest.mark.timeout(HANG_GUARD)
    async def test_nixl_posix_files_are_file_backend_files(tmp_path: Path) -> None:
        root = tmp_path / "kv"
        keys = [make_key(i) for i in range(3)]
        values = [b"", os.urandom(70_000), os.urandom(2 * MiB + 5)]
        async with open_backend(f"nixl+posix://{root}") as n:
            assert [r.status for r in await n.put(keys, values)] == [PutStatus.STORED] * 3
        async with FileBackend.from_url(f"file://{root}") as f:
            dsts = [bytearray(len(v)) for v in values]
            assert await f.get_into(keys, dsts) == [len(v) for v in values]
            assert [bytes(d) for d in dsts] == values
            extra, extra_value = make_key(9), os.urandom(12345)
            assert (await f.put([extra], [extra_value]))[0].ok
        async with open_backend(f"nixl://{root}?backend=posix") as n:
            assert n.stats()["entries"] == 4
            dst = bytearray(12345)
            assert await n.get_into([extra], [dst]) == [12345] and bytes(dst) == extra_value

    @pytest.fixture
    def small_groups(monkeypatch: pytest.MonkeyPatch) -> None:
        """Transfer groups of 4 MiB of values, whatever the tuned default, so small batches span several."""
        monkeypatch.setattr(nixl_lanes, "_GROUP_BYTES", 4 * MiB)

    @pytest.mark.timeout(HANG_GUARD)
    @pytest.mark.usefixtures("small_groups")
    async def test_batches_of_several_transfer_groups_round_trip_and_catch_damage(nixl_peer: ServerProcess) -> None:
        """A batch bigger than one transfer group (4 MiB): every group moves, and each value is checked."""
        sizes = [3 * MiB + 1, 5, 2 * MiB, 2 * MiB - 7, 0, 4 * MiB + 64, 700_001, MiB, 3 * MiB]
        keys = [make_key(500 + i) for i in range(len(sizes))]
        values = [os.urandom(n) for n in sizes]
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}") as b:
            assert [r.status for r in await b.put(keys, values)] == [PutStatus.STORED] * len(keys)
            dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
            assert await b.get_into(keys, dsts) == sizes
            assert all(d.tobytes() == v for d, v in zip(dsts, values, strict=True))
            raw_corrupt(nixl_peer.port, keys[6])  # a value in a middle group
            dsts = [np.zeros(n, dtype=np.uint8) for n in sizes]
            got = await b.get_into(keys, dsts)
            assert got == [*sizes[:6], None, *sizes[7:]]
            assert all(d.tobytes() == v for i, (d, v) in enumerate(zip(dsts, values, strict=True)) if i != 6)
            assert b.stats()["corrupt"] == 1
            await b.delete(keys)

    def _cpu_seconds(pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    def _rss_kib(pid: int) -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))

    @pytest.mark.timeout(HANG_GUARD)
    async def test_make_agent_gives_an_agent_that_reaches_the_peer(nixl_peer: ServerProcess) -> None:
        """The raw baseline's agent comes from the backend (UCX, its progress_thread and ucx_workers)."""
        b = NixlBackend.from_url(f"nixl://127.0.0.1:{nixl_peer.port}?ucx_workers=2")
        assert isinstance(b, NixlBackend)
        agent = await asyncio.get_running_loop().run_in_executor(None, b.make_agent, "lmcache-test-make-agent")
        assert agent.name == "lmcache-test-make-agent"
        assert "UCX" in agent.backends
        async with b:  # the backend's own agent takes the same path: it still opens and moves bytes
            key, value = make_key(4242), os.urandom(64 << 10)
            assert (await b.put([key], [value]))[0].ok
            dst = bytearray(len(value))
            assert await b.get_into([key], [dst]) == [len(value)] and bytes(dst) == value
            await b.delete([key])

    @pytest.mark.timeout(HANG_GUARD)
    async def test_bench_runs_the_raw_and_checked_nixl_baselines_against_the_peer(nixl_peer: ServerProcess) -> None:
        """``bench backend --checked`` on nixl://: both raw-NIXL instances move real bytes, then leave."""
        url = f"nixl://127.0.0.1:{nixl_peer.port}"
        params = BenchParams(
            url=url,
            value_size=256 << 10,
            count=8,
            batch=4,
            concurrency=2,
            repeat=2,
            warmup=0,
            keys_tokens=0,
            checked=True,
        )
        async with open_backend(url) as b:
            assert isinstance(b, NixlBackend)
            used = (await b.peer_stats())["used_bytes"]
        result = await run_backend_bench(params)
        assert result["baseline"]["name"] == "raw-nixl"
        assert result["checked_baseline"]["name"] == "raw-nixl+xxh3"
        for system in ("backend", "baseline", "checked"):
            for op in ("put", "get"):
                assert result["median"][system][op]["gbps"] > 0
        # Every get of every system was compared byte for byte (run_backend_bench raises otherwise);
        # the baselines deleted their extents and the backend its keys.
        async with open_backend(url) as b:
            assert isinstance(b, NixlBackend)
            assert (await b.peer_stats())["used_bytes"] == used

    @pytest.mark.timeout(HANG_GUARD)
    async def test_an_idle_peer_and_client_take_no_cpu(nixl_peer: ServerProcess) -> None:
        """Progress threads wait for events: NIXL's default poll would keep a core busy for good."""
        assert nixl_peer.pid is not None
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}?progress_thread=true") as b:
            key, value = make_key(600), os.urandom(MiB)
            assert (await b.put([key], [value]))[0].ok
            peer_before, ours_before = _cpu_seconds(nixl_peer.pid), time.process_time()
            await asyncio.sleep(2.0)
            peer_idle, ours_idle = _cpu_seconds(nixl_peer.pid) - peer_before, time.process_time() - ours_before
            dst = bytearray(MiB)
            assert await b.get_into([key], [dst]) == [MiB] and bytes(dst) == value, "transfers still progress"
            await b.delete([key])
        assert peer_idle < 0.5, f"the idle peer used {peer_idle:.2f} s of CPU in 2 s"
        assert ours_idle < 0.5, f"an idle client with a progress thread used {ours_idle:.2f} s of CPU in 2 s"

    @pytest.mark.timeout(HANG_GUARD)
    async def test_a_prefaulted_peer_holds_its_pool_resident(tmp_path: Path) -> None:
        port = free_port()
        argv = [sys.executable, "-m", "lmcache.backends.nixl.peer", "--port", str(port), "--capacity", "96MiB"]
        peer = start_process("nixl-peer", [*argv, "--prefault"], tmp_path / "peer", lambda: _port_open(port), port)
        try:
            assert peer.pid is not None
            rss_kib = _rss_kib(peer.pid)
            assert rss_kib >= 96 * 1024, f"resident {rss_kib} KiB, pool 96 MiB"
            async with open_backend(f"nixl://127.0.0.1:{port}") as b:
                key, value = make_key(700), os.urandom(5 * MiB)
                assert (await b.put([key], [value]))[0].ok
                dst = bytearray(len(value))
                assert await b.get_into([key], [dst]) == [len(value)] and bytes(dst) == value
        finally:
            peer.stop()

    @pytest.mark.timeout(HANG_GUARD)
    async def test_parallel_ucx_workers_move_concurrent_batches_intact(nixl_peer: ServerProcess) -> None:
        """With several UCX workers (shared-lock agent), batches on different threads copy at once."""
        url = f"nixl://127.0.0.1:{nixl_peer.port}?ucx_workers=8&workers=4"
        batches = [[make_key(800 + 10 * b + i) for i in range(5)] for b in range(6)]
        values = [[os.urandom(MiB + 17 * i + b) for i in range(5)] for b in range(6)]
        async with open_backend(url) as nx:
            assert isinstance(nx, NixlBackend) and nx.settings.ucx_workers == 8
            puts = await asyncio.gather(*(nx.put(k, v) for k, v in zip(batches, values, strict=True)))
            assert all(r.ok for batch in puts for r in batch)
            dsts = [[np.zeros(len(x), dtype=np.uint8) for x in v] for v in values]
            gets = await asyncio.gather(*(nx.get_into(k, d) for k, d in zip(batches, dsts, strict=True)))
            assert gets == [[len(x) for x in v] for v in values]
            for d_batch, v_batch in zip(dsts, values, strict=True):
                assert all(d.tobytes() == v for d, v in zip(d_batch, v_batch, strict=True))
            await nx.delete([k for batch in batches for k in batch])

    @pytest.mark.timeout(HANG_GUARD)
    @pytest.mark.parametrize(
        "query", ["", "?native_lane=off", "?ucx_workers=4"], ids=["native", "python-lane", "direct"]
    )
    async def test_registered_host_memory_is_not_registered_again_per_call(
        nixl_peer: ServerProcess, monkeypatch: pytest.MonkeyPatch, query: str
    ) -> None:
        """Views of registered host memory (and the frame headers) need no per-call registration."""
        n = MiB + 3
        pool = np.zeros(4 * n, dtype=np.uint8)
        keys = [make_key(1000 + i) for i in range(4)]
        values = [os.urandom(n) for _ in keys]
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}{query}") as b:
            assert isinstance(b, NixlBackend)
            await b.register_host_memory(pool)
            calls: list[object] = []
            real = b._link.agent.register_memory

            def counting(*args: object, **kwargs: object) -> object:
                calls.append(args)
                return real(*args, **kwargs)

            monkeypatch.setattr(b._link.agent, "register_memory", counting)
            views = [pool[i * n : (i + 1) * n] for i in range(4)]
            for view, value in zip(views, values, strict=True):
                view[:] = np.frombuffer(value, dtype=np.uint8)
            assert all(r.ok for r in await b.put(keys, views))
            pool[:] = 0
            assert await b.get_into(keys, views) == [n] * 4
            assert [v.tobytes() for v in views] == values
            assert calls == [], "registered memory and header slabs were registered again"
            dst = bytearray(n)  # outside the registered memory: registered for its call
            assert await b.get_into(keys[:1], [dst]) == [n] and bytes(dst) == values[0]
            assert len(calls) == 1
            await b.unregister_host_memory(pool)
            pool[:] = 0
            assert await b.get_into(keys, views) == [n] * 4
            assert [v.tobytes() for v in views] == values
            assert len(calls) == 2, "unregistered memory is registered per call again"
            await b.delete(keys)

    @pytest.mark.timeout(HANG_GUARD)
    async def test_a_batch_whose_headers_outgrow_a_slab_round_trips(nixl_peer: ServerProcess) -> None:
        """Frame headers beyond one registered slab go into a buffer registered for the call."""
        keys = [make_key(2000 + i) for i in range(700)]
        values = [os.urandom(i % 97) for i in range(700)]
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}") as b:
            assert isinstance(b, NixlBackend)
            hlen = len(frame.encode_header(keys[0], memoryview(values[0]), alignment=FRAME_ALIGN))
            assert hlen * len(keys) > nixl_backend._HEADER_SLAB, "the batch must not fit one slab"
            assert all(r.ok for r in await b.put(keys, values))
            dsts = [bytearray(97) for _ in keys]
            assert await b.get_into(keys, dsts) == [len(v) for v in values]
            assert all(bytes(d[: len(v)]) == v for d, v in zip(dsts, values, strict=True))
            await b.delete(keys)

    class _FailSecondPost:
        """Fault injection: the batch's second transfer fails to post, the others go through."""

        def __init__(self, backend: NixlBackend) -> None:
            self.real = backend._lane.post  # type: ignore[union-attr]
            self.calls = 0

        def __call__(self, op: str, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]) -> object:
            self.calls += 1
            if self.calls == 2:
                raise BackendUnavailableError("injected: posting a transfer failed")
            return self.real(op, local, remote)

    class _FailSecondNativeTransfer:
        """Fault injection: the second transfer of a job reaches past the peer's registered pool.

        NIXL itself then refuses that transfer (its remote descriptor lies in no registered
        memory), in the native lane, after the first one has moved.
        """

        def __init__(self, backend: NixlBackend) -> None:
            assert isinstance(backend._lane, CLane)
            self.real = backend._lane.native.submit
            self.past_pool = backend._link.pool_addr + backend._link.pool_len + (1 << 30)
            self.jobs = 0

        def __call__(self, remote: str, op: int, transfers: list, **kwargs: bool) -> object:
            if len(transfers) >= 2 and self.jobs == 0:
                self.jobs += 1
                descs, ranges = transfers[1]
                transfers = [transfers[0], ([(a, self.past_pool, n) for a, _r, n in descs], ranges), *transfers[2:]]
            return self.real(remote, op, transfers, **kwargs)

    @pytest.mark.timeout(HANG_GUARD)
    @pytest.mark.usefixtures("small_groups")
    @pytest.mark.parametrize(
        "query", ["?native_lane=on", "?native_lane=off", "?ucx_workers=4"], ids=["native", "python-lane", "direct"]
    )
    async def test_a_transfer_failing_midway_aborts_the_put_and_fails_the_get(
        nixl_peer: ServerProcess, monkeypatch: pytest.MonkeyPatch, query: str
    ) -> None:
        """A batch of three transfer groups whose second transfer fails: nothing half-written is visible.

        Every way of making NIXL calls: the native lane (NIXL refuses the transfer), the Python lane
        thread (one UCX worker) and the calling thread (several) (posting it fails).
        """
        keys = [make_key(900 + i) for i in range(3)]
        values = [os.urandom(3 * MiB) for _ in keys]
        async with open_backend(f"nixl://127.0.0.1:{nixl_peer.port}{query}") as b:
            assert isinstance(b, NixlBackend)
            assert b.stats()["native_lane"] == (query == "?native_lane=on")
            if isinstance(b._lane, CLane):
                target, name, injector, match = b._lane.native, "submit", _FailSecondNativeTransfer, "transfer 2 of 3"
            else:
                target, name, injector, match = b._lane, "post", _FailSecondPost, "injected"
            used = (await b.peer_stats())["used_bytes"]
            with monkeypatch.context() as m:
                m.setattr(target, name, injector(b))
                results = await b.put(keys, values)
            assert [(r.status, r.reason) for r in results] == [(PutStatus.REJECTED, "error")] * 3
            assert b.stats()["errors"] >= 1
            assert await b.contains(keys) == [False] * 3, "the group was aborted, the first value included"
            assert all(r.ok for r in await b.put(keys, values))
            with monkeypatch.context() as m:
                m.setattr(target, name, injector(b))
                with pytest.raises(BackendUnavailableError, match=match):
                    await b.get_into(keys, [bytearray(3 * MiB) for _ in keys])
            dsts = [bytearray(3 * MiB) for _ in keys]
            assert await b.get_into(keys, dsts) == [3 * MiB] * 3
            assert [bytes(d) for d in dsts] == values
            await b.delete(keys)
            assert (await b.peer_stats())["used_bytes"] == used, "leases the failed get took were released"

    @pytest.mark.timeout(HANG_GUARD)
    async def test_native_lane_checksums_are_the_frame_checksums(nixl_peer: ServerProcess) -> None:
        """What the native lane hashes is what the Python lane verifies, and the other way round."""
        keys = [make_key(970 + i) for i in range(6)]
        values = [os.urandom(n) for n in (0, 1, 63, 4097, 2 * MiB + 5, 3 * MiB)]
        url = f"nixl://127.0.0.1:{nixl_peer.port}"
        async with open_backend(url + "?native_lane=on") as native, open_backend(url + "?native_lane=off") as py:
            assert native.stats()["native_lane"] and not py.stats()["native_lane"]
            for writer, reader in ((native, py), (py, native)):
                assert all(r.ok for r in await writer.put(keys, values))
                dsts = [bytearray(len(v)) for v in values]
                assert await reader.get_into(keys, dsts) == [len(v) for v in values]
                assert [bytes(d) for d in dsts] == values
                assert reader.stats()["corrupt"] == 0
                await writer.delete(keys)
            assert all(r.ok for r in await py.put(keys, values))
            raw_corrupt(nixl_peer.port, keys[4])
            dsts = [bytearray(len(v)) for v in values]
            got = await native.get_into(keys, dsts)
            assert got == [0, 1, 63, 4097, None, 3 * MiB]
            assert native.stats()["corrupt"] == 1
            await py.delete(keys)

    @pytest.mark.timeout(HANG_GUARD)
    async def test_without_a_compiler_auto_keeps_the_python_lane_and_on_refuses(
        nixl_peer: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        """The native lane is built on first use; where it cannot be, ``auto`` falls back and ``on`` fails."""
        from lmcache.backends.nixl import native as nixl_native

        monkeypatch.setattr(nixl_native, "_built", {})
        monkeypatch.setenv("LMCACHE_NATIVE_DIR", str(tmp_path / "native"))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        url = f"nixl://127.0.0.1:{nixl_peer.port}"
        with pytest.raises(BackendUnavailableError, match="native lane cannot run here"):
            async with open_backend(url + "?native_lane=on"):
                pass
        async with open_backend(url) as b:
            assert isinstance(b, NixlBackend) and isinstance(b._lane, PythonLane)
            key = make_key(990)
            assert all(r.ok for r in await b.put([key], [b"x" * 5000]))
            dst = bytearray(5000)
            assert await b.get_into([key], [dst]) == [5000] and bytes(dst) == b"x" * 5000
            await b.delete([key])
