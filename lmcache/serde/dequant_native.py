"""The dequantization loops of ``fp8``, ``int8`` and ``int4`` in C: ``_dequant.c``, built on first use.

The torch decode path (:mod:`lmcache.serde.quant`) makes several passes over each block (codes to
float32, scale, centre, convert into the chunk's dtype); the C loop makes one, from the codes
straight into the destination chunk, a short row at a time through an L1-sized buffer, with
AVX-512 (and AVX512-BF16) or AVX2 + F16C where the CPU has them (checked at run time). The
arithmetic is the torch path's: float32 multiply, then add (never fused), then round to
nearest even into the chunk's dtype, so both give identical bytes (tests check it on every
dtype and odd shapes). fp8 body version 2 also rotates its keys by RoPE in that one pass.

Built like the cachegen coder (:mod:`lmcache.serde.cachegen_native`) with
:func:`lmcache.native_build.build_shared_library`; :func:`library` returns None, with the reason
logged once, when there is no compiler (``LMCACHE_DEQUANT_NATIVE=0`` forces that), and the
codecs then decode with torch. ctypes releases the GIL for each call, so decoder threads run
in parallel.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from lmcache.native_build import load_once

__all__ = ["CODE_FP8", "CODE_INT8", "int4", "library", "rope", "scaled"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_dequant.c")
#: No fused multiply-add: the C arithmetic must round exactly as torch's mul_ then add_ do.
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
CODE_FP8, CODE_INT8 = 0, 1
_OUT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
#: bfloat16 output whose NaN is 0xFFFF (torch's vectorised float32 -> bfloat16 copy_) instead of
#: 0x7FC0 (c10::BFloat16's, what the other bfloat16 loops write).
_BF16_TORCH_NAN = 3

#: The widest loop to use where the CPU has it: 3 AVX-512 with bfloat16 rounding in one
#: instruction (AVX512-BF16), 2 AVX-512, 1 AVX2, 0 the scalar loop (tests lower it to check each
#: loop against torch).
SIMD = 3

_lock = threading.Lock()
_state: dict[str, object] = {}


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lmc_dq_init.restype = None
    lib.lmc_dq_init.argtypes = []
    lib.lmc_dq_has_simd.restype = c_int
    lib.lmc_dq_has_simd.argtypes = []
    lib.lmc_dq_scaled.restype = c_int
    lib.lmc_dq_scaled.argtypes = [
        c_int, vp, i64, i64, i64, i64, i64, vp, vp, vp, i64, vp, vp, vp, vp, i64, c_int, vp, i64, i64, i64, c_int
    ]  # fmt: skip
    lib.lmc_dq_int4.restype = c_int
    lib.lmc_dq_int4.argtypes = [vp, i64, i64, i64, i64, i64, i64, i64, i64, vp, vp, c_int, vp, i64, i64, i64, c_int]
    lib.lmc_dq_rope.restype = c_int
    lib.lmc_dq_rope.argtypes = [vp, i64, i64, i64, i64, i64, vp, vp]
    lib.lmc_dq_init()
    _state["simd"] = int(lib.lmc_dq_has_simd())
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled loops, built on first use (once per process), or None (torch decodes)."""
    return load_once(
        _state,
        _lock,
        source=_SOURCE,
        stem="dequant",
        what="the dequantization loops",
        flags=_FLAGS,
        bind=_load,
        env="LMCACHE_DEQUANT_NATIVE",
        fallback="decoding with torch",
        log=logger,
    )


def _simd() -> int:
    return min(SIMD, int(_state.get("simd", 0)))  # type: ignore[call-overload]


def _rows(dst: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``dst`` (``[L, P, T, H, D]``)'s dtype code and byte strides of its outer axes, if rows are contiguous."""
    kind = _OUT.get(dst.dtype)
    if kind is None or dst.device.type != "cpu" or not dst.shape[3] * dst.shape[4]:
        return None
    s = dst.stride()
    if s[4] != 1 or (dst.shape[3] > 1 and s[3] != dst.shape[4]):
        return None  # heads * dim not one contiguous row
    size = dst.element_size()
    return kind, s[0] * size, s[1] * size, s[2] * size


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | np.ndarray | None) -> int | None:
    if t is None:
        return None
    return t.ctypes.data if isinstance(t, np.ndarray) else t.data_ptr()


