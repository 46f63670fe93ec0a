"""Eviction policies: which keys a full tier gives up to make room.

A policy is pure bookkeeping. :class:`~lmcache.tiered.TieredBackend` keeps one policy instance
per capacity-bounded tier, tells it what was stored (``on_insert``), read (``on_access``) and
removed (``on_remove``), and when the tier rejects a put for capacity asks it for ``victims``,
deletes those keys from the tier and retries. A policy never touches a backend, so it can be
tested and swapped on its own; backends never evict on their own (rule 7 in
:mod:`lmcache.backends.base`).

Built-in policies are registered by the names :class:`~lmcache.config.LMCacheConfig` accepts
for ``eviction_policy``: ``"lru"``, ``"fifo"`` and ``"lfu"``, plus ``"s3fifo"``
(:class:`S3FIFOPolicy`, scan-resistant; usable in ``tiered://`` URLs and as a factory). Others can be registered with
:func:`register_policy`, or passed to ``TieredBackend`` directly as a factory.

Policies are not thread-safe; they are used from one event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterator

from lmcache.errors import ConfigError
from lmcache.keys import CacheKey

__all__ = [
    "EvictionPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PolicyFactory",
    "S3FIFOPolicy",
    "make_policy",
    "policy_names",
    "register_policy",
]

_NOTHING: frozenset[CacheKey] = frozenset()


class EvictionPolicy(ABC):
    """Tracks the keys one tier holds, with their sizes, and orders them for eviction.

    Every method is O(1) or close to it except :meth:`victims`, which walks keys in eviction
    order only as far as it needs to.
    """

    @abstractmethod
    def on_insert(self, key: CacheKey, size: int) -> None:
        """A value of ``size`` bytes was stored under ``key`` (re-inserting updates its size)."""

    @abstractmethod
    def on_access(self, key: CacheKey) -> None:
        """``key`` was read (a hit); unknown keys are ignored."""

    @abstractmethod
    def on_remove(self, key: CacheKey) -> None:
        """``key`` left the tier (evicted or deleted); unknown keys are ignored."""

    @abstractmethod
    def victims(self, n_bytes: int, protected: Container[CacheKey] = _NOTHING) -> list[CacheKey]:
        """Keys to evict, in eviction order, whose sizes add up to at least ``n_bytes``.

        This only proposes: the caller deletes the keys and then calls :meth:`on_remove` for
        each. Fewer bytes come back when the policy does not know enough keys.

        Args:
            n_bytes: Bytes to free.
            protected: Keys that must not be proposed (for example values still waiting to be
                written back to a slower tier).
        """

    @abstractmethod
    def __len__(self) -> int:
        """Number of tracked keys."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @property
    @abstractmethod
    def tracked_bytes(self) -> int:
        """Sum of the sizes of the tracked keys."""


PolicyFactory = Callable[[], EvictionPolicy]


class _OrderedPolicy(EvictionPolicy):
    """Keys in one ordered dict, oldest (next to evict) first."""

    def __init__(self) -> None:
        self._sizes: OrderedDict[CacheKey, int] = OrderedDict()
        self._bytes = 0

    def on_insert(self, key: CacheKey, size: int) -> None:
        old = self._sizes.get(key)
        if old is not None:
            self._bytes -= old
            self._reinsert(key)
        self._sizes[key] = size
        self._bytes += size

    def _reinsert(self, key: CacheKey) -> None:
        """Where a re-inserted key goes (LRU: to the back; FIFO: keeps its place)."""

    def on_remove(self, key: CacheKey) -> None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self._bytes -= size

    def victims(self, n_bytes: int, protected: Container[CacheKey] = _NOTHING) -> list[CacheKey]:
        return _take(iter(self._sizes.items()), n_bytes, protected)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    @property
    def tracked_bytes(self) -> int:
        return self._bytes


