"""``BlockRemoved`` KV events for the vLLM connector: which announced blocks lmcache no longer holds.

The scheduler-side connector announces the vLLM blocks its stores cover with ``BlockStored``
events (``medium="LMCACHE"``). When a tier later evicts the chunks behind them (capacity, a
Redis ``maxmemory`` policy, a reset from another process, a server restart), KV-aware routers
must learn it, or they keep routing to a cache that misses.

How evictions are learnt: :class:`EvictionWatch` remembers which chunk keys back each announced
block and, at most every ``interval`` seconds, asks the tiers about up to ``max_keys`` of those
keys (one batched ``contains`` per tier, round robin over the tracked keys). A block whose chunk
no tier holds any more is reported once as removed and forgotten. This works the same for every
shared tier (the per-host ``lmcache server``, ``file://``, ``redis://``), needs no protocol
change, and reports what a router cares about: a chunk evicted from the server's memory but
still on its ``file://`` tier is still a hit, so it is not removed. Its costs are bounded: one
batched ``contains`` of at most ``max_keys`` keys per ``interval``, run on the engine's event
loop (never on vLLM's scheduler thread), and at most ``max_blocks`` tracked blocks (the oldest
are dropped without an event: a router's entry for them can go stale, costing a miss).

A check whose tier fails or times out reports nothing (a tier that is down is not an eviction);
keys announced less than ``grace`` seconds ago are not checked yet (their store may not have
landed). The watch has no vLLM import; :func:`block_removed_events` builds vLLM's event objects.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Hashable, Sequence
from typing import Any

from lmcache.keys import CacheKey

__all__ = ["EvictionWatch", "block_removed_events", "chunk_keys_of_blocks", "tiers_holding"]

logger = logging.getLogger(__name__)

#: Seconds after its announcement before a key is checked: its store is handed to the workers in
#: the same step and lands asynchronously.
DEFAULT_GRACE = 2.0
#: Tracked blocks at most (about 100 bytes each).
DEFAULT_MAX_BLOCKS = 200_000


async def tiers_holding(tiers: Sequence[Any], keys: Sequence[CacheKey], timeout: float) -> list[bool]:
    """Whether some tier holds each key, asking every tier directly (one batched ``contains`` each).

    Unlike :meth:`TieredBackend.contains`, a tier that fails or does not answer within
    ``timeout`` raises instead of counting as a miss, so the caller can tell "evicted" from
    "could not ask".

    Raises:
        Exception: Whatever a tier raised, or :class:`TimeoutError`.
    """
    found = [False] * len(keys)
    for tier in tiers:
        rest = [i for i, f in enumerate(found) if not f]
        if not rest:
            break
        held = await asyncio.wait_for(tier.contains([keys[i] for i in rest]), timeout)
        for i, h in zip(rest, held, strict=True):
            found[i] = bool(h)
    return found


class EvictionWatch:
    """Tracks announced blocks and the chunk keys behind them; finds the blocks whose chunks are gone.

    Thread safety: :meth:`track` and :meth:`poll` are called from vLLM's scheduler thread; the
    checks run on the engine's loop and are collected by a later :meth:`poll`.

    Args:
        interval: Seconds between checks (0: never check).
        max_keys: Keys per check at most.
        grace: Seconds after tracking before a key is checked.
        max_blocks: Blocks tracked at most; the oldest go first, without an event.
        clock: Monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        interval: float,
        max_keys: int,
        *,
        grace: float = DEFAULT_GRACE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_keys = max_keys
        self.grace = grace
        self.max_blocks = max_blocks
        self._clock = clock
        self._lock = threading.Lock()
        # block hash -> the keys of the chunks holding its tokens (insertion order: oldest first)
        self._blocks: collections.OrderedDict[Hashable, tuple[CacheKey, ...]] = collections.OrderedDict()
        # key -> (announced at, the blocks it backs)
        self._keys: dict[CacheKey, tuple[float, set[Hashable]]] = {}
        self._cursor: collections.deque[CacheKey] = collections.deque()  # round-robin order of keys
        self._pending: tuple[list[CacheKey], concurrent.futures.Future[list[bool]]] | None = None
        self._next_check = 0.0
        self.checks = 0
        self.checked_keys = 0
        self.failed_checks = 0
        self.dropped_blocks = 0

    @property
    def enabled(self) -> bool:
        """Whether checks run at all."""
        return self.interval > 0

    def __len__(self) -> int:
        return len(self._blocks)

    def track(self, block_hashes: Sequence[Hashable], keys_per_block: Sequence[Sequence[CacheKey]]) -> None:
        """Remember announced blocks and the chunk keys behind each (a re-announced block is refreshed)."""
        if not self.enabled:
            return
        now = self._clock()
        with self._lock:
            for block, keys in zip(block_hashes, keys_per_block, strict=True):
                self._forget_block(block)
                self._blocks[block] = tuple(keys)
                for key in keys:
                    entry = self._keys.get(key)
                    if entry is None:
                        self._keys[key] = (now, {block})
                        self._cursor.append(key)
                    else:
                        entry[1].add(block)
            while len(self._blocks) > self.max_blocks:
                oldest = next(iter(self._blocks))
                self._forget_block(oldest)
                self.dropped_blocks += 1

    def _forget_block(self, block: Hashable) -> None:
        keys = self._blocks.pop(block, None)
        for key in keys or ():
            entry = self._keys.get(key)
            if entry is not None:
                entry[1].discard(block)
                if not entry[1]:
                    del self._keys[key]  # its cursor entry is skipped when reached

    def poll(
        self, submit: Callable[[Coroutine[Any, Any, list[bool]]], concurrent.futures.Future[list[bool]]], tiers: Any
    ) -> list[Hashable]:
        """Collect a finished check and start the next when due; never blocks.

        Args:
            submit: Runs a coroutine on the engine's loop and returns its future.
            tiers: The tier backends to ask (a callable returning them, or a sequence).

        Returns:
            Block hashes found removed since the last call (each reported once).
        """
        if not self.enabled:
            return []
        removed: list[Hashable] = []
        with self._lock:
            if self._pending is not None:
                keys, fut = self._pending
                if not fut.done():
                    return []
                self._pending = None
                try:
                    held = fut.result()
                except Exception as exc:  # a tier that cannot answer is not an eviction
                    self.failed_checks += 1
                    logger.debug("lmcache: eviction check failed, nothing reported: %s", exc)
                    held = [True] * len(keys)
                for key, h in zip(keys, held, strict=True):
                    if h or key not in self._keys:
                        continue
                    for block in list(self._keys[key][1]):
                        self._forget_block(block)
                        removed.append(block)
            now = self._clock()
            if now < self._next_check:
                return removed
            self._next_check = now + self.interval
            batch = self._next_batch(now)
            if batch:
                self.checks += 1
                self.checked_keys += len(batch)
                tier_list = tiers() if callable(tiers) else tiers
                self._pending = (batch, submit(tiers_holding(tier_list, batch, timeout=max(self.interval, 5.0))))
        return removed

    def _next_batch(self, now: float) -> list[CacheKey]:
        """Up to ``max_keys`` tracked keys past their grace, round robin."""
        batch: list[CacheKey] = []
        seen = 0
        while self._cursor and len(batch) < self.max_keys and seen < len(self._cursor):
            key = self._cursor.popleft()
            entry = self._keys.get(key)
            if entry is None:
                continue  # forgotten: drop it from the rotation
            self._cursor.append(key)
            seen += 1
            if now - entry[0] >= self.grace:
                batch.append(key)
        return batch

    def close(self) -> None:
        """Forget everything (a check in flight is left to finish on its own)."""
        with self._lock:
            self._pending = None
            self._blocks.clear()
            self._keys.clear()
            self._cursor.clear()


