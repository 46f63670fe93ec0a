"""Building lmcache's small C helpers on first use.

The native NIXL lane, the cachegen coder, the dequantization loops and the block copies ship as
C sources (package data) and are compiled with the system compiler (``$CC``, else ``cc``) the
first time they are needed, into a per-user cache folder (``$LMCACHE_NATIVE_DIR``, else
``$XDG_CACHE_HOME/lmcache/native``). The file name carries a hash of the source, compiler and
flags, so an upgrade or another ``CC`` never loads a stale library, and a build is installed by
rename, so concurrent builders never see half a file. Callers keep a pure-Python fallback for
when this raises; :func:`load_once` is that pattern
(build once per process, an environment switch to turn it off, a logged fallback).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_shared_library", "load_once", "native_cache_dir"]

#: Seconds one compiler run may take.
BUILD_TIMEOUT = 120


def native_cache_dir() -> Path:
    """The folder compiled helpers are cached in."""
    env = os.environ.get("LMCACHE_NATIVE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lmcache" / "native"


def build_shared_library(source: Path, stem: str, what: str, flags: Sequence[str]) -> Path:
    """Compile ``source`` into a shared library (or find the cached build) and return its path.

    Args:
        source: The C file.
        stem: The library's file name prefix (``<stem>-<hash>.so``).
        what: What is built, for error messages ("the native NIXL lane").
        flags: Compiler flags (``-shared -fPIC`` among them).

    Raises:
        OSError: The source cannot be read, there is no compiler, or the build failed or timed
            out (the message says which, with the compiler's last output).
    """
    try:
        text = source.read_bytes()
    except OSError as exc:  # an install that left out the package data
        raise OSError(f"{what}'s source {source} cannot be read: {exc.strerror or exc}") from None
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        raise OSError(f"no C compiler ({' '.join(cc) or 'cc'}) to build {what}")
    tag = hashlib.sha256(text + " ".join([*cc, *flags]).encode()).hexdigest()[:16]
    out_dir = native_cache_dir()
    target = out_dir / f"{stem}-{tag}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        try:
            proc = subprocess.run(
                [*cc, *flags, "-o", tmp, str(source)],
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise OSError(f"building {what} ({cc[0]}) took over {BUILD_TIMEOUT} s") from None
        if proc.returncode != 0:
            raise OSError(f"building {what} failed ({cc[0]}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load_once(
    state: MutableMapping[str, Any],
    lock: threading.Lock,
    *,
    source: Path,
    stem: str,
    what: str,
    flags: Sequence[str],
    bind: Callable[[Path], ctypes.CDLL],
    env: str,
    fallback: str,
    log: logging.Logger,
) -> ctypes.CDLL | None:
    """A helper library, built and bound on the first call of the process, else the cached answer.

    Args:
        state: The caller's cache: ``state["lib"]`` holds the answer once there is one.
        lock: Serialises the first build of this library across threads.
        source: The C file.
        stem: The library's file name prefix.
        what: What it is, for log lines ("the dequantization loops").
        flags: Compiler flags.
        bind: Opens the built file and declares its functions' signatures.
        env: The variable that turns it off when ``0``.
        fallback: What runs instead, for log lines ("decoding with torch").
        log: The caller's logger.

    Returns:
        The library, or None when it is turned off or cannot be built (the caller falls back;
        a warning says why).
    """
    with lock:
        if "lib" in state:
            return state["lib"]
        lib: ctypes.CDLL | None = None
        if os.environ.get(env, "1") == "0":
            log.info("%s disabled by %s=0; %s", what, env, fallback)
        else:
            try:
                lib = bind(build_shared_library(source, stem, what, flags))
            except OSError as exc:
                log.warning("%s unavailable (%s); %s (slower)", what, exc, fallback)
        state["lib"] = lib
        return lib
