"""Cache keys and deterministic chained prefix hashing of token sequences.

A chunk's hash covers every token before it: ``h_i = H(h_{i-1} || tokens_i || extra)`` with
keyed BLAKE2b (a fixed seed, 32-byte digests). Python's ``hash()`` is never used, so two
processes, engines or machines agree on every key. Token ids are hashed as little-endian
int64, whatever container they arrive in (list, numpy array, torch tensor).

This module imports only ``errors``; it knows nothing of backends or engines.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from lmcache.errors import InvalidArgumentError

__all__ = ["MAX_KEY_BYTES", "CacheKey", "Chunk", "ChunkHasher", "KeyScope", "check_key_length"]

_DIGEST = 32
_SEP = "@"
#: Longest key text (:meth:`CacheKey.to_string`, in bytes) a backend accepts: the value frame
#: stores its length in 16 bits. Backends check it for every key (InvalidArgumentError).
MAX_KEY_BYTES = 0xFFFF
# Key text beside model, dtype and tags: the 64 hex digits of the hash, four separators and the
# world size and rank (under 20 digits each, checked before this bound is used).
_KEY_FIXED_CHARS = 64 + 4 + 2 * 20
# Quoting writes a character as at most 4 UTF-8 bytes of 3 characters each (%XX).
_QUOTE_GROWTH = 12
_MAX_WORLD_SIZE = 10**19  # world size and rank have fewer than 20 digits below this
# (model, dtype, tags) of the last key that passed the bound, to skip recomputing it.
_LAST_FITTING: list[tuple[str, str, tuple[tuple[str, str], ...]] | None] = [None]


def _check_tags(tags: object) -> None:
    """Tags are ``(name, value)`` pairs of strings; anything else would fail later, in one backend only."""
    if not isinstance(tags, tuple):
        raise InvalidArgumentError(f"tags must be a tuple of (name, value) string pairs, got {type(tags).__name__}")
    for pair in tags:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)):
            raise InvalidArgumentError(f"tags must be (name, value) pairs of strings, got {pair!r}")


@functools.lru_cache(maxsize=4096)
def _quote(text: str) -> str:
    # Models, dtypes and tags repeat across millions of keys: quote each distinct one once.
    return quote(text, safe="")


@dataclasses.dataclass(frozen=True, slots=True)
class CacheKey:
    """The identity of one stored KV chunk.

    Attributes:
        model: Identifies the model and its KV geometry (layers, KV heads, head dim).
        world_size: Tensor-parallel world size of the engine that produced the chunk.
        rank: The worker's rank within ``world_size``.
        chunk_hash: The chained prefix hash (32 bytes).
        dtype: Dtype of the stored KV (``"float16"``, ``"bfloat16"``…).
        tags: Sorted ``(name, value)`` pairs that isolate keys (tenant, LoRA adapter).
    """

    model: str
    world_size: int
    rank: int
    chunk_hash: bytes
    dtype: str
    tags: tuple[tuple[str, str], ...] = ()
    # Keys live in dicts on every hot path (indexes, policies): hash once, not per lookup.
    _hash: int = dataclasses.field(init=False, repr=False, compare=False, default=0)
    # Every remote request names its keys as strings (~6 us each to build): build once, on demand.
    _str: str | None = dataclasses.field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.tags:
            _check_tags(self.tags)
        object.__setattr__(
            self, "_hash", hash((self.model, self.world_size, self.rank, self.chunk_hash, self.dtype, self.tags))
        )
        if not isinstance(self.chunk_hash, bytes) or len(self.chunk_hash) != _DIGEST:
            raise InvalidArgumentError(f"chunk_hash must be {_DIGEST} bytes")
        if not self.model:
            raise InvalidArgumentError("CacheKey.model must not be empty")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise InvalidArgumentError(f"rank {self.rank} is not within world_size {self.world_size}")

    def __hash__(self) -> int:
        return self._hash

    def to_string(self) -> str:
        """A canonical, URL- and filename-safe text form; :meth:`from_string` reverses it."""
        if self._str is not None:
            return self._str
        parts = [
            _quote(self.model),
            str(self.world_size),
            str(self.rank),
            _quote(self.dtype),
            self.chunk_hash.hex(),
        ]
        if self.tags:
            parts.append("&".join(f"{_quote(k)}={_quote(v)}" for k, v in self.tags))
        text = _SEP.join(parts)
        object.__setattr__(self, "_str", text)
        return text

    @classmethod
    def from_string(cls, text: str) -> CacheKey:
        """Parse the form written by :meth:`to_string`.

        Raises:
            InvalidArgumentError: ``text`` is not a key string.
        """
        parts = text.split(_SEP)
        try:
            if len(parts) not in (5, 6):
                raise ValueError
            tags: tuple[tuple[str, str], ...] = ()
            if len(parts) == 6:
                pairs = [p.split("=", 1) for p in parts[5].split("&")]
                tags = tuple((unquote(k), unquote(v)) for k, v in pairs)
            return cls(
                model=unquote(parts[0]),
                world_size=int(parts[1]),
                rank=int(parts[2]),
                dtype=unquote(parts[3]),
                chunk_hash=bytes.fromhex(parts[4]),
                tags=tags,
            )
        except (ValueError, InvalidArgumentError):
            raise InvalidArgumentError(f"not a cache key string: {text[:120]!r}") from None

    def digest(self) -> str:
        """A fixed-length hex name for this key (for file names and size-limited stores)."""
        return hashlib.blake2b(self.to_string().encode(), digest_size=20).hexdigest()

    def __str__(self) -> str:
        return self.to_string()


def check_key_length(key: CacheKey) -> None:
    """Refuse a key whose text form is longer than :data:`MAX_KEY_BYTES`.

    Most keys are far below the limit: a bound from the lengths of model, dtype and tags decides
    without building the text (which costs microseconds per key on the hot path).

    Raises:
        InvalidArgumentError: The key text is too long for the value frame.
    """
    if key.world_size < _MAX_WORLD_SIZE:  # else its digits are not covered by the bound
        last = _LAST_FITTING[0]
        # Keys of one scope share their model, dtype and tags objects: one identity check each.
        if last is not None and last[0] is key.model and last[1] is key.dtype and last[2] is key.tags:
            return
        n = len(key.model) + len(key.dtype)
        for name, value in key.tags:
            n += len(name) + len(value) + 2
        if _QUOTE_GROWTH * n + _KEY_FIXED_CHARS <= MAX_KEY_BYTES:
            _LAST_FITTING[0] = (key.model, key.dtype, key.tags)  # a benign race: at worst recomputed
            return
    size = len(key.to_string())  # quoted: ASCII, so characters are bytes
    if size > MAX_KEY_BYTES:
        raise InvalidArgumentError(
            f"cache key text is {size} bytes, over the limit of {MAX_KEY_BYTES} "
            f"(model {key.model[:40]!r}…: use shorter model names, dtypes and tags)"
        )


@dataclasses.dataclass(frozen=True, slots=True)
class KeyScope:
    """The part of a key shared by all chunks of one engine worker."""

    model: str
    world_size: int = 1
    rank: int = 0
    dtype: str = "float16"
    tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def create(
        cls,
        model: str,
        *,
        world_size: int = 1,
        rank: int = 0,
        dtype: str = "float16",
        tags: Mapping[str, str] | None = None,
    ) -> KeyScope:
        """Build a scope, sorting ``tags`` so equal tag sets give equal keys.

        Raises:
            InvalidArgumentError: A tag name or value is not a string.
        """
        pairs = tuple((tags or {}).items())
        _check_tags(pairs)
        return cls(model, world_size, rank, dtype, tuple(sorted(pairs)))

    def key(self, chunk_hash: bytes) -> CacheKey:
        """The key of the chunk with ``chunk_hash`` in this scope."""
        return CacheKey(self.model, self.world_size, self.rank, chunk_hash, self.dtype, self.tags)


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk of a token sequence: tokens ``[start, end)`` and its chained hash."""

    start: int
    end: int
    hash: bytes

    @property
    def num_tokens(self) -> int:
        """Tokens covered by this chunk."""
        return self.end - self.start


