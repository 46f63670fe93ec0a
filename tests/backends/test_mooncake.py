"""mooncake:// against a real ``mooncake_master`` and ``mooncake_client`` storage node, over TCP.

Mooncake's transfer engine listens on all interfaces, so the server tests run only inside a
private network namespace: outside one, :func:`test_mooncake_in_private_network_namespace` re-runs
this module under ``unshare --net --fork`` (loopback only) with ``LMCACHE_TEST_MOONCAKE_NETNS=1``
and reports its result; it skips when ``unshare`` is not permitted (not root). URL parsing, error
mapping and the unreachable-master probe need no server and run everywhere.

Bypass paths (reading, corrupting or planting objects) use a second, raw
``MooncakeDistributedStore`` client, never the backend.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

pytest.importorskip(
    "mooncake.store",
    reason="the mooncake:// backend needs pip install 'lmcache[mooncake]' and apt-get install libibverbs1",
    exc_type=ImportError,
)

from lmcache_conformance import BackendTests
from servers import run_pytest_in_netns, unshare_works

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.mooncake import MooncakeBackend, error_name, mooncake_error
from lmcache.backends.registry import open_backend
from lmcache.errors import (
    BackendClosedError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    PermanentBackendError,
    TransientBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import decode_frame

if TYPE_CHECKING:
    from mooncake_servers import MooncakeCluster

# Session fixtures mooncake_cluster and mooncake_private_cluster (server processes, stopped by PID).
pytest_plugins = ["mooncake_servers"]

MiB = 1 << 20
MOONCAKE_NETNS_ENV = "LMCACHE_TEST_MOONCAKE_NETNS"  # also in mooncake_servers (imported as a plugin)
IN_NETNS = os.environ.get(MOONCAKE_NETNS_ENV) == "1"
REPO = Path(__file__).resolve().parents[2]
# A hang guard only (tests make no timing claims): a typed error must come long before this.
HANG_GUARD = 120


def make_key(i: int, model: str = "test/mooncake") -> CacheKey:
    return CacheKey(model, 1, 0, os.urandom(28) + i.to_bytes(4, "little"), "float16")


def closed_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# No server needed: URLs, errors, an unreachable master


def test_url_defaults_and_location() -> None:
    b = MooncakeBackend.from_url("mooncake://10.1.2.3")
    s = b.settings
    assert (s.host, s.port, s.protocol, s.metadata_server) == ("10.1.2.3", 50051, "tcp", "P2PHANDSHAKE")
    assert s.global_segment_size == 0
    assert b.url == "mooncake://10.1.2.3:50051"
    assert not b.is_open


def test_url_options_round_trip() -> None:
    url = (
        "mooncake://master.example:7000?protocol=rdma&rdma_devices=mlx5_0%2Cmlx5_1"
        "&metadata_server=http%3A%2F%2Fmeta%3A8080%2Fmetadata&global_segment_size=4GiB"
        "&local_buffer_size=32MiB&staging_size=512MiB&max_workers=8&timeout=5s&prefix=tenant-a%3A"
    )
    b = MooncakeBackend.from_url(url)
    s = b.settings
    assert (s.host, s.port, s.protocol, s.rdma_devices) == ("master.example", 7000, "rdma", "mlx5_0,mlx5_1")
    assert s.metadata_server == "http://meta:8080/metadata"
    assert s.global_segment_size == 4 << 30 and s.local_buffer_size == 32 << 20
    assert s.staging_size == 512 << 20 and s.max_workers == 8 and s.timeout == 5.0
    assert s.prefix == "tenant-a:"
    again = MooncakeBackend.from_url(b.url)
    assert again.settings == s and again.url == b.url
    assert type(open_backend(url)) is MooncakeBackend


def test_max_value_bytes_follows_the_arenas() -> None:
    b = MooncakeBackend.from_url("mooncake://h?staging_size=64MiB&max_workers=4")
    limit = b.capabilities.max_value_bytes
    assert limit is not None and 15 * MiB < limit < 16 * MiB
    assert MooncakeBackend.capabilities.max_value_bytes is None  # the class default is untouched


@pytest.mark.parametrize(
    "url",
    [
        "mooncake://h?protocol=udp",
        "mooncake://h?no_such_option=1",
        "mooncake://h/some/path",
        "mooncake://user:pw@h",
        "mooncake://h#frag",
        "mooncake://?protocol=tcp",
        "mooncake://h:0",
        "mooncake://h?timeout=soon",
        "mooncake://h?staging_size=1MiB&max_workers=256",
    ],
)
def test_bad_urls_raise_config_error(url: str) -> None:
    with pytest.raises(ConfigError):
        MooncakeBackend.from_url(url)


def test_environment_and_overrides_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("LMCACHE_MOONCAKE_MAX_WORKERS", "2")
    b = MooncakeBackend.from_url("mooncake://h?max_workers=3", timeout=7)
    assert b.settings.protocol == "rdma"  # environment beats the default
    assert b.settings.max_workers == 3  # the URL beats the environment
    assert b.settings.timeout == 7.0  # keyword overrides beat everything


@pytest.mark.parametrize(
    ("code", "exc_type", "name"),
    [
        (-900, BackendUnavailableError, "RPC_FAIL"),
        (-800, BackendUnavailableError, "TRANSFER_FAIL"),
        (-706, TransientBackendError, "OBJECT_HAS_LEASE"),
        (-703, TransientBackendError, "REPLICA_IS_NOT_READY"),
        (-200, CapacityError, "NO_AVAILABLE_HANDLE"),
        (-600, PermanentBackendError, "INVALID_PARAMS"),
        (-400, PermanentBackendError, "INVALID_KEY"),
        (-12345, PermanentBackendError, "code -12345"),
    ],
)
def test_sdk_codes_map_to_typed_errors(code: int, exc_type: type[Exception], name: str) -> None:
    err = mooncake_error(code, "doing something")
    assert type(err) is exc_type
    assert error_name(code) == name
    assert name in str(err) and "doing something" in str(err)


@pytest.mark.timeout(HANG_GUARD)
async def test_unreachable_master_is_unavailable() -> None:
    # The TCP probe fails before the SDK's setup() (which would block ~90 s) ever runs.
    b = MooncakeBackend.from_url(f"mooncake://127.0.0.1:{closed_port()}?connect_timeout=2s")
    try:
        with pytest.raises(BackendUnavailableError, match="cannot be reached"):
            await b.open()
        assert not b.is_open
        with pytest.raises(BackendUnavailableError):
            await b.contains([make_key(1)])
    finally:
        await b.aclose()
    with pytest.raises(BackendClosedError):
        await b.open()


# ---------------------------------------------------------------------------------------------
# The re-exec into a private network namespace


@pytest.mark.skipif(IN_NETNS, reason="already inside the private network namespace")
@pytest.mark.timeout(1200)
def test_mooncake_in_private_network_namespace() -> None:
    """Run the server tests of this module under ``unshare --net`` (Mooncake binds all interfaces)."""
    why = unshare_works()
    if why is not None:
        pytest.skip(f"mooncake server tests need a private network namespace: {why}")
    env = {**os.environ, MOONCAKE_NETNS_ENV: "1"}
    proc = run_pytest_in_netns(Path(__file__), env, REPO, 1150, "-ra", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
    print(tail)
    assert proc.returncode == 0, f"mooncake tests inside the namespace failed (exit {proc.returncode}):\n{tail}"


# ---------------------------------------------------------------------------------------------
# With servers, inside the namespace

_NETNS_ONLY: list[str] = []


def needs_netns(obj: Any) -> Any:
    """Mark a test (or test class) that runs only inside the private network namespace.

    Outside it, such tests are removed from the module at the end of the import (so they are not
    even collected as skipped); :func:`test_mooncake_in_private_network_namespace` runs them.
    """
    _NETNS_ONLY.append(obj.__name__)
    return obj


class _RawClient:
    """A second Mooncake client, straight on the SDK: the conformance suite's bypass path."""

    def __init__(self, cluster: MooncakeCluster) -> None:
        from mooncake.store import MooncakeDistributedStore

        self.store = MooncakeDistributedStore()
        code = self.store.setup("127.0.0.1", "P2PHANDSHAKE", 0, 64 * MiB, "tcp", "", cluster.address)
        assert code == 0, f"raw client setup failed: {error_name(code)}"

    def read(self, name: str) -> bytes | None:
        if self.store.is_exist(name) != 1:
            return None
        return bytes(self.store.get(name))

    def replace(self, name: str, data: bytes) -> None:
        assert self.store.remove(name, True) in (0, -704)
        assert self.store.put(name, data) == 0

    def close(self) -> None:
        self.store.close()