def scaled(
    kind: int,
    codes: np.ndarray,
    dst: torch.Tensor,
    *,
    sk: torch.Tensor,
    sv: torch.Tensor | None,
    ck: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact: tuple[np.ndarray, memoryview] | None = None,
) -> bool:
    """``dst`` = codes times key scales ``sk`` (plus centres ``ck``) and value scales ``sv``, in C.

    The arguments are those of :func:`lmcache.serde.quant._decode_blocks`: ``codes`` are one
    byte each in ``dst``'s order ``[L, P, T, H, D]`` (``dst`` may be a view that skips tokens);
    ``sk``/``ck`` are ``[L, H, D]``, ``sv`` ``[L, T, H, 1]`` or ``[L, T, 1, 1]`` (one scale per
    token, as fp8 body version 2 stores them). With ``rope`` (cos and sin
    ``[T, D / 2]``) the keys are then rotated by RoPE in the same pass, in registers, with
    :func:`lmcache.serde.quant._rotate_keys`' arithmetic (each product rounded, never fused):
    the bytes of decoding into float32, rotating and converting, without that float32 pass.
    With ``exact`` (fp8 body version 2's exact key elements: strictly increasing uint32 indices
    into the keys ``[L, T, H * D]`` and their bytes in ``dst``'s dtype) those then replace the
    decoded elements, a layer at a time while its keys are in cache.

    Returns:
        False where the C loops are not available or do not take these arguments (the caller
        then decodes with torch); True once ``dst`` holds the decoded values.
    """
    lib = library()
    rows = _rows(dst) if lib is not None else None
    if lib is None or rows is None:
        return False
    L, P, T, H, D = dst.shape
    codes = np.ascontiguousarray(codes)
    if codes.size != dst.numel() or codes.dtype.itemsize != 1 or P not in (1, 2) or (P == 2 and sv is None):
        return False
    sv_heads = H if sv is None or sv.numel() != L * T else 1
    if sv is not None and sv.numel() != L * T * sv_heads:
        return False
    cos = sin = None
    if rope is not None:
        if D % 2 or tuple(rope[0].shape) != (T, D // 2) or tuple(rope[1].shape) != (T, D // 2):
            return False
        cos, sin = _f32(rope[0]), _f32(rope[1])
    ex_idx = ex_vals = None
    if exact is not None:
        ex_idx, ex_vals = np.ascontiguousarray(exact[0]), np.frombuffer(exact[1], dtype=np.uint8)
        if ex_idx.dtype != np.uint32 or ex_vals.size != ex_idx.size * dst.element_size():
            return False
    sk32, ck32, sv32 = _f32(sk), _f32(ck), _f32(sv)
    out_kind, sL, sP, sT = rows
    if rope is not None and out_kind == _OUT[torch.bfloat16]:
        # bfloat16 NaN as 0xFFFF: torch's vectorised float32 copy_, which ended the two-pass path, writes that
        out_kind = _BF16_TORCH_NAN
    rc = lib.lmc_dq_scaled(
        kind,
        _ptr(codes),
        L,
        P,
        T,
        H,
        D,
        _ptr(sk32),
        _ptr(ck32),
        _ptr(sv32),
        sv_heads,
        _ptr(cos),
        _ptr(sin),
        _ptr(ex_idx),
        _ptr(ex_vals),
        0 if ex_idx is None else ex_idx.size,
        out_kind,
        _ptr(dst),
        sL,
        sP,
        sT,
        _simd(),
    )
    return rc == 0


def int4(
    packed: np.ndarray,
    half: int,
    dst: torch.Tensor,
    *,
    gk: int,
    gv: int,
    meta: torch.Tensor,
) -> bool:
    """Decode an int4 version 1 body's codes into ``dst`` (``[L, P, T, H, D]``) in C.

    Args:
        packed: The two nibble planes (``half`` bytes).
        half: Bytes per plane.
        dst: The chunk, written in place.
        gk: Tokens per key group.
        gv: Channels per value group.
        meta: float32 minimums and steps: keys ``[2, L, token groups, H, D]``, then values
            ``[2, L, T, H, channel groups]``.

    Returns:
        False where the C loops are not available or do not take these arguments (the caller
        then decodes with torch).
    """
    lib = library()
    rows = _rows(dst) if lib is not None else None
    if lib is None or rows is None:
        return False
    L, P, T, H, D = dst.shape
    ngk, ngv = -(-T // gk), -(-D // gv)
    nk = 2 * L * ngk * H * D
    if meta.numel() != nk + (2 * L * T * H * ngv if P > 1 else 0) or packed.size < half:
        return False
    meta = meta.to(torch.float32).contiguous()
    mv = meta[nk:] if P > 1 else meta[:0]
    out_kind, sL, sP, sT = rows
    packed = np.ascontiguousarray(packed)  # kept referenced until the call returns
    rc = lib.lmc_dq_int4(
        _ptr(packed),
        half,
        L,
        P,
        T,
        H,
        D,
        gk,
        gv,
        _ptr(meta),
        _ptr(mv) if P > 1 else None,
        out_kind,
        _ptr(dst),
        sL,
        sP,
        sT,
        _simd(),
    )
    return rc == 0


def rope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Rotate float32 keys ``k`` (``[n, T, H, D]``, each ``[T, H, D]`` contiguous) by RoPE in place, in C.

    ``cos``/``sin`` are ``[T, D / 2]`` float32; the arithmetic is
    :func:`lmcache.serde.quant._rotate_keys`' (each product rounded, never fused), so the bytes
    are the same.

    Returns:
        False where the C loops are not available or do not take these arguments (the caller
        then rotates with torch).
    """
    lib = library()
    if lib is None or k.dtype != torch.float32 or k.dim() != 4 or k.device.type != "cpu":
        return False
    n, T, H, D = k.shape
    if k.stride()[1:] != (H * D, D, 1) and T * H * D > 1:
        return False
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2) or D % 2:
        return False
    c, s = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
    return lib.lmc_dq_rope(_ptr(k), n, k.stride(0), T, H, D, _ptr(c), _ptr(s)) == 0
