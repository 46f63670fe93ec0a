"""``TieredBackend``: an ordered stack of backends (fastest first) behind one StorageBackend.

This is where cache policy lives (rule 7 in :mod:`lmcache.backends.base`): tiers only store
bytes; this module decides where values go, when they move and what is given up.

* **Reads** ask tier 0 for every key, then each slower tier for the keys still missing (one
  batch per tier). A hit in a slower tier is *promoted*: after the value is in the caller's
  ``dst``, it is put into tier 0 from that ``dst`` (the caller's buffer is borrowed for the call
  only, so this happens before ``get_into`` returns; for a memory tier it costs one copy) and
  queued for write-back to the tiers between. Promotion is best-effort and bounded by
  ``tier_timeout``; its failure never changes the read's result.
* **Writes** go to tier 0 synchronously (the put result is tier 0's) and reach each slower
  tier through a bounded write-back queue drained by one background writer task per slower
  tier. A full queue drops the write-back and counts it (``writeback_dropped``); memory never
  grows without bound. **Write-around:** a value tier 0 cannot take (rejected for
  ``capacity`` after eviction, e.g. a batch larger than tier 0, or ``too_large`` for it) is put
  synchronously into the next slower tier that takes it (counted as that tier's
  ``written_around``), and the put reports that tier's result; it lives there (not in the
  tiers below it) until a read promotes it.
* **Event loops.** The writers, probes and queues run on the loop that opened the stack. Used
  later from another loop (``asyncio.run`` twice in a row), the stack moves them to the new
  loop on its first call: what was queued, or taken by a writer when the old loop ended, is
  written back from there. Using it from a second loop while the first still runs (another
  thread) is a :class:`~lmcache.errors.StateError`.
* **Write-back staging: read back from tier 0.** The caller's source buffer is borrowed, so the
  queue holds only keys and sizes, and each writer reads a batch back from tier 0 into its own
  small pool of reusable staging buffers (``write_back_batch`` buffers, grown to the largest
  value seen, so no allocation in steady state), then puts that batch into its tier. Compared
  with copying into staging at put time, this keeps the put path at exactly one copy (into
  tier 0), bounds staging memory by ``write_back_batch`` values per slower tier instead of
  ``write_back_queue`` values, and lets the queue be deep. The price is one extra tier-0 read
  per write-back and a rule: a key waiting for write-back is *pinned* in tier 0 (eviction skips
  it) until every writer it was queued for has tried to copy it. When only pinned keys are left
  to evict, a put waits (up to ``tier_timeout``, counted as ``writeback_stalls``) for a writer
  to finish a batch, then is rejected: that is the backpressure of writing faster than the
  slower tiers drain. Pinned bytes are bounded by roughly ``write_back_queue +
  write_back_batch`` values, so tier 0 should be a good deal larger than that. A deleted key is
  not resurrected: its queued write-back is cancelled and ``delete`` waits for one in flight.
* **Faults.** Every tier call runs under a ``tier_timeout`` deadline (``asyncio.timeout``; one
  deadline per call, which is one batch: size batches for the slowest tier). A tier that
  raises (any ``Exception`` except a caller error such as a too-small ``dst``) or times out is
  a miss for reads / a rejected put (``"error"``), counted per tier (``errors``/``timeouts``,
  and per key in ``lookup_failures``/``get_failures``/``put_failures``) and logged once per
  tier, operation and kind; serving goes on. Timeouts cancel the tier call and wait for it to
  unwind (rule 3: nothing may write into a ``dst`` after we return), so a tier blocked in an
  executor thread is bounded by its own SDK timeouts, not by ours. A tier that fails part-way
  through a ``get_into`` may have written into some ``dst`` before it raised; such a key is then
  read from the next tier or reported as a miss.
* **Circuit breaker.** After a timeout or a refusal (a transient error: connection refused or
  reset, a server not ready, a tier that could not be opened) the tier is *suspended*: every
  call to it is skipped (an immediate miss or rejected put, counted as ``skipped``) until it
  answers again. Every ``tier_retry_after`` seconds a background probe (a ``ping``, which also
  opens a tier that could not be opened) asks it; the first call that succeeds (that probe, a
  ping, or a late answer) lifts the suspension. Calls to the tier still in flight when it trips
  are released at once (counted as timeouts): concurrent callers share the one wait instead of
  each running out its own ``tier_timeout``. So a dead or hung tier costs one ``tier_timeout`` in
  all, not one per request or per caller, and no caller ever waits to find out that it is still
  down. Permanent errors and bugs do not trip it: they may belong to one value. While a tier is
  suspended its write-backs are dropped (counted in ``writeback_dropped`` and
  ``put_failures``), queued ones included, so values never stay pinned in tier 0 for it.
* **Lookup budget.** ``contains(keys, budget=s)`` and ``lookup_prefix(keys, budget=s)`` return
  within about ``s`` seconds: a tier that has not answered by then is a miss for this call
  (counted in ``budget_exceeded`` and ``lookup_failures``). Its call is not cancelled but left
  to finish in the background under ``tier_timeout`` (it holds no caller buffer), so a hung tier
  still trips the breaker once, and until that call ends further budgeted calls skip the tier
  instead of starting another. Reads and puts have no budget: they need the data.
* **Eviction.** For tiers with ``capabilities.bounded`` an :class:`~lmcache.policies.EvictionPolicy`
  instance tracks the keys and sizes this backend stored there (on put, promotion and
  write-back; seeded from ``list_entries()`` at open for persistent, listable tiers). Before a put
  the tier's ``stats()`` (``capacity_bytes``/``used_bytes``) allow proactive eviction; a
  ``rejected("capacity")`` result triggers eviction of policy victims and a retry
  (``evict_retries`` times at most). Keys pinned with :meth:`TierAdmin.pin` (a lease with a
  TTL, used by the cache server's control API) are never chosen as victims until it lapses.
* **Ownership.** Tiers built from URLs (:meth:`TieredBackend.from_urls`, :meth:`from_url`,
  :meth:`from_config`) are owned and closed by :meth:`aclose`. Backend instances passed to the
  constructor are *borrowed* by default (like a connection pool handed to a client): they are
  opened on first use (``open`` is idempotent) but left open for their owner to close; pass
  ``own_tiers=True`` to hand them over.
* **Codecs.** Every tier except ``memory://`` reads and writes through a
  :class:`~lmcache.serde.layer.CodecBackend` (built in ``_build_tiers``): values are encoded for
  it with its URL's ``?codec=`` or the ``codec`` setting, and whatever codec wrote a value is
  decoded on the way out (docs/codecs.md). Promotion puts the decoded value into faster tiers.
* **Health.** :meth:`ping` pings every tier; failing tiers are marked unhealthy in
  :meth:`stats` and only when *no* tier answers does ``ping`` raise.
* **Consistency.** First writer wins per tier. A key evicted from tier 0 and put again is
  ``STORED`` there even though a slower tier still holds it (asking every tier on each put would
  cost a slow round trip); with content-hash keys both copies are the same bytes.

URL form (tier URLs are percent-encoded, repeated in speed order)::

    tiered://?tier=memory%3A%2F%2F%3Fcapacity%3D8GiB&tier=file%3A%2F%2F%2Fvar%2Flib%2Flmcache&tier_timeout=2

This module imports ``backends.base`` (and the registry lazily to build tiers from URLs).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, urlencode

from lmcache.backends.base import (
    Capabilities,
    PutResult,
    PutStatus,
    StorageBackend,
    parse_backend_url,
    redact_url,
    rejected,
    settings_query,
    split_url,
)
from lmcache.config import LMCacheConfig, TieredSettings, env_layer, resolve_settings
from lmcache.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    InvalidArgumentError,
    StateError,
    TransientBackendError,
)
from lmcache.keys import CacheKey
from lmcache.policies import EvictionPolicy, PolicyFactory, make_policy
from lmcache.pool import Block, InPlaceTier, Lease, OffersInPlace, Refused, Reservation, SharedPoolInfo

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["TierAdmin", "TierStats", "TieredBackend", "TieredSettings"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_FAILED: Any = object()  # sentinel: the guarded tier call failed or timed out
# The loop time by which a budgeted contains()/lookup_prefix() must answer (None: no budget).
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("lmcache_tiered_deadline", default=None)
# Rejections by tier 0 that a put answers by writing the value straight to a slower tier.
_WRITE_AROUND = frozenset({"capacity", "too_large"})
# Which per-key failure counter a failed or skipped tier call moves, by operation.
_FAILURE_COUNTERS = {
    "contains": "lookup_failures",
    "get": "get_failures",
    "write-back read": "get_failures",
    "put": "put_failures",
}


@dataclasses.dataclass
class TierStats:
    """Per-tier counters kept by :class:`TieredBackend` (reads, faults, movement between tiers).

    ``writeback_stalls`` (tier 0): puts that found tier 0 full of values still waiting for
    write-back and waited (up to ``tier_timeout``) for the writers to free room.

    Faults: ``errors`` and ``timeouts`` count failed tier calls, ``skipped`` calls not made
    because the tier is suspended (or still busy with an earlier budgeted lookup), and
    ``budget_exceeded`` budgeted lookups the tier did not answer in time. The ``*_failures``
    counters count *keys* that one of those cost: ``lookup_failures`` keys whose ``contains``
    on this tier gave no answer, ``get_failures`` keys whose read gave no answer (a miss
    here, maybe a hit in a slower tier), ``put_failures`` values that did not reach this tier
    because of a fault (a failed put, or a write-back dropped or failed).

    ``written_around`` (slower tiers): values a put stored straight into this tier because
    the tiers above it could not take them (full, or the value too large for them).
    """

    hits: int = 0
    misses: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0
    promotions: int = 0
    writeback_queued: int = 0
    writeback_written: int = 0
    writeback_dropped: int = 0
    writeback_failed: int = 0
    evictions: int = 0
    writeback_stalls: int = 0
    lookup_failures: int = 0
    get_failures: int = 0
    put_failures: int = 0
    budget_exceeded: int = 0
    written_around: int = 0


@dataclasses.dataclass(eq=False)
class _WriteBack:
    """One value waiting to be copied from tier 0 into slower tiers."""

    key: CacheKey
    size: int
    tiers: set[int] = dataclasses.field(default_factory=set)  # writers that still have to copy it
    cancelled: bool = False
    busy: int = 0  # writers copying it right now
    idle: asyncio.Event | None = None  # set when busy drops to 0 (a delete waits on it)


class _StagingPool:
    """A writer's reusable staging buffers: buffer ``i`` holds the ``i``-th value of a batch.

    Buffers only grow (to the largest value seen), so with fixed-size KV chunks a writer
    allocates ``write_back_batch`` buffers once and then only copies.
    """

    def __init__(self) -> None:
        self._bufs: list[bytearray] = []

    def views(self, sizes: Sequence[int]) -> list[memoryview]:
        out = []
        for i, size in enumerate(sizes):
            if i == len(self._bufs):
                self._bufs.append(bytearray(size))
            elif len(self._bufs[i]) < size:
                self._bufs[i] = bytearray(size)
            out.append(memoryview(self._bufs[i])[:size])
        return out

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self._bufs)


@dataclasses.dataclass(eq=False)
class _Tier:
    index: int
    backend: StorageBackend
    owned: bool
    policy: EvictionPolicy | None
    stats: TierStats = dataclasses.field(default_factory=TierStats)
    healthy: bool = True
    suspended_until: float = 0.0  # non-zero: suspended (after a timeout); loop time of the next probe
    probe: asyncio.Task[None] | None = None  # the background ping of a suspended tier
    lagging: asyncio.Task[Any] | None = None  # a budgeted contains that outlived its budget
    # Deadlines of the calls to this tier in flight now: when one call finds the tier down,
    # the others are released at once instead of each waiting out its own tier_timeout.
    inflight: set[Any] = dataclasses.field(default_factory=set)
    queue: asyncio.Queue[_WriteBack] | None = None
    writer: asyncio.Task[None] | None = None
    staging: _StagingPool = dataclasses.field(default_factory=_StagingPool)

    def label(self) -> str:
        return f"tier {self.index} ({redact_url(self.backend.url, self.backend.secret_options)})"


class TieredBackend(StorageBackend):
    """Backends stacked fastest first, with promotion, write-back and eviction.

    Args:
        tiers: Backend instances, fastest first (at least one).
        settings: Behaviour settings (defaults: :class:`TieredSettings`).
        policy: An eviction policy name or factory; overrides ``settings.eviction_policy``
            (a factory is not part of :attr:`url`).
        own_tiers: Close the given tiers in :meth:`aclose` (one flag for all, or one per tier).
            Default: borrowed, i.e. the caller closes them.

    Raises:
        ConfigError: No tiers, the same backend twice, or an unknown policy.
    """

    schemes: ClassVar[tuple[str, ...]] = ("tiered",)
    capabilities: ClassVar[Capabilities] = Capabilities()  # per instance: see _combine

    def __init__(
        self,
        tiers: Sequence[StorageBackend],
        settings: TieredSettings | None = None,
        *,
        policy: str | PolicyFactory | None = None,
        own_tiers: bool | Sequence[bool] = False,
    ) -> None:
        super().__init__()
        tiers = list(tiers)
        if not tiers:
            raise ConfigError("tiered://: at least one tier is needed")
        for b in tiers:
            if not isinstance(b, StorageBackend):
                raise ConfigError(f"tiered://: tiers must be StorageBackend instances, got {type(b).__name__}")
        if len({id(b) for b in tiers}) != len(tiers) or any(b is self for b in tiers):
            raise ConfigError("tiered://: the same backend instance appears twice")
        owned = [own_tiers] * len(tiers) if isinstance(own_tiers, bool) else list(own_tiers)
        if len(owned) != len(tiers):
            raise ConfigError(f"tiered://: own_tiers has {len(owned)} flags for {len(tiers)} tiers")
        self.settings = settings if settings is not None else TieredSettings()
        self._policy_factory = make_policy(policy if policy is not None else self.settings.eviction_policy)
        self._tiers = [
            _Tier(i, b, bool(o), self._policy_factory() if b.capabilities.bounded else None)
            for i, (b, o) in enumerate(zip(tiers, owned, strict=True))
        ]
        # Capabilities describe the stack, not the class, so they are set per instance.
        self.capabilities = _combine([b.capabilities for b in tiers])  # type: ignore[misc]
        self._pending: dict[CacheKey, _WriteBack] = {}
        self._progress: asyncio.Event | None = None  # set (and replaced) after each write-back batch
        self._delete_epoch = 0  # bumped by every delete; a promotion that raced one is dropped
        self._pins: dict[CacheKey, float] = {}  # key -> time.monotonic() expiry; see pin()
        self._background: set[asyncio.Task[Any]] = set()  # probes and lookups past their budget
        self._loop: asyncio.AbstractEventLoop | None = None  # where the writers run; see _follow_loop

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_urls(
        cls, urls: Sequence[str], *, policy: str | PolicyFactory | None = None, **settings: Any
    ) -> TieredBackend:
        """Build (without I/O) a stack of owned tiers from backend URLs, fastest first.

        Args:
            urls: Backend URLs such as ``memory://?capacity=8GiB``, ``file:///var/lib/lmcache``.
            policy: An eviction policy factory or name (overrides ``eviction_policy``).
            **settings: :class:`TieredSettings` fields (over ``LMCACHE_TIERED_<FIELD>`` env).

        Raises:
            ConfigError: A bad URL, an unknown setting or value.
            MissingDependencyError: A tier's SDK is not installed.
        """
        if isinstance(urls, str):
            raise ConfigError("tiered://: from_urls takes a list of URLs")
        layers: list[tuple[str, Mapping[str, object]]] = [
            ("environment", env_layer("LMCACHE_TIERED_", TieredSettings)),  # as from_url reads it
            ("keyword arguments", settings),
        ]
        parsed = resolve_settings(TieredSettings, layers, owner="tiered://", strict=("keyword arguments",))
        return cls(_build_tiers(urls, parsed.codec), parsed, policy=policy, own_tiers=True)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``tiered://?tier=<urlencoded url>&tier=…&tier_timeout=…`` (no I/O).

        Raises:
            ConfigError: No ``tier``, a host or path in the URL, or a bad option.
        """
        parts = split_url(url)
        if parts.scheme not in cls.schemes:
            raise ConfigError(f"URL scheme {parts.scheme!r} is not served here; expected one of {list(cls.schemes)}")
        if parts.netloc or parts.path not in ("", "/"):
            raise ConfigError("tiered:// takes no host or path; give tiers as ?tier=<urlencoded url>&tier=…")
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        urls = [v for k, v in pairs if k == "tier"]
        if not urls:
            raise ConfigError("tiered:// needs at least one ?tier=<urlencoded backend url>")
        rest = urlencode([(k, v) for k, v in pairs if k != "tier"])
        settings = parse_backend_url(url, cls.schemes, TieredSettings, {}, overrides, split=parts._replace(query=rest))
        return cls(_build_tiers(urls, settings.codec), settings, own_tiers=True)

    @classmethod
    def from_config(cls, config: LMCacheConfig, **overrides: Any) -> TieredBackend:
        """Build the stack described by ``config.tiers`` and its tiering settings (no I/O)."""
        # LMCacheConfig extends TieredSettings: every tiering setting travels, none is relisted.
        settings: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(TieredSettings)}
        settings.update(overrides)
        return cls.from_urls(config.tiers, **settings)

    @property
    def url(self) -> str:
        """``tiered://?tier=…`` (one per tier, fastest first) plus non-default settings."""
        query = "&".join("tier=" + quote(t.backend.url, safe="") for t in self._tiers)
        extra = settings_query(self.settings)
        return f"tiered://?{query}" + (f"&{extra}" if extra else "")

    def __repr__(self) -> str:
        # The tier URLs may hold credentials; show each one redacted instead of the encoded URL.
        shown = ", ".join(repr(redact_url(t.backend.url, t.backend.secret_options)) for t in self._tiers)
        return f"TieredBackend([{shown}], state={self._state.value})"

    @property
    def tiers(self) -> list[StorageBackend]:
        """The tier backends, fastest first."""
        return [t.backend for t in self._tiers]

    # -- the in-place seam and the operator facade -------------------------------------------

    def in_place(self) -> InPlaceTier | None:
        """Tier 0's :class:`~lmcache.pool.InPlaceTier`, with this stack's bookkeeping; or None.

        A value committed through it is tracked by tier 0's eviction policy and queued for
        write-back to the slower tiers, as a :meth:`put` into tier 0 would be; a lease taken
        through it counts as a tier-0 hit (and refreshes the key in the policy), as a
        :meth:`get_into` hit would. None when tier 0 offers no in-place access.
        """
        top = self._tiers[0].backend
        inner = top.in_place() if isinstance(top, OffersInPlace) else None
        return None if inner is None else _TieredInPlace(self, inner)

    def admin(self) -> TierAdmin:
        """Operator actions on this stack: pins against eviction and moves between tiers."""
        return TierAdmin(self)

    # -- pins (an eviction hook for operators; through TierAdmin) ----------------------------

    def _pin(self, keys: Sequence[CacheKey], ttl: float) -> int:
        """Keep ``keys`` from being chosen as eviction victims in any tier for ``ttl`` seconds.

        A pin is a lease, not a count: pinning again extends it, and it lapses on its own, so a
        forgotten pin cannot hold space forever. Pins do not stop :meth:`delete`.

        Returns:
            How many keys are pinned now (over all calls).

        Raises:
            InvalidArgumentError: ``ttl`` is not a positive number of seconds.
        """
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            raise InvalidArgumentError(f"pin ttl must be a positive number of seconds, got {ttl!r}")
        expiry = time.monotonic() + float(ttl)
        for key in keys:
            if not isinstance(key, CacheKey):
                raise InvalidArgumentError(f"keys must be CacheKey instances, got {type(key).__name__}")
            self._pins[key] = max(expiry, self._pins.get(key, 0.0))
        return len(self._pinned())

    def _record_hits(self, keys: Sequence[CacheKey], tier: int = 0, *, sizes: Sequence[int] | None = None) -> None:
        """Account reads of ``tier`` served outside :meth:`get_into`.

        Leases through :meth:`in_place` use this: the reads count as that
        tier's hits and refresh the keys in its eviction policy, as a ``get_into`` hit would,
        and they count in this backend's own ``get_requests``/``hits`` (and ``bytes_read``, given
        the value ``sizes``) as if they had been read through :meth:`get_into`.
        """
        t = self._tiers[tier]
        t.stats.hits += len(keys)
        c = self.counters
        c.get_requests += len(keys)
        c.hits += len(keys)
        if sizes is not None:
            c.bytes_read += sum(sizes)
        if t.policy is not None:
            for key in keys:
                t.policy.on_access(key)

    def _record_stored(self, keys: Sequence[CacheKey], sizes: Sequence[int]) -> None:
        """Account values stored into tier 0 outside :meth:`put`.

        Commits through :meth:`in_place` use this: tier 0's policy
        tracks them and they are queued for write-back to the slower tiers, as a put would do.
        """
        top = self._tiers[0]
        slower = range(1, len(self._tiers))
        c = self.counters
        for key, size in zip(keys, sizes, strict=True):
            if top.policy is not None:
                top.policy.on_insert(key, size)
            if len(self._tiers) > 1:
                self._enqueue(key, size, slower)
            c.put_requests += 1
            c.stored += 1
            c.bytes_written += size

    def _unpin(self, keys: Sequence[CacheKey]) -> int:
        """Drop the pins of ``keys`` (unpinned keys are ignored); returns how many were dropped."""
        return sum(1 for key in keys if self._pins.pop(key, None) is not None)

    def _pinned(self) -> dict[CacheKey, float]:
        """Live pins: key -> seconds left (expired pins are dropped here)."""
        now = time.monotonic()
        for key in [k for k, t in self._pins.items() if t <= now]:
            del self._pins[key]
        return {k: t - now for k, t in self._pins.items()}

    async def _move(
        self,
        keys: Sequence[CacheKey],
        sizes: Sequence[int],
        to_tier: int,
        *,
        from_tier: int | None = None,
        keep_source: bool = False,
    ) -> list[bool]:
        """Copy values into tier ``to_tier`` (an operator action, e.g. pre-warming tier 0).

        Each value is read from ``from_tier`` (default: the fastest tier holding it, other than
        the target), put into ``to_tier`` through the same eviction bookkeeping as promotion,
        and, unless ``keep_source``, deleted from ``from_tier`` (default: from every other tier).

        Args:
            keys: Keys to move.
            sizes: An upper bound of each value's size in bytes (e.g. from ``list_entries``).
            to_tier: Index of the target tier.
            from_tier: Index of the source tier, or None to search.
            keep_source: Copy instead of move.

        Returns:
            Per key, whether the value is now held by the target tier.

        Raises:
            InvalidArgumentError: A tier index that does not exist, or mismatched lengths.
        """
        keys = list(keys)
        if len(keys) != len(sizes):
            raise InvalidArgumentError(f"move got {len(keys)} keys but {len(sizes)} sizes")
        n_tiers = len(self._tiers)
        for name, idx in (("to_tier", to_tier), ("from_tier", from_tier)):
            if idx is not None and (isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n_tiers):
                raise InvalidArgumentError(f"{name}={idx!r}: no such tier; this stack has tiers 0..{n_tiers - 1}")
        if from_tier == to_tier:
            raise InvalidArgumentError("from_tier and to_tier are the same tier")
        await self._ensure_open()
        target = self._tiers[to_tier]
        done = [False] * len(keys)
        sources = [from_tier] if from_tier is not None else [t.index for t in self._tiers if t.index != to_tier]
        todo = [i for i in range(len(keys))]
        held = await self._guard(target, "contains", target.backend.contains(keys))
        if held is not _FAILED:
            todo = [i for i in todo if not held[i]]
            for i in range(len(keys)):
                done[i] = bool(held[i])
        for src_index in sources:
            if not todo:
                break
            src = self._tiers[src_index]
            bufs = [bytearray(max(0, int(sizes[i]))) for i in todo]
            got = await self._guard(src, "get", src.backend.get_into([keys[i] for i in todo], bufs))
            if got is _FAILED:
                continue
            hit = [(i, memoryview(b)[:n]) for i, b, n in zip(todo, bufs, got, strict=True) if n is not None]
            if not hit:
                continue
            stored = await self._store(target, [keys[i] for i, _ in hit], [v for _, v in hit], may_wait=False)
            for (i, _), r in zip(hit, stored, strict=True):
                done[i] = r.ok
            todo = [i for i in todo if not done[i]]
        moved = [k for k, ok in zip(keys, done, strict=True) if ok]
        if moved and not keep_source:
            # Also for keys the target held already: after a move the source no longer has them.
            for src_index in sources:
                src = self._tiers[src_index]
                await self._guard(src, "delete", src.backend.delete(moved))
                if src.policy is not None:
                    for key in moved:
                        src.policy.on_remove(key)
        return done

    # -- budgeted lookups --------------------------------------------------------------------

    async def contains(self, keys: Sequence[CacheKey], *, budget: float | None = None) -> list[bool]:
        """Whether each key is held by some tier, in input order.

        Args:
            keys: Keys to check.
            budget: Answer within about this many seconds: a tier that has not answered by then
                counts as not holding the keys it was asked for (see the module docstring).
                None: each tier may take up to ``tier_timeout``.
        """
        if budget is None:
            return await super().contains(keys)
        token = _DEADLINE.set(asyncio.get_running_loop().time() + _check_budget(budget))
        try:
            return await super().contains(keys)
        finally:
            _DEADLINE.reset(token)

    async def lookup_prefix(self, keys: Sequence[CacheKey], *, budget: float | None = None) -> int:
        """Length of the leading run of held keys; ``budget`` as in :meth:`contains`."""
        found = await self.contains(keys, budget=budget)
        for i, hit in enumerate(found):
            if not hit:
                return i
        return len(found)

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        outcomes = await asyncio.gather(*(t.backend.open() for t in self._tiers), return_exceptions=True)
        failures: list[BaseException] = []
        for tier, out in zip(self._tiers, outcomes, strict=True):
            if isinstance(out, BaseException):
                if not isinstance(out, Exception):
                    raise out
                failures.append(out)
                self._record_failure(tier, "open", out)
        if len(failures) == len(self._tiers):
            # Nothing can serve: fail like any backend that cannot connect. No tier is open, so
            # nothing leaks, and a later open() may retry (every tier is still NEW).
            first = failures[0]
            if isinstance(first, BackendError):
                raise first
            raise BackendUnavailableError(f"{self!r}: no tier could be opened: {first}") from first
        for tier in self._tiers:
            if tier.policy is not None and tier.backend.is_open:
                await self._seed(tier)
        self._loop = asyncio.get_running_loop()
        for tier in self._tiers[1:]:
            tier.queue = asyncio.Queue(self.settings.write_back_queue)
            tier.writer = self._loop.create_task(self._writer(tier), name=f"lmcache-writeback-{tier.index}")

    async def _ensure_open(self) -> None:
        await super()._ensure_open()
        self._follow_loop()

    def _follow_loop(self) -> None:
        """Move the background writers to the running event loop when it is not theirs.

        A stack may be used from one event loop after another (``asyncio.run`` twice, as the
        plain backends may): its writers, probes and queues belong to the loop that opened it,
        and that loop's end cancelled them (a batch a writer held then was dropped and counted).
        The write-backs still queued move to new queues drained by new writers on this loop, so
        they are not lost and :meth:`aclose` does not wait for writers that will never run.

        Raises:
            StateError: The stack's loop is still running (in another thread): one stack is
                not shared by two live loops at once.
        """
        loop = asyncio.get_running_loop()
        old = self._loop
        if old is None or old is loop:
            return
        if old.is_running():
            raise StateError(
                f"{self!r} belongs to an event loop still running in another thread; "
                "use one TieredBackend per event loop"
            )
        self._loop = loop
        stale = [t.writer for t in self._tiers if t.writer is not None] + list(self._background)
        if not old.is_closed():  # stopped, not closed: let its tasks end if it ever runs again
            for task in stale:
                task.cancel()
        self._background = set()
        self._progress = None
        for tier in self._tiers:
            tier.probe = None
            tier.lagging = None
            tier.inflight.clear()
            if tier.queue is None:
                continue
            queue: asyncio.Queue[_WriteBack] = asyncio.Queue(self.settings.write_back_queue)
            while not tier.queue.empty():
                queue.put_nowait(tier.queue.get_nowait())
                tier.queue.task_done()
            tier.queue = queue
            tier.writer = loop.create_task(self._writer(tier), name=f"lmcache-writeback-{tier.index}")

    async def _seed(self, tier: _Tier) -> None:
        """Teach the policy what a persistent tier already holds, so old values can be evicted.

        Sizes come from ``list_entries()``; where a tier cannot tell a size, the key gets the
        average of the unknown ones (``used_bytes`` minus the known sizes), which is good
        enough to size eviction rounds. Seeded keys rank as the oldest.
        """
        caps = tier.backend.capabilities
        if tier.policy is None or not (caps.listing and caps.persistent):
            return
        entries: list[tuple[CacheKey, int | None]] = []
        try:
            async for entry in tier.backend.list_entries():
                entries.append(entry)
        except Exception as exc:
            self._record_failure(tier, "list", exc)
        unknown = sum(1 for _, size in entries if size is None)
        guess = 1
        if unknown:
            used = self._tier_gauges(tier)[1] or 0
            known = sum(size for _, size in entries if size is not None)
            guess = max(1, (used - known) // unknown)
        for key, size in entries:
            if key not in tier.policy:
                tier.policy.on_insert(key, size if size is not None else guess)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued write-back has been attempted.

        Args:
            timeout: Seconds to wait at most (None: no limit).

        Returns:
            True when the queues drained, False on timeout (or when never opened: True).
        """
        if self._loop is not None:
            self._follow_loop()
        queues = [t.queue for t in self._tiers if t.queue is not None]
        if not queues:
            return True
        try:
            await asyncio.wait_for(asyncio.gather(*(q.join() for q in queues)), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def wait_persisted(
        self, keys: Sequence[CacheKey], sizes: Sequence[int], timeout: float | None = None
    ) -> list[bool]:
        """Wait until the last persistent tier holds each of ``keys`` (a cache server's ``ack=durable``).

        Unlike :meth:`flush` this waits for these keys' write-backs only: other callers may keep
        the queues busy for ever. A key whose write-back to that tier is not queued or did not
        land (dropped from a full queue, a failed tier, a put that found the key in tier 0
        already) is queued once more, read back from tier 0 like any write-back; a full queue
        is waited for, a suspended tier is not.

        Args:
            keys: Keys just put into tier 0.
            sizes: Their values' sizes in bytes (to queue a write-back again).
            timeout: Seconds to wait at most (None: no limit).

        Returns:
            Per key, whether the last persistent tier holds it. When no tier below tier 0 is
            persistent there is nothing to wait for, and every key counts as held.
        """
        keys = list(keys)
        if self._loop is not None:
            self._follow_loop()
        target = max((t.index for t in self._tiers if t.backend.capabilities.persistent), default=0)
        if target == 0 or not keys:
            return [True] * len(keys)
        tier = self._tiers[target]
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        held = [False] * len(keys)
        todo = list(range(len(keys)))
        requeued: set[int] = set()
        while todo:
            if not any((job := self._pending.get(keys[i])) is not None and target in job.tiers for i in todo):
                found = await self._guard(tier, "contains", tier.backend.contains([keys[i] for i in todo]), n=len(todo))
                if found is _FAILED:
                    break
                for i, f in zip(todo, found, strict=True):
                    held[i] = bool(f)
                # A key written back again that is still missing is given up on.
                todo = [i for i in todo if not held[i] and i not in requeued]
                if not todo or self._suspended(tier) or tier.queue is None:
                    break
                for i in todo:
                    if tier.queue.full():  # the rest after the writer made room
                        break
                    self._enqueue(keys[i], sizes[i], range(target, target + 1))
                    requeued.add(i)
            # The writers wake waiters (_wake_puts) after every batch they are done with.
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                break
            if self._progress is None:
                self._progress = asyncio.Event()
            try:
                await _with_timeout(self._progress.wait(), left)  # type: ignore[arg-type]
            except (TimeoutError, asyncio.TimeoutError):
                break
        return held

    async def _close(self) -> None:
        self._follow_loop()  # writers on this loop drain what an earlier loop left queued
        background = list(self._background)  # probes and lookups past their budget: no buffers held
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        if not await self.flush(self.settings.close_timeout):
            logger.warning(
                "%r: write-back did not drain within %ss; dropping the rest", self, self.settings.close_timeout
            )
        writers = [t.writer for t in self._tiers if t.writer is not None]
        for w in writers:
            w.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        for tier in self._tiers:
            q = tier.queue
            while q is not None and not q.empty():
                q.get_nowait()
                q.task_done()
                tier.stats.writeback_dropped += 1
                tier.stats.put_failures += 1
            tier.writer = None
        self._pending.clear()
        await self._close_owned()

    async def _register_host_memory(self, view: memoryview) -> None:
        # Every tier may move values straight from or into the caller's memory.
        for tier in self._tiers:
            try:
                await tier.backend.register_host_memory(view)
            except Exception as exc:  # a hint: the tier still works, per call
                self.log_once(f"register_host_memory:{tier.backend.url}", "%r: %r: %s", self, tier.backend, exc)

    async def _unregister_host_memory(self, view: memoryview) -> None:
        for tier in self._tiers:
            try:
                await tier.backend.unregister_host_memory(view)
            except Exception as exc:
                self.log_once(f"unregister_host_memory:{tier.backend.url}", "%r: %r: %s", self, tier.backend, exc)

    async def _close_owned(self) -> None:
        for tier in self._tiers:
            if tier.owned:
                try:
                    await tier.backend.aclose()
                except Exception as exc:
                    self._record_failure(tier, "close", exc)

    # -- guarded tier calls ------------------------------------------------------------------

    async def _guard(self, tier: _Tier, op: str, call: Coroutine[Any, Any, T], *, probe: bool = False, n: int = 0) -> T:
        """Run one tier call under the tier timeout; a failure returns ``_FAILED`` (counted).

        Caller errors (:class:`InvalidArgumentError`, e.g. a ``dst`` smaller than the value)
        propagate: they are not the tier's fault and retrying elsewhere would not help. A
        suspended tier (one that timed out and has not answered since) is skipped at once
        (counted as ``skipped``), so one hung tier costs one timeout, not one per call;
        ``probe`` calls (pings) are always made and any success lifts the suspension. ``n`` is
        the number of keys a failure costs (``lookup_failures``/``get_failures``/``put_failures``
        by ``op``).
        """
        if not probe and self._suspended(tier):
            call.close()  # never started: nothing to cancel or await
            tier.stats.skipped += 1
            self._count_failure(tier, op, n)
            return _FAILED  # type: ignore[no-any-return]
        try:
            out = await _with_tier_timeout(call, self.settings.tier_timeout, tier.inflight)
        except InvalidArgumentError:
            raise
        except Exception as exc:
            self._record_failure(tier, op, exc)
            self._count_failure(tier, op, n)
            return _FAILED  # type: ignore[no-any-return]
        tier.healthy = True
        tier.suspended_until = 0.0
        return out

    async def _guard_within(self, tier: _Tier, op: str, call: Coroutine[Any, Any, T], n: int, deadline: float) -> T:
        """:meth:`_guard` for a caller that waits only until ``deadline`` (loop time).

        A call still running at the deadline is left to finish in the background under the
        tier timeout (only for calls that hold no caller buffer: ``contains``); the tier is
        *lagging* until it ends, and budgeted calls skip a lagging tier.
        """
        lagging = tier.lagging
        if (lagging is not None and not lagging.done()) or self._suspended(tier):
            call.close()
            tier.stats.skipped += 1
            self._count_failure(tier, op, n)
            return _FAILED  # type: ignore[no-any-return]
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left >= self.settings.tier_timeout:
            return await self._guard(tier, op, call, n=n)
        if left <= 0:  # the budget went on faster tiers: do not start what nobody waits for
            call.close()
            tier.stats.budget_exceeded += 1
            self._count_failure(tier, op, n)
            return _FAILED  # type: ignore[no-any-return]
        task = loop.create_task(self._guard(tier, op, call))  # failures counted here, not there
        try:
            await asyncio.wait({task}, timeout=left)
        finally:
            if not task.done():  # past the budget, or our caller was cancelled: let it finish
                tier.lagging = task
                self._keep(task)
                task.add_done_callback(lambda t: self._lag_done(tier, t))
        if not task.done():
            tier.stats.budget_exceeded += 1
            self._count_failure(tier, op, n)
            self.log_once(
                f"{tier.index}:{op}:budget",
                "%r: %s %s did not answer within its lookup budget; treating it as a miss",
                self,
                tier.label(),
                op,
            )
            return _FAILED  # type: ignore[no-any-return]
        out = task.result()
        if out is _FAILED:
            self._count_failure(tier, op, n)
        return out

    def _lag_done(self, tier: _Tier, task: asyncio.Task[Any]) -> None:
        if tier.lagging is task:
            tier.lagging = None
        if not task.cancelled():
            task.exception()  # retrieved: a caller error here has nobody left to tell

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a reference to a background task until it ends (the loop keeps only weak ones)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _suspended(self, tier: _Tier) -> bool:
        """Whether ``tier`` is suspended; starts its background probe when one is due."""
        if not tier.suspended_until:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() >= tier.suspended_until and (tier.probe is None or tier.probe.done()) and self.is_open:
            tier.probe = loop.create_task(self._probe(tier), name=f"lmcache-probe-{tier.index}")
            self._keep(tier.probe)
        return True

    async def _probe(self, tier: _Tier) -> None:
        """Ping a suspended tier: an answer lifts the suspension, a failure re-arms it."""
        if await self._guard(tier, "probe", tier.backend.ping(), probe=True) is _FAILED and tier.suspended_until:
            retry = asyncio.get_running_loop().time() + self.settings.tier_retry_after
            tier.suspended_until = max(tier.suspended_until, retry)

    def _count_failure(self, tier: _Tier, op: str, n: int) -> None:
        field = _FAILURE_COUNTERS.get(op)
        if field is not None and n:
            setattr(tier.stats, field, getattr(tier.stats, field) + n)

    def _drop_writebacks(self, tier: _Tier) -> None:
        """Drop what waits in ``tier``'s write-back queue (it is suspended): unpin it in tier 0."""
        q = tier.queue
        dropped = 0
        while q is not None and not q.empty():
            job = q.get_nowait()
            q.task_done()
            self._job_left(job, tier)
            dropped += 1
        if dropped:
            tier.stats.writeback_dropped += dropped
            tier.stats.put_failures += dropped
            self._wake_puts()

    def _job_left(self, job: _WriteBack, tier: _Tier) -> None:
        """``tier``'s writer is done with ``job`` (copied, failed or dropped)."""
        job.tiers.discard(tier.index)
        if not job.tiers and self._pending.get(job.key) is job:
            del self._pending[job.key]

    def _wake_puts(self) -> None:
        if self._progress is not None:  # wake puts waiting for room in tier 0
            self._progress.set()
            self._progress = None

    def _record_failure(self, tier: _Tier, op: str, exc: BaseException) -> None:
        tier.healthy = False
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # ours, or the tier's BackendTimeoutError
            tier.stats.timeouts += 1
            self.log_once(
                f"{tier.index}:{op}:timeout",
                "%r: %s %s timed out (tier_timeout=%ss); treating it as a miss",
                self,
                tier.label(),
                op,
                self.settings.tier_timeout,
            )
        else:
            tier.stats.errors += 1
            self.log_once(
                f"{tier.index}:{op}:error",
                "%r: %s %s failed (%s: %s); treating it as a miss",
                self,
                tier.label(),
                op,
                type(exc).__name__,
                exc,
            )
        if _trips_breaker(exc):
            self._suspend(tier)

    def _suspend(self, tier: _Tier) -> None:
        """Skip ``tier`` for ``tier_retry_after`` (it is down); its probe decides when it is back.

        The calls to it still in flight are released at once (as timeouts): they wait on the
        same dead tier, and letting each run out its own ``tier_timeout`` is how concurrent
        callers used to pay for one fault many times over.
        """
        if self.settings.tier_retry_after <= 0:
            return
        loop = asyncio.get_running_loop()
        newly = not tier.suspended_until
        tier.suspended_until = loop.time() + self.settings.tier_retry_after
        if not newly:
            return
        self.log_once(
            f"{tier.index}:suspended",
            "%r: %s is skipped until it answers again (probed every %ss)",
            self,
            tier.label(),
            self.settings.tier_retry_after,
        )
        self._drop_writebacks(tier)
        for deadline in list(tier.inflight):
            with contextlib.suppress(RuntimeError):  # one expiring on its own right now
                deadline.reschedule(loop.time())

    # -- reads -------------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        deadline = _DEADLINE.get()
        found = [False] * len(keys)
        todo = list(range(len(keys)))
        for tier in self._tiers:
            if not todo:
                break
            call = tier.backend.contains([keys[i] for i in todo])
            if deadline is None:
                got = await self._guard(tier, "contains", call, n=len(todo))
            else:
                got = await self._guard_within(tier, "contains", call, len(todo), deadline)
            if got is _FAILED:
                continue
            rest = []
            for i, hit in zip(todo, got, strict=True):
                if hit:
                    found[i] = True
                else:
                    rest.append(i)
            todo = rest
        return found

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        results: list[int | None] = [None] * len(keys)
        hit_tier = [0] * len(keys)
        top_failed = False
        epoch = self._delete_epoch
        todo = list(range(len(keys)))
        for tier in self._tiers:
            if not todo:
                break
            sub_keys = [keys[i] for i in todo]
            got = await self._guard(
                tier, "get", tier.backend.get_into(sub_keys, [dsts[i] for i in todo]), n=len(sub_keys)
            )
            if got is _FAILED:
                top_failed = top_failed or tier.index == 0
                continue
            rest = []
            for i, n in zip(todo, got, strict=True):
                if n is None:
                    tier.stats.misses += 1
                    rest.append(i)
                else:
                    tier.stats.hits += 1
                    results[i] = n
                    hit_tier[i] = tier.index
                    if tier.policy is not None:
                        tier.policy.on_access(keys[i])
            todo = rest
        # Promoting into a tier 0 that just failed this read would only add a second wait.
        if self.settings.promote_on_hit and len(self._tiers) > 1 and not top_failed:
            await self._promote(keys, dsts, results, hit_tier, epoch)
        return results

    async def _promote(
        self,
        keys: list[CacheKey],
        dsts: list[memoryview],
        results: list[int | None],
        hit_tier: list[int],
        epoch: int,
    ) -> None:
        """Put slower-tier hits into tier 0 from their ``dst``; queue them for the tiers between.

        A delete that ran since the read began (``epoch`` changed) may have removed these keys:
        promotion is best-effort, so it is skipped, or undone when the delete ran during it,
        rather than bring a deleted value back.
        """
        if self._delete_epoch != epoch:
            return
        seen: set[CacheKey] = set()
        p_keys: list[CacheKey] = []
        p_views: list[memoryview] = []
        p_from: list[int] = []
        for i, key in enumerate(keys):
            n = results[i]
            if n is None or hit_tier[i] == 0 or key in seen:
                continue
            seen.add(key)
            p_keys.append(key)
            p_views.append(dsts[i][:n])
            p_from.append(hit_tier[i])
        if not p_keys:
            return
        top = self._tiers[0]
        # No waiting for write-back room here: the caller's read is done and should return.
        stored = await self._store(top, p_keys, p_views, may_wait=False)
        if self._delete_epoch != epoch:
            undo = [k for k, r in zip(p_keys, stored, strict=True) if r.status is PutStatus.STORED]
            if undo:
                await self._guard(top, "delete", top.backend.delete(undo))
                if top.policy is not None:
                    for key in undo:
                        top.policy.on_remove(key)
            return
        for key, view, src_tier, r in zip(p_keys, p_views, p_from, stored, strict=True):
            if r.status is PutStatus.STORED:
                top.stats.promotions += 1
                if src_tier > 1:
                    self._enqueue(key, view.nbytes, range(1, src_tier))

    # -- writes ------------------------------------------------------------------------------

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results = await self._store(self._tiers[0], keys, srcs)
        if len(self._tiers) > 1:
            slower = range(1, len(self._tiers))
            around: list[int] = []
            for i, (key, src, r) in enumerate(zip(keys, srcs, results, strict=True)):
                if r.status is PutStatus.STORED:
                    self._enqueue(key, src.nbytes, slower)
                elif r.status is PutStatus.REJECTED and r.reason in _WRITE_AROUND:
                    around.append(i)
            if around:
                await self._write_around(keys, srcs, results, around)
        return results

    async def _write_around(
        self, keys: list[CacheKey], srcs: list[memoryview], results: list[PutResult], todo: list[int]
    ) -> None:
        """Put the values tier 0 could not take (``todo``) straight into the next tier that can.

        The caller's sources are still borrowed here, so this is a synchronous put into the
        slower tier (not a write-back, which reads tier 0). A value stored this way lives in
        that tier only until a read promotes it; its result replaces tier 0's rejection, which
        stays when no tier takes the value.
        """
        for tier in self._tiers[1:]:
            if not todo:
                return
            got = await self._store(tier, [keys[i] for i in todo], [srcs[i] for i in todo], may_wait=False)
            rest = []
            for i, r in zip(todo, got, strict=True):
                if r.ok:
                    results[i] = r
                    tier.stats.written_around += 1
                else:
                    rest.append(i)
            todo = rest

    async def _store(
        self, tier: _Tier, keys: list[CacheKey], views: list[memoryview], *, may_wait: bool = True
    ) -> list[PutResult]:
        """Put into one tier, evicting policy victims and retrying when it is full."""
        policy = tier.policy
        # Waiting for write-back to free room (see _evict) is bounded once per call, not per round.
        deadline = asyncio.get_running_loop().time() + (self.settings.tier_timeout if may_wait else 0.0)
        if policy is not None:
            incoming = sum(v.nbytes for k, v in zip(keys, views, strict=True) if k not in policy)
            capacity, used = self._tier_gauges(tier)
            if capacity is not None and used is not None and used + incoming > capacity and incoming <= capacity:
                await self._evict(tier, used + incoming - capacity, deadline)
        got = await self._guard(tier, "put", tier.backend.put(keys, views), n=len(keys))
        if got is _FAILED:
            return [rejected("error")] * len(keys)
        results: list[PutResult] = list(got)
        if policy is not None:
            capacity = self._tier_gauges(tier)[0]
            for _ in range(self.settings.evict_retries):
                full = [
                    i
                    for i, r in enumerate(results)
                    if r.status is PutStatus.REJECTED
                    and r.reason == "capacity"
                    and (capacity is None or views[i].nbytes <= capacity)  # too big ever to fit
                ]
                if not full or not await self._evict(tier, sum(views[i].nbytes for i in full), deadline):
                    break
                retry = await self._guard(
                    tier, "put", tier.backend.put([keys[i] for i in full], [views[i] for i in full]), n=len(full)
                )
                if retry is _FAILED:
                    break
                for i, r in zip(full, retry, strict=True):
                    results[i] = r
            for key, view, r in zip(keys, views, results, strict=True):
                if r.status is PutStatus.STORED or (r.status is PutStatus.EXISTS and key not in policy):
                    policy.on_insert(key, view.nbytes)
        return results

    async def _evict(self, tier: _Tier, n_bytes: int, deadline: float) -> bool:
        """Delete policy victims worth ``n_bytes`` from ``tier``; False when nothing could go.

        Values still waiting to be copied out of tier 0 are protected. When they are all that
        is left to evict, the put waits (until ``deadline``) for the writers to copy some: that
        is the backpressure of a tier 0 filled faster than the slower tiers drain it, and
        it also lets writers run when callers never yield to the event loop.
        """
        assert tier.policy is not None
        pending = self._pending if tier.index == 0 else None
        protected = _Protected(pending, self._pins) if self._pins else (pending if pending is not None else ())
        victims = tier.policy.victims(n_bytes, protected)
        if not victims and tier.index == 0 and self._pending:
            loop = asyncio.get_running_loop()
            stalled = False
            while not victims and self._pending and (remaining := deadline - loop.time()) > 0:
                if not stalled:
                    stalled = True
                    tier.stats.writeback_stalls += 1
                if self._progress is None:
                    self._progress = asyncio.Event()
                try:
                    await _with_timeout(self._progress.wait(), remaining)
                except (TimeoutError, asyncio.TimeoutError):
                    break
                victims = tier.policy.victims(n_bytes, protected)
        if not victims:
            self.log_once(f"{tier.index}:evict:none", "%r: %s is full and has nothing to evict", self, tier.label())
            return False
        if await self._guard(tier, "evict", tier.backend.delete(victims)) is _FAILED:
            return False
        for key in victims:
            tier.policy.on_remove(key)
        tier.stats.evictions += len(victims)
        return True

    def _tier_gauges(self, tier: _Tier) -> tuple[int | None, int | None]:
        """``(capacity_bytes, used_bytes)`` from the tier's stats, where it reports them."""
        try:
            st = tier.backend.stats()
        except Exception:
            return None, None
        cap, used = st.get("capacity_bytes"), st.get("used_bytes")
        return (cap if isinstance(cap, int) else None), (used if isinstance(used, int) else None)

    def _enqueue(self, key: CacheKey, size: int, tiers: range) -> None:
        job = self._pending.get(key)
        if job is None:
            job = _WriteBack(key, size)
        for t in tiers:
            tier = self._tiers[t]
            if t in job.tiers or tier.queue is None:
                continue
            if self._suspended(tier):  # hung: do not pin the value in tier 0 for it
                tier.stats.writeback_dropped += 1
                tier.stats.put_failures += 1
                continue
            try:
                tier.queue.put_nowait(job)
            except asyncio.QueueFull:
                tier.stats.writeback_dropped += 1
                tier.stats.put_failures += 1
                self.log_once(
                    f"{t}:writeback:full",
                    "%r: write-back queue of %s is full (%d); dropping write-backs (counted)",
                    self,
                    tier.label(),
                    self.settings.write_back_queue,
                )
                continue
            job.tiers.add(t)
            tier.stats.writeback_queued += 1
        if job.tiers:
            self._pending[key] = job

    async def _writer(self, tier: _Tier) -> None:
        """Background task: copy queued values from tier 0 into ``tier``, a batch at a time."""
        queue = tier.queue
        assert queue is not None
        while True:
            batch = [await queue.get()]
            while len(batch) < self.settings.write_back_batch and not queue.empty():
                batch.append(queue.get_nowait())
            for job in batch:
                job.busy += 1
            requeue: list[_WriteBack] = []
            try:
                if self._suspended(tier):  # hung since these were queued: dropped, not waited for
                    tier.stats.writeback_dropped += len(batch)
                    tier.stats.put_failures += len(batch)
                else:
                    await self._write_back(tier, batch)
            except asyncio.CancelledError:
                if self.is_closed:
                    tier.stats.writeback_dropped += len(batch)  # aclose() gave up on this batch
                    tier.stats.put_failures += len(batch)
                else:  # the event loop is ending under us: the next loop's writer takes it
                    requeue = batch
                raise
            except Exception as exc:
                # A bug or a caller-class error from a tier: never let the writer die.
                tier.stats.writeback_failed += len(batch)
                tier.stats.put_failures += len(batch)
                self._record_failure(tier, "write-back", exc)
            finally:
                for job in batch:
                    job.busy -= 1
                    if job.busy == 0 and job.idle is not None:
                        job.idle.set()
                    if not requeue:
                        self._job_left(job, tier)
                    queue.task_done()
                for job in requeue:
                    try:
                        queue.put_nowait(job)
                    except asyncio.QueueFull:
                        tier.stats.writeback_dropped += 1
                        tier.stats.put_failures += 1
                        self._job_left(job, tier)
                self._wake_puts()

    async def _write_back(self, tier: _Tier, batch: list[_WriteBack]) -> None:
        live = [j for j in batch if not j.cancelled]
        if not live:
            return
        top = self._tiers[0]
        views = tier.staging.views([j.size for j in live])
        got = await self._guard(top, "write-back read", top.backend.get_into([j.key for j in live], views), n=len(live))
        if got is _FAILED:
            tier.stats.writeback_failed += len(live)
            return
        jobs: list[_WriteBack] = []
        ready: list[memoryview] = []
        for job, view, n in zip(live, views, got, strict=True):
            if n is None:
                tier.stats.writeback_failed += 1  # it left tier 0 (deleted elsewhere) first
            else:
                jobs.append(job)
                ready.append(view[:n])
        if not jobs:
            return
        results = await self._store(tier, [j.key for j in jobs], ready)
        for r in results:
            if r.ok:
                tier.stats.writeback_written += 1
            else:
                tier.stats.writeback_failed += 1
        undo = [j.key for j in jobs if j.cancelled]
        if undo:  # deleted while we were copying: do not resurrect it in this tier
            await self._guard(tier, "delete", tier.backend.delete(undo))
            if tier.policy is not None:
                for key in undo:
                    tier.policy.on_remove(key)

    async def _delete(self, keys: list[CacheKey]) -> None:
        # Cancel queued write-backs, and wait for ones being copied right now: otherwise their
        # put could land in a slower tier after our delete and the key would be visible there
        # until the writer undoes it. A batch in flight ends within a few tier timeouts.
        self._delete_epoch += 1
        busy: list[asyncio.Event] = []
        for key in keys:
            job = self._pending.pop(key, None)
            if job is not None:
                job.cancelled = True
                if job.busy:
                    if job.idle is None:
                        job.idle = asyncio.Event()
                    busy.append(job.idle)
        if busy:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await _with_timeout(asyncio.gather(*(e.wait() for e in busy)), 3 * self.settings.tier_timeout)

        async def one(tier: _Tier) -> None:
            await self._guard(tier, "delete", tier.backend.delete(keys))
            if tier.policy is not None:
                for key in keys:
                    tier.policy.on_remove(key)

        await asyncio.gather(*(one(t) for t in self._tiers))

    # -- health, stats, listing --------------------------------------------------------------

    async def _ping(self) -> None:
        outcomes = await asyncio.gather(*(self._guard(t, "ping", t.backend.ping(), probe=True) for t in self._tiers))
        if all(o is _FAILED for o in outcomes):
            raise BackendUnavailableError(f"{self!r}: no tier answered a ping")

    def _extra_stats(self) -> dict[str, Any]:
        tiers = []
        totals = TierStats()
        for tier in self._tiers:
            entry: dict[str, Any] = dataclasses.asdict(tier.stats)
            for name, value in entry.items():
                setattr(totals, name, getattr(totals, name) + value)
            try:
                backend_stats: dict[str, Any] = tier.backend.stats()
            except Exception as exc:
                backend_stats = {"error": f"{type(exc).__name__}: {exc}"}
            entry.update(
                url=redact_url(tier.backend.url, tier.backend.secret_options),
                owned=tier.owned,
                healthy=tier.healthy,
                suspended=bool(tier.suspended_until),
                writeback_pending=tier.queue.qsize() if tier.queue is not None else 0,
                staging_bytes=tier.staging.nbytes,
                tracked_keys=len(tier.policy) if tier.policy is not None else None,
                tracked_bytes=tier.policy.tracked_bytes if tier.policy is not None else None,
                backend=backend_stats,
            )
            tiers.append(entry)
        out: dict[str, Any] = {f"tier_{k}": v for k, v in dataclasses.asdict(totals).items()}
        out["writeback_pending"] = sum(t["writeback_pending"] for t in tiers)
        out["healthy_tiers"] = sum(1 for t in self._tiers if t.healthy)
        out["tiers"] = tiers
        return out

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key, _ in self._list_entries():
            yield key

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        # The union over tiers, each key once (from the fastest tier that lists it).
        seen: set[CacheKey] = set()
        for tier in self._tiers:
            if not tier.backend.capabilities.listing:
                continue
            try:
                async for key, size in tier.backend.list_entries():
                    if key not in seen:
                        seen.add(key)
                        yield key, size
            except Exception as exc:
                self._record_failure(tier, "list", exc)


if sys.version_info >= (3, 11):

    async def _with_timeout(call: Coroutine[Any, Any, T], seconds: float) -> T:
        # Runs the tier call inline in this task (no Task per call, unlike wait_for); at the
        # deadline the call is cancelled where it awaits and unwinds before TimeoutError.
        async with asyncio.timeout(seconds):
            return await call

else:  # pragma: no cover - Python 3.10

    async def _with_timeout(call: Coroutine[Any, Any, T], seconds: float) -> T:
        return await asyncio.wait_for(call, seconds)


if sys.version_info >= (3, 11):

    async def _with_tier_timeout(call: Coroutine[Any, Any, T], seconds: float, inflight: set[Any]) -> T:
        # _with_timeout whose deadline sits in ``inflight`` while the call runs, so that a
        # breaker trip can move it to "now" (asyncio.Timeout.reschedule) and release the call.
        async with asyncio.timeout(seconds) as deadline:
            inflight.add(deadline)
            try:
                return await call
            finally:
                inflight.discard(deadline)

else:  # pragma: no cover - Python 3.10: no reschedulable deadline; calls run out their own

    async def _with_tier_timeout(call: Coroutine[Any, Any, T], seconds: float, inflight: set[Any]) -> T:
        return await asyncio.wait_for(call, seconds)


class _TieredInPlace:
    """Tier 0's :class:`~lmcache.pool.InPlaceTier` seen through a :class:`TieredBackend`.

    Commits and leases do what the stack does for a put into or a read from tier 0 (policy,
    write-back, counters); everything else is tier 0's own.
    """

    __slots__ = ("_inner", "_tiered")

    def __init__(self, tiered: TieredBackend, inner: InPlaceTier) -> None:
        self._tiered = tiered
        self._inner = inner

    def reserve(self, key: CacheKey, nbytes: int) -> Reservation[CacheKey] | Refused:
        return self._inner.reserve(key, nbytes)

    def commit(self, reservation: Reservation[CacheKey]) -> bool:
        ok = self._inner.commit(reservation)
        if ok:
            self._tiered._record_stored([reservation.key], [reservation.nbytes])
        return ok

    def abort(self, reservation: Reservation[CacheKey]) -> None:
        self._inner.abort(reservation)

    def lease(self, keys: Sequence[CacheKey]) -> list[Lease[CacheKey] | None]:
        leases = self._inner.lease(keys)
        hits = [x for x in leases if x is not None]
        if hits:
            # Served from the pool, not through get_into: counted as its reads all the same.
            self._tiered._record_hits([x.key for x in hits], sizes=[x.nbytes for x in hits])
        return leases

    def release(self, lease: Lease[CacheKey]) -> None:
        self._inner.release(lease)

    def view(self, block: Block[CacheKey]) -> memoryview:
        return self._inner.view(block)

    @property
    def shared_pool(self) -> SharedPoolInfo | None:
        return self._inner.shared_pool


class TierAdmin:
    """Operator actions on a :class:`TieredBackend` (what the server's HTTP control API offers).

    Get one with :meth:`TieredBackend.admin`; it holds no state of its own.
    """

    __slots__ = ("_tiered",)

    def __init__(self, tiered: TieredBackend) -> None:
        self._tiered = tiered

    def pin(self, keys: Sequence[CacheKey], ttl: float) -> int:
        """Keep ``keys`` from being chosen as eviction victims in any tier for ``ttl`` seconds.

        A pin is a lease, not a count: pinning again extends it, and it lapses on its own, so a
        forgotten pin cannot hold space forever. Pins do not stop deletes.

        Returns:
            How many keys are pinned now (over all calls).

        Raises:
            InvalidArgumentError: ``ttl`` is not a positive number of seconds.
        """
        return self._tiered._pin(keys, ttl)

    def unpin(self, keys: Sequence[CacheKey]) -> int:
        """Drop the pins of ``keys`` (unpinned keys are ignored); returns how many were dropped."""
        return self._tiered._unpin(keys)

    def pinned(self) -> dict[CacheKey, float]:
        """Live pins: key -> seconds left."""
        return self._tiered._pinned()

    async def move(
        self,
        keys: Sequence[CacheKey],
        sizes: Sequence[int],
        to_tier: int,
        *,
        from_tier: int | None = None,
        keep_source: bool = False,
    ) -> list[bool]:
        """Copy values into tier ``to_tier`` (e.g. pre-warming tier 0); see :meth:`TieredBackend._move`.

        Returns:
            Per key, whether the value is now held by the target tier.

        Raises:
            InvalidArgumentError: A tier index that does not exist, or mismatched lengths.
        """
        return await self._tiered._move(keys, sizes, to_tier, from_tier=from_tier, keep_source=keep_source)


def _trips_breaker(exc: BaseException) -> bool:
    """Whether a tier failure means the tier is down (suspend it), not that one call went wrong.

    Timeouts (ours or the tier's) and refusals (connection refused or reset, a server not ready)
    do: the next call would fail the same way, after the same wait or the same client retries.
    Permanent errors and bugs do not: they may belong to one value, and the tier goes on serving.
    """
    return isinstance(exc, (TimeoutError, asyncio.TimeoutError, ConnectionError, TransientBackendError))


class _Protected:
    """Keys eviction must skip: values awaiting write-back (tier 0) and live operator pins."""

    __slots__ = ("_now", "_pending", "_pins")

    def __init__(self, pending: Mapping[CacheKey, Any] | None, pins: Mapping[CacheKey, float]) -> None:
        self._pending = pending
        self._pins = pins
        self._now = time.monotonic()

    def __contains__(self, key: object) -> bool:
        if self._pending is not None and key in self._pending:
            return True
        expiry = self._pins.get(key)  # type: ignore[call-overload]
        return expiry is not None and expiry > self._now


def _check_budget(budget: object) -> float:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise InvalidArgumentError(f"a lookup budget is a non-negative number of seconds, got {budget!r}")
    return float(budget)


def _combine(caps: list[Capabilities]) -> Capabilities:
    """What a stack can promise: reads may come from any tier, writes enter through tier 0."""
    return Capabilities(
        # Survives a restart once written back (aclose() flushes the write-back queues).
        persistent=any(c.persistent for c in caps),
        # Other processes see a value at once only if every tier, tier 0 included, is shared.
        shared=all(c.shared for c in caps),
        device_buffers=all(c.device_buffers for c in caps),
        listing=all(c.listing for c in caps),
        integrity_checked=all(c.integrity_checked for c in caps),
        # Tier 0 takes every put it can; when it is bounded the stack evicts to make room, and
        # what it still cannot take (a batch larger than tier 0, room held by values awaiting
        # write-back, a value too large for it) is written around it into a slower tier.
        bounded=caps[0].bounded,
        max_value_bytes=(
            None if any(c.max_value_bytes is None for c in caps) else max(c.max_value_bytes or 0 for c in caps)
        ),
    )


def _build_tiers(urls: Sequence[str], codec: str = "raw") -> list[StorageBackend]:
    from lmcache.backends.registry import open_backend
    from lmcache.serde.layer import CodecBackend, wrap_with_codec

    urls = list(urls)
    if not urls:
        raise ConfigError("tiered://: at least one tier URL is needed")
    tiers = []
    for u in urls:
        b = open_backend(u)
        # A tier that keeps values outside this process may hold values any codec wrote: it
        # reads through a codec layer (free for raw values), which also applies the default
        # codec. memory:// holds only what this stack put there and stays as it is.
        if not isinstance(b, (CodecBackend, TieredBackend)) and split_url(u).scheme != "memory":
            b = wrap_with_codec(b, {"codec": codec}, explicit=False)
        tiers.append(b)
    return tiers
