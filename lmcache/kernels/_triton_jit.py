"""The Triton JIT kernels behind :mod:`lmcache.kernels.triton_kernels` (imported only on first use).

No ``from __future__ import annotations`` here: Triton reads ``tl.constexpr`` annotations as
objects when it specialises a kernel.
"""

import triton
import triton.language as tl

__all__ = ["gather_kernel", "scatter_kernel"]


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
