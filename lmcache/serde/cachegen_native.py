"""The ``cachegen`` codec's rANS coder in C: ``_cachegen.c``, compiled on first use.

numpy steps over the streams cannot decode KV at memory-like speeds (each step is a dozen
array operations over a few thousand streams); the C loop decodes and dequantizes a symbol in
a few nanoseconds, writing the chunk's bytes in order. It is built like the native NIXL lane
(:mod:`lmcache.backends.nixl.native`): the host's C compiler (``cc``, or ``$CC``) compiles
``_cachegen.c`` into ``$LMCACHE_NATIVE_DIR`` (default ``~/.cache/lmcache/native``), keyed by a
hash of the source and flags, once per machine; it links nothing. :func:`library` returns None,
with the reason logged once, when it cannot be built (no compiler), and the codec then uses its
numpy coder, which writes and reads the same bytes (``LMCACHE_CACHEGEN_NATIVE=0`` forces it).

ctypes releases the GIL for the duration of each call, so worker threads decode in parallel.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np

from lmcache.native_build import load_once

__all__ = [
    "OUT_BF16",
    "OUT_F32",
    "OUT_SYMBOLS",
    "SIMD_AUTO",
    "SIMD_AVX2",
    "SIMD_GATHER",
    "SIMD_LEVELS",
    "SIMD_LOADS",
    "SIMD_SCALAR",
    "count",
    "decode",
    "encode",
    "half_to_float",
    "library",
    "log_values",
    "unpack_tables",
]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_cachegen.c")
#: No fused multiply-add: the C arithmetic must round exactly as numpy's does.
_FLAGS = ["-O2", "-std=gnu11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno"]
OUT_SYMBOLS, OUT_F32, OUT_BF16 = 0, 1, 2
#: ``simd`` levels of :func:`decode`: the CPU's best (AVX-512 with scalar-load table fetches on
#: AMD, whose ``vpgatherdd`` is slow, with ``vpgatherdd`` elsewhere; AVX2 without AVX-512F; the
#: scalar loop without either), the scalar loop, the two AVX-512 loops and the AVX2 loop (a
#: level the CPU lacks runs its best instead). Every level writes the same bytes.
SIMD_AUTO, SIMD_SCALAR, SIMD_GATHER, SIMD_LOADS, SIMD_AVX2 = -1, 0, 1, 2, 3
#: The levels a test runs (each one's bytes must equal the others').
SIMD_LEVELS = (SIMD_SCALAR, SIMD_GATHER, SIMD_LOADS, SIMD_AVX2)
#: Most streams a body may have (the C coder keeps their states on its stack).
MAX_STREAMS = 4096

_lock = threading.Lock()
_state: dict[str, object] = {}


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.lmc_cg_half_to_float.restype = None
    lib.lmc_cg_half_to_float.argtypes = [vp, i64, vp]
    lib.lmc_cg_log_values.restype = None
    lib.lmc_cg_log_values.argtypes = [vp, vp, i64, i64, vp, i64, vp]
    lib.lmc_cg_unpack_tables.restype = i64
    lib.lmc_cg_unpack_tables.argtypes = [vp, i64, i64, vp]
    lib.lmc_cg_decode.restype = ctypes.c_int
    lib.lmc_cg_decode.argtypes = [
        vp,
        i64,
        vp,
        i64,
        vp,
        i64,
        i64,
        i64,
        vp,
        i64,
        vp,
        vp,
        vp,
        vp,
        ctypes.c_int,
        vp,
        ctypes.c_int,
        vp,
        vp,
        i64,
        i64,
        vp,
    ]
    lib.lmc_cg_encode.restype = i64
    lib.lmc_cg_encode.argtypes = [vp, i64, i64, vp, vp, i64, i64, vp, vp, vp]
    lib.lmc_cg_count.restype = ctypes.c_int
    lib.lmc_cg_count.argtypes = [vp, i64, i64, i64, vp, vp]
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled coder, built on first use (once per process), or None (numpy is used)."""
    return load_once(
        _state,
        _lock,
        source=_SOURCE,
        stem="cachegen",
        what="the cachegen coder",
        flags=_FLAGS,
        bind=_load,
        env="LMCACHE_CACHEGEN_NATIVE",
        fallback="using the numpy coder",
        log=logger,
    )


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def unpack_tables(lib: ctypes.CDLL, buf: np.ndarray, n_tables: int) -> tuple[np.ndarray, int]:
    """Frequency tables ``[n_tables, 256]`` from their packed form at the start of ``buf`` (uint8).

    Returns:
        The tables and how many bytes they took.

    Raises:
        ValueError: ``buf`` is short or a table is damaged.
    """
    freq = np.empty((n_tables, 256), dtype=np.uint16)
    used = lib.lmc_cg_unpack_tables(_ptr(buf), buf.size, n_tables, _ptr(freq))
    if used < 0:
        raise ValueError("cachegen frequency tables are damaged")
    return freq, int(used)


