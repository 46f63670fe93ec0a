"""Auth tokens of ``lmcache server``: generated at start, kept in private files, found by same-host clients.

Auth is on by default. A server started without a token (``--token-file`` or
``LMCACHE_SERVER_TOKEN``) generates a random one at start and writes it where only its own user
can read it:

* ``<dir>/<port>.token`` for each TCP port it listens on (the lm:// port and the HTTP control
  port; TCP ports are one namespace per host, so one file name per port is unambiguous), where
  ``<dir>`` is the first usable of ``$XDG_RUNTIME_DIR/lmcache``, ``~/.cache/lmcache/run`` and
  ``<tmp>/lmcache-<uid>``, each created mode 0700 and used only when owned by this user;
* ``<socket>.token`` beside a Unix socket.

Files are mode 0600, written through a fresh temporary name and renamed into place (a planted
symlink is replaced, never followed), and removed at a clean shutdown. A client of the same
user (``lm://`` to a loopback address, ``lm+unix://``, ``lmcache server-ctl``) that was given
no token reads the file for the port or socket it connects to; a file owned by another user is
ignored. Another user cannot read the file, so cannot authenticate.

This module touches only the file system: no sockets, no server or client state.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from lmcache.errors import ConfigError

__all__ = [
    "discover_tcp_token",
    "discover_unix_token",
    "generate_token",
    "read_token_file",
    "remove_token_file",
    "run_dir",
    "tcp_token_path",
    "token_dirs",
    "unix_token_path",
    "write_token_file",
]

logger = logging.getLogger(__name__)

_MAX_TOKEN_FILE = 4096


def generate_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_dirs() -> list[Path]:
    """Candidate private folders for TCP token files, in order of preference."""
    out: list[Path] = []
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        out.append(Path(xdg) / "lmcache")
    home = os.path.expanduser("~")
    if home and home != "~" and os.path.isabs(home):
        out.append(Path(home) / ".cache" / "lmcache" / "run")
    out.append(Path(tempfile.gettempdir()) / f"lmcache-{os.geteuid()}")
    return out


def _private_dir(path: Path) -> bool:
    """Create ``path`` (0700) if needed; True when it is a real folder owned by us, now 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        logger.warning("lmcache auth: %s is not a folder owned by this user; not using it for tokens", path)
        return False
    if stat.S_IMODE(st.st_mode) & 0o077:
        try:
            os.chmod(path, 0o700)
        except OSError:
            return False
    return True


def run_dir() -> Path:
    """This user's private run folder on this host: the first usable of :func:`token_dirs`.

    Token files of TCP ports live here, and so do the well-known socket, lock and log of the
    per-host server that the vLLM connector starts (``server: auto``).

    Raises:
        ConfigError: No candidate folder is usable (each is named).
    """
    dirs = token_dirs()
    for folder in dirs:
        if _private_dir(folder):
            return folder
    raise ConfigError(f"lmcache: no private run folder (tried {', '.join(map(str, dirs))})")


def tcp_token_path(port: int) -> Path:
    """Where the server writes the token of TCP ``port``: the first usable private folder.

    Raises:
        ConfigError: No candidate folder is usable (each is named).
    """
    return run_dir() / f"{port}.token"


def unix_token_path(socket_path: str | os.PathLike[str]) -> Path:
    """The token file beside a Unix socket: ``<socket>.token``."""
    return Path(f"{os.fspath(socket_path)}.token")


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path``, mode 0600, atomically and without following symlinks.

    Raises:
        ConfigError: The file cannot be written (the message names it).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, token.encode() + b"\n")
        finally:
            os.close(fd)
        os.replace(tmp, path)  # replaces a planted file or symlink; never writes through it
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise ConfigError(f"lmcache server: cannot write the token file {path}: {exc.strerror or exc}") from None


def read_token_file(path: Path) -> str | None:
    """The token in ``path`` if it is a regular file of ours; None when absent or unreadable.

    A file owned by another user is ignored (it could only be a plant: ours are written by us).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
            logger.debug("lmcache auth: cannot read %s: %s", path, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            logger.warning("lmcache auth: ignoring %s: not a regular file owned by this user", path)
            return None
        raw = os.read(fd, _MAX_TOKEN_FILE)
    except OSError:
        return None
    finally:
        os.close(fd)
    token = raw.decode(errors="replace").strip()
    return token or None


def remove_token_file(path: Path, token: str) -> None:
    """Remove ``path`` if it still holds ``token`` (a newer server's file is left alone)."""
    if read_token_file(path) == token:
        with contextlib.suppress(OSError):
            os.unlink(path)


def discover_tcp_token(port: int) -> str | None:
    """The token a server of this user on this host wrote for TCP ``port``, if any."""
    for folder in token_dirs():
        token = read_token_file(folder / f"{port}.token")
        if token is not None:
            return token
    return None


def discover_unix_token(socket_path: str | os.PathLike[str]) -> str | None:
    """The token a server of this user wrote beside its Unix socket, if any."""
    return read_token_file(unix_token_path(socket_path))
