"""The ``nixl://`` data path in native code: a lane that makes NIXL calls without the GIL.

NIXL's Python bindings release the GIL inside ``createXferReq`` and ``postXferReq``, so a Python
thread that posts transfers takes the GIL back several times per transfer, each time from
whichever thread holds it (the event loop, the threads that verify), and a verifying thread
wakes tens of microseconds to milliseconds after a transfer lands. ``_lane.c`` (beside this module) does the
same work with no Python in the loop: one thread makes every NIXL call of the data path through
NIXL's own C API (``libnixl_capi.so``, shipped in the NIXL wheel), and a second one hashes each
transfer's values with xxh3 as the lane starts it (a put) or as soon as it lands (a get), while
the bytes are still in cache.

The C file is compiled on first use with the host's C compiler (``cc``, overridable with
``$CC``) into ``$LMCACHE_NATIVE_DIR`` (default ``~/.cache/lmcache/native``), keyed by a hash of
its source, the way Triton builds its launchers. It links nothing: every function it calls is a
pointer handed over here. :func:`open_lane` returns None, with the reason logged, when anything
is missing (no compiler, a NIXL build without the C API, an agent the bindings cannot hand
over), and ``nixl://`` then keeps its Python lane (see :mod:`lmcache.backends.nixl.lanes`).

The agent is NIXL's own C++ object, taken from the bindings through pybind11's cross-module
conduit (``_pybind11_conduit_v1_``), and checked by asking the C API for the agent's metadata,
which must equal what the bindings return.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import xxhash

from lmcache.native_build import build_shared_library

__all__ = ["NativeJob", "NativeLane", "build", "open_lane"]

logger = logging.getLogger(__name__)

#: The lane's C source, shipped beside this module as package data (see pyproject.toml).
_SOURCE = Path(__file__).with_name("_lane.c")
#: NIXL C API status (``nixl_capi_status_t``) of a job cancelled before it finished.
CANCELLED = -100
READ, WRITE = 0, 1

_build_lock = threading.Lock()
#: The loaded library, or why it could not be built (once per process).
_built: dict[str, Any] = {}


class _Api(ctypes.Structure):
    """``lmc_api`` in ``_lane.c``: the functions the lane calls."""

    _fields_ = [
        (name, ctypes.c_void_p)
        for name in (
            "dl_create",
            "dl_destroy",
            "dl_add",
            "req_create",
            "req_post",
            "req_status",
            "req_release",
            "req_destroy",
            "hash",
        )
    ]


_CAPI_NAMES = {
    "dl_create": "nixl_capi_create_xfer_dlist",
    "dl_destroy": "nixl_capi_destroy_xfer_dlist",
    "dl_add": "nixl_capi_xfer_dlist_add_desc",
    "req_create": "nixl_capi_create_xfer_req",
    "req_post": "nixl_capi_post_xfer_req",
    "req_status": "nixl_capi_get_xfer_status",
    "req_release": "nixl_capi_release_xfer_req",
    "req_destroy": "nixl_capi_destroy_xfer_req",
}


def build() -> ctypes.CDLL:
    """The compiled lane library, built on first use (once per process; cached on disk).

    Raises:
        OSError: No C compiler, or the build failed (the message says why).
    """
    with _build_lock:
        if "library" in _built:
            return _built["library"]  # type: ignore[no-any-return]
        if "error" in _built:
            raise OSError(_built["error"])
        try:
            _built["library"] = _load(_compile())
        except OSError as exc:
            _built["error"] = str(exc)
            raise
        return _built["library"]  # type: ignore[no-any-return]


def _compile() -> Path:
    flags = ["-O2", "-std=gnu11", "-shared", "-fPIC", "-pthread"]
    return build_shared_library(_SOURCE, "nixl_lane", "the native NIXL lane", flags)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    vp, i32p, u64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_uint64)
    lib.lmc_lane_create.restype = vp
    lib.lmc_lane_create.argtypes = [ctypes.POINTER(_Api), vp]
    lib.lmc_lane_destroy.restype = None
    lib.lmc_lane_destroy.argtypes = [vp]
    lib.lmc_lane_stats.restype = None
    lib.lmc_lane_stats.argtypes = [vp, u64p]
    lib.lmc_job_submit.restype = vp
    lib.lmc_job_submit.argtypes = [vp, ctypes.c_char_p, *[ctypes.c_int] * 3, i32p, u64p, i32p, u64p, ctypes.c_int, u64p]
    lib.lmc_job_wait.restype = ctypes.c_int
    lib.lmc_job_wait.argtypes = [vp, vp, ctypes.c_long]
    lib.lmc_job_cancel.restype = None
    lib.lmc_job_cancel.argtypes = [vp]
    lib.lmc_job_result.restype = ctypes.c_int
    lib.lmc_job_result.argtypes = [vp, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p, ctypes.c_size_t, u64p]
    lib.lmc_job_free.restype = None
    lib.lmc_job_free.argtypes = [vp]
    return lib


def _loaded_library(name: str) -> str | None:
    """Path of the shared object ``name`` mapped into this process (from /proc/self/maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path) == name:
                    return path
    except OSError:
        return None
    return None


