"""Baselines for ``lmcache bench backend --url lm://…`` and ``lm+unix://…``.

What a client of the cache server is measured against, in the same run:

* **Shared-memory path** (``shm=true`` and the server on this host): :class:`ShmMemcpyBaseline`,
  a ``numpy.copyto`` of the same bytes into and out of a preallocated pool mapped from
  ``/dev/shm`` (the memory kind the lm path moves values through). The lm path does two such
  copies per value (client <-> segment, segment <-> the server's tier), in two processes.
* **Socket path** (``shm=false``, or a remote server): :class:`RawSocketBaseline`, the same
  bytes sent to and received from a minimal server process over a plain socket (TCP over
  loopback for ``lm://``, a Unix socket for ``lm+unix://``): a 17-byte command, then the value,
  one-byte ack for a put; the value straight into the destination for a get. The client side
  uses the same event-loop calls (``sock_sendall``/``sock_recv_into``) as the lm client, one
  connection per batch in flight; the server keeps values in one preallocated pool.

Registered for :class:`~lmcache.server.client.LMServerBackend` (every scheme it serves) in
:data:`lmcache.bench.baselines.BUILTIN_BASELINES`; importing this module registers nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.bench.baselines.base import Baseline
from lmcache.bench.baselines.memory import MemcpyBaseline
from lmcache.pool import PoolMapping, map_pool

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawSocketBaseline", "ShmMemcpyBaseline", "make"]

_CMD = struct.Struct("<cQQ")  # op (b"P" put / b"G" get), slot, length

# The raw server: blocking sockets, one thread per connection, one pool for all values.
_SERVER = r"""
import os, socket, struct, sys, threading
CMD = struct.Struct("<cQQ")
count, size, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
pool = bytearray(count * size)
view = memoryview(pool)
if where == "tcp":
    ls = socket.create_server(("127.0.0.1", 0))
    print(ls.getsockname()[1], flush=True)
else:
    ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ls.bind(where)
    ls.listen(64)
    print(where, flush=True)

def exact(c, v):
    while v.nbytes:
        n = c.recv_into(v)
        if n == 0:
            raise EOFError
        v = v[n:]

def serve(c):
    head = memoryview(bytearray(CMD.size))
    try:
        while True:
            exact(c, head)
            op, slot, n = CMD.unpack(head)
            dst = view[slot * size : slot * size + n]
            if op == b"P":
                exact(c, dst)
                c.sendall(b"k")
            else:
                c.sendall(dst)
    except (EOFError, OSError):
        c.close()

while True:
    c, _ = ls.accept()
    if where == "tcp":
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        c.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


class ShmMemcpyBaseline(MemcpyBaseline):
    """``numpy.copyto`` into and out of a preallocated pool mapped from ``/dev/shm``."""

    name = "memcpy-shm"

    def __init__(self, workload: Workload) -> None:
        super().__init__(workload)
        self._mapping: PoolMapping | None = None

    def _allocate(self, nbytes: int) -> np.ndarray:
        # The shared kind of pool the lm server maps (a /dev/shm file; a crashed run's is swept by pid).
        self._mapping = map_pool(nbytes, shared=True, hugepages=False, prefault=False, owner="bench memcpy-shm")
        return np.frombuffer(self._mapping.mm, dtype=np.uint8)[:nbytes]

    async def aclose(self) -> None:
        await super().aclose()
        mapping, self._mapping = self._mapping, None
        if mapping is not None:
            mapping.close()


class RawSocketBaseline(Baseline):
    """Plain send/recv of the same bytes to a minimal server process over a socket."""

    name = "raw-socket"

    def __init__(self, workload: Workload, unix: bool) -> None:
        self._w = workload
        self._unix = unix
        self._proc: asyncio.subprocess.Process | None = None
        self._address: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._free: asyncio.Queue[socket.socket] = asyncio.Queue()
        self._socks: list[socket.socket] = []

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "transport": "unix" if self._unix else "tcp-loopback"}

    async def open(self) -> None:
        where = "tcp"
        if self._unix:
            self._tmp = tempfile.TemporaryDirectory(prefix="lmcache-bench-")
            where = os.path.join(self._tmp.name, "raw.sock")
        w = self._w
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _SERVER, str(w.count), str(w.value_size), where, stdout=asyncio.subprocess.PIPE
        )
        assert self._proc.stdout is not None
        line = (await asyncio.wait_for(self._proc.stdout.readline(), 30)).decode().strip()
        self._address = where if self._unix else ("127.0.0.1", int(line))
        loop = asyncio.get_running_loop()
        for _ in range(max(1, w.concurrency)):
            s = socket.socket(socket.AF_UNIX if self._unix else socket.AF_INET, socket.SOCK_STREAM)
            if not self._unix:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            s.setblocking(False)
            await loop.sock_connect(s, self._address)
            self._socks.append(s)
            self._free.put_nowait(s)

    async def aclose(self) -> None:
        for s in self._socks:
            s.close()
        self._socks.clear()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._tmp is not None:
            self._tmp.cleanup()

    async def _recv_into(self, sock: socket.socket, view: memoryview) -> None:
        loop = asyncio.get_running_loop()
        while view.nbytes:
            n = await loop.sock_recv_into(sock, view)
            if n == 0:
                raise ConnectionError("the raw baseline server closed the connection")
            view = view[n:]

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        loop = asyncio.get_running_loop()
        sock = await self._free.get()
        try:
            ack = memoryview(bytearray(1))
            for slot, src in zip(slots, srcs, strict=True):
                await loop.sock_sendall(sock, _CMD.pack(b"P", slot, src.nbytes))
                await loop.sock_sendall(sock, memoryview(src).cast("B"))
            for _ in slots:
                await self._recv_into(sock, ack)
        finally:
            self._free.put_nowait(sock)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        loop = asyncio.get_running_loop()
        sock = await self._free.get()
        try:
            await loop.sock_sendall(
                sock, b"".join(_CMD.pack(b"G", slot, d.nbytes) for slot, d in zip(slots, dsts, strict=True))
            )
            for d in dsts:
                await self._recv_into(sock, memoryview(d).cast("B"))
        finally:
            self._free.put_nowait(sock)
        return [d.nbytes for d in dsts]


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The baseline for an lm:// or lm+unix:// backend (built, not opened)."""
    from lmcache.server.client import LMServerBackend
    from lmcache.server.shm import shm_available

    if not isinstance(backend, LMServerBackend):
        return None
    s = backend.settings
    unix = backend.url.startswith("lm+unix:")
    local = unix or s.host in ("127.0.0.1", "localhost", "::1") or s.host.startswith("127.")
    if s.shm and local and shm_available():
        return ShmMemcpyBaseline(workload)
    return RawSocketBaseline(workload, unix=unix)