def half_to_float(lib: ctypes.CDLL, h: np.ndarray) -> np.ndarray:
    """float16 values (any shape) as float32, flat: the same values (and bits) as numpy's ``astype``."""
    h = np.ascontiguousarray(h, dtype=np.float16).reshape(-1)
    out = np.empty(h.size, dtype=np.float32)
    lib.lmc_cg_half_to_float(_ptr(h), h.size, _ptr(out))
    return out


def log_values(lib: ctypes.CDLL, base: np.ndarray, codes: np.ndarray, values: np.ndarray, lo: int) -> np.ndarray:
    """``values[base[r] - lo + codes[r, c]]`` flat (float32): body version 3's per-lane log codes.

    Args:
        lib: :func:`library`.
        base: int16 base code per row, each within ``[lo, lo + values.size - 256]`` (checked by the caller).
        codes: uint8 ``[rows, cols]``.
        values: float32 value of every code from ``lo``.
        lo: The first code of ``values``.
    """
    base = np.ascontiguousarray(base, dtype=np.int16)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(base.size, -1)
    values = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty(codes.size, dtype=np.float32)
    lib.lmc_cg_log_values(_ptr(base), _ptr(codes), base.size, codes.shape[1], _ptr(values), lo, _ptr(out))
    return out


def decode(
    lib: ctypes.CDLL,
    states: np.ndarray,
    words: np.ndarray,
    freq: np.ndarray,
    *,
    shape: tuple[int, int, int],
    regular: np.ndarray,
    anchor: int,
    lane_params: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    out_kind: int,
    out: np.ndarray,
    simd: int = SIMD_AUTO,
    rope: tuple[np.ndarray, np.ndarray, int, int] | None = None,
) -> None:
    """Decode into ``out`` (symbols, float32 or bfloat16 bits; ``[lp * T * HD]`` elements).

    Args:
        lib: :func:`library`.
        states: Initial states, one per stream (uint32).
        words: The 16-bit words.
        freq: Frequency tables ``[2 * layer-parts, 256]`` (uint16; per layer-part, the precise
            tokens' then the regular ones'); the C loop builds each layer-part's decode tables
            as it reaches it.
        shape: ``(layer-parts, tokens, heads * dim)``.
        regular: Per token, 1 for tokens coded against their reference, 0 for precise ones (uint8).
        anchor: Anchor stride, or 0 (references are channel means).
        lane_params: Per lane (``layer-part * heads * dim``) float32 precise scale, mean and
            step; None with ``OUT_SYMBOLS``.
        out_kind: ``OUT_SYMBOLS``, ``OUT_F32`` or ``OUT_BF16``.
        out: Contiguous output array of the right element size.
        simd: The loop to use (``SIMD_AUTO``, ``SIMD_SCALAR``, ``SIMD_GATHER``, ``SIMD_LOADS``,
            ``SIMD_AVX2``); every level writes the same bytes.
        rope: For a body that rotated its keys (version 2): float32 cos and sin ``[T, dim / 2]``,
            the parts and the head dim; key rows are rotated back after dequantizing.

    Raises:
        ValueError: The words run out, the streams do not end where they should, or a frequency
            table is damaged.
    """
    lp, T, HD = shape
    n = lp * T * HD
    pscale = mean = step = anc = None
    if lane_params is not None:
        pscale, mean, step = (np.ascontiguousarray(a, dtype=np.float32) for a in lane_params)
        anc = np.zeros(lp * HD, dtype=np.float32)
    states = np.ascontiguousarray(states, dtype=np.uint32)
    words = np.ascontiguousarray(words, dtype=np.uint16)
    regular = np.ascontiguousarray(regular, dtype=np.uint8)
    freq = np.ascontiguousarray(freq, dtype=np.uint16)
    if freq.shape != (2 * lp, 256):
        raise ValueError("cachegen frequency tables do not fit the chunk")
    rcos = rsin = rowbuf = None
    parts = dim = 0
    if rope is not None and lane_params is not None:
        rcos, rsin = (np.ascontiguousarray(a, dtype=np.float32) for a in rope[:2])
        parts, dim = rope[2], rope[3]
        if rcos.shape != (T, dim // 2) or rsin.shape != rcos.shape:
            raise ValueError("cachegen RoPE tables do not fit the chunk")
        rowbuf = np.empty(HD, dtype=np.float32)
    rc = lib.lmc_cg_decode(
        _ptr(states),
        states.size,
        _ptr(words),
        words.size,
        _ptr(freq),
        n,
        T,
        HD,
        _ptr(regular),
        anchor,
        _ptr(pscale),
        _ptr(mean),
        _ptr(step),
        _ptr(anc),
        out_kind,
        _ptr(out),
        int(simd),
        _ptr(rcos),
        _ptr(rsin),
        parts,
        dim,
        _ptr(rowbuf),
    )
    if rc == -3:
        raise ValueError("cachegen decode parameters do not fit the chunk")
    if rc == -1:
        raise ValueError("rANS stream is truncated")
    if rc == -4:
        raise ValueError("cachegen frequency tables are damaged")
    if rc != 0:
        raise ValueError("rANS stream does not end where it should")


def count(lib: ctypes.CDLL, sym: np.ndarray, *, shape: tuple[int, int, int], regular: np.ndarray) -> np.ndarray:
    """Symbol counts ``[2 * layer-parts, 256]`` (per layer-part: precise tokens, then the rest)."""
    lp, T, HD = shape
    sym = np.ascontiguousarray(sym, dtype=np.uint8).reshape(-1)
    regular = np.ascontiguousarray(regular, dtype=np.uint8)
    counts = np.empty((2 * lp, 256), dtype=np.int64)
    if lib.lmc_cg_count(_ptr(sym), sym.size, T, HD, _ptr(regular), _ptr(counts)) != 0:
        raise ValueError("cachegen symbols do not fill whole rows")
    return counts


def encode(
    lib: ctypes.CDLL,
    sym: np.ndarray,
    streams: int,
    freq: np.ndarray,
    *,
    shape: tuple[int, int, int],
    regular: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Encode symbols (chunk order, uint8): the final states and the words in decoder order.

    Raises:
        ValueError: A symbol has frequency 0 in its table.
    """
    _lp, T, HD = shape
    sym = np.ascontiguousarray(sym, dtype=np.uint8).reshape(-1)
    f = np.ascontiguousarray(freq, dtype=np.uint16)
    cum = np.zeros_like(f)
    cum[:, 1:] = np.cumsum(f, axis=1, dtype=np.uint32)[:, :-1].astype(np.uint16)
    regular = np.ascontiguousarray(regular, dtype=np.uint8)
    words = np.empty(sym.size, dtype=np.uint16)
    states = np.empty(streams, dtype=np.uint32)
    k = lib.lmc_cg_encode(
        _ptr(sym), sym.size, streams, _ptr(f), _ptr(cum), T, HD, _ptr(regular), _ptr(words), _ptr(states)
    )
    if k < 0:
        raise ValueError("cachegen symbol has no frequency in its table")
    return states, words[sym.size - k :].copy()