def _take(items: Iterator[tuple[CacheKey, int]], n_bytes: int, protected: Container[CacheKey]) -> list[CacheKey]:
    out: list[CacheKey] = []
    freed = 0
    if n_bytes <= 0:
        return out
    for key, size in items:
        if key in protected:
            continue
        out.append(key)
        freed += size
        if freed >= n_bytes:
            break
    return out


class LRUPolicy(_OrderedPolicy):
    """Least recently used first: a read or re-insert makes a key the last to go."""

    def on_access(self, key: CacheKey) -> None:
        try:  # noqa: SIM105 - one hash lookup, no context manager: this runs on every hit
            self._sizes.move_to_end(key)
        except KeyError:
            pass

    def _reinsert(self, key: CacheKey) -> None:
        self._sizes.move_to_end(key)


class FIFOPolicy(_OrderedPolicy):
    """First in, first out: reads do not matter, the oldest insert goes first."""

    def on_access(self, key: CacheKey) -> None:
        return


class LFUPolicy(EvictionPolicy):
    """Least frequently used first; ties go to the key that reached that count first.

    Keys live in per-count buckets (insertion-ordered), so access is O(1) and
    :meth:`victims` walks buckets from the lowest count up. Counts start at 1 on insert and
    survive re-inserts; removed keys forget their count.
    """

    def __init__(self) -> None:
        self._sizes: dict[CacheKey, int] = {}
        self._count: dict[CacheKey, int] = {}
        self._buckets: dict[int, OrderedDict[CacheKey, None]] = {}
        self._bytes = 0

    def _unlink(self, key: CacheKey, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def _link(self, key: CacheKey, count: int) -> None:
        self._buckets.setdefault(count, OrderedDict())[key] = None
        self._count[key] = count

    def on_insert(self, key: CacheKey, size: int) -> None:
        old = self._sizes.get(key)
        if old is not None:
            self._bytes -= old
        else:
            self._link(key, 1)
        self._sizes[key] = size
        self._bytes += size

    def on_access(self, key: CacheKey) -> None:
        count = self._count.get(key)
        if count is None:
            return
        self._unlink(key, count)
        self._link(key, count + 1)

    def on_remove(self, key: CacheKey) -> None:
        size = self._sizes.pop(key, None)
        if size is None:
            return
        self._bytes -= size
        self._unlink(key, self._count.pop(key))

    def victims(self, n_bytes: int, protected: Container[CacheKey] = _NOTHING) -> list[CacheKey]:
        def ordered() -> Iterator[tuple[CacheKey, int]]:
            for count in sorted(self._buckets):
                for key in self._buckets[count]:
                    yield key, self._sizes[key]

        return _take(ordered(), n_bytes, protected)

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    @property
    def tracked_bytes(self) -> int:
        return self._bytes


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost list.

    New keys enter the small queue. Evicting from it, a key read since insert moves to the
    main queue; an unread one is evicted and remembered in the ghost list, and a ghost key that
    comes back is inserted straight into main. Evicting from main, a key read since it was
    last passed over gets another round (its count decremented, to at most 3 rounds), others
    go. The small queue is drained first while it holds at least ``small_ratio`` of the bytes.
    One-hit scans therefore wash through the small queue without pushing the hot set out.

    :meth:`victims` performs the queue moves described above (small to main, another round in
    main: they are state, not removals); proposed keys keep their places and are forgotten only
    in :meth:`on_remove`.

    Args:
        small_ratio: Share of tracked bytes the small queue may hold before it is drained first.
    """

    _MAX_FREQ = 3

    def __init__(self, small_ratio: float = 0.1) -> None:
        if not 0.0 < small_ratio < 1.0:
            raise ConfigError(f"S3-FIFO small_ratio must be between 0 and 1, got {small_ratio}")
        self._ratio = small_ratio
        self._small: OrderedDict[CacheKey, int] = OrderedDict()
        self._main: OrderedDict[CacheKey, int] = OrderedDict()
        self._ghost: OrderedDict[CacheKey, None] = OrderedDict()
        self._freq: dict[CacheKey, int] = {}
        self._small_bytes = 0
        self._bytes = 0

    def on_insert(self, key: CacheKey, size: int) -> None:
        for queue in (self._small, self._main):
            old = queue.get(key)
            if old is not None:  # a re-insert: update the size in place, count it as a read
                queue[key] = size
                self._bytes += size - old
                if queue is self._small:
                    self._small_bytes += size - old
                self.on_access(key)
                return
        self._freq[key] = 0
        self._bytes += size
        if key in self._ghost:  # seen recently and evicted too early: straight to main
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size

    def on_access(self, key: CacheKey) -> None:
        f = self._freq.get(key)
        if f is not None and f < self._MAX_FREQ:
            self._freq[key] = f + 1

    def on_remove(self, key: CacheKey) -> None:
        size = self._small.pop(key, None)
        if size is not None:
            self._small_bytes -= size
            # Left the small queue unread: remember it, so a quick return goes to main.
            if self._freq.get(key, 0) == 0:
                self._ghost[key] = None
                while len(self._ghost) > max(len(self._main), 1):
                    self._ghost.popitem(last=False)
        else:
            size = self._main.pop(key, None)
            if size is None:
                return
        self._bytes -= size
        self._freq.pop(key, None)

    def victims(self, n_bytes: int, protected: Container[CacheKey] = _NOTHING) -> list[CacheKey]:
        out: list[CacheKey] = []
        freed = 0
        # Walk snapshots of both queues; proposed and protected keys keep their places. Every
        # key is revisited only after its count dropped, so the walk ends.
        small = deque(self._small)
        main = deque(self._main)
        small_left = self._small_bytes  # small-queue bytes not yet walked past
        while freed < n_bytes:
            if small and (small_left >= self._ratio * self._bytes or not main):
                key = small.popleft()
                size = self._small[key]
                small_left -= size
                if key in protected:
                    continue
                if self._freq[key] > 0:  # read while on probation: promote to main
                    del self._small[key]
                    self._small_bytes -= size
                    self._main[key] = size
                    self._freq[key] = 0
                    main.append(key)
                    continue
                out.append(key)
                freed += size
            elif main:
                key = main.popleft()
                if key in protected:
                    continue
                if self._freq[key] > 0:  # another round in main
                    self._freq[key] -= 1
                    self._main.move_to_end(key)
                    main.append(key)
                    continue
                out.append(key)
                freed += self._main[key]
            else:
                break
        return out

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __contains__(self, key: object) -> bool:
        return key in self._small or key in self._main

    @property
    def tracked_bytes(self) -> int:
        return self._bytes


_REGISTRY: dict[str, PolicyFactory] = {"lru": LRUPolicy, "fifo": FIFOPolicy, "lfu": LFUPolicy, "s3fifo": S3FIFOPolicy}


def register_policy(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``factory`` available under ``name`` (for URLs and config files).

    Raises:
        ConfigError: ``name`` is taken and ``replace`` is false.
    """
    key = name.lower()
    if key in _REGISTRY and not replace:
        raise ConfigError(f"eviction policy {name!r} is already registered")
    _REGISTRY[key] = factory


def policy_names() -> list[str]:
    """Names of every registered policy."""
    return sorted(_REGISTRY)


def make_policy(name_or_factory: str | PolicyFactory) -> PolicyFactory:
    """Resolve a policy name (``"lru"``…) or pass a factory through.

    Raises:
        ConfigError: Unknown name (the message lists the known ones).
    """
    if callable(name_or_factory):
        return name_or_factory
    factory = _REGISTRY.get(str(name_or_factory).lower())
    if factory is None:
        raise ConfigError(f"unknown eviction policy {name_or_factory!r}; known: {', '.join(policy_names())}")
    return factory
