"""The Triton JIT kernel behind :mod:`lmcache.kernels.cachegen_triton` (imported only on first use).

No ``from __future__ import annotations`` here: Triton reads ``tl.constexpr`` annotations as
objects when it specialises a kernel.
"""

import triton
import triton.language as tl

__all__ = ["dequantize_kernel"]


@triton.jit
def dequantize_kernel(  # noqa: PLR0917 - Triton kernels take positional arguments
    sym,
    regular,
    pscale,
    ref,
    step,
    out,
    n,
    tokens,
    hd,
    anchor,
    rcos,
    rsin,
    parts,
    dim,
    ANCHORED: tl.constexpr,
    BF16_BITS: tl.constexpr,
    BLOCK: tl.constexpr,
    ROPE: tl.constexpr = False,
):
    """One block of the chunk (chunk order): the value of each symbol, in ``out``'s dtype.

    Precise tokens are ``q * pscale[lane]``; the rest ``ref[lane] + q * step[lane]``, where the
    reference is the channel mean or (``ANCHORED``) the value of the token's anchor, recomputed
    from the anchor's symbol exactly as the CPU decoder computes it. With ``BF16_BITS`` ``out``
    is int16 and gets bfloat16 bit patterns rounded to nearest even by integer arithmetic, as
    the CPU decoder rounds (whatever conversion the backend, or the interpreter, would use).
    With ``ROPE`` (body version 2, mean references only) key rows (layer-part ``% parts == 0``)
    are rotated back by RoPE: each value is combined with its pair's (channel ``c`` of a head
    with ``c + dim / 2``), recomputed here from the pair's symbol, as the CPU decoder does
    (``lo = a * cos - b * sin``, ``hi = b * cos + a * sin``, products rounded, never fused).
    """
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    col = idx % hd
    row = idx // hd  # layer-part * tokens + token
    tok = row % tokens
    lane = (row // tokens) * hd + col
    q = tl.load(sym + idx, mask=mask, other=127).to(tl.float32) - 127.0
    reg = tl.load(regular + tok, mask=mask, other=1)
    ps = tl.load(pscale + lane, mask=mask, other=0.0)
    st = tl.load(step + lane, mask=mask, other=0.0)
    if ANCHORED:
        first = idx - (tok % anchor) * hd
        qa = tl.load(sym + first, mask=mask, other=127).to(tl.float32) - 127.0
        base = qa * ps
    else:
        base = tl.load(ref + lane, mask=mask, other=0.0)
    value = tl.where(reg != 0, base + q * st, q * ps)
    if ROPE:
        half = dim // 2
        d = col % dim
        low_half = d < half
        shift = tl.where(low_half, half, -half)
        plane = lane + shift
        qp = tl.load(sym + idx + shift, mask=mask, other=127).to(tl.float32) - 127.0
        pair = tl.where(
            reg != 0,
            tl.load(ref + plane, mask=mask, other=0.0) + qp * tl.load(step + plane, mask=mask, other=0.0),
            qp * tl.load(pscale + plane, mask=mask, other=0.0),
        )
        j = tok * half + d % half
        c = tl.load(rcos + j, mask=mask, other=0.0)
        s = tl.load(rsin + j, mask=mask, other=0.0)
        rotated = tl.where(low_half, value * c - pair * s, value * c + pair * s)
        value = tl.where((row // tokens) % parts == 0, rotated, value)
    if BF16_BITS:
        u = value.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(out + idx, u.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out + idx, value.to(out.dtype.element_ty), mask=mask)
