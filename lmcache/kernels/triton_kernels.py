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
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lmcache.kernels.paged import PagedKV

__all__ = ["available", "copy"]

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is an optional extra
    triton = None
    tl = None


def available() -> bool:
    """Whether Triton is installed."""
    return triton is not None


if triton is not None:

    @triton.jit
    def _gather_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
        ptrs,
        slots,
        out,
        num_tokens,
        hd,
        head_dim,
        block_size,
        s_block,
        s_token,
        s_head,
        s_dim,
        BLOCK_T: tl.constexpr,
        BLOCK_HD: tl.constexpr,
    ):
        entry = tl.program_id(0)
        tile = tl.program_id(1)
        # The entry's base address, typed like the output's elements.
        base = tl.load(ptrs + entry).to(out.dtype)
        tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_mask = tok < num_tokens
        slot = tl.load(slots + tok, mask=tok_mask, other=0)
        src_tok = (slot // block_size) * s_block + (slot % block_size) * s_token
        dst_tok = (entry * num_tokens + tok).to(tl.int64) * hd
        for start in range(0, hd, BLOCK_HD):
            col = start + tl.arange(0, BLOCK_HD)
            col_mask = col < hd
            src_col = (col // head_dim).to(tl.int64) * s_head + (col % head_dim).to(tl.int64) * s_dim
            mask = tok_mask[:, None] & col_mask[None, :]
            vals = tl.load(base + src_tok[:, None] + src_col[None, :], mask=mask)
            tl.store(out + dst_tok[:, None] + col[None, :], vals, mask=mask)

    @triton.jit
    def _scatter_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
        ptrs,
        slots,
        src,
        num_tokens,
        hd,
        head_dim,
        block_size,
        s_block,
        s_token,
        s_head,
        s_dim,
        BLOCK_T: tl.constexpr,
        BLOCK_HD: tl.constexpr,
    ):
        entry = tl.program_id(0)
        tile = tl.program_id(1)
        base = tl.load(ptrs + entry).to(src.dtype)
        tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        tok_mask = tok < num_tokens
        slot = tl.load(slots + tok, mask=tok_mask, other=0)
        dst_tok = (slot // block_size) * s_block + (slot % block_size) * s_token
        src_tok = (entry * num_tokens + tok).to(tl.int64) * hd
        for start in range(0, hd, BLOCK_HD):
            col = start + tl.arange(0, BLOCK_HD)
            col_mask = col < hd
            dst_col = (col // head_dim).to(tl.int64) * s_head + (col % head_dim).to(tl.int64) * s_dim
            mask = tok_mask[:, None] & col_mask[None, :]
            vals = tl.load(src + src_tok[:, None] + col[None, :], mask=mask)
            tl.store(base + dst_tok[:, None] + dst_col[None, :], vals, mask=mask)


@functools.lru_cache(maxsize=64)
def _tiles(num_tokens: int, hd: int) -> tuple[int, int]:
    # ~4K elements per program: wide rows get fewer tokens per tile.
    block_hd = min(triton.next_power_of_2(hd), 1024)
    block_t = max(1, min(triton.next_power_of_2(max(num_tokens, 1)), 4096 // block_hd, 64))
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
    grid = (len(kv.entries), triton.cdiv(num_tokens, block_t))
    kernel: Any = _gather_kernel if op == "gather" else _scatter_kernel
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
