"""Whole-block copies of strided KV entries in C: ``_block_copy.c``, built on first use.

:class:`~lmcache.kernels.paged.PagedKV` copies a chunk of whole blocks whose entries are not one
contiguous run per block (vLLM-CPU's head-major ``vllm_cpu`` and ``vllm_paged`` blocks, and
``vllm_cpu_vec``'s transposed K) with one call here per chunk: every entry and block in one C
loop, rows with a contiguous dim by ``memcpy`` and a transposed K in 8 x 8 SIMD tiles (AVX2 for
4-byte words where the CPU has it, SSE2 for 2-byte ones, scalar tiles otherwise); a scatter
writes vLLM's blocks with non-temporal stores where the rows are aligned (a load's destination
is far larger than the caches: skipping each line's read-for-ownership about doubles the copy's
speed from a cold source, 16 ms instead of 28-33 ms for 189 MB inside vLLM-CPU). Python makes
one call per chunk instead of one numpy copy per block and entry, ctypes releases the GIL once
for the whole chunk, and no OpenMP team is involved: inside vLLM, where the engine loop shares
the GIL and vLLM's pinned OpenMP threads share the cores, that keeps a load near the copy's own
speed (docs/benchmarks.md, warm TTFT at 4k).

:meth:`BlockCopyPlan.copy_hashed` is the PD transfer's copy (``lmcache.integrations.vllm.pd``): the
same copy with the chunk's xxh3-64 taken in the same pass, through the ``xxhash`` package's own
C functions (:func:`xxh3`), so a value in the cache server's pool is sealed or verified without
reading it a second time.

Built with :func:`lmcache.native_build.build_shared_library`; :func:`library` returns None, with
the reason logged once, when there is no compiler (``LMCACHE_COPY_NATIVE=0`` forces that), and
the copies then go through numpy/torch as before. Bytes are identical either way (tests check
it on every layout and element size).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from pathlib import Path

import numpy as np
import torch

from lmcache.native_build import load_once

__all__ = ["BlockCopyPlan", "Xxh3", "library", "set_simd", "xxh3"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("_block_copy.c")
_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC"]

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}
_xxh3: dict[str, Xxh3 | None] = {}


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # CDLL: the GIL is released during each call
    vp, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lmc_block_copy.restype = c_int
    lib.lmc_block_copy.argtypes = [c_int, i64, vp, vp, i64, vp, vp, i64, i64, i64, i64]
    lib.lmc_block_copy_simd.restype = c_int
    lib.lmc_block_copy_simd.argtypes = [c_int]
    lib.lmc_block_copy_hashed.restype = c_int
    lib.lmc_block_copy_hashed.argtypes = [c_int, i64, vp, vp, i64, vp, vp, i64, i64, i64, i64, vp, vp, vp]
    lib.lmc_block_copy_simd(1)
    return lib


def set_simd(on: bool) -> bool:
    """Use the SIMD tiles and streaming stores (default), or the scalar loops; returns whether AVX2 is used.

    For tests, which check the scalar loops give the same bytes.
    """
    lib = library()
    return bool(lib.lmc_block_copy_simd(1 if on else 0)) if lib is not None else False


def library() -> ctypes.CDLL | None:
    """The compiled copy loop, built on first use (once per process), or None (numpy copies)."""
    return load_once(
        _state,
        _lock,
        source=_SOURCE,
        stem="block_copy",
        what="the native block copies",
        flags=_FLAGS,
        bind=_load,
        env="LMCACHE_COPY_NATIVE",
        fallback="copying with numpy",
        log=logger,
    )


class Xxh3:
    """xxh3-64 (seed 0, the frames' checksum) through the streaming C functions of the ``xxhash`` package.

    The ``xxhash`` extension module (a dependency, the one :func:`lmcache.serde.frame.payload_checksum`
    uses) exports the library's C API; the hashed block copies call its update function from C,
    once per block part, so a chunk is copied and hashed in one pass without the GIL.

    Args:
        lib: The loaded ``xxhash`` extension module.
    """

    __slots__ = ("_create", "_digest", "_free", "_reset", "update")

    def __init__(self, lib: ctypes.CDLL) -> None:
        vp = ctypes.c_void_p
        self._create = lib.XXH3_createState
        self._create.restype, self._create.argtypes = vp, []
        self._free = lib.XXH3_freeState
        self._free.restype, self._free.argtypes = ctypes.c_int, [vp]
        self._reset = lib.XXH3_64bits_reset
        self._reset.restype, self._reset.argtypes = ctypes.c_int, [vp]
        self._digest = lib.XXH3_64bits_digest
        self._digest.restype, self._digest.argtypes = ctypes.c_uint64, [vp]
        #: The address of ``XXH3_64bits_update(state, data, len)``, for the C copies.
        # The runtime-dispatched update (AVX2 where the CPU has it) where the build has one.
        update = getattr(lib, "XXH3_64bits_update_dispatch", None) or lib.XXH3_64bits_update
        self.update: int = ctypes.cast(update, vp).value or 0

    def new_state(self) -> int:
        """A fresh (reset) hash state; give it back with :meth:`free`.

        Raises:
            MemoryError: The library could not allocate one.
        """
        state = self._create()
        if not state:
            raise MemoryError("XXH3_createState failed")
        self._reset(state)
        return int(state)

    def digest(self, state: int) -> int:
        """The 64-bit hash of everything fed to ``state`` so far."""
        return int(self._digest(state))

    def free(self, state: int) -> None:
        """Free a state from :meth:`new_state`."""
        self._free(state)


def xxh3() -> Xxh3 | None:
    """The ``xxhash`` package's C xxh3 functions, or None (logged once) when they cannot be bound."""
    with _lock:
        if "lib" not in _xxh3:
            try:
                from xxhash import _xxhash

                _xxh3["lib"] = Xxh3(ctypes.CDLL(_xxhash.__file__))
            except (ImportError, OSError, AttributeError) as exc:
                logger.info("lmcache: xxhash's C functions are not reachable (%s); hashing in a second pass", exc)
                _xxh3["lib"] = None
        return _xxh3["lib"]


_bounce = threading.local()


def _bounce_buffer(nbytes: int) -> np.ndarray:
    """This thread's scratch buffer of at least ``nbytes`` (one block part: it stays in L2)."""
    buf = getattr(_bounce, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        _bounce.buf = buf
    return buf


class BlockCopyPlan:
    """The addresses and strides of a bound KV's entries, ready for :func:`lmc_block_copy` calls.

    Args:
        entries: Per entry a CPU ``[num_blocks, block_size, heads, width]`` view (any strides),
            all of one element size and the same shape.
        lib: The compiled library.
    """

    __slots__ = ("_addrs", "_lib", "_strides", "esize", "shape")

    def __init__(self, entries: list[torch.Tensor], lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.shape = tuple(entries[0].shape[1:])
        self.esize = entries[0].element_size()
        # The views must stay alive for the addresses to stay valid: PagedKV holds them.
        self._addrs = np.array([e.data_ptr() for e in entries], dtype=np.int64)
        self._strides = np.array([e.stride() for e in entries], dtype=np.int64).reshape(-1)

    def copy(self, scatter: bool, blocks: torch.Tensor, chunk: torch.Tensor) -> None:
        """Copy whole ``blocks`` (int64, CPU) between the entries and the contiguous ``chunk``.

        ``chunk`` is ``[entries, len(blocks), block_size, heads, width]`` elements of the
        entries' size (any dtype of that width), contiguous, on the CPU; block ids are in range
        (the caller checked the slots).
        """
        ids = blocks.contiguous()  # held until the call returns: its pointer is an argument
        rc = self._lib.lmc_block_copy(*self._call_args(scatter, ids, chunk))
        if rc != 0:  # only an element size the plan's caller already rules out
            raise ValueError(f"native block copy: unsupported element size {self.esize}")

    def _call_args(self, scatter: bool, ids: torch.Tensor, chunk: torch.Tensor) -> tuple[int, ...]:
        """The arguments ``lmc_block_copy`` and ``lmc_block_copy_hashed`` share, in their order."""
        bs, heads, width = self.shape
        return (
            1 if scatter else 0,
            len(self._addrs),
            self._addrs.ctypes.data,
            self._strides.ctypes.data,
            ids.numel(),
            ids.data_ptr(),
            chunk.data_ptr(),
            bs,
            heads,
            width,
            self.esize,
        )

    def copy_hashed(
        self, scatter: bool, blocks: torch.Tensor, chunk: torch.Tensor, hasher: Xxh3, *, stream: bool = True
    ) -> int:
        """:meth:`copy`, and the chunk's xxh3-64 taken in the same pass; returns the hash.

        A gather hashes the bytes it writes into ``chunk`` (each block part from a scratch
        buffer in cache, then streamed into ``chunk``); a scatter hashes ``chunk`` as it is read.
        One C call for the whole chunk (GIL released). The hash equals
        :func:`lmcache.serde.frame.payload_checksum` of the chunk's bytes.

        Raises:
            ValueError: An unsupported element size, or the hash update failed.
        """
        ids = blocks.contiguous()  # held until the call returns: its pointer is an argument
        bs, heads, width = self.shape
        bounce = None if scatter or not stream else _bounce_buffer(bs * heads * width * self.esize)
        state = hasher.new_state()
        try:
            rc = self._lib.lmc_block_copy_hashed(
                *self._call_args(scatter, ids, chunk),
                None if bounce is None else bounce.ctypes.data,
                hasher.update,
                state,
            )
            if rc != 0:
                raise ValueError(f"native hashed block copy failed ({rc}; element size {self.esize})")
            return hasher.digest(state)
        finally:
            hasher.free(state)