def _capi() -> ctypes.CDLL:
    """NIXL's C API, from the directory of the ``libnixl.so`` the bindings loaded."""
    core = _loaded_library("libnixl.so")
    if core is None:
        raise OSError("libnixl.so is not loaded (import NIXL first)")
    path = os.path.join(os.path.dirname(core), "libnixl_capi.so")
    if not os.path.exists(path):
        raise OSError(f"this NIXL build has no C API ({path} is missing)")
    return ctypes.CDLL(path)


def _hash_function() -> int:
    """Address of ``XXH3_64bits`` in the xxhash module Python uses (the same checksums)."""
    module = getattr(xxhash, "_xxhash", None)
    path = getattr(module, "__file__", None)
    if not path:
        raise OSError("the xxhash module has no native library to take XXH3_64bits from")
    fn = ctypes.CDLL(path).XXH3_64bits
    probe = b"lmcache"
    fn.restype, fn.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t]
    if fn(probe, len(probe)) != xxhash.xxh3_64_intdigest(probe):
        raise OSError("xxhash's XXH3_64bits disagrees with xxh3_64_intdigest")
    return ctypes.cast(fn, ctypes.c_void_p).value or 0


class _TypeInfo(ctypes.Structure):
    """The layout of a GCC ``std::type_info``: what pybind11 matches types by (their names)."""

    _fields_ = [("vptr", ctypes.c_void_p), ("name", ctypes.c_char_p)]


def _agent_pointer(bound_agent: Any) -> int:
    """The ``nixlAgent*`` behind the bindings' agent object (pybind11's conduit).

    Raises:
        OSError: The bindings do not hand it over.
    """
    conduit = getattr(bound_agent, "_pybind11_conduit_v1_", None)
    if conduit is None:
        raise OSError("these NIXL bindings have no pybind11 conduit")
    name = ctypes.create_string_buffer(b"9nixlAgent")  # typeid(nixlAgent).name()
    info = _TypeInfo(None, ctypes.cast(name, ctypes.c_char_p))
    new, get = ctypes.pythonapi.PyCapsule_New, ctypes.pythonapi.PyCapsule_GetPointer
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    capsule = new(ctypes.addressof(info), b"St9type_info", None)
    out = None
    for abi in _pybind_abi_ids(bound_agent):
        out = conduit(abi, capsule, b"raw_pointer_ephemeral")
        if out is not None:
            break
    if out is None:
        raise OSError("the NIXL bindings did not hand over their agent")
    return int(get(out, b"9nixlAgent") or 0)


_KNOWN_ABI_IDS = (b"system_libstdcpp_gxx_abi_1xxx_use_cxx11_abi_1", b"_gcc_libstdcpp_cxxabi1018")


def _pybind_abi_ids(bound_agent: Any) -> Iterator[bytes]:
    """pybind11 platform ABI ids to try: the usual GCC ones, then the one the bindings name.

    The bindings' shared object is read (~1 MB) only when neither usual id is accepted.
    """
    yield from _KNOWN_ABI_IDS
    module = __import__(type(bound_agent).__module__, fromlist=["_"])
    path = getattr(module, "__file__", None)
    try:
        data = Path(path).read_bytes() if path else b""
    except OSError:
        return
    start = data.find(b"__pybind11_internals_v")
    if start >= 0:
        # "__pybind11_internals_v12_<abi id>__": the id follows the version
        middle = data[start + len(b"__pybind11_internals_v") : data.find(b"__\x00", start)]
        abi = middle.partition(b"_")[2]
        if abi and abi not in _KNOWN_ABI_IDS:
            yield abi


def _check_agent(capi: ctypes.CDLL, handle: ctypes.Structure, nixl_agent: Any) -> None:
    """The C API must see the same agent as the bindings: compare their local metadata."""
    fn = capi.nixl_capi_get_local_md
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    data, size = ctypes.c_void_p(), ctypes.c_size_t()
    if fn(ctypes.addressof(handle), ctypes.byref(data), ctypes.byref(size)) != 0 or not data.value:
        raise OSError("NIXL's C API could not read the agent's metadata")
    try:
        native = ctypes.string_at(data.value, size.value)
    finally:
        libc = ctypes.CDLL(None)
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(data)
    if native != bytes(nixl_agent.get_agent_metadata()):
        raise OSError("NIXL's C API and its bindings disagree about the agent")


class _AgentHandle(ctypes.Structure):
    _fields_ = [("inner", ctypes.c_void_p)]  # NIXL's nixl_capi_agent_s


