"""One ``lmcache server`` per user and host, found or started for the vLLM connector (``server: auto``).

vLLM runs its scheduler (which looks up) and its workers (which store and load) in separate
processes, so they need a tier both reach. A local cache server over ``lm+unix://`` with shared
memory is the fastest such tier, and it outlives any one vLLM: a vLLM that crashed and restarted,
or a second vLLM on the host, hits on what the first stored.

:func:`ensure_server` is *connect or spawn*: under an exclusive ``flock`` on a lock file in the
user's private run folder (:func:`lmcache.server.auth.run_dir`, the folder the server's token
files already use), it connects to the well-known socket ``<run>/server.sock``; when nothing
answers there it starts ``python -m lmcache server`` detached (its own session, stdin closed,
output appended to ``<run>/server.log``, its tiers in ``LMCACHE_TIERS``, out of ``ps``) and
waits until the socket accepts. Every connector process of every vLLM goes through the same
lock, so two vLLMs starting at once start one server, and the loser of the race connects to the
winner's. The server writes its token beside the socket (``server.sock.token``), where
``lm+unix://`` clients of the same user find it.

This module starts processes and touches files in the run folder; it imports neither vLLM nor
the server (the server runs in its own interpreter).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lmcache.errors import BackendUnavailableError
from lmcache.server.auth import run_dir

__all__ = ["AutoServer", "auto_socket_path", "ensure_server", "socket_alive"]

logger = logging.getLogger(__name__)

#: File names in the run folder.
SOCKET_NAME = "server.sock"
LOCK_NAME = "server.lock"
LOG_NAME = "server.log"
READY_NAME = "server.ready"

#: Seconds the auto-started server lives on without clients (``LMCACHE_SERVER_EXIT_WHEN_IDLE``
#: overrides it; 0 keeps it forever).
EXIT_WHEN_IDLE = 600.0

_CHILDREN: list[subprocess.Popen[bytes]] = []


@dataclasses.dataclass(frozen=True)
class AutoServer:
    """The per-host server a connector uses.

    Attributes:
        socket_path: Its Unix socket.
        started: True when this call started it (False: it was running already).
        pid: Its process id when this call started it, else ``None``.
    """

    socket_path: str
    started: bool
    pid: int | None = None

    @property
    def url(self) -> str:
        """The tier URL of the server (``lm+unix://``; shared memory is the client's default)."""
        return f"lm+unix://{self.socket_path}"


def auto_socket_path() -> Path:
    """The well-known socket of this user's per-host server.

    Raises:
        ConfigError: No private run folder is usable.
    """
    return run_dir() / SOCKET_NAME


def socket_alive(path: str | os.PathLike[str], timeout: float = 1.0) -> bool:
    """Whether a server accepts connections on the Unix socket ``path``.

    A socket file left by a killed server refuses the connection, so this tells a live server from
    a stale file without speaking the protocol.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _server_command(socket_path: Path) -> list[str]:
    # The tiers go through the environment (LMCACHE_TIERS), not argv: a tier URL may carry a
    # password, and any user sees a process's argv in ps, only its owner its environment.
    ready = str(socket_path.with_name(READY_NAME))
    cmd = [
        sys.executable,
        "-m",
        "lmcache",
        "server",
        "--host",
        "",
        "--unix-socket",
        str(socket_path),
        "--ready-file",
        ready,
    ]
    if "LMCACHE_SERVER_EXIT_WHEN_IDLE" not in os.environ:
        # Nobody stops a server that was started for them: it goes once every vLLM process that
        # used it has exited and none came back for this long (a crashed vLLM restarts sooner).
        cmd += ["--exit-when-idle", str(EXIT_WHEN_IDLE)]
    return cmd


def _log_tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def ensure_server(
    tiers: Sequence[str],
    *,
    chunk_size: int | None = None,
    start_timeout: float = 60.0,
    lock_timeout: float = 120.0,
) -> AutoServer:
    """Connect to this user's per-host server, or start it.

    Args:
        tiers: Tier URLs of the server if it has to be started (fastest first). A running server
            keeps its own tiers; the first to start decides.
        chunk_size: The server's chunk size (it reports hits in tokens with it), if started.
        start_timeout: Seconds a started server has to accept connections.
        lock_timeout: Seconds to wait for another process that is starting the server.

    Returns:
        The server's socket, and whether this call started it.

    Raises:
        ConfigError: No private run folder is usable.
        BackendUnavailableError: The server could not be started (its log's tail is in the
            message), or the lock was held past ``lock_timeout``.
    """
    sock_path = auto_socket_path()
    if socket_alive(sock_path):  # the common case: no lock needed to use a running server
        return AutoServer(str(sock_path), False)
    lock_path = sock_path.with_name(LOCK_NAME)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        _lock(fd, lock_timeout, lock_path)
        # Under the lock: whoever held it before may have started the server meanwhile.
        if socket_alive(sock_path):
            return AutoServer(str(sock_path), False)
        pid = _spawn(sock_path, tiers, chunk_size, start_timeout)
        return AutoServer(str(sock_path), True, pid)
    finally:
        os.close(fd)  # releases the flock (also released by the kernel if this process dies)


def _lock(fd: int, timeout: float, path: Path) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise BackendUnavailableError(
                    f"lmcache: another process held {path} for over {timeout:.0f} s while starting the cache server"
                ) from None
            time.sleep(0.05)


def _spawn(sock_path: Path, tiers: Sequence[str], chunk_size: int | None, timeout: float) -> int:
    """Start the server detached and wait until its socket accepts; returns its pid."""
    log_path = sock_path.with_name(LOG_NAME)
    env = dict(os.environ)
    env["LMCACHE_TIERS"] = " ".join(tiers)
    if chunk_size is not None:
        env["LMCACHE_CHUNK_SIZE"] = str(chunk_size)
    cmd = _server_command(sock_path)
    ready = sock_path.with_name(READY_NAME)
    with contextlib.suppress(FileNotFoundError):
        ready.unlink()  # left by a killed server: readiness must be this server's
    with open(log_path, "ab") as log:
        os.chmod(log_path, 0o600)
        # Its own session: vLLM's signals to its process group (Ctrl-C, a supervisor's kill) do
        # not reach the server, which must outlive vLLM. No inherited descriptors, no stdin.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            close_fds=True,
            cwd="/",
        )
    logger.info("lmcache: started the per-host cache server (pid %d) on %s, tiers %s", proc.pid, sock_path, tiers)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendUnavailableError(
                f"lmcache: the cache server exited with status {proc.returncode} at start; "
                f"{log_path}:\n{_log_tail(log_path)}"
            )
        # The ready file comes after the token file: a client that sees it finds the new token.
        if ready.exists() and socket_alive(sock_path):
            _CHILDREN.append(proc)  # kept referenced: the server is meant to outlive this object
            return proc.pid
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        proc.kill()
    raise BackendUnavailableError(
        f"lmcache: the cache server did not accept connections on {sock_path} within {timeout:.0f} s; "
        f"{log_path}:\n{_log_tail(log_path)}"
    )
