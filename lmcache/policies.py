"""Eviction policies: which keys a full tier gives up to make room.

A policy is pure bookkeeping. :class:`~lmcache.tiered.TieredBackend` keeps one policy instance
per capacity-bounded tier, tells it what was stored (``on_insert``), read (``on_access``) and
removed (``on_remove``), and when the tier rejects a put for capacity asks it for ``victims``,
deletes those keys from the tier and retries. A policy never touches a backend, so it can be
tested and swapped on its own; backends never evict on their own (rule 7 in
:mod:`lmcache.backends.base`).

Built-in policies are registered by the names :class:`~lmcache.config.LMCacheConfig` accepts
for ``eviction_policy``: ``"lru"``, ``"fifo"`` and ``"lfu"``. Others can be registered with
:func:`register_policy`, or passed to ``TieredBackend`` directly as a factory.

Policies are not thread-safe; they are used from one event loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Container, Iterator

from lmcache.errors import ConfigError
from lmcache.keys import CacheKey

__all__ = [
    "EvictionPolicy",
    "FIFOPolicy",
    "LFUPolicy",
    "LRUPolicy",
    "PolicyFactory",
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
        if key in self._sizes:
            self._sizes.move_to_end(key)

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


_REGISTRY: dict[str, PolicyFactory] = {"lru": LRUPolicy, "fifo": FIFOPolicy, "lfu": LFUPolicy}


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
