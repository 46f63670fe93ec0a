"""Real Mooncake Store servers for tests: ``mooncake_master`` plus a ``mooncake_client`` storage node.

Both come from the ``mooncake-transfer-engine-non-cuda`` wheel (``pip install 'lmcache[mooncake]'``;
the binaries need ``libibverbs1`` from apt even for TCP). They are child processes on free loopback
ports, polled until ready and stopped by PID (:mod:`servers`). Mooncake's transfer engine listens
on all interfaces, so these fixtures refuse to start outside a private network namespace (see
``tests/backends/test_mooncake.py``, which re-runs itself under ``unshare --net``).

The storage node contributes the memory that values live in; the backends under test contribute
none (``global_segment_size=0``), so every value crosses TCP between two processes.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import ServerProcess, free_port, start_process

__all__ = [
    "MOONCAKE_NETNS_ENV",
    "MooncakeCluster",
    "mooncake_binary",
    "mooncake_cluster",
    "mooncake_private_cluster",
    "start_mooncake_cluster",
]

#: Set (to "1") by the re-exec under ``unshare --net``: servers may bind all interfaces here.
MOONCAKE_NETNS_ENV = "LMCACHE_TEST_MOONCAKE_NETNS"
STORAGE_SEGMENT = "1GB"
READY_TIMEOUT = 30.0


def mooncake_binary(name: str) -> str | None:
    """Path of a Mooncake binary (``mooncake_master``, ``mooncake_client``): next to this Python, or on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which(name)


def _tcp_open(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=1.0):
        return True


def _capacity(metrics_port: int) -> int:
    """``master_total_capacity_bytes`` from the master's metrics page (memory mounted by storage nodes)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("master_total_capacity_bytes "):
            return int(float(line.split()[-1]))
    return 0


@dataclasses.dataclass
class MooncakeCluster:
    """A master and one storage node we started.

    Attributes:
        master: The ``mooncake_master`` process (RPC on ``master.port``).
        node: The ``mooncake_client`` storage node.
        metrics_port: The master's HTTP metrics port.
    """

    master: ServerProcess
    node: ServerProcess
    metrics_port: int
    metadata_server: str = "P2PHANDSHAKE"

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` of the master's RPC server."""
        return f"127.0.0.1:{self.master.port}"

    def url(self, **options: object) -> str:
        """A ``mooncake://`` URL for this cluster; the client contributes no memory by default."""
        opts: dict[str, object] = {"global_segment_size": 0, **options}
        if self.metadata_server != "P2PHANDSHAKE":
            opts.setdefault("metadata_server", self.metadata_server)
        query = urllib.parse.urlencode({k: str(v) for k, v in opts.items()})
        return f"mooncake://{self.address}?{query}"

    def capacity(self) -> int:
        """Bytes of storage the master knows of."""
        return _capacity(self.metrics_port)

    def stop(self) -> None:
        """Stop the storage node, then the master."""
        self.node.stop()
        self.master.stop()


def _require_namespace() -> None:
    if os.environ.get(MOONCAKE_NETNS_ENV) != "1":
        pytest.skip(
            "Mooncake servers bind all interfaces: they run only inside a private network namespace "
            "(tests/backends/test_mooncake.py re-runs itself under unshare --net)"
        )


def start_mooncake_cluster(
    workdir: Path, segment: str = STORAGE_SEGMENT, *, http_metadata: bool = False
) -> MooncakeCluster:
    """Start a master and one storage node of ``segment`` bytes in ``workdir``; skip without the binaries.

    With ``http_metadata`` the master also serves the HTTP metadata service (instead of
    P2PHANDSHAKE); processes using it should have ``MC_TCP_BIND_ADDRESS=127.0.0.1`` set.

    A storage node that never registers with its master (seen once in ~10 CI runs: the node
    retried "Client not available" for 30 s) gets one more try with a fresh master and fresh
    ports; a second failure is raised.
    """
    _require_namespace()
    master_bin, node_bin = mooncake_binary("mooncake_master"), mooncake_binary("mooncake_client")
    if master_bin is None or node_bin is None:
        pytest.skip(
            "no mooncake_master/mooncake_client: pip install 'lmcache[mooncake]' (and apt-get install libibverbs1)"
        )
    try:
        return _start_cluster(master_bin, node_bin, workdir / "try1", segment, http_metadata)
    except RuntimeError as exc:
        print(f"mooncake cluster did not start ({str(exc).splitlines()[0]}); trying once more", file=sys.stderr)
        return _start_cluster(master_bin, node_bin, workdir / "try2", segment, http_metadata)


def _start_cluster(master_bin: str, node_bin: str, workdir: Path, segment: str, http_metadata: bool) -> MooncakeCluster:
    workdir.mkdir(parents=True, exist_ok=True)
    rpc, metrics, http = free_port(), free_port(), free_port()
    argv = [
        master_bin,
        "-rpc_address=127.0.0.1",
        f"-rpc_port={rpc}",
        "-metrics_host=127.0.0.1",
        f"-metrics_port={metrics}",
    ]
    metadata = "P2PHANDSHAKE"
    if http_metadata:
        argv += [
            "-enable_http_metadata_server=true",
            "-http_metadata_server_host=127.0.0.1",
            f"-http_metadata_server_port={http}",
        ]
        metadata = f"http://127.0.0.1:{http}/metadata"
    master = start_process(
        f"mooncake-master-{rpc}",
        argv,
        workdir,
        lambda: _tcp_open(rpc) and (not http_metadata or _tcp_open(http)),
        rpc,
    )
    try:
        node_port = free_port()
        node = ServerProcess(
            f"mooncake-node-{node_port}",
            [
                node_bin,
                "-host=127.0.0.1",
                f"-port={node_port}",
                f"-master_server_address=127.0.0.1:{rpc}",
                f"-metadata_server={metadata}",
                "-protocol=tcp",
                f"-global_segment_size={segment}",
                "-local_buffer_size=16MB",
            ],
            workdir,
            # Ready once the master counts the node's memory.
            lambda: _capacity(metrics) > 0,
            node_port,
        )
        node.start(READY_TIMEOUT)
    except BaseException:
        master.stop()
        raise
    return MooncakeCluster(master, node, metrics, metadata)


@pytest.fixture(scope="session")
def mooncake_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeCluster]:
    """A master and a storage node shared by the session's tests."""
    cluster = start_mooncake_cluster(tmp_path_factory.mktemp("mooncake"))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def mooncake_private_cluster(tmp_path: Path) -> Iterator[MooncakeCluster]:
    """A cluster for one test, which it may stop or kill (fault tests)."""
    cluster = start_mooncake_cluster(tmp_path / "mooncake")
    try:
        yield cluster
    finally:
        cluster.stop()
