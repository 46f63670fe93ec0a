"""A preallocated pool of host chunk buffers, handed out as leases that expire.

Copies between the engine and the storage tiers stage through chunk buffers (see
:mod:`lmcache.layouts` for the chunk format). Allocating them per chunk costs page faults and, for
pinned memory, a driver call each; so the pool allocates one block once (pinned when CUDA is
available, so device↔host copies can be asynchronous) and cuts it into fixed-size slots, each big
enough for one full chunk.

A slot is handed out as a :class:`ChunkLease` with a time to live, not a bare pin count: a caller
that crashes or forgets to release cannot hold memory forever. When a lease's TTL passes, the lease
is dead: its slot may be reclaimed and handed to someone else, and every later use of the stale
lease object (:meth:`ChunkLease.tensor`, :meth:`ChunkLease.memoryview`, :meth:`ChunkLease.renew`,
:meth:`ChunkLease.release`) raises :class:`~lmcache.errors.StateError`. Each slot carries a
generation counter that moves on every release or reclaim, so a stale lease is detected even after
its slot was leased again. Holders of long operations call :meth:`ChunkLease.renew`.

What a lease cannot do is revoke views already taken from it: a tensor or memoryview obtained
from a lease must not be used after the lease ends, and an asynchronous device copy into or out of a
lease's buffer must complete within its TTL (synchronise on the copy's handle before releasing).

The pool is thread-safe: engines call it from their own threads. ``acquire`` on a full pool first
reclaims expired leases, then waits up to ``timeout`` for a release, then raises
:class:`~lmcache.errors.CapacityError`. The clock is injectable so tests drive expiry without
sleeping.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is an extra
    from lmcache.errors import MissingDependencyError

    raise MissingDependencyError("torch", "torch", "lmcache.chunk_buffers") from exc

from lmcache.errors import CapacityError, InvalidArgumentError, StateError
from lmcache.layouts import KVGeometry

__all__ = ["ChunkBufferPool", "ChunkLease", "PoolStats"]

logger = logging.getLogger(__name__)

_FREE = math.inf  # expiry of a slot that is not leased


class PoolStats(dict[str, float]):
    """Counters of a pool (a plain dict: ``capacity``, ``in_use``, ``acquired``, ``expired``…)."""


class ChunkLease:
    """A time-limited claim on one slot of a :class:`ChunkBufferPool`.

    Obtain one from :meth:`ChunkBufferPool.acquire`; use it as a context manager or call
    :meth:`release`. All methods raise :class:`StateError` once the lease has expired or ended.

    Attributes:
        nbytes: Bytes this lease covers (at most the pool's slot size).
        shape: The default tensor shape of :meth:`tensor` (``(nbytes,)`` when none was asked for).
        dtype: The default tensor dtype of :meth:`tensor`.
    """

    __slots__ = ("_expires_at", "_generation", "_pool", "_released", "_slot", "dtype", "nbytes", "shape")

    def __init__(
        self,
        pool: ChunkBufferPool,
        *,
        slot: int,
        generation: int,
        nbytes: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        expires_at: float,
    ) -> None:
        self._pool = pool
        self._slot = slot
        self._generation = generation
        self._expires_at = expires_at
        self._released = False
        self.nbytes = nbytes
        self.shape = shape
        self.dtype = dtype

    # -- state ---------------------------------------------------------------------------------

    @property
    def slot(self) -> int:
        """Index of the pool slot this lease holds."""
        return self._slot

    @property
    def expires_at(self) -> float:
        """When the lease expires, on the pool's clock."""
        return self._expires_at

    @property
    def valid(self) -> bool:
        """Whether the lease may still be used (not released, not expired, slot not reclaimed)."""
        with self._pool._cond:
            return self._alive_locked(self._pool._clock())

    def _alive_locked(self, now: float) -> bool:
        pool = self._pool
        return not self._released and pool._generations[self._slot] == self._generation and now < self._expires_at

    def _check_locked(self, what: str) -> None:
        if self._released:
            raise StateError(f"{what}: the lease on slot {self._slot} was released")
        if self._pool._generations[self._slot] != self._generation or self._pool._clock() >= self._expires_at:
            raise StateError(f"{what}: the lease on slot {self._slot} expired; its buffer may have been reused")

    # -- access --------------------------------------------------------------------------------

    def tensor(self, shape: Sequence[int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor view of the leased bytes (no copy, no allocation of the data).

        Args:
            shape: Shape of the view (default: the shape given to ``acquire``). May cover fewer
                bytes than the lease, e.g. a partial chunk.
            dtype: Dtype of the view (default: the dtype given to ``acquire``).

        Raises:
            StateError: The lease has ended.
            InvalidArgumentError: The view would exceed the lease.
        """
        dtype = dtype or self.dtype
        shape = tuple(shape) if shape is not None else self.shape
        itemsize = dtype.itemsize
        nbytes = math.prod(shape) * itemsize
        if nbytes > self.nbytes:
            raise InvalidArgumentError(f"a {shape} {dtype} view needs {nbytes} bytes; the lease holds {self.nbytes}")
        with self._pool._cond:
            self._check_locked("tensor()")
            raw = self._pool._slot_views[self._slot]
        return raw[:nbytes].view(dtype).view(shape)

    def chunk(self, num_tokens: int | None = None) -> torch.Tensor:
        """A chunk buffer view ``[layers, kv_parts, num_tokens, heads, head_dim]`` (pools with a geometry).

        Args:
            num_tokens: Tokens in the chunk (default: the pool's ``chunk_tokens``); a partial chunk
                is a contiguous view of the slot's first bytes.
        """
        geo = self._pool.geometry
        if geo is None:
            raise StateError("chunk() needs a pool built with a geometry (ChunkBufferPool.for_geometry)")
        tokens = self._pool.chunk_tokens if num_tokens is None else num_tokens
        return self.tensor(geo.chunk_shape(tokens), geo.torch_dtype)

    def memoryview(self, nbytes: int | None = None) -> memoryview:
        """A writable byte memoryview of the lease (for backends' ``get_into`` / ``put``)."""
        nbytes = self.nbytes if nbytes is None else nbytes
        if not 0 <= nbytes <= self.nbytes:
            raise InvalidArgumentError(f"nbytes must be within 0..{self.nbytes}, got {nbytes}")
        with self._pool._cond:
            self._check_locked("memoryview()")
            raw = self._pool._slot_views[self._slot]
        return memoryview(raw[:nbytes].numpy())

    # -- lifetime ------------------------------------------------------------------------------

    def renew(self, ttl: float | None = None) -> float:
        """Extend the lease to ``ttl`` seconds from now (default: the pool's TTL); returns the new expiry.

        Raises:
            StateError: The lease has already expired or been released (an expired lease cannot
                be revived: its slot may already be someone else's).
        """
        ttl = self._pool._ttl(ttl)
        with self._pool._cond:
            self._check_locked("renew()")
            self._expires_at = self._pool._clock() + ttl
            self._pool._expiry[self._slot] = self._expires_at
            return self._expires_at

    def release(self) -> None:
        """Return the slot to the pool. Releasing twice is a no-op.

        Raises:
            StateError: The lease had expired first: whatever was written to it may have been
                overwritten, so the caller must not trust it.
        """
        pool = self._pool
        with pool._cond:
            if self._released:
                return
            self._released = True
            current = pool._generations[self._slot] == self._generation
            expired = pool._clock() >= self._expires_at
            if current:
                pool._free_locked(self._slot, expired=expired)
        if expired or not current:
            raise StateError(f"the lease on slot {self._slot} expired before release; its buffer may have been reused")

    def __enter__(self) -> ChunkLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.release()
            return
        try:
            self.release()
        except StateError:
            # Do not mask the error already in flight; the expiry is logged instead.
            logger.warning("lease on slot %s expired while an error was raised in its block", self._slot)

    def __repr__(self) -> str:
        return f"ChunkLease(slot={self._slot}, nbytes={self.nbytes}, expires_at={self._expires_at:.3f})"


class ChunkBufferPool:
    """A fixed set of equal, preallocated host buffers leased out with a TTL.

    Args:
        slot_nbytes: Bytes per slot (one full chunk); rounded up to ``alignment``.
        num_slots: Number of slots.
        pin_memory: Page-lock the memory (default: when CUDA is available), so device copies can
            be asynchronous. Falls back to plain memory, with a warning, if pinning fails.
        default_ttl: Lease lifetime in seconds when ``acquire`` gives none.
        default_timeout: Seconds ``acquire`` waits on a full pool when it gives none (0: fail at once).
        clock: Monotonic clock in seconds; injectable for tests.
        alignment: Slot alignment and size granularity in bytes (page size suits O_DIRECT/GDS).
        geometry: The KV geometry of the chunks (enables :meth:`ChunkLease.chunk`).
        chunk_tokens: Tokens per full chunk (with ``geometry``).

    Raises:
        InvalidArgumentError: A size, count or time is not positive.
    """

    def __init__(
        self,
        slot_nbytes: int,
        num_slots: int,
        *,
        pin_memory: bool | None = None,
        default_ttl: float = 60.0,
        default_timeout: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        alignment: int = 4096,
        geometry: KVGeometry | None = None,
        chunk_tokens: int | None = None,
    ) -> None:
        for name, value in (("slot_nbytes", slot_nbytes), ("num_slots", num_slots), ("alignment", alignment)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
        if alignment & (alignment - 1):
            raise InvalidArgumentError(f"alignment must be a power of two, got {alignment}")
        if not default_ttl > 0:
            raise InvalidArgumentError(f"default_ttl must be positive, got {default_ttl!r}")
        if not default_timeout >= 0:
            raise InvalidArgumentError(f"default_timeout must not be negative, got {default_timeout!r}")
        self.geometry = geometry
        self.chunk_tokens = chunk_tokens
        self.slot_nbytes = slot_nbytes
        self.num_slots = num_slots
        self.default_ttl = float(default_ttl)
        self.default_timeout = float(default_timeout)
        self._clock = clock
        # With an injected clock, waiting must also poll it: nothing else tells us time moved.
        self._poll = None if clock is time.monotonic else 0.01
        stride = -(-slot_nbytes // alignment) * alignment
        self._stride = stride
        want_pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.pinned = False
        total = stride * num_slots + alignment
        storage: torch.Tensor
        if want_pin:
            try:
                storage = torch.empty(total, dtype=torch.uint8, pin_memory=True)
                self.pinned = True
            except RuntimeError as exc:
                logger.warning("could not pin %s bytes for the chunk pool (%s); using pageable memory", total, exc)
                storage = torch.empty(total, dtype=torch.uint8)
        else:
            storage = torch.empty(total, dtype=torch.uint8)
        self._storage: torch.Tensor | None = storage
        start = (-storage.data_ptr()) % alignment
        # Slot views are made once: acquiring allocates no tensor data.
        self._slot_views: list[torch.Tensor] = [
            storage[start + i * stride : start + i * stride + slot_nbytes] for i in range(num_slots)
        ]
        self._generations = [0] * num_slots
        self._expiry = [_FREE] * num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))  # a stack: recently used slots are warm
        self._cond = threading.Condition(threading.Lock())
        self._closed = False
        self._counters = {"acquired": 0, "released": 0, "expired": 0, "waits": 0, "capacity_errors": 0}

    @classmethod
    def for_geometry(
        cls,
        geometry: KVGeometry,
        num_slots: int,
        *,
        chunk_tokens: int = 256,
        **kwargs: Any,
    ) -> ChunkBufferPool:
        """A pool whose slots each hold one full chunk of ``geometry`` (``chunk_tokens`` tokens)."""
        return cls(
            geometry.chunk_nbytes(chunk_tokens), num_slots, geometry=geometry, chunk_tokens=chunk_tokens, **kwargs
        )

    # -- leasing -------------------------------------------------------------------------------

    def _ttl(self, ttl: float | None) -> float:
        ttl = self.default_ttl if ttl is None else ttl
        if not ttl > 0:
            raise InvalidArgumentError(f"ttl must be positive, got {ttl!r}")
        return float(ttl)

    def acquire(
        self,
        nbytes: int | None = None,
        *,
        shape: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> ChunkLease:
        """Lease one slot.

        Args:
            nbytes: Bytes needed (default: from ``shape``, else the whole slot).
            shape: Default shape of :meth:`ChunkLease.tensor`; with a geometry pool and no
                ``dtype``, the geometry's dtype.
            dtype: Default dtype of :meth:`ChunkLease.tensor` (default ``uint8``, or the
                geometry's dtype with a ``shape``).
            ttl: Lease lifetime in seconds (default: the pool's).
            timeout: Seconds to wait for a slot when none is free (default: the pool's).

        Raises:
            InvalidArgumentError: More bytes than a slot holds, or a bad ttl/timeout.
            CapacityError: No slot became free within ``timeout``.
            StateError: The pool is closed.
        """
        ttl = self._ttl(ttl)
        timeout = self.default_timeout if timeout is None else timeout
        if not timeout >= 0:
            raise InvalidArgumentError(f"timeout must not be negative, got {timeout!r}")
        if shape is not None:
            shape = tuple(int(s) for s in shape)
            if dtype is None:
                dtype = self.geometry.torch_dtype if self.geometry is not None else torch.uint8
            need = math.prod(shape) * dtype.itemsize
            if nbytes is not None and nbytes != need:
                raise InvalidArgumentError(f"nbytes={nbytes} disagrees with shape {shape} of {dtype} ({need} bytes)")
            nbytes = need
        elif nbytes is None:
            nbytes = self.slot_nbytes
        if not isinstance(nbytes, int) or nbytes < 0 or nbytes > self.slot_nbytes:
            raise InvalidArgumentError(f"a lease holds 0..{self.slot_nbytes} bytes, asked for {nbytes!r}")
        if shape is None:
            if dtype is not None and dtype != torch.uint8:
                itemsize = dtype.itemsize
                if nbytes % itemsize:
                    raise InvalidArgumentError(f"{nbytes} bytes is not a whole number of {dtype} elements")
                shape = (nbytes // itemsize,)
            else:
                dtype, shape = torch.uint8, (nbytes,)
        assert dtype is not None

        with self._cond:
            start = self._clock()
            deadline = start + timeout
            waited = False
            while True:
                if self._closed:
                    raise StateError("the chunk buffer pool is closed")
                now = self._clock()
                if not self._free:
                    self._reclaim_locked(now)
                if self._free:
                    slot = self._free.pop()
                    self._expiry[slot] = now + ttl
                    self._counters["acquired"] += 1
                    return ChunkLease(
                        self,
                        slot=slot,
                        generation=self._generations[slot],
                        nbytes=nbytes,
                        shape=shape,
                        dtype=dtype,
                        expires_at=now + ttl,
                    )
                remaining = deadline - now
                if remaining <= 0:
                    self._counters["capacity_errors"] += 1
                    raise CapacityError(
                        f"all {self.num_slots} chunk buffers are leased"
                        + (f" (waited {now - start:.3g}s)" if waited else "")
                    )
                if not waited:
                    self._counters["waits"] += 1
                    waited = True
                # Wake for a release, the next expiry, or the deadline, whichever comes first.
                wait = min(remaining, min(self._expiry) - now)
                if self._poll is not None:
                    wait = min(wait, self._poll)
                self._cond.wait(max(wait, 0.0))

    def try_acquire(self, nbytes: int | None = None, **kwargs: Any) -> ChunkLease | None:
        """Like :meth:`acquire` with no waiting, but ``None`` instead of :class:`CapacityError`."""
        try:
            return self.acquire(nbytes, timeout=0.0, **kwargs)
        except CapacityError:
            return None

    def _free_locked(self, slot: int, *, expired: bool) -> None:
        self._generations[slot] += 1
        self._expiry[slot] = _FREE
        self._free.append(slot)
        self._counters["expired" if expired else "released"] += 1
        self._cond.notify()

    def _reclaim_locked(self, now: float) -> int:
        reclaimed = 0
        for slot, expiry in enumerate(self._expiry):
            if expiry <= now:
                self._free_locked(slot, expired=True)
                reclaimed += 1
        if reclaimed:
            logger.warning("reclaimed %d chunk buffer lease(s) that expired without release", reclaimed)
        return reclaimed

    def reclaim_expired(self) -> int:
        """Return the slots of every expired lease to the pool now; returns how many."""
        with self._cond:
            return self._reclaim_locked(self._clock())

    # -- introspection and lifetime ------------------------------------------------------------

    @property
    def storage(self) -> torch.Tensor | None:
        """The one allocation every slot is a view of (None once closed).

        Declare it to backends with ``register_host_memory`` so that those that register memory
        for transfers (``nixl://``) do it once, not for every call's buffers.
        """
        return self._storage

    @property
    def in_use(self) -> int:
        """Slots currently leased (expired but unreclaimed leases included)."""
        with self._cond:
            return self.num_slots - len(self._free)

    def stats(self) -> PoolStats:
        """Counters: capacity, in_use, slot_nbytes, pinned, acquired, released, expired, waits, capacity_errors."""
        with self._cond:
            return PoolStats(
                capacity=self.num_slots,
                in_use=self.num_slots - len(self._free),
                slot_nbytes=self.slot_nbytes,
                pinned=float(self.pinned),
                **self._counters,
            )

    def close(self) -> None:
        """Free the memory. Outstanding leases become stale; ``acquire`` raises :class:`StateError`."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            for slot in range(self.num_slots):
                self._generations[slot] += 1
            self._slot_views = []
            self._storage = None
            self._cond.notify_all()

    def __enter__(self) -> ChunkBufferPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"ChunkBufferPool(slots={self.num_slots}, slot_nbytes={self.slot_nbytes}, pinned={self.pinned}, "
            f"geometry={self.geometry.identity if self.geometry else None})"
        )
