"""One pool for every in-memory store: ``memory://``, the cache server's tier 0, the nixl peer.

* :mod:`lmcache.pool.allocator`: :class:`BlockAllocator`, best fit over aligned blocks.
* :mod:`lmcache.pool.index`: :class:`LeasedIndex`, keys to blocks with typed
  :class:`Reservation` (reserve, then commit or abort) and :class:`Lease` (lease, then release)
  handles, so a value can be written or read in place by a socket, another process or a NIXL
  transfer without ever being reused under it.
* :mod:`lmcache.pool.mapping`: :func:`map_pool`, the pool's memory (private or ``/dev/shm``,
  huge pages, prefault).
* :mod:`lmcache.pool.inplace`: :class:`InPlaceTier`, the protocol a tier offers when values can be
  written and read in place (what the cache server's fast path uses).

This package imports nothing above ``lmcache.errors``, ``lmcache.config`` and ``lmcache.keys``:
backends and the server build on it, never the other way round.
"""

from __future__ import annotations

from lmcache.pool.allocator import ALIGNMENT, BlockAllocator, round_up
from lmcache.pool.index import Block, Lease, LeasedIndex, Refused, Reservation
from lmcache.pool.inplace import InPlaceTier, OffersInPlace, SharedPoolInfo
from lmcache.pool.mapping import PoolMapping, available_memory, map_pool, populate, prefault

__all__ = [
    "ALIGNMENT",
    "Block",
    "BlockAllocator",
    "InPlaceTier",
    "LeasedIndex",
    "Lease",
    "OffersInPlace",
    "PoolMapping",
    "Refused",
    "Reservation",
    "SharedPoolInfo",
    "available_memory",
    "map_pool",
    "populate",
    "prefault",
    "round_up",
]
