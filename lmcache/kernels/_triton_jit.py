"""The Triton JIT kernels behind :mod:`lmcache.kernels.triton_kernels` (imported only on first use).

No ``from __future__ import annotations`` here: Triton reads ``tl.constexpr`` annotations as
objects when it specialises a kernel.

Two kernel pairs share one body (:func:`_copy_tile`, inlined by Triton):

* ``gather_kernel`` / ``scatter_kernel``: every entry has the same element strides (the usual
  case, and the fast path: strides are plain scalar arguments);
* ``gather_kv_kernel`` / ``scatter_kv_kernel``: entries alternate K, V (``entry % 2``) and the K
  entries share one set of strides, the V entries another (vLLM-CPU's ``vec`` block format stores
  K transposed within a block, V not).
"""

import triton
import triton.language as tl

__all__ = ["gather_kernel", "gather_kv_kernel", "scatter_kernel", "scatter_kv_kernel"]


@triton.jit
def _copy_tile(  # noqa: PLR0917 - Triton functions take positional arguments
    ptrs,
    slots,
    buf,
    entry,
    num_tokens,
    hd,
    head_dim,
    block_size,
    s_block,
    s_token,
    s_head,
    s_dim,
    GATHER: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    """Copy one token tile of one entry between the paged KV and the chunk buffer ``buf``."""
    tile = tl.program_id(1)
    # The entry's base address, typed like the buffer's elements.
    base = tl.load(ptrs + entry).to(buf.dtype)
    tok = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    tok_mask = tok < num_tokens
    slot = tl.load(slots + tok, mask=tok_mask, other=0)
    kv_tok = (slot // block_size) * s_block + (slot % block_size) * s_token
    buf_tok = (entry * num_tokens + tok).to(tl.int64) * hd
    for start in range(0, hd, BLOCK_HD):
        col = start + tl.arange(0, BLOCK_HD)
        col_mask = col < hd
        kv_col = (col // head_dim).to(tl.int64) * s_head + (col % head_dim).to(tl.int64) * s_dim
        mask = tok_mask[:, None] & col_mask[None, :]
        kv_ptr = base + kv_tok[:, None] + kv_col[None, :]
        buf_ptr = buf + buf_tok[:, None] + col[None, :]
        if GATHER:
            tl.store(buf_ptr, tl.load(kv_ptr, mask=mask), mask=mask)
        else:
            tl.store(kv_ptr, tl.load(buf_ptr, mask=mask), mask=mask)


@triton.jit
def gather_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
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
    _copy_tile(
        ptrs, slots, out, entry, num_tokens, hd, head_dim, block_size, s_block, s_token, s_head, s_dim,
        True, BLOCK_T, BLOCK_HD,
    )  # fmt: skip


@triton.jit
def scatter_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
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
    _copy_tile(
        ptrs, slots, src, entry, num_tokens, hd, head_dim, block_size, s_block, s_token, s_head, s_dim,
        False, BLOCK_T, BLOCK_HD,
    )  # fmt: skip


@triton.jit
def _part_strides(entry, k_block, k_token, k_head, k_dim, v_block, v_token, v_head, v_dim):  # noqa: PLR0917
    """The strides of ``entry``: K's for even entries, V's for odd ones (scalar arithmetic, no branch)."""
    odd = (entry % 2).to(tl.int64)
    return (
        k_block + odd * (v_block - k_block),
        k_token + odd * (v_token - k_token),
        k_head + odd * (v_head - k_head),
        k_dim + odd * (v_dim - k_dim),
    )


@triton.jit
def gather_kv_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
    ptrs,
    slots,
    out,
    num_tokens,
    hd,
    head_dim,
    block_size,
    k_block,
    k_token,
    k_head,
    k_dim,
    v_block,
    v_token,
    v_head,
    v_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    entry = tl.program_id(0)
    s_block, s_token, s_head, s_dim = _part_strides(
        entry, k_block, k_token, k_head, k_dim, v_block, v_token, v_head, v_dim
    )
    _copy_tile(
        ptrs, slots, out, entry, num_tokens, hd, head_dim, block_size, s_block, s_token, s_head, s_dim,
        True, BLOCK_T, BLOCK_HD,
    )  # fmt: skip


@triton.jit
def scatter_kv_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
    ptrs,
    slots,
    src,
    num_tokens,
    hd,
    head_dim,
    block_size,
    k_block,
    k_token,
    k_head,
    k_dim,
    v_block,
    v_token,
    v_head,
    v_dim,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    entry = tl.program_id(0)
    s_block, s_token, s_head, s_dim = _part_strides(
        entry, k_block, k_token, k_head, k_dim, v_block, v_token, v_head, v_dim
    )
    _copy_tile(
        ptrs, slots, src, entry, num_tokens, hd, head_dim, block_size, s_block, s_token, s_head, s_dim,
        False, BLOCK_T, BLOCK_HD,
    )  # fmt: skip
