"""Triton gather/scatter kernels: one launch copies every layer's K and V of a chunk.

The launch grid is ``(entries, token tiles)``: an *entry* is one layer's K or V (or MLA latent),
found through a table of base addresses (:meth:`lmcache.kernels.paged.PagedKV.pointer_table`), so
layers need not share a storage. All entries must share element strides (checked when binding).
Elements move as same-width integers, so every dtype is copied bit-exactly, and the kernels run
unchanged on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check them against torch).

Triton is optional (``pip install 'lmcache[triton]'``); importing this module never fails, and
:func:`available` says whether the kernels can run.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmcache.kernels.paged import PagedKV

__all__ = ["available", "copy"]


def available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _kernels() -> tuple[Any, Any]:
    """Import the kernels on first use.

    Deferred so that importing lmcache does not import Triton, and so that ``TRITON_INTERPRET``
    is read when the kernels are first needed rather than at import.
    """
    from lmcache.kernels import _triton_jit

    return _triton_jit.gather_kernel, _triton_jit.scatter_kernel


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
    assert kv.shared_strides is not None  # checked by PagedKV._choose
    s_block, s_token, s_head, s_dim = kv.shared_strides
    heads, head_dim = buf.shape[3], buf.shape[4]
    hd = heads * head_dim
    raw = buf.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[buf.element_size()])
    block_t, block_hd = _tiles(num_tokens, hd)
    grid = (len(kv.entries), -(-num_tokens // block_t))
    gather_kernel, scatter_kernel = _kernels()
    kernel: Any = gather_kernel if op == "gather" else scatter_kernel
    kernel[grid](
        kv.pointer_table(),
        slots.contiguous(),
        raw,
        num_tokens,
        hd,
        head_dim,
        kv.block_size,
        s_block,
        s_token,
        s_head,
        s_dim,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
    )
