"""The store behind ``nixl://host:port``: a registered DRAM pool, an index, and the control server.

Run it as ``python -m lmcache.backends.nixl.peer --port 7400 --capacity 8GiB`` (``--host``
defaults to 127.0.0.1; ``--prefault`` populates the pool at start). The peer allocates one pool
of ``capacity`` bytes (huge pages where the kernel gives them), registers it with a NIXL agent
(UCX, whose progress thread sleeps until there is work), and serves the control protocol of
:mod:`lmcache.backends.nixl.wire` over TCP. Values never travel over that socket: clients move
the bytes themselves with one-sided NIXL transfers between their own registered buffers and the
pool; the peer only decides where (reserve, commit, lookup with leases, release, delete).

Values are stored as :mod:`lmcache.serde.frame` frames written by the client (the peer never
decodes payloads; checksums are checked by the reading client). The peer is bounded: a full pool
refuses reservations; it never evicts (eviction is the job of
:class:`~lmcache.tiered.TieredBackend` on the client side).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import itertools
import logging
import mmap
import os
import signal
import struct
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from lmcache.backends.memory import MemoryBackend
from lmcache.backends.nixl.sdk import make_agent
from lmcache.backends.nixl.wire import (
    HIT,
    MISS,
    RESERVED,
    U32,
    U64,
    Op,
    ProtocolError,
    Reader,
    Status,
    pack_key,
    pack_message,
    read_message,
)
from lmcache.config import parse_size

__all__ = ["ALIGN", "PeerStore", "main", "map_pool", "serve"]

logger = logging.getLogger(__name__)

#: Pool allocations are aligned to this (frames are 64-byte aligned themselves).
ALIGN = 64


# ---------------------------------------------------------------------------------------------
# The store: allocator + index (event-loop thread only)


@dataclasses.dataclass(eq=False)
class _Entry:
    key: bytes
    offset: int
    frame_len: int
    header_len: int
    lease_id: int
    committed: bool = False
    dead: bool = False  # deleted or aborted: freed once no reader or writer uses its bytes
    leases: int = 0  # readers between LOOKUP and RELEASE
    writing: bool = False  # reserved, not yet committed
    freed: bool = False


class _Allocator:
    """First-fit allocation of aligned extents in ``[0, size)``, with coalescing frees."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._starts: list[int] = [0] if size else []
        self._lens: dict[int, int] = {0: size} if size else {}
        self.used = 0

    def alloc(self, n: int) -> int | None:
        n = -(-n // ALIGN) * ALIGN
        for start in self._starts:
            length = self._lens[start]
            if length >= n:
                i = bisect.bisect_left(self._starts, start)
                del self._starts[i]
                del self._lens[start]
                if length > n:
                    bisect.insort(self._starts, start + n)
                    self._lens[start + n] = length - n
                self.used += n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        n = -(-n // ALIGN) * ALIGN
        self.used -= n
        i = bisect.bisect_left(self._starts, start)
        # Merge with the following extent, then with the preceding one.
        if i < len(self._starts) and self._starts[i] == start + n:
            n += self._lens.pop(self._starts[i])
            del self._starts[i]
        if i > 0 and self._starts[i - 1] + self._lens[self._starts[i - 1]] == start:
            prev = self._starts[i - 1]
            self._lens[prev] += n
            return
        self._starts.insert(i, start)
        self._lens[start] = n


class PeerStore:
    """The index and allocator of one peer; every method runs on the event loop thread.

    Args:
        capacity: Pool bytes.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._alloc = _Allocator(capacity)
        self._index: dict[bytes, _Entry] = {}  # committed entries
        self._pending: dict[bytes, _Entry] = {}  # reserved, not yet committed
        self._leased: dict[int, _Entry] = {}
        self._ids = itertools.count(1)

    @property
    def used(self) -> int:
        """Bytes allocated (committed, pending and dead-but-leased values)."""
        return self._alloc.used

    @property
    def entries(self) -> int:
        """Committed values."""
        return len(self._index)

    def reserve(self, key: bytes, frame_len: int, header_len: int) -> tuple[int, _Entry | None]:
        """``(Status, entry)``: a pending entry to write, or why not."""
        if key in self._index or key in self._pending:
            return Status.EXISTS, None
        if frame_len > self.capacity:
            return Status.TOO_LARGE, None
        offset = self._alloc.alloc(frame_len)
        if offset is None:
            return Status.CAPACITY, None
        entry = _Entry(key, offset, frame_len, header_len, next(self._ids))
        entry.writing = True  # its space is the writer's until commit, even if deleted meanwhile
        self._pending[key] = entry
        return Status.OK, entry

    def commit(self, entry: _Entry, ok: bool) -> None:
        """Publish a pending entry (``ok``) or give its space back."""
        entry.writing = False
        if self._pending.get(entry.key) is entry:
            del self._pending[entry.key]
            if ok:
                entry.committed = True
                self._index[entry.key] = entry
                return
            entry.dead = True
        self._maybe_free(entry)  # aborted, or deleted while it was being written

    def lookup(self, key: bytes) -> _Entry | None:
        """A committed entry with a lease taken (release it with :meth:`release`)."""
        entry = self._index.get(key)
        if entry is not None:
            entry.leases += 1
            self._leased[entry.lease_id] = entry
        return entry

    def release(self, lease_id: int) -> None:
        """Drop one lease taken by :meth:`lookup`."""
        entry = self._leased.get(lease_id)
        if entry is None:
            return
        entry.leases -= 1
        if entry.leases == 0:
            del self._leased[lease_id]
            self._maybe_free(entry)

    def contains(self, key: bytes) -> bool:
        return key in self._index

    def delete(self, key: bytes) -> None:
        entry = self._index.pop(key, None) or self._pending.pop(key, None)
        if entry is not None:
            entry.dead = True
            self._maybe_free(entry)

    def _maybe_free(self, entry: _Entry) -> None:
        # A dead entry's bytes may still be in use: a reader copying them out (lease) or a writer
        # whose transfer into them is in flight. Reusing them then would hand one value's bytes
        # to another key; they are freed when the last user is done.
        if entry.dead and not entry.leases and not entry.writing and not entry.freed:
            entry.freed = True
            self._alloc.free(entry.offset, entry.frame_len)

    def items(self) -> Iterator[_Entry]:
        return iter(list(self._index.values()))

    def get_committed(self, key: bytes) -> _Entry | None:
        return self._index.get(key)


# ---------------------------------------------------------------------------------------------
# The server


class _Peer:
    def __init__(self, store: PeerStore, pool: memoryview, pool_addr: int, metadata: bytes, debug_ops: bool) -> None:
        self.store = store
        self.pool = pool
        self.pool_addr = pool_addr
        self.metadata = metadata
        self.debug_ops = debug_ops

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: dict[int, list[_Entry]] = {}  # this connection's reservations, by group
        leases: list[int] = []  # this connection's lease ids (one per lookup hit)
        try:
            while True:
                try:
                    op, req_id, body = await read_message(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                try:
                    reply = self.dispatch(op, body, pending, leases)
                except ProtocolError as exc:
                    writer.write(pack_message(Op.ERROR, req_id, str(exc).encode()))
                    await writer.drain()
                    return
                if reply is not None:
                    writer.write(pack_message(op, req_id, reply))
                    await writer.drain()
        except ProtocolError as exc:
            logger.warning("nixl peer: closing a connection after a protocol error: %s", exc)
        except ConnectionError:
            pass
        finally:
            for group in pending.values():
                for entry in group:
                    self.store.commit(entry, ok=False)
            for lease in leases:
                self.store.release(lease)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def dispatch(self, op: int, body: bytes, pending: dict[int, list[_Entry]], leases: list[int]) -> bytes | None:
        r = Reader(body)
        s = self.store
        if op == Op.HELLO:
            r.end()
            return U64.pack(self.pool_addr) + U64.pack(len(self.pool)) + U32.pack(len(self.metadata)) + self.metadata
        if op == Op.RESERVE:
            group_id = r.u64()
            n = r.count()
            items = [(r.key(), r.u64(), r.u32()) for _ in range(n)]
            r.end()
            if group_id in pending:
                raise ProtocolError(f"reservation group {group_id} is already open")
            group: list[_Entry] = []
            out = [U32.pack(n)]
            for key, frame_len, header_len in items:
                if header_len > frame_len:
                    for entry in group:
                        s.commit(entry, ok=False)
                    raise ProtocolError("a frame's header is longer than the frame")
                status, entry = s.reserve(key, frame_len, header_len)
                if entry is not None:
                    group.append(entry)
                out.append(RESERVED.pack(status, entry.offset if entry else 0))
            if group:
                pending[group_id] = group
            return b"".join(out)
        if op == Op.COMMIT:
            group_id = r.u64()
            ok = r.u8()
            r.end()
            for entry in pending.pop(group_id, ()):
                s.commit(entry, bool(ok))
            return b""
        if op == Op.LOOKUP:
            keys = r.keys()
            r.end()
            out = [U32.pack(len(keys))]
            for key in keys:
                entry = s.lookup(key)
                if entry is None:
                    out.append(MISS)
                else:
                    leases.append(entry.lease_id)
                    out.append(HIT.pack(1, entry.lease_id, entry.offset, entry.frame_len, entry.header_len))
            return b"".join(out)
        if op == Op.RELEASE:
            n = r.count()
            ids = [r.u64() for _ in range(n)]
            r.end()
            for lease in ids:
                if lease in leases:  # a connection releases only leases it holds
                    leases.remove(lease)
                    s.release(lease)
            return None  # fire and forget: the client does not wait
        if op == Op.CONTAINS:
            keys = r.keys()
            r.end()
            return bytes(1 if s.contains(k) else 0 for k in keys)
        if op == Op.DELETE:
            keys = r.keys()
            r.end()
            for key in keys:
                s.delete(key)  # a pending entry is dropped at its commit
            return b""
        if op == Op.LIST:
            r.end()
            entries = list(s.items())
            return U32.pack(len(entries)) + b"".join(
                pack_key(e.key) + U64.pack(e.frame_len - e.header_len) for e in entries
            )
        if op == Op.STATS:
            r.end()
            return struct.pack("<QQQ", s.capacity, s.used, s.entries)
        if op == Op.PING:
            r.end()
            return b""
        if op == Op.CORRUPT and self.debug_ops:
            key = r.key()
            r.end()
            entry = s.get_committed(key)
            if entry is None:
                return b"\x00"
            self.pool[entry.offset + entry.frame_len - 1] ^= 0x01
            return b"\x01"
        raise ProtocolError(f"unknown operation {op}")


def map_pool(capacity: int, prefault: bool) -> mmap.mmap:
    """The pool: private anonymous memory, on huge pages where the kernel gives them (best effort).

    Transfers into pages never touched take a page fault each (a first fill ran at ~0.3-0.4
    GB/s here, with or without huge pages, against ~10-12 GB/s once mapped), so ``prefault``
    populates it all now: it commits the whole capacity as resident memory.
    """
    # Private: the default (shared) anonymous mapping is shmem, which gets no transparent huge
    # pages unless shmem THP is enabled; on 4 KiB pages UCX's CMA copies ran ~1.7x slower.
    pool_map = mmap.mmap(-1, max(capacity, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):
            pool_map.madvise(mmap.MADV_HUGEPAGE)
    if prefault:
        MemoryBackend._populate(pool_map)  # memory://'s prefault: also falls back on old kernels
    return pool_map


async def serve(
    host: str,
    port: int,
    capacity: int,
    *,
    debug_ops: bool = False,
    prefault: bool = False,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a peer until cancelled (or SIGTERM/SIGINT when run as a program)."""
    pool_map = map_pool(capacity, prefault)
    pool = memoryview(pool_map)[:capacity]
    addr = int(np.frombuffer(pool_map, dtype=np.uint8).ctypes.data) if capacity else 0
    # A progress thread, since transfers to and from the pool need one on transports the peer
    # takes part in (UCX over TCP); it sleeps until the worker has an event, so an idle peer
    # costs no CPU (NIXL's default poll would take a whole core).
    agent = make_agent(f"lmcache-nixl-peer-{os.getpid()}-{port}", ["UCX"], True)
    reg = agent.register_memory([(addr, max(capacity, 1), 0, "")], "DRAM")  # type: ignore[attr-defined]
    metadata = agent.get_agent_metadata()  # type: ignore[attr-defined]
    peer = _Peer(PeerStore(capacity), pool, addr, metadata, debug_ops)
    server = await asyncio.start_server(peer.handle, host, port, limit=1 << 20)
    logger.info("nixl peer: serving %d bytes on %s:%d", capacity, host, port)
    print(f"lmcache nixl peer ready on {host}:{port} ({capacity} bytes)", flush=True)
    if ready is not None:
        ready.set()
    try:
        async with server:
            await server.serve_forever()
    finally:
        agent.deregister_memory(reg)  # type: ignore[attr-defined]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m lmcache.backends.nixl.peer``."""
    p = argparse.ArgumentParser(prog="python -m lmcache.backends.nixl.peer", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="control address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, required=True, help="control TCP port")
    p.add_argument("--capacity", default="1GiB", help="pool bytes, e.g. 8GiB (default 1GiB)")
    p.add_argument(
        "--prefault", action="store_true", help="populate the whole pool at start (resident memory; fast first fill)"
    )
    p.add_argument("--debug-ops", action="store_true", help="enable the CORRUPT op (tests only)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    capacity = parse_size(args.capacity)

    async def run() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        with contextlib.suppress(asyncio.CancelledError):
            await serve(args.host, args.port, capacity, debug_ops=args.debug_ops, prefault=args.prefault)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
