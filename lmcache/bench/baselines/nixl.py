"""Raw NIXL baseline for ``lmcache bench backend --url nixl://host:port``.

The baseline is what an application would do with the NIXL SDK alone, against the same peer
process and the same transport (UCX): it reserves one extent of ``count * value_size`` bytes in
the peer's pool once (one control round trip at open), registers the workload's whole source and
destination arrays with its own NIXL agent once, and then every batch is a single one-sided
WRITE (put) or READ (get) of the batch's slots between those registered arrays and the extent,
with the same number of batches in flight, and an agent configured like the backend's (the
``progress_thread`` and ``ucx_workers`` options). It skips everything lmcache adds on top: per-batch
control messages (reserve/commit, lookup/release), per-batch registration of the caller's
buffers, the frame header and its xxh3 checksum (computed on put, verified on get). Its agent
comes from :meth:`lmcache.backends.nixl.NixlBackend.make_agent`; it moves its bytes with the
same SDK calls as the backend (:mod:`lmcache.backends.nixl.sdk`) and speaks the peer's protocol
through :mod:`lmcache.backends.nixl.wire`.

Registered for :class:`~lmcache.backends.nixl.NixlBackend` (every scheme it serves) in
:data:`lmcache.bench.baselines.BUILTIN_BASELINES`; importing this module registers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.backends.buffers import buffer_address
from lmcache.backends.nixl import wire
from lmcache.backends.nixl.sdk import transfer
from lmcache.bench.baselines.base import Baseline
from lmcache.errors import BackendUnavailableError

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawNixlBaseline", "make"]


class RawNixlBaseline(Baseline):
    """One NIXL WRITE/READ per batch between pre-registered arrays and one reserved peer extent."""

    name = "raw-nixl"

    def __init__(self, backend: Any, workload: Workload) -> None:
        self._backend = backend
        self._settings = backend.settings
        self._workload = workload
        self._executor: ThreadPoolExecutor | None = None
        self._agent: Any = None
        self._remote = ""
        self._regs: list[Any] = []
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._key = f"lmcache-bench-baseline/{os.getpid()}/{secrets.token_hex(6)}".encode()
        self._base = 0  # address of the reserved extent in the peer
        self._req = 0

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "peer": f"{self._settings.host}:{self._settings.port}",
            "threads": self._workload.concurrency,
        }

    async def _call(self, op: int, body: bytes) -> bytes:
        assert self._reader is not None and self._writer is not None
        self._req += 1
        self._writer.write(wire.pack_message(op, self._req, body))
        await self._writer.drain()
        reply_op, _id, reply = await wire.read_message(self._reader)
        if reply_op == wire.Op.ERROR:
            raise BackendUnavailableError(f"raw nixl baseline: the peer refused {op}: {reply.decode(errors='replace')}")
        return reply

    async def open(self) -> None:
        s = self._settings
        w = self._workload
        self._executor = ThreadPoolExecutor(max(1, w.concurrency), thread_name_prefix="lmcache-bench-nixl")
        loop = asyncio.get_running_loop()
        # An agent configured by the backend (progress thread, UCX workers): the two share this
        # process, and the same SDK settings are what an application would choose.
        name = f"lmcache-bench-nixl-{os.getpid()}-{secrets.token_hex(3)}"
        self._agent = await loop.run_in_executor(self._executor, self._backend.make_agent, name)
        self._reader, self._writer = await asyncio.open_connection(s.host, s.port)
        r = wire.Reader(await self._call(wire.Op.HELLO, b""))
        pool_addr, _pool_len, metadata = r.u64(), r.u64(), r.blob()
        name = await loop.run_in_executor(self._executor, self._agent.add_remote_agent, metadata)
        self._remote = name.decode() if isinstance(name, bytes) else str(name)
        total = w.count * w.value_size
        body = struct.pack("<QI", 1, 1) + wire.pack_key(self._key) + struct.pack("<QI", total, 0)
        status, offset = wire.RESERVED.unpack_from(await self._call(wire.Op.RESERVE, body), wire.U32.size)
        if status != wire.Status.OK:
            raise BackendUnavailableError(f"raw nixl baseline: the peer has no room for {total} bytes")
        await self._call(wire.Op.COMMIT, struct.pack("<QB", 1, 1))
        self._base = pool_addr + offset
        for arr in (w.srcs, w.dsts):
            reg = await loop.run_in_executor(
                self._executor, self._agent.register_memory, [(buffer_address(arr), arr.nbytes, 0, "")], "DRAM"
            )
            self._regs.append(reg)

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await self._call(wire.Op.DELETE, wire.pack_keys([self._key]))
            self._writer.close()
            self._writer = self._reader = None
        if self._executor is not None:
            for reg in self._regs:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._executor, self._agent.deregister_memory, reg)
            self._regs = []
            if self._remote:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(self._executor, self._agent.remove_remote_agent, self._remote)
            self._executor.shutdown(wait=True)
            self._executor = None
        self._agent = None

    async def _move(self, op: str, slots: range, bufs: Sequence[np.ndarray]) -> None:
        vs = self._workload.value_size
        local = [(buffer_address(b), vs, 0) for b in bufs]
        remote = [(self._base + slot * vs, vs, 0) for slot in slots]
        await asyncio.get_running_loop().run_in_executor(
            self._executor,
            lambda: transfer(
                self._agent,
                op,
                local=local,
                local_type="DRAM",
                remote=remote,
                remote_type="DRAM",
                remote_agent=self._remote,
                timeout=self._settings.timeout,
            ),
        )

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        await self._move("WRITE", slots, srcs)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        await self._move("READ", slots, dsts)
        return [self._workload.value_size] * len(slots)


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The raw baseline for a ``nixl://host:port`` backend (None for ``nixl+posix://`` and others)."""
    from lmcache.backends.nixl import NixlBackend

    if not isinstance(backend, NixlBackend):
        return None
    return RawNixlBaseline(backend, workload)