def chunk_keys_of_blocks(
    engine: Any, tokens: Sequence[int], end: int, blocks: range, block_size: int
) -> list[tuple[CacheKey, ...]]:
    """For each vLLM block ``first..last-1``, the keys of the stored chunks holding its tokens.

    Args:
        engine: The :class:`~lmcache.engine.CacheEngine` that keys the chunks.
        tokens: The request's tokens; ``tokens[:end]`` were handed to stores.
        end: Stored extent (the blocks lie within it).
        blocks: The block indices.
        block_size: Tokens per vLLM block.
    """
    chunks = engine.chunks(list(tokens[:end]))
    out: list[tuple[CacheKey, ...]] = []
    for b in blocks:
        lo, hi = b * block_size, (b + 1) * block_size
        out.append(tuple(engine.scope.key(c.hash) for c in chunks if c.start < hi and c.end > lo))
    return out


def block_removed_events(block_hashes: Sequence[Hashable]) -> list[Any]:
    """The ``BlockRemoved`` events (vLLM's) for lmcache's blocks (``medium="LMCACHE"``, group 0).

    One event per call, as vLLM's own prefix cache does for a batch of evictions.
    """
    if not block_hashes:
        return []
    from vllm.distributed.kv_events import BlockRemoved

    return [BlockRemoved(block_hashes=list(block_hashes), medium="LMCACHE", group_idx=0)]
