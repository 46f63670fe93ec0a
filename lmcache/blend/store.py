"""Position-free segment KV in an engine's tiers, under keys that never meet prefix keys.

A segment (a document, a system prompt) is keyed by its own tokens only: chunks are hashed with
the chain restarting at the segment's first token, so the same document has the same keys
wherever it stood in a prompt. Every key carries the scope tag ``lmcache.blend=segment-v1``,
so a segment chunk and a prefix chunk with equal tokens are different keys (their KV differs:
the prefix chunk saw the tokens before it). The trailing partial chunk is stored too, because a
segment is only usable whole.

A segment may be stored as computed right after a shared prefix (a system prompt, the way a RAG
deployment's prompts all begin): its KV then saw that prefix, its real attention sink, and
depends on it. Such entries carry a second tag, ``lmcache.blend.after=<prefix digest>``, so a
segment computed after one prefix never answers for another prefix, nor for no prefix.

:class:`SegmentStore` drives the engine's own lookup/retrieve/store machinery (pool, budgets,
failure counting, in-flight dedup) through a scoped view of the engine: a backend failure is a
miss, never an error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
from typing import Any

import numpy as np

from lmcache.engine import CacheEngine, KVDestination, KVSource
from lmcache.errors import StateError
from lmcache.keys import ChunkHasher, KeyScope

__all__ = ["AFTER_TAG", "BLEND_TAG", "BLEND_TAG_VALUE", "SegmentStore", "blend_scope", "prefix_digest"]

#: Scope tag name on every segment key.
BLEND_TAG = "lmcache.blend"
#: Its value; bump when the stored form of a segment changes.
BLEND_TAG_VALUE = "segment-v1"
#: Scope tag naming the prefix a segment was computed after (absent: computed alone).
AFTER_TAG = "lmcache.blend.after"


def prefix_digest(tokens: Any) -> str:
    """A 32-hex-digit digest of a prefix's token ids (hashed as little-endian int64)."""
    ids = np.asarray(tokens.cpu() if hasattr(tokens, "cpu") else tokens, dtype="<i8")
    return hashlib.blake2b(ids.tobytes(), digest_size=16, person=b"lmcache-blend").hexdigest()


def blend_scope(scope: KeyScope, after: str | None = None) -> KeyScope:
    """``scope`` with the blend tag added (replacing tags of the blend names).

    Args:
        scope: The engine's key scope.
        after: :func:`prefix_digest` of the prefix the segments were computed after, if any.
    """
    tags = {name: value for name, value in scope.tags if name not in (BLEND_TAG, AFTER_TAG)}
    tags[BLEND_TAG] = BLEND_TAG_VALUE
    if after is not None:
        tags[AFTER_TAG] = after
    return dataclasses.replace(scope, tags=tuple(sorted(tags.items())))


class SegmentStore:
    """Store and load whole segments' KV through a :class:`~lmcache.engine.CacheEngine`.

    Args:
        engine: The engine whose tiers, chunk pool and event loop are used; its chunk size and
            hash seed apply. Its counters include segment traffic.
        prefix: Token ids of the prefix these segments are computed after (None: computed
            alone, at position 0).
    """

    def __init__(self, engine: CacheEngine, prefix: Any = None) -> None:
        self.engine = engine
        # A shallow copy shares the backend, pool, loop, locks and counters; only the key scope
        # and the hasher (segment-local chains, partial tail kept) differ.
        view = copy.copy(engine)
        view.scope = blend_scope(engine.scope, None if prefix is None else prefix_digest(prefix))
        view.hasher = ChunkHasher(engine.config.chunk_size, save_partial_chunks=True, seed=engine.config.hash_seed)
        self._view = view

    @property
    def scope(self) -> KeyScope:
        """The key scope of segment chunks."""
        return self._view.scope

    def _check(self) -> CacheEngine:
        if getattr(self.engine, "_closed", False):
            raise StateError("CacheEngine is closed")
        return self._view

    def keys(self, tokens: Any) -> list[Any]:
        """The cache keys of a segment's chunks."""
        return self._view.hasher.keys(tokens, self._view.scope)

    def load(self, tokens: Any, dst: KVDestination) -> bool:
        """Load the whole segment ``tokens`` into ``dst`` (tokens ``[0, n)``); False on any miss."""
        view = self._check()
        n = len(tokens)
        return n > 0 and view.retrieve(tokens, dst) == n

    def contains(self, tokens: Any) -> bool:
        """Whether every chunk of the segment is cached (within the engine's lookup budget)."""
        view = self._check()
        n = len(tokens)
        return n > 0 and view.lookup(tokens) == n

    def store(self, tokens: Any, src: KVSource) -> Any:
        """Store the segment's position-0 KV from ``src``; returns the engine's store future."""
        return self._check().store(tokens, src)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every store issued so far."""
        self.engine.flush(timeout)
