"""The ``cachegen`` codec's GPU decode stage: dequantize and rebuild references in Triton.

:func:`lmcache.serde.cachegen.decode_into_tensor` entropy-decodes a value on the CPU (the rANS
streams are sequential; the C coder runs at several GB/s) and hands the symbols, one byte per
value, to :func:`dequantize`, which writes the chunk's values straight into a device tensor:
half the bytes of the bf16 chunk cross the bus, and the arithmetic matches the CPU decoder's
operation for operation (float32 multiply, then add, no fused multiply-add; one rounding to
the output dtype), so the result is the CPU path's bit for bit. The kernel also runs on CPU
tensors under ``TRITON_INTERPRET=1``, which is how the tests check that equality.

Triton is optional; importing this module never fails, and :func:`available` says whether the
kernel can run.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from lmcache.serde.cachegen import ParsedBody

__all__ = ["available", "dequantize", "interpreted"]

BLOCK = 1024


def available() -> bool:
    """Whether Triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether Triton kernels run in its interpreter here (``TRITON_INTERPRET=1``: CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1" and available()


def dequantize(sym: np.ndarray, body: ParsedBody, out: torch.Tensor) -> None:
    """Write the values of ``sym`` (flat symbols, chunk order) into ``out`` (contiguous, any device).

    Raises:
        InvalidArgumentError: Triton is missing, or ``out`` is on the CPU outside the interpreter.
    """
    from lmcache.errors import InvalidArgumentError

    if not available():
        raise InvalidArgumentError("the cachegen GPU decode needs Triton (pip install 'lmcache[triton]')")
    if out.device.type == "cpu" and not interpreted():
        raise InvalidArgumentError("the cachegen Triton kernel runs on CUDA tensors (or under TRITON_INTERPRET=1)")
    from lmcache.kernels._cachegen_jit import dequantize_kernel

    dev = out.device
    lp, tokens, hd = body.shape
    n = lp * tokens * hd
    args = [
        torch.from_numpy(np.ascontiguousarray(sym)).to(dev, non_blocking=True),
        torch.from_numpy(np.ascontiguousarray(body.regular, dtype=np.uint8)).to(dev),
        torch.from_numpy(np.ascontiguousarray(body.pscale, dtype=np.float32)).to(dev),
        torch.from_numpy(np.ascontiguousarray(body.ref, dtype=np.float32)).to(dev),
        torch.from_numpy(np.ascontiguousarray(body.step, dtype=np.float32)).to(dev),
    ]
    bf16 = out.dtype == torch.bfloat16
    flat = out.view(-1).view(torch.int16) if bf16 else out.view(-1)
    rope = body.rope()
    if rope is not None:  # body version 2: key rows rotated back by RoPE (the CPU decoder's tables)
        rcos, rsin = (torch.from_numpy(np.array(a)).to(dev) for a in rope[:2])  # copies: cached tables are read-only
        parts, dim = rope[2], rope[3]
    else:
        rcos, rsin, parts, dim = args[2], args[2], 1, 2  # unused placeholders
    grid = ((n + BLOCK - 1) // BLOCK,)
    extra = {} if interpreted() else {"enable_fp_fusion": False}  # no FMA: round like the CPU
    dequantize_kernel[grid](
        *args,
        flat,
        n,
        tokens,
        hd,
        max(1, body.anchor),
        rcos,
        rsin,
        parts,
        dim,
        ANCHORED=bool(body.anchor),
        BF16_BITS=bf16,
        BLOCK=BLOCK,
        ROPE=rope is not None,
        **extra,
    )