def as_token_array(tokens: Any) -> np.ndarray:
    """Return ``tokens`` as a 1-D little-endian int64 array.

    Accepts lists/tuples of ints, numpy integer arrays and integer torch tensors (any device).

    Raises:
        InvalidArgumentError: Not a 1-D sequence of non-negative integers.
    """
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):  # torch.Tensor without importing torch
        if tokens.is_floating_point() or tokens.is_complex() or str(tokens.dtype) == "torch.bool":
            raise InvalidArgumentError(f"token ids must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise InvalidArgumentError(f"token ids must be a sequence of ints, got {type(tokens).__name__}")
        seq = tokens if isinstance(tokens, Sequence) else list(tokens)
        if any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) for t in seq):
            raise InvalidArgumentError("token ids must all be integers")
        arr = np.asarray(seq, dtype=np.int64) if len(seq) else np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidArgumentError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise InvalidArgumentError(f"token ids must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and int(arr.min()) < 0:
        raise InvalidArgumentError("token ids must be non-negative")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidArgumentError("token ids must fit in int64")
    return np.ascontiguousarray(arr, dtype="<i8")


class ChunkHasher:
    """Splits token sequences into chunks and computes chained prefix hashes.

    Args:
        chunk_size: Tokens per chunk (default 256).
        save_partial_chunks: Also return the trailing chunk with fewer than ``chunk_size``
            tokens. Its hash differs from any full chunk's (the length is hashed).
        seed: Mixed into every hash; caches shared between engines must use the same seed.
        extra: Bytes mixed into every chunk (e.g. a multimodal input hash); rarely needed, as
            tags in :class:`KeyScope` are the usual way to isolate caches.
    """

    def __init__(
        self,
        chunk_size: int = 256,
        *,
        save_partial_chunks: bool = False,
        seed: str | bytes = "lmcache-v1",
        extra: bytes = b"",
    ) -> None:
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise InvalidArgumentError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.save_partial_chunks = save_partial_chunks
        seed_bytes = seed.encode() if isinstance(seed, str) else bytes(seed)
        # BLAKE2b keys are at most 64 bytes: derive one of fixed length from any seed.
        self._key = hashlib.blake2b(seed_bytes, digest_size=32, person=b"lmcache-seed").digest()
        self._extra = bytes(extra)
        self._root = hashlib.blake2b(b"root", key=self._key, digest_size=_DIGEST).digest()

    def __repr__(self) -> str:
        return f"ChunkHasher(chunk_size={self.chunk_size}, save_partial_chunks={self.save_partial_chunks})"

    def chunks(self, tokens: Any) -> list[Chunk]:
        """Chunks of ``tokens`` with their chained hashes, in order.

        Args:
            tokens: A 1-D sequence of token ids.

        Returns:
            One :class:`Chunk` per full chunk, plus the partial tail when configured.
        """
        arr = as_token_array(tokens)
        raw = arr.tobytes()
        n = arr.shape[0]
        size = self.chunk_size
        end_full = n - n % size
        stop = n if self.save_partial_chunks else end_full
        out: list[Chunk] = []
        prev = self._root
        key = self._key
        extra = self._extra
        for start in range(0, stop, size):
            end = min(start + size, n)
            h = hashlib.blake2b(prev, key=key, digest_size=_DIGEST)
            h.update(raw[start * 8 : end * 8])
            h.update((end - start).to_bytes(4, "little"))
            if extra:
                h.update(extra)
            prev = h.digest()
            out.append(Chunk(start, end, prev))
        return out

    def hashes(self, tokens: Any) -> list[bytes]:
        """Only the chained hashes of :meth:`chunks`."""
        return [c.hash for c in self.chunks(tokens)]

    def keys(self, tokens: Any, scope: KeyScope) -> list[CacheKey]:
        """Cache keys of every chunk of ``tokens`` within ``scope``."""
        return [scope.key(c.hash) for c in self.chunks(tokens)]
