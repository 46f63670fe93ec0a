"""``InPlaceTier``: the capability of a tier whose values can be written and read where they lie.

A tier that keeps values in one pool of memory can let its owner skip a copy: receive a value
from a socket straight into a reserved block, send a hit straight from its block, or let a
same-host client copy in and out of a shared pool itself. The cache server's fast path needs
exactly that and nothing more, so it is a small protocol rather than a concrete class the server
imports (``memory://`` offers it; :meth:`lmcache.tiered.TieredBackend.in_place` wraps its first
tier's so that commits and leases also do the stack's policy and write-back bookkeeping).

Backends that may offer it implement :class:`OffersInPlace` (``in_place()`` returns the
capability or None), so wrappers (a timed tier, a tiered stack) can pass it through.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from lmcache.keys import CacheKey
    from lmcache.pool.index import Block, Lease, Refused, Reservation

__all__ = ["InPlaceTier", "OffersInPlace", "SharedPoolInfo"]


@dataclasses.dataclass(frozen=True)
class SharedPoolInfo:
    """A pool other processes of this user may map: its ``/dev/shm`` name and size.

    ``resident`` says every page is allocated already (prefaulted), so a client may map them all
    up front instead of faulting them in one by one mid-copy.
    """

    name: str
    size: int
    resident: bool


@runtime_checkable
class InPlaceTier(Protocol):
    """Reserve/commit and lease/release on the blocks of a tier's pool (event-loop thread only).

    Each reservation is committed or aborted once; each lease released once. A reserved key
    reads as absent until committed; a leased block is not reused until released, even if its
    key is deleted or evicted meanwhile.
    """

    def reserve(self, key: CacheKey, nbytes: int) -> Reservation[CacheKey] | Refused:
        """A block to fill for ``key``, or why there is none (store it the usual way then)."""
        ...

    def commit(self, reservation: Reservation[CacheKey]) -> bool:
        """Publish a filled block; False when it could not be (the block is freed)."""
        ...

    def abort(self, reservation: Reservation[CacheKey]) -> None:
        """Drop an unfilled reservation and free its block."""
        ...

    def lease(self, keys: Sequence[CacheKey]) -> list[Lease[CacheKey] | None]:
        """Per key, a lease on its block, or None on a miss."""
        ...

    def release(self, lease: Lease[CacheKey]) -> None:
        """Give one lease back."""
        ...

    def view(self, block: Block[CacheKey]) -> memoryview:
        """The bytes of a live reservation or lease, in the pool."""
        ...

    @property
    def shared_pool(self) -> SharedPoolInfo | None:
        """The pool's ``/dev/shm`` name when other processes may map it, else None."""
        ...


@runtime_checkable
class OffersInPlace(Protocol):
    """A backend that may offer :class:`InPlaceTier` (itself, or what it wraps)."""

    def in_place(self) -> InPlaceTier | None:
        """The in-place capability, or None where this backend has none."""
        ...
