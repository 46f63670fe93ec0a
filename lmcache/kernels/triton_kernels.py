"""Triton gather/scatter kernels: one launch copies every layer's K and V of a chunk.

The launch grid is ``(entries, token tiles)``: an *entry* is one layer's K or V (or MLA latent),
found through a table of base addresses (:meth:`lmcache.kernels.paged.PagedKV.pointer_table`), so
layers need not share a storage. Entries are addressed by element strides ``(block, token, head,
dim)``: either every entry shares one set (the fast path), or the K entries share one set and the V
entries another (:func:`part_strides`; vLLM-CPU's ``vec`` format stores K transposed within a block,
V not). :func:`supports` says whether a bound KV can be copied by these kernels.
Elements move as same-width integers, so every dtype is copied bit-exactly, and the kernels run
unchanged on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them against torch).

Triton is optional (``pip install 'lmcache[triton]'``); importing this module never fails, and
:func:`available` says whether the kernels can run.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmcache.kernels.paged import PagedKV

__all__ = ["available", "copy", "part_strides", "supports"]


def available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


# part_strides per bound KV, computed once (PagedKV objects hash by identity).
_PART_STRIDES: weakref.WeakKeyDictionary[PagedKV, tuple[tuple[int, ...], ...] | None] = weakref.WeakKeyDictionary()


def part_strides(kv: PagedKV) -> tuple[tuple[int, ...], ...] | None:
    """Element strides ``(block, token, head, dim)`` the kernels address ``kv``'s entries with.

    One set when every entry shares it (``kv.shared_strides``), else one per KV part (K then V)
    when the entries of each part share one (entries alternate K, V layer by layer), else None:
    the kernels cannot address ``kv``.
    """
    if kv.shared_strides is not None:
        return (kv.shared_strides,)
    try:
        return _PART_STRIDES[kv]
    except KeyError:
        pass
    parts = kv.geometry.kv_parts
    found: tuple[tuple[int, ...], ...] | None = None
    if parts == 2:
        sets = [{tuple(e.stride()) for e in kv.entries[p::parts]} for p in range(parts)]
        if all(len(s) == 1 for s in sets):
            found = tuple(s.pop() for s in sets)
    _PART_STRIDES[kv] = found
    return found


def supports(kv: PagedKV) -> bool:
    """Whether the kernels can address ``kv``'s entries (its strides are shared, or shared per KV part).

    Says nothing of whether Triton is installed (:func:`available`) or of the device.
    """
    return part_strides(kv) is not None


@functools.cache
def _kernels() -> dict[tuple[str, int], Any]:
    """Import the kernels on first use, keyed by ``(op, stride sets)``.

    Deferred so that importing lmcache does not import Triton, and so that ``TRITON_INTERPRET``
    is read when the kernels are first needed rather than at import.
    """
    from lmcache.kernels import _triton_jit

    return {
        ("gather", 1): _triton_jit.gather_kernel,
        ("scatter", 1): _triton_jit.scatter_kernel,
        ("gather", 2): _triton_jit.gather_kv_kernel,
        ("scatter", 2): _triton_jit.scatter_kv_kernel,
    }


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=64)
def _tiles(num_tokens: int, hd: int) -> tuple[int, int]:
    # ~4K elements per program: wide rows get fewer tokens per tile.
    block_hd = min(_next_pow2(hd), 1024)
    block_t = max(1, min(_next_pow2(num_tokens), 4096 // block_hd, 64))
    return block_t, block_hd


def copy(op: str, kv: PagedKV, slots: torch.Tensor, buf: torch.Tensor) -> None:
    """Run the gather (``op="gather"``: KV → ``buf``) or scatter kernel on the current stream.

    ``slots`` (int64) and ``buf`` (the chunk buffer) are on the KV's device and already validated.
    """
    num_tokens = buf.shape[2]
    if num_tokens == 0:
        return
    strides = part_strides(kv)
    if strides is None:
        from lmcache.errors import LayoutMismatchError

        raise LayoutMismatchError("the triton kernels need every layer's K (and V) to have the same strides")
    heads, head_dim = buf.shape[3], buf.shape[4]
    hd = heads * head_dim
    raw = buf.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buf.element_size()])
    block_t, block_hd = _tiles(num_tokens, hd)
    grid = (len(kv.entries), -(-num_tokens // block_t))
    kernel = _kernels()[op, len(strides)]
    kernel[grid](
        kv.pointer_table(),
        slots.contiguous(),
        raw,
        num_tokens,
        hd,
        head_dim,
        kv.block_size,
        *(s for part in strides for s in part),
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
    )