@pytest.fixture(scope="session")
def mooncake_raw(mooncake_cluster: MooncakeCluster) -> Iterator[_RawClient]:
    raw = _RawClient(mooncake_cluster)
    try:
        yield raw
    finally:
        raw.close()


@needs_netns
class TestMooncake(BackendTests):
    """The conformance suite against a master and a storage node; the backend holds no memory itself."""

    @pytest.fixture
    def backend_url(self, mooncake_cluster: MooncakeCluster) -> str:
        return mooncake_cluster.url(staging_size="64MiB", timeout="60s")

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        raw: _RawClient = self._fixture("mooncake_raw", required=True)
        assert isinstance(backend, MooncakeBackend)
        name = backend.object_name(key)
        data = bytearray(raw.read(name) or b"")
        assert data, "the value to corrupt is not stored"
        data[-1] ^= 0x40  # a payload byte: the frame header still parses, the checksum does not
        raw.replace(name, bytes(data))


@pytest.fixture
async def mooncake(mooncake_cluster: MooncakeCluster) -> Any:
    b = open_backend(mooncake_cluster.url(staging_size="64MiB"))
    try:
        await b.open()
        yield b
    finally:
        await b.aclose()


@needs_netns
async def test_values_live_on_the_storage_node_framed(mooncake: MooncakeBackend, mooncake_raw: _RawClient) -> None:
    # The backend contributes no memory: what a second client reads was carried to the node over TCP.
    key, value = make_key(1), os.urandom(3 * MiB + 5)
    assert [r.status for r in await mooncake.put([key], [value])] == [PutStatus.STORED]
    stored = mooncake_raw.read(mooncake.object_name(key))
    assert stored is not None and len(stored) > len(value)
    header, payload = decode_frame(stored, key)
    assert bytes(payload) == value and header.key == key.to_string()


