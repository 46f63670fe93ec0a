"""The store behind ``nixl://host:port``: a registered DRAM pool, an index, and the control server.

Run it as ``python -m lmcache.backends.nixl.peer --port 7400 --capacity 8GiB`` (``--host``
defaults to 127.0.0.1; ``--prefault`` populates the pool at start). The peer allocates one pool
of ``capacity`` bytes (huge pages where the kernel gives them), registers it with a NIXL agent
(UCX, whose progress thread sleeps until there is work), and serves the control protocol of
:mod:`lmcache.backends.nixl.wire` over TCP. Values never travel over that socket: clients move
the bytes themselves with one-sided NIXL transfers between their own registered buffers and the
pool; the peer only decides where (reserve, commit, lookup with leases, release, delete). The
pool, its allocator and its reserve/commit/lease index are :mod:`lmcache.pool`'s, as for
``memory://`` and the cache server's tier 0.

Values are stored as :mod:`lmcache.serde.frame` frames written by the client (the peer never
decodes payloads; checksums are checked by the reading client). The peer is bounded: a full pool
refuses reservations; it never evicts (eviction is the job of
:class:`~lmcache.tiered.TieredBackend` on the client side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import mmap
import os
import signal
import struct
import sys
from collections.abc import Iterator, Sequence

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
from lmcache.pool import ALIGNMENT, Lease, LeasedIndex, PoolMapping, Refused, Reservation
from lmcache.pool import map_pool as _map_pool

__all__ = ["ALIGN", "PeerStore", "main", "map_peer_pool", "map_pool", "serve"]

logger = logging.getLogger(__name__)

#: Pool allocations are aligned to this (frames are 64-byte aligned themselves).
ALIGN = ALIGNMENT


# ---------------------------------------------------------------------------------------------
# The store: lmcache.pool's index over the pool (event-loop thread only)

# Why the pool refused a reservation, in the control protocol's words (a key being written
# already counts as held: a second writer of an immutable value has nothing to add).
_REFUSED = {
    Refused.EXISTS: Status.EXISTS,
    Refused.BUSY: Status.EXISTS,
    Refused.FULL: Status.CAPACITY,
    Refused.TOO_LARGE: Status.TOO_LARGE,
}


class PeerStore:
    """The index of one peer's pool (a :class:`~lmcache.pool.LeasedIndex` keyed by wire keys).

    Each entry's ``tag`` is its frame's header length. A delete also cancels a reservation
    whose transfer is in flight: its bytes stay the writer's until the commit, which then
    publishes nothing. Every method runs on the event loop thread.

    Args:
        capacity: Pool bytes (rounded up to :data:`ALIGN`; :attr:`capacity` is the result).
    """

    def __init__(self, capacity: int) -> None:
        self._index: LeasedIndex[bytes] = LeasedIndex(capacity, ALIGN)
        self.capacity = self._index.capacity

    @property
    def used(self) -> int:
        """Bytes allocated (committed, pending and dead-but-leased values)."""
        return self._index.used

    @property
    def entries(self) -> int:
        """Committed values."""
        return self._index.entries

    def reserve(self, key: bytes, frame_len: int, header_len: int) -> tuple[int, Reservation[bytes] | None]:
        """``(Status, reservation)``: a block to write, or why not."""
        res = self._index.reserve(key, frame_len, header_len)
        if isinstance(res, Reservation):
            return Status.OK, res
        return _REFUSED[res], None

    def commit(self, reservation: Reservation[bytes], ok: bool) -> None:
        """Publish a written reservation (``ok``) or give its space back."""
        if ok:
            self._index.commit(reservation)  # False: deleted while written, and freed
        else:
            self._index.abort(reservation)

    def lookup(self, key: bytes) -> Lease[bytes] | None:
        """A committed value with a lease taken (give it back with :meth:`release`)."""
        return self._index.lease(key)

    def release(self, lease: Lease[bytes]) -> None:
        """Drop a lease taken by :meth:`lookup` (once; again is a no-op)."""
        self._index.release(lease)

    def contains(self, key: bytes) -> bool:
        """True when ``key`` is committed."""
        return self._index.contains(key)

    def delete(self, key: bytes) -> None:
        """Unlink ``key``, committed or still being written (freed when its users are done)."""
        self._index.delete(key, cancel_reservation=True)

    def items(self) -> Iterator[tuple[bytes, int, int]]:
        """``(key, frame length, header length)`` of every committed value (a snapshot)."""
        return self._index.items()


# ---------------------------------------------------------------------------------------------
# The server


class _Peer:
    def __init__(self, store: PeerStore, pool: memoryview, pool_addr: int, metadata: bytes, debug_ops: bool) -> None:
        self.store = store
        self.pool = pool
        self.pool_addr = pool_addr
        self.metadata = metadata
        self.debug_ops = debug_ops
        self._lease_ids = itertools.count(1)  # one id per lookup hit, unique on this peer

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pending: dict[int, list[Reservation[bytes]]] = {}  # this connection's reservations, by group
        leases: dict[int, Lease[bytes]] = {}  # this connection's leases, by id (one per lookup hit)
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
            for lease in leases.values():
                self.store.release(lease)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def dispatch(
        self, op: int, body: bytes, pending: dict[int, list[Reservation[bytes]]], leases: dict[int, Lease[bytes]]
    ) -> bytes | None:
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
            group: list[Reservation[bytes]] = []
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
                lease = s.lookup(key)
                if lease is None:
                    out.append(MISS)
                else:
                    lease_id = next(self._lease_ids)
                    leases[lease_id] = lease
                    out.append(HIT.pack(1, lease_id, lease.offset, lease.nbytes, lease.tag))
            return b"".join(out)
        if op == Op.RELEASE:
            n = r.count()
            ids = [r.u64() for _ in range(n)]
            r.end()
            for lease_id in ids:
                held = leases.pop(lease_id, None)  # a connection releases only leases it holds
                if held is not None:
                    s.release(held)
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
                pack_key(key) + U64.pack(frame_len - header_len) for key, frame_len, header_len in entries
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
            lease = s.lookup(key)
            if lease is None:
                return b"\x00"
            self.pool[lease.offset + lease.nbytes - 1] ^= 0x01
            s.release(lease)
            return b"\x01"
        raise ProtocolError(f"unknown operation {op}")


def map_peer_pool(capacity: int, prefault: bool) -> PoolMapping:
    """The peer's pool: private anonymous memory on huge pages where the kernel gives them.

    Private, since the default (shared) anonymous mapping is shmem, which gets no transparent
    huge pages unless shmem THP is enabled; on 4 KiB pages UCX's CMA copies ran ~1.7x slower.
    Transfers into pages never touched take a page fault each (a first fill ran at ~0.3-0.4
    GB/s here, against ~10-12 GB/s once mapped), so ``prefault`` populates it all now: it
    commits the whole capacity as resident memory.
    """
    return _map_pool(capacity, shared=False, hugepages=True, prefault=prefault, owner="nixl peer")


def map_pool(capacity: int, prefault: bool) -> mmap.mmap:
    """The mapping of :func:`map_peer_pool` alone (for processes that only hold such a pool)."""
    return map_peer_pool(capacity, prefault).mm


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
    store = PeerStore(capacity)
    mapping = map_peer_pool(store.capacity, prefault)
    pool = mapping.view[: store.capacity]
    addr = mapping.address if store.capacity else 0
    # A progress thread, since transfers to and from the pool need one on transports the peer
    # takes part in (UCX over TCP); it sleeps until the worker has an event, so an idle peer
    # costs no CPU (NIXL's default poll would take a whole core).
    agent = make_agent(f"lmcache-nixl-peer-{os.getpid()}-{port}", ["UCX"], True)
    reg = agent.register_memory([(addr, max(store.capacity, 1), 0, "")], "DRAM")  # type: ignore[attr-defined]
    metadata = agent.get_agent_metadata()  # type: ignore[attr-defined]
    peer = _Peer(store, pool, addr, metadata, debug_ops)
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
        mapping.close()


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