class NativeJob:
    """One submitted job: wait for it, cancel it, read its result (then it is freed)."""

    def __init__(self, lane: NativeLane, ptr: int, nhash: int) -> None:
        self._lane = lane
        self._ptr: int | None = ptr
        self._nhash = nhash

    def wait(self, timeout: float | None) -> bool:
        """Block (without the GIL) until the job ends; False if ``timeout`` seconds passed first."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        return bool(self._lane.lib.lmc_job_wait(self._lane.ptr, self._ptr, ms))

    def cancel(self) -> None:
        """Post nothing more; transfers in flight finish or are aborted where NIXL can."""
        self._lane.lib.lmc_job_cancel(self._ptr)

    def result(self) -> tuple[int, int, str, list[int]]:
        """``(status, failed_at, what, checksums)`` of an ended job; frees it."""
        if self._ptr is None:
            raise RuntimeError("the job's result was already taken")
        failed_at = ctypes.c_int()
        what = ctypes.create_string_buffer(48)
        out = (ctypes.c_uint64 * max(self._nhash, 1))()
        status = self._lane.lib.lmc_job_result(self._ptr, ctypes.byref(failed_at), what, len(what), out)
        self._lane.lib.lmc_job_free(self._ptr)
        self._ptr = None
        return int(status), int(failed_at.value), what.value.decode(errors="replace"), list(out[: self._nhash])


class NativeLane:
    """The lane and checksum threads of one NIXL agent."""

    def __init__(self, lib: ctypes.CDLL, api: _Api, handle: _AgentHandle) -> None:
        self.lib = lib
        self._handle = handle
        ptr = lib.lmc_lane_create(ctypes.byref(api), handle.inner)
        if not ptr:
            raise OSError("could not start the native NIXL lane's threads")
        self.ptr: int = ptr

    def submit(
        self,
        remote: str,
        op: int,
        transfers: Sequence[tuple[Sequence[tuple[int, int, int]], Sequence[tuple[int, int]]]],
        *,
        hash_at_start: bool,
        headers: Sequence[tuple[int, int, int]] = (),
    ) -> NativeJob:
        """Queue transfers with the agent ``remote``: ``(descriptors, ranges to hash)`` each.

        A descriptor is ``(local address, remote address, length)``, a range to hash
        ``(address, length)``: hashed once the lane takes the transfer up (``hash_at_start``,
        a WRITE's sources) or once it has landed (a READ's destinations). ``headers``: frame
        headers ``(address, key +
        metadata length, index of the payload's hashed range)`` that the last transfer writes;
        once every range is hashed, the lane fills in their checksums
        (:func:`lmcache.serde.frame.encode_header`'s layout) before it posts that transfer.

        Raises:
            OSError: The lane is stopping, out of memory, or ``remote`` is too long a name.
        """
        xd, desc, xh, hr = [0], [], [0], []
        for descs, ranges in transfers:
            for local, far, n in descs:
                desc += (local, far, n)
            for addr, n in ranges:
                hr += (addr, n)
            xd.append(len(desc) // 3)
            xh.append(len(hr) // 2)
        ptr = self.lib.lmc_job_submit(
            self.ptr,
            remote.encode(),
            op,
            int(hash_at_start),
            len(transfers),
            (ctypes.c_int32 * len(xd))(*xd),
            (ctypes.c_uint64 * max(len(desc), 1))(*desc),
            (ctypes.c_int32 * len(xh))(*xh),
            (ctypes.c_uint64 * max(len(hr), 1))(*hr),
            len(headers),
            (ctypes.c_uint64 * max(3 * len(headers), 1))(*(v for h in headers for v in h)),
        )
        if not ptr:
            raise OSError("the native NIXL lane did not take the job (stopping, out of memory, or malformed)")
        return NativeJob(self, ptr, len(hr) // 2)

    def stats(self) -> dict[str, int]:
        """The lane's counters since it started.

        Transfers, bytes, hashed bytes, and nanoseconds spent posting, with the checksum thread
        waiting, making requests (before a post), releasing them (after), with the lane waiting
        only for parked puts' checksums (before their headers), and with nothing to do.
        """
        out = (ctypes.c_uint64 * 9)()
        self.lib.lmc_lane_stats(self.ptr, out)
        keys = (
            "transfers",
            "bytes",
            "hashed_bytes",
            "post_ns",
            "hash_wait_ns",
            "create_ns",
            "finish_ns",
            "sums_wait_ns",
            "idle_ns",
        )
        return dict(zip(keys, (int(v) for v in out), strict=True))

    def close(self) -> None:
        """Stop the threads (every submitted job must have ended)."""
        if self.ptr:
            self.lib.lmc_lane_destroy(self.ptr)
            self.ptr = 0


def open_lane(nixl_agent: Any) -> NativeLane:
    """A native lane for ``nixl_agent`` (NIXL's Python ``nixl_agent``).

    Raises:
        OSError: It cannot run here (the message says why).
    """
    lib = build()
    capi = _capi()
    api = _Api()
    for field, symbol in _CAPI_NAMES.items():
        try:
            setattr(api, field, ctypes.cast(getattr(capi, symbol), ctypes.c_void_p).value)
        except AttributeError:
            raise OSError(f"NIXL's C API lacks {symbol}") from None
    api.hash = _hash_function()
    handle = _AgentHandle(_agent_pointer(nixl_agent.agent))
    _check_agent(capi, handle, nixl_agent)
    return NativeLane(lib, api, handle)