@needs_netns
async def test_foreign_and_misplaced_objects_are_counted_misses(
    mooncake: MooncakeBackend, mooncake_raw: _RawClient
) -> None:
    a, b, c = make_key(1), make_key(2), make_key(3)
    await mooncake.put([a], [b"A" * 1000])
    frame_of_a = mooncake_raw.read(mooncake.object_name(a))
    assert frame_of_a is not None
    mooncake_raw.replace(mooncake.object_name(b), frame_of_a)  # a's value under b's name
    mooncake_raw.replace(mooncake.object_name(c), b"not an lmcache frame at all")
    before = mooncake.stats()["corrupt"]
    dsts = [bytearray(1000) for _ in range(3)]
    assert await mooncake.get_into([a, b, c], dsts) == [1000, None, None]
    assert mooncake.stats()["corrupt"] == before + 2
    assert bytes(dsts[0]) == b"A" * 1000


@needs_netns
@pytest.mark.parametrize("size", [4096, 3 * MiB], ids=["checked_before_copy", "checked_after_copy"])
async def test_corrupt_payload_is_a_counted_miss(
    mooncake: MooncakeBackend, mooncake_raw: _RawClient, size: int
) -> None:
    # Small values are checked before the copy, large ones in dst right after it: both are misses.
    key, value = make_key(1), os.urandom(size)
    await mooncake.put([key], [value])
    name = mooncake.object_name(key)
    frame = bytearray(mooncake_raw.read(name) or b"")
    frame[len(frame) // 2 + 100] ^= 0x01  # a payload byte in the middle
    mooncake_raw.replace(name, bytes(frame))
    before = mooncake.stats()["corrupt"]
    dst = bytearray(b"\xa5" * size)
    assert await mooncake.get_into([key], [dst]) == [None]
    assert mooncake.stats()["corrupt"] == before + 1
    if size < 256 * 1024:
        assert dst == bytearray(b"\xa5" * size)


@needs_netns
async def test_value_larger_than_an_arena_is_rejected(mooncake_cluster: MooncakeCluster) -> None:
    b = open_backend(mooncake_cluster.url(staging_size="4MiB", max_workers=2))
    try:
        limit = b.capabilities.max_value_bytes
        assert limit is not None and limit < 2 * MiB
        small, big = make_key(1), make_key(2)
        results = await b.put([small, big], [os.urandom(limit), os.urandom(limit + 1)])
        assert [r.status for r in results] == [PutStatus.STORED, PutStatus.REJECTED]
        assert results[1].reason == "too_large"
        # A batch of many arena-sized values runs as several sub-batches, in order.
        keys = [make_key(10 + i) for i in range(9)]
        values = [os.urandom(MiB - i) for i in range(9)]
        assert all(r.status is PutStatus.STORED for r in await b.put(keys, values))
        dsts = [bytearray(MiB) for _ in keys]
        assert await b.get_into(keys, dsts) == [len(v) for v in values]
        assert all(bytes(d[: len(v)]) == v for d, v in zip(dsts, values, strict=True))
    finally:
        await b.aclose()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_full_cluster_rejects_with_capacity(tmp_path: Path) -> None:
    from mooncake_servers import start_mooncake_cluster

    cluster = start_mooncake_cluster(tmp_path / "small", segment="32MB")
    b = open_backend(cluster.url(staging_size="64MiB", max_workers=1))
    try:
        keys = [make_key(i) for i in range(6)]
        values = [os.urandom(8 * MiB) for _ in keys]
        results = await b.put(keys, values)
        statuses = [r.status for r in results]
        assert PutStatus.REJECTED in statuses, "48 MiB fit into a 32 MB cluster"
        assert {r.reason for r in results if r.status is PutStatus.REJECTED} == {"capacity"}
        held = [k for k, r in zip(keys, results, strict=True) if r.status is PutStatus.STORED]
        assert held, "nothing was stored at all"
        assert b.stats()["rejected"] >= 1
    finally:
        await b.aclose()
        cluster.stop()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_master_stopped_mid_run(mooncake_private_cluster: MooncakeCluster) -> None:
    cluster = mooncake_private_cluster
    b = open_backend(cluster.url(staging_size="16MiB", timeout="20s"))
    try:
        keys = [make_key(i) for i in range(4)]
        values = [os.urandom(64 * 1024) for _ in keys]
        assert all(r.ok for r in await b.put(keys, values))
        await b.ping()
        cluster.master.stop()
        errors_before = b.stats()["errors"]
        # Every operation fails with a typed, transient error (RPC_FAIL or the timeout), no hang.
        with pytest.raises(TransientBackendError):
            await b.get_into(keys, [bytearray(64 * 1024) for _ in keys])
        with pytest.raises(TransientBackendError):
            await b.contains(keys)
        with pytest.raises(TransientBackendError):
            await b.put([make_key(99)], [b"x" * 100])
        with pytest.raises(TransientBackendError):
            await b.ping()
        assert b.stats()["errors"] >= errors_before + 4
        assert b.is_open  # a failure does not close the backend
        # A new backend cannot even open against the stopped master.
        fresh = open_backend(cluster.url(connect_timeout="2s"))
        try:
            with pytest.raises(BackendUnavailableError):
                await fresh.open()
        finally:
            await fresh.aclose()
    finally:
        await b.aclose()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_short_timeout_is_a_timeout_error_and_dst_stays_clean(
    mooncake_private_cluster: MooncakeCluster,
) -> None:
    # With the master gone each SDK call takes seconds (RPC retries); a shorter timeout abandons
    # the call, and the abandoned worker never writes into the caller's buffer afterwards.
    cluster = mooncake_private_cluster
    b = open_backend(cluster.url(staging_size="16MiB", timeout="0.5s"))
    try:
        key = make_key(1)
        assert (await b.put([key], [b"v" * 4096]))[0].ok
        cluster.master.stop()
        dst = bytearray(b"\xa5" * 4096)
        with pytest.raises(TransientBackendError):
            await b.get_into([key], [dst])
        await asyncio.sleep(6)  # longer than the SDK's own RPC failure path
        assert dst == bytearray(b"\xa5" * 4096)
    finally:
        await b.aclose()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_storage_node_killed_mid_batch(mooncake_private_cluster: MooncakeCluster) -> None:
    # The data lives on the node: once it dies, reads fail with a typed transient error (the
    # transfer fails) or miss (the master dropped the node's objects), never hang or return junk.
    cluster = mooncake_private_cluster
    b = open_backend(cluster.url(staging_size="64MiB", timeout="20s"))
    try:
        keys = [make_key(i) for i in range(32)]
        values = [os.urandom(MiB) for _ in keys]
        assert all(r.ok for r in await b.put(keys, values))
        dsts = [bytearray(MiB) for _ in keys]
        task = asyncio.create_task(b.get_into(keys, dsts))
        await asyncio.sleep(0)
        cluster.node.kill()
        try:
            got = await task
        except TransientBackendError:
            pass
        else:  # finished before the node died: then it must be right
            for n, d, v in zip(got, dsts, values, strict=True):
                assert n is None or (n == MiB and bytes(d) == v)
        after = [bytearray(b"\xa5" * MiB) for _ in range(4)]
        try:
            again = await b.get_into(keys[:4], after)
        except TransientBackendError:
            assert b.stats()["errors"] >= 1
        else:
            assert again == [None] * 4, "values of a dead storage node were read back"
            assert all(d == bytearray(b"\xa5" * MiB) for d in after)
    finally:
        await b.aclose()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_http_metadata_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mooncake_servers import start_mooncake_cluster

    # Mooncake's advice for HTTP metadata: bind the transfer engine to the announced address.
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", "127.0.0.1")
    cluster = start_mooncake_cluster(tmp_path / "http", segment="64MB", http_metadata=True)
    try:
        url = cluster.url(staging_size="16MiB")
        assert "metadata_server=http" in url
        b = open_backend(url)
        assert b.settings.metadata_server.startswith("http://127.0.0.1:")  # type: ignore[attr-defined]
        try:
            key, value = make_key(1), os.urandom(3 * MiB)
            assert [r.status for r in await b.put([key], [value])] == [PutStatus.STORED]
            dst = bytearray(3 * MiB)
            assert await b.get_into([key], [dst]) == [3 * MiB]
            assert bytes(dst) == value
        finally:
            await b.aclose()
    finally:
        cluster.stop()


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_make_store_is_a_client_of_the_same_cluster(mooncake: MooncakeBackend) -> None:
    """make_store gives a raw client set up like the backend's, with the given buffers registered."""
    key, value = make_key(70), os.urandom(MiB)
    assert [r.status for r in await mooncake.put([key], [value])] == [PutStatus.STORED]
    buf = np.zeros(2 * MiB, dtype=np.uint8)

    def read_raw() -> int:
        store = mooncake.make_store([buf])
        try:
            # A zero-copy read into the registered buffer: the frame the backend stored.
            return int(store.get_into(mooncake.object_name(key), buf.ctypes.data, buf.nbytes))
        finally:
            store.unregister_buffer(buf.ctypes.data)
            store.close()

    n = await asyncio.get_running_loop().run_in_executor(None, read_raw)
    assert n > MiB
    _header, payload = decode_frame(buf[:n].tobytes(), key)
    assert bytes(payload) == value


@needs_netns
@pytest.mark.timeout(HANG_GUARD)
async def test_bench_runs_the_raw_sdk_baseline_on_a_store_the_backend_sets_up(
    mooncake_cluster: MooncakeCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lmcache.bench.backend import BenchParams, run_backend_bench

    registered: list[int] = []  # buffers per store set up: the backend's and the baseline's
    real_make_store = MooncakeBackend.make_store

    def make_store(self: MooncakeBackend, buffers: Any = ()) -> Any:
        registered.append(len(buffers))
        return real_make_store(self, buffers)

    monkeypatch.setattr(MooncakeBackend, "make_store", make_store)
    url = mooncake_cluster.url(staging_size="64MiB")
    params = BenchParams(url=url, value_size=256 << 10, count=8, batch=4, concurrency=2, repeat=1, keys_tokens=0)
    result = await run_backend_bench(params)
    assert result["baseline"]["name"] == "raw-mooncake"
    assert sorted(registered) == [1, 2]  # the staging arena; the workload's sources and destinations
    for system in ("backend", "baseline"):
        for op in ("put", "get"):
            assert result["median"][system][op]["gbps"] > 0
    assert result["ratio"]["put_gbps"] is not None and result["ratio"]["get_gbps"] is not None


if not IN_NETNS:
    for _name in _NETNS_ONLY:
        del globals()[_name]
