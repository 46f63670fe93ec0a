"""The reserve/commit/lease index over one pool: which key owns which block, and who uses it.

Every in-memory store in lmcache keeps values in one preallocated pool and lets a value be
written or read *in place* by someone other than the index's owner: a socket ``recv`` or a
same-host client filling a block (the cache server), a one-sided NIXL transfer (the nixl peer),
or a plain copy (``memory://``). :class:`LeasedIndex` is that bookkeeping, once:

* :meth:`LeasedIndex.reserve` hands out a :class:`Reservation`: a block the caller fills; the key
  reads as absent until :meth:`~LeasedIndex.commit` publishes it (or :meth:`~LeasedIndex.abort`
  drops it). Each reservation is settled once; settling it again does nothing.
* :meth:`LeasedIndex.lease` hands out a :class:`Lease` on a published value: its block is not
  reused while the lease is held, even if the key is deleted meanwhile (the last user frees
  it). Each lease is released once; releasing it again does nothing.
* A block whose key is gone is freed when its last user is done: no reader ever copies bytes a
  later writer put into reused space, and no writer's bytes land in a block handed to another key.

Handles carry the block's ``offset``, ``nbytes`` and a caller-defined ``tag`` (the nixl peer keeps
a frame's header length there); the memory itself belongs to the caller (see
:func:`lmcache.pool.map_pool`). Not thread safe: use an index from one thread (an event loop).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

from lmcache.pool.allocator import ALIGNMENT, BlockAllocator, round_up

__all__ = ["Block", "LeasedIndex", "Lease", "Refused", "Reservation"]

K = TypeVar("K", bound=Hashable)


class Refused(str, enum.Enum):
    """Why :meth:`LeasedIndex.reserve` gave no block (the values are the server's wire words)."""

    EXISTS = "exists"  #: the key is published: a put of it is a no-op
    BUSY = "busy"  #: another reservation of the key is being filled
    FULL = "full"  #: no free block fits (the pool is full or fragmented)
    TOO_LARGE = "too_large"  #: larger than the whole pool


class _Entry:
    """One block and its users (private: callers hold :class:`Block` handles)."""

    __slots__ = ("dead", "epoch", "nbytes", "offset", "readers", "ready", "tag", "waiter", "writing")

    def __init__(self, offset: int, nbytes: int, tag: int, epoch: int) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.tag = tag
        self.epoch = epoch  # the index generation it was allocated in (clear() starts a new one)
        self.ready = False  # committed and published
        self.writing = True  # reserved and not yet settled: the writer owns the bytes
        self.readers = 0  # leases held
        self.dead = False  # no key points at it any more: freed by its last user
        self.waiter: asyncio.Future[None] | None = None  # made only when someone waits for it


class Block(Generic[K]):
    """A handle on one block of the pool: ``key``, ``offset``, ``nbytes`` and ``tag``."""

    __slots__ = ("_entry", "key", "nbytes", "offset", "tag")

    def __init__(self, key: K, entry: _Entry) -> None:
        self.key = key
        self.offset = entry.offset
        self.nbytes = entry.nbytes
        self.tag = entry.tag
        self._entry: _Entry | None = entry  # None once settled or released

    @property
    def live(self) -> bool:
        """True until the reservation is settled or the lease released."""
        return self._entry is not None

    def __repr__(self) -> str:
        state = "live" if self._entry is not None else "done"
        return f"{type(self).__name__}({self.key!r}, offset={self.offset}, nbytes={self.nbytes}, {state})"


class Reservation(Block[K]):
    """A block reserved for ``key``, to be filled in place and then committed or aborted once."""

    __slots__ = ()


class Lease(Block[K]):
    """A published value's block, pinned against reuse until released (once)."""

    __slots__ = ()


class LeasedIndex(Generic[K]):
    """Keys to blocks of one pool, with reservations and leases; see the module docstring.

    Args:
        capacity: Pool bytes (rounded up to ``alignment``: :attr:`capacity` is the result).
        alignment: Block alignment (a power of two).
    """

    def __init__(self, capacity: int, alignment: int = ALIGNMENT) -> None:
        self.capacity = round_up(capacity, alignment)
        self.alignment = alignment
        self.allocator = BlockAllocator(self.capacity, alignment)
        self._map: dict[K, _Entry] = {}  # published values and open reservations
        self._entries = 0  # published values
        self._epoch = 0

    # -- writing in place --------------------------------------------------------------------

    def reserve(self, key: K, nbytes: int, tag: int = 0) -> Reservation[K] | Refused:
        """A block of ``nbytes`` for ``key`` to be filled in place, or why there is none."""
        e = self._map.get(key)
        if e is not None:
            return Refused.EXISTS if e.ready else Refused.BUSY
        if nbytes > self.capacity:
            return Refused.TOO_LARGE
        offset = self.allocator.alloc(nbytes)
        if offset is None:
            return Refused.FULL
        entry = _Entry(offset, nbytes, tag, self._epoch)
        self._map[key] = entry  # not ready: readers miss, a second reservation is BUSY
        return Reservation(key, entry)

    def commit(self, res: Reservation[K]) -> bool:
        """Publish a filled reservation; False when its key was deleted (or cleared) meanwhile.

        A reservation that is no longer live (settled before) is left alone and gives False.
        """
        e = res._entry
        if e is None:
            return False
        res._entry = None
        e.writing = False
        if self._map.get(res.key) is e:
            e.ready = True
            self._entries += 1
            ok = True
        else:  # deleted while being written: its bytes are free now that the writer is done
            e.dead = True
            self._maybe_free(e)
            ok = False
        self._wake(e)
        return ok

    def abort(self, res: Reservation[K]) -> None:
        """Drop a reservation and free its block (a reservation no longer live is left alone)."""
        e = res._entry
        if e is None:
            return
        res._entry = None
        e.writing = False
        if self._map.get(res.key) is e:
            del self._map[res.key]
        e.dead = True
        self._maybe_free(e)
        self._wake(e)

    def reserved(self, key: K) -> bool:
        """True while ``key`` has an open (unsettled) reservation."""
        e = self._map.get(key)
        return e is not None and not e.ready

    async def settled(self, key: K) -> None:
        """Wait until ``key`` has no open reservation (committed, aborted or deleted)."""
        while (e := self._map.get(key)) is not None and not e.ready:
            if e.waiter is None:
                e.waiter = asyncio.get_running_loop().create_future()
            # wait() rather than awaiting the future: our cancellation must not cancel theirs.
            await asyncio.wait([e.waiter])

    # -- reading in place --------------------------------------------------------------------

    def lease(self, key: K) -> Lease[K] | None:
        """Pin a published value's block; None on a miss. Release it once with :meth:`release`."""
        e = self._map.get(key)
        if e is None or not e.ready:
            return None
        e.readers += 1
        return Lease(key, e)

    def release(self, lease: Lease[K]) -> None:
        """Give a lease back (a lease no longer live is left alone)."""
        e = lease._entry
        if e is None:
            return
        lease._entry = None
        e.readers -= 1
        self._maybe_free(e)

    # -- the rest of the index ---------------------------------------------------------------

    def contains(self, key: K) -> bool:
        """True when ``key`` is published."""
        e = self._map.get(key)
        return e is not None and e.ready

    def delete(self, key: K, *, cancel_reservation: bool = False) -> bool:
        """Unlink ``key``; its block is freed once no lease or writer uses it.

        Args:
            key: The key.
            cancel_reservation: Also unlink an open reservation (its commit then publishes
                nothing). Without it a delete leaves reservations alone, so a put still being
                filled publishes after the delete (it is ordered after it).

        Returns:
            True when something was unlinked.
        """
        e = self._map.get(key)
        if e is None or not (e.ready or cancel_reservation):
            return False
        del self._map[key]
        if e.ready:
            self._entries -= 1
        e.dead = True
        self._maybe_free(e)
        self._wake(e)
        return True

    def items(self) -> Iterator[tuple[K, int, int]]:
        """``(key, nbytes, tag)`` of every published value (a snapshot: mutate freely)."""
        return iter([(k, e.nbytes, e.tag) for k, e in self._map.items() if e.ready])

    def clear(self) -> None:
        """Forget every key and block at once (the pool is going away).

        Handles from before stay safe to settle or release: their blocks belong to the old
        generation and are never freed into the new one.
        """
        waiting = [e for e in self._map.values() if e.waiter is not None]
        self._map.clear()
        self._entries = 0
        self._epoch += 1
        self.allocator = BlockAllocator(self.capacity, self.alignment)
        for e in waiting:
            self._wake(e)

    @property
    def entries(self) -> int:
        """Published values."""
        return self._entries

    @property
    def used(self) -> int:
        """Bytes in blocks (published, reserved, and unlinked but still in use)."""
        return self.allocator.used

    # -- internals ---------------------------------------------------------------------------

    def _maybe_free(self, e: _Entry) -> None:
        if e.dead and not e.readers and not e.writing and e.epoch == self._epoch:
            e.epoch = -1  # freed: never twice
            self.allocator.free(e.offset, e.nbytes)

    @staticmethod
    def _wake(e: _Entry) -> None:
        if e.waiter is not None:
            e.waiter.set_result(None)
            e.waiter = None
