"""``nixl://``: values moved by NVIDIA NIXL transfers, to a peer store's memory or to files.

Two forms:

``nixl://host:port?timeout=30&workers=4&progress_thread=false&ucx_workers=1&native_lane=auto``
    A peer process (``python -m lmcache.backends.nixl_peer --port P --capacity 8GiB``, see
    :mod:`lmcache.backends.nixl_peer`) holds a NIXL-registered DRAM pool and the index. This
    backend talks to it over a small TCP control protocol (reserve, commit, lookup, release,
    contains, delete, list) and moves the bytes itself with one-sided NIXL transfers over UCX: a
    put WRITEs the frame header (from a per-batch buffer) and the caller's source buffer straight
    into the reserved pool extent, a get READs the header and the payload straight into the
    caller's destination buffer. The caller's buffers are registered with NIXL for the duration
    of one batch (one registration call per batch; ~5-10 us here), so no value is copied on
    the host. Values are :mod:`lmcache.serde.frame` frames; the reading client verifies the
    key, lengths and checksum, so a damaged value is a counted miss (and is deleted on the peer,
    so it can be stored again). Like every large-value read that lands straight in ``dst``, the
    ``dst`` of a corrupt value is unspecified.

    A lookup takes a *lease* on each hit, released after the READ, so the peer never reuses the
    bytes of a value that is being read even if it is deleted meanwhile; a reservation is
    invisible to readers until its commit. A cancelled put aborts its reservations; a cancelled
    get waits for its transfer (rule 3), then releases its leases. A lost control connection is
    re-established on the next call (the peer frees what the old connection reserved or leased).

``nixl+posix:///abs/dir`` (or ``nixl:///abs/dir?backend=posix``)
    NIXL's POSIX backend as a file store: the ``file://`` layout, frames, index, atomic
    publication and capacity rules (:class:`NixlPosixBackend` subclasses
    :class:`~lmcache.backends.file.FileBackend`), with every read and write of file bytes done
    as a NIXL DRAM↔FILE transfer. ``o_direct`` is not offered (the plugin does its own I/O).

Performance (``lmcache bench backend --url nixl://… --checked`` against
:mod:`lmcache.bench.baselines_nixl`: a raw NIXL WRITE/READ per batch between pre-registered
arrays and one reserved extent, using an agent configured like the backend's; ``--checked`` adds
the raw SDK with lmcache's check, xxh3 of each value before a WRITE and after a READ. Setup: 2 MiB
values, batches of 16, 4 in flight, 1 GiB rounds, a 2-vCPU AMD EPYC VM, a prefaulted peer, UCX
over loopback in a private network namespace. UCX moves the bytes with CMA
(``process_vm_readv``/``writev``), so every transfer is a copy by the host CPU, done when posted.)

* **The native lane** (the default where a C compiler is present, ``native_lane=auto``; see
  :mod:`lmcache.backends.nixl_native`). One C thread makes every NIXL call of the data path
  through NIXL's C API, one value per transfer; a second C thread hashes each value as the lane
  starts copying it (a put: the hash runs ahead of the copy over the same bytes, so the copy
  reads them from cache) or as soon as it has landed (a get: still in cache). No Python runs
  between transfers. A put is one job: its frame headers are encoded here with a placeholder
  checksum and written by the job's last transfer, after the lane has filled in each header's
  checksums. When the last values of a put are still being hashed as its payloads are done, the
  lane parks that put and goes on with the next jobs, writing its headers once the checksums are
  in: waiting for them had cost 1-7% of a put phase (the checksum thread shares the second vCPU
  with the event loop and the peer). The checksum thread polls transfer states with 50 us sleeps:
  waking it with a futex call cost the lane 3-20 us per ~170 us transfer. With parking, 11 runs
  (``--repeat 7 --checked``, the raw SDK at 7.8-10.8 GB/s):

  ===========  ==============================  ==============================
  ratio        put                             get
  ===========  ==============================  ==============================
  / raw        0.78-1.02, median 0.935, 8 of   0.81-1.03, median 0.944, 10 of
               11 at >= 0.90                   11 at >= 0.90
  / checked    1.07-1.25                       1.08-1.38
  ===========  ==============================  ==============================

  The lane posts 0.95-0.97 of a phase for puts and gets alike (0.85-0.95 for puts before
  parking); a put's copies inside ``postXferReq`` ran at 0.92-1.02 of the raw SDK's in the phase
  next to them. What remains is
  the checksum pass beside the copy (xxh3 of every byte on the second vCPU, ~0.4-0.6 of a core)
  and the control messages: on 2 vCPUs the lane, the checksum thread, the event loop and the
  peer share two cores. Two of the three runs with a figure below 0.90 came when the host copied
  fastest (the raw SDK at 10.1-10.8 GB/s), where the checked raw SDK fell to 0.70-0.77 of the
  raw one; the third was a put at 0.898.
  Before parking, five interleaved A/B
  pairs (``native_lane=auto`` vs ``off``, the raw SDK at 7.3-10.2 GB/s) gave native puts
  0.87-0.95 and gets 0.87-1.08, the Python lane 0.75-0.90 and 0.72-0.83; with the host at
  11.4-12.8 GB/s, native 0.81-0.86 and 0.87-0.92.
* **Why the Python lane verifies gets from memory.** NIXL's bindings release the GIL in
  ``createXferReq`` and ``postXferReq``, so a Python thread that posts transfers takes the GIL
  back from the verifying and event-loop threads three times per transfer (~40-60 us each under
  load, against ~10 us for a whole transfer in a quiet process), and a verifying Python thread
  woke 30-70 us (p90 0.3-1.3 ms) after a transfer ended. The Python lane therefore moves values
  in groups of ~:data:`_GROUP_BYTES` (16 MiB) per transfer, and a get verifies a group only when
  the whole group has landed, by then mostly from memory: gets at 0.73-0.85 of the raw SDK, about
  as fast as the checked raw SDK. Small groups kept the bytes in cache (hash rate 43-50 GB/s
  instead of 27-30) but cost as much in GIL handoffs as they saved. A put queues all its
  payload transfers and checksums each group from the moment the lane starts it (0.83-0.93,
  against 0.71-0.76 when it checksummed the next group while the lane copied the previous one).
* **The ceiling.** Every put checksums and every get verifies the whole payload (DESIGN.md §3
  rule 8), one more pass over memory than the raw SDK makes; ``lmcache bench host`` measures
  what that costs with no store or NIXL involved (CMA read then check: 0.78-0.92 of the bare
  reads on this VM, moving with the host's memory traffic). The raw SDK with the same check ran
  at 0.71-0.87 of the raw one in the runs above.
* **One lane per agent.** With one UCX worker the agent serializes its calls and holds its lock
  for a whole CPU copy, so one thread making every call (either lane) never waits for the lock
  and always has the next transfer queued. ``ucx_workers=4`` or ``8`` lets executor threads copy
  in parallel (backend put 12.1-13.5, get 11.9-13.6 GB/s on an earlier VM, against a raw SDK
  that gains more: 18.6-27 GB/s).
* **Registered memory.** Registering a batch's buffers cost 10-40 us alone but up to 1.4 ms amid
  the copies. Callers declare long-lived memory once with
  :meth:`~lmcache.backends.base.StorageBackend.register_host_memory` (the engine's chunk pool, the
  benchmark's arrays); frame headers go into slabs of one registered arena. Buffers outside
  registered memory are still registered per call.
* Progress threads (the peer's always, a client's with ``progress_thread=true``) sleep until
  UCX has an event: NIXL's Python API makes them poll without pause, and an idle peer took a
  whole core. The peer's pool is private anonymous memory with ``MADV_HUGEPAGE`` (on 4 KiB
  pages both the raw SDK and the backend ran ~1.6x slower); ``--prefault`` populates it at start
  (~2.3 s per GiB here), otherwise a first fill ran at ~0.4 GB/s.
* Over UCX/TCP (``UCX_TLS=tcp,self``, transfers not done when posted) both lanes keep several
  transfers in flight and poll them; TCP is then the bottleneck (256 MiB, one run each: native
  lane put 1.04, get 0.96 of the raw SDK at 2.9 and 0.8 GB/s; Python lane 0.77 and 0.90; an
  earlier Python-lane run with ``progress_thread=true``: 0.99 and 1.00).

Every NIXL call (agent creation, registration, transfers, polling) runs on the backend's own
bounded executor (``workers`` threads) or its lane thread (Python or native), never on the event loop. SDK
failures are mapped to :class:`~lmcache.errors.BackendUnavailableError` /
:class:`~lmcache.errors.BackendTimeoutError`.

Install: ``pip install 'lmcache[nixl]'`` (``nixl-cu12``; the import name ``nixl`` comes from
``pip install --no-deps nixl``, or ``nixl_cu12`` is used directly). UCX reads its configuration
from the environment: on hosts without InfiniBand set ``UCX_MODULES=^ib`` (otherwise processes
can crash at exit), and ``UCX_NET_DEVICES`` to the interfaces to use (``lo`` for a single host).
The NIXL agent's listener is not used (metadata travels over the control socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import itertools
import logging
import os
import queue
import secrets
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qsl, quote, urlencode

import numpy as np

from lmcache.backends import nixl_native
from lmcache.backends.base import (
    EXISTS,
    STORED,
    Capabilities,
    PutResult,
    StorageBackend,
    check_dst_size,
    parse_backend_url,
    rejected,
    run_blocking,
    settings_query,
    split_by_size,
    split_url,
)
from lmcache.backends.file import FileBackend, FileSettings
from lmcache.backends.nixl_native import NativeLane
from lmcache.backends.nixl_peer import (
    MAX_BATCH,
    Op,
    ProtocolError,
    Reader,
    Status,
    pack_key,
    pack_keys,
    pack_message,
    read_message,
)
from lmcache.config import setting
from lmcache.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    MissingDependencyError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde import frame

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["NixlBackend", "NixlPosixBackend", "NixlPosixSettings", "NixlSettings", "import_nixl"]

logger = logging.getLogger(__name__)

_FRAME_ALIGN = 64
#: Bytes of payload per transfer of a put or a get (see NixlBackend._write_values/_read_values).
_GROUP_BYTES = 16 << 20
#: Bytes of one slab of the registered arena that holds a batch's frame headers.
_HEADER_SLAB = 64 << 10
#: Poll timeout of a NIXL progress thread, in microseconds (see _hook_poll_timeout).
PROGRESS_POLL_US = 100_000
_STATUS = struct.Struct("<BQ")
_HIT = struct.Struct("<BQQQI")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def import_nixl() -> Any:
    """NIXL's Python API module (``nixl._api``, else ``nixl_cu12._api`` / ``nixl_cu13._api``).

    Raises:
        MissingDependencyError: NIXL is not installed.
    """
    for name in ("nixl._api", "nixl_cu12._api", "nixl_cu13._api"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise MissingDependencyError("nixl", "nixl", "the nixl:// backend")


def _addr(view: memoryview | np.ndarray | bytes) -> int:
    """Address of a contiguous host buffer (read-only ones included)."""
    arr = view if isinstance(view, np.ndarray) else np.frombuffer(view, dtype=np.uint8)
    return int(arr.ctypes.data)


_POLL = threading.local()  # the progress thread's poll timeout for agents made by this thread


def _hook_poll_timeout(api: Any) -> bool:
    """Let :func:`_make_agent` choose the progress thread's poll timeout (NIXL's ``pthrDelay``).

    NIXL's Python API always passes ``pthrDelay=0``: its UCX progress thread then polls the
    worker without pause and takes a whole core even when idle. With a timeout, the thread arms
    the worker and sleeps in ``poll()`` until the worker signals an event (incoming data, a
    completion) or the timeout passes, so it costs nothing while idle. The API offers no way to
    set it, so the binding's config class is replaced, once, by a subclass whose ``pthrDelay``
    takes the value this thread asked for, and otherwise the one given (other users of NIXL in
    the process see no change). False when this NIXL build has no such field.
    """
    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    if base is None:
        return False
    if getattr(base, "_lmcache_poll_hook", False):
        return True
    field = getattr(base, "pthrDelay", None)
    if field is None or not hasattr(field, "__set__"):
        return False

    try:

        class _Config(base):  # type: ignore[misc, valid-type]
            _lmcache_poll_hook = True

            @property
            def pthrDelay(self) -> int:
                return int(field.__get__(self))

            @pthrDelay.setter
            def pthrDelay(self, value: int) -> None:
                wanted = getattr(_POLL, "us", None)
                field.__set__(self, value if wanted is None else wanted)

    except TypeError as exc:  # a binding class that cannot be subclassed: keep NIXL's default
        logger.debug("NIXL: cannot set the progress thread's poll timeout (%s)", exc)
        return False
    bind.nixlAgentConfig = _Config
    return True


def _make_agent(name: str, backends: list[str], prog_thread: bool, ucx_workers: int = 1) -> Any:
    """A NIXL agent with ``backends``; its progress thread (if any) waits for events, not spins.

    With one UCX worker the agent serializes its calls (``STRICT``): a transfer the host CPU
    copies (CMA, TCP) then holds it for the whole copy, so copies run one at a time. With
    ``ucx_workers > 1`` the agent takes a shared lock for transfers (``RW``) and UCX gets that
    many workers (NIXL picks one per calling thread), so threads copy in parallel.
    """
    api = import_nixl()
    try:
        sync = (
            api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT
            if ucx_workers <= 1
            else api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW
        )
        cfg = api.nixl_agent_config(
            enable_prog_thread=prog_thread,
            enable_listen_thread=False,
            backends=backends if ucx_workers <= 1 else [b for b in backends if b != "UCX"],
            sync_mode=sync,
        )
        hooked = prog_thread and _hook_poll_timeout(api)
        if hooked:
            _POLL.us = PROGRESS_POLL_US
        try:
            agent = api.nixl_agent(name, cfg)
            if ucx_workers > 1 and "UCX" in backends:
                agent.create_backend("UCX", {"num_workers": str(ucx_workers)})
        finally:
            if hooked:
                _POLL.us = None
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: creating agent {name} failed: {type(exc).__name__}: {exc}") from None
    missing = [b for b in backends if b not in agent.backends]
    if missing:
        raise BackendUnavailableError(f"NIXL: the {', '.join(missing)} backend plugin is not available here")
    return agent


@dataclasses.dataclass
class _Xfer:
    """A posted NIXL transfer: its handle, and whether it is known to be done.

    A transfer the host CPU copies (UCX over CMA) is done when posted. Knowing that saves the
    state polls, each of which takes the agent's lock that the other threads' copies hold.
    """

    handle: Any
    done: bool


def _post(
    agent: Any,
    op: str,
    *,
    local: list[tuple[int, int, int]],
    local_type: str,
    remote: list[tuple[int, int, int]],
    remote_type: str,
    remote_agent: str,
) -> _Xfer | None:
    """Start one NIXL transfer (finish it with :func:`_wait`); None if there is nothing to move.

    Raises:
        BackendUnavailableError: NIXL refused the transfer.
    """
    if not local:
        return None
    try:
        handle = agent.initialize_xfer(
            op, agent.get_xfer_descs(local, local_type), agent.get_xfer_descs(remote, remote_type), remote_agent
        )
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: preparing a {op} failed: {type(exc).__name__}: {exc}") from None
    try:
        state = agent.transfer(handle)
    except Exception as exc:
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)
        raise BackendUnavailableError(f"NIXL: posting a {op} failed: {type(exc).__name__}: {exc}") from None
    if state == "ERR":
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)
        raise BackendUnavailableError(f"NIXL: a {op} to {remote_agent} failed when posted")
    return _Xfer(handle, state == "DONE")


def _is_done(agent: Any, xfer: _Xfer | None) -> bool:
    """Whether a posted transfer has finished (progresses it once; errors are left to :func:`_wait`)."""
    if xfer is None or xfer.done:
        return True
    try:
        return bool(agent.check_xfer_state(xfer.handle) != "PROC")
    except Exception:
        return True


def _wait(agent: Any, xfer: _Xfer | None, timeout: float) -> None:
    """Poll a posted transfer to completion and release its handle (always, even on failure).

    Raises:
        BackendTimeoutError: Not done within ``timeout`` seconds.
        BackendUnavailableError: The transfer failed.
    """
    if xfer is None or xfer.handle is None:
        return  # nothing posted, or done and released by the lane (see _LaneBatch)
    handle = xfer.handle
    try:
        state = "DONE" if xfer.done else agent.check_xfer_state(handle)
        deadline = time.monotonic() + timeout
        spins = 0
        while state == "PROC":
            spins += 1
            if spins > 200:
                # Past a short spin, yield the core: the progress thread needs it on small hosts.
                time.sleep(0.00005)
                if time.monotonic() > deadline:
                    raise BackendTimeoutError(f"NIXL: a transfer did not finish within {timeout:g} s")
            state = agent.check_xfer_state(handle)
        if state != "DONE":
            raise BackendUnavailableError(f"NIXL: a transfer failed ({state})")
    except BackendError:
        raise
    except Exception as exc:
        raise BackendUnavailableError(f"NIXL: a transfer failed: {type(exc).__name__}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            agent.release_xfer_handle(handle)


def _finish(agent: Any, handles: list[_Xfer | None], timeout: float) -> BackendError | None:
    """Wait for every posted transfer in ``handles`` (None entries are done); the first failure."""
    failure: BackendError | None = None
    for i, handle in enumerate(handles):
        handles[i] = None
        try:
            _wait(agent, handle, timeout)
        except BackendError as exc:
            failure = failure or exc
    return failure


def _transfer(
    agent: Any,
    op: str,
    *,
    local: list[tuple[int, int, int]],
    local_type: str,
    remote: list[tuple[int, int, int]],
    remote_type: str,
    remote_agent: str,
    timeout: float,
) -> None:
    """One NIXL transfer, posted and polled to completion (blocking; run it on an executor).

    Raises:
        BackendTimeoutError: Not done within ``timeout`` seconds.
        BackendUnavailableError: NIXL refused or failed the transfer.
    """
    handle = _post(
        agent,
        op,
        local=local,
        local_type=local_type,
        remote=remote,
        remote_type=remote_type,
        remote_agent=remote_agent,
    )
    _wait(agent, handle, timeout)


def _register(agent: Any, regions: list[tuple[int, int, int]], mem_type: str) -> Any:
    """Register ``(addr, len, dev)`` regions (deduplicated, empty ones skipped); None if none.

    Raises:
        BackendUnavailableError: NIXL refused.
    """
    unique = sorted({r for r in regions if r[1] > 0})
    if not unique:
        return None
    try:
        return agent.register_memory([(a, n, d, "") for a, n, d in unique], mem_type)
    except Exception as exc:
        raise BackendUnavailableError(
            f"NIXL: registering {mem_type} memory failed: {type(exc).__name__}: {exc}"
        ) from None


@contextlib.contextmanager
def _registered(agent: Any, regions: list[tuple[int, int, int]], mem_type: str) -> Iterator[None]:
    """Register ``(addr, len, dev)`` regions (deduplicated) for the duration of the block."""
    reg = _register(agent, regions, mem_type)
    try:
        yield
    finally:
        if reg is not None:
            with contextlib.suppress(Exception):
                agent.deregister_memory(reg)


#: Posts one transfer of a batch: ``(op, local, remote)`` regions, see :func:`_post`.
_PostFn = Callable[[str, list[tuple[int, int, int]], list[tuple[int, int, int]]], _Xfer | None]


class _DirectBatch:
    """The NIXL calls of one batch, made by the calling thread (an agent with several UCX workers).

    The batch's regions are registered from construction to :meth:`close`; :meth:`post` starts
    one transfer, :meth:`wait` finishes one, :meth:`close` finishes the rest (a failure midway
    still waits for every posted transfer before deregistering) and returns the first failure.
    """

    queued: ClassVar[bool] = False  # post() returns once the transfer is posted

    def __init__(self, agent: Any, post: _PostFn, regions: list[tuple[int, int, int]], timeout: float) -> None:
        self._agent = agent
        self._post = post
        self._timeout = timeout
        self._xfers: list[_Xfer | None] = []
        self._regs = _registered(agent, regions, "DRAM")
        self._regs.__enter__()

    def post(self, op: str, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]) -> None:
        self._xfers.append(self._post(op, local, remote))

    def is_done(self, i: int) -> bool:
        return _is_done(self._agent, self._xfers[i])

    def wait(self, i: int) -> None:
        xfer, self._xfers[i] = self._xfers[i], None
        _wait(self._agent, xfer, self._timeout)

    def close(self, *, cancel: bool = False) -> BackendError | None:
        try:
            return _finish(self._agent, self._xfers, self._timeout)
        finally:
            self._regs.__exit__(None, None, None)


class _LaneBatch:
    """The NIXL calls of one batch, queued in order on the agent's lane thread (one UCX worker).

    With one UCX worker the agent runs one call at a time and holds its lock for a whole CPU copy
    (UCX over CMA or TCP). Several threads posting into it hand the lock over after every
    transfer, and each handover waits for a sleeping thread to be scheduled; a thread that
    verifies or checksums between its transfers leaves the copier idle meanwhile. One thread
    (the lane) that makes every call of the data path never waits for the lock, and always has
    the next transfer queued: the callers checksum and verify on other cores while it copies.

    Same contract as :class:`_DirectBatch`. Registration is queued first; transfers queued behind
    it fail if it failed. A transfer the lane finds done when posted is released by the lane
    itself (releasing takes the agent's lock, which the caller would have to wait for). After
    :meth:`close` the batch's deregistration is queued behind everything else, so it never
    precedes a transfer, and the caller does not wait for it.
    """

    queued: ClassVar[bool] = True  # post() only queues the transfer

    def __init__(
        self,
        lane: ThreadPoolExecutor,
        agent: Any,
        post: _PostFn,
        regions: list[tuple[int, int, int]],
        timeout: float,
    ) -> None:
        self._lane = lane
        self._agent = agent
        self._post = post
        self._timeout = timeout
        self._reg: Any = None
        self._failed: BackendError | None = None
        self._futures: list[Future[_Xfer | None] | None] = []
        if any(n > 0 for _a, n, _d in regions):
            self._submit(self._register, regions)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return self._lane.submit(fn, *args)
        except RuntimeError:  # shut down: the backend is closing
            raise BackendUnavailableError("nixl://: the backend was closed") from None

    def _register(self, regions: list[tuple[int, int, int]]) -> None:
        try:
            self._reg = _register(self._agent, regions, "DRAM")
        except BackendError as exc:
            self._failed = exc  # the batch's transfers fail with it

    def _deregister(self) -> None:
        if self._reg is not None:
            with contextlib.suppress(Exception):
                self._agent.deregister_memory(self._reg)
            self._reg = None

    def _post_now(
        self,
        op: str,
        local: list[tuple[int, int, int]],
        remote: list[tuple[int, int, int]],
        started: threading.Event | None,
    ) -> _Xfer | None:
        if started is not None:
            started.set()  # also when it fails next: the caller then learns of it from wait/close
        if self._failed is not None:
            raise self._failed
        xfer = self._post(op, local, remote)
        if xfer is not None and xfer.done:
            with contextlib.suppress(Exception):
                self._agent.release_xfer_handle(xfer.handle)
            xfer.handle = None
        return xfer

    def post(
        self,
        op: str,
        local: list[tuple[int, int, int]],
        remote: list[tuple[int, int, int]],
        started: threading.Event | None = None,
    ) -> None:
        """Queue one transfer; ``started`` is set when the lane takes it up (just before posting it)."""
        self._futures.append(self._submit(self._post_now, op, local, remote, started))

    def wait_started(self, started: threading.Event) -> None:
        """Block until the lane takes up the transfer queued with ``started``.

        Raises:
            BackendTimeoutError: Not within the batch's timeout (the lane is stuck behind others).
        """
        if not started.wait(self._timeout):
            raise BackendTimeoutError(f"NIXL: a transfer was not started within {self._timeout:g} s")

    def _posted(self, fut: Future[_Xfer | None], timeout: float | None) -> _Xfer | None:
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise BackendTimeoutError(f"NIXL: a transfer was not posted within {self._timeout:g} s") from None

    def wait(self, i: int) -> None:
        fut, self._futures[i] = self._futures[i], None
        if fut is not None:
            _wait(self._agent, self._posted(fut, self._timeout), self._timeout)

    def close(self, *, cancel: bool = False) -> BackendError | None:
        failure: BackendError | None = None
        futures, self._futures = self._futures, []
        for fut in futures:
            if fut is None or (cancel and fut.cancel()):
                continue  # waited for, or (after a failure) never started
            try:
                _wait(self._agent, self._posted(fut, None), self._timeout)
            except BackendError as exc:
                failure = failure or exc
        with contextlib.suppress(BackendUnavailableError):
            self._submit(self._deregister)  # a closing backend drops its registrations with the agent
        return failure


def _verify(
    key: CacheKey, head: np.ndarray, dst: memoryview, hlen: int, n: int, *, checksum: int | None = None
) -> int | IntegrityError:
    """``n`` when the frame header and the payload in ``dst`` check out, else the error.

    ``checksum``: the payload's, when it was computed already (the native lane hashes it).
    """
    try:
        header = frame.parse_header(memoryview(head), expected_key=key)
        if header.payload_offset != hlen or header.payload_len != n:
            raise IntegrityError(f"value for {key} has a header that disagrees with the peer's index")
        if checksum is not None:
            header.verify_checksum(checksum)
        elif n:
            header.verify_payload(dst[:n])
    except IntegrityError as exc:
        return exc
    return n


# ---------------------------------------------------------------------------------------------
# nixl://host:port — a peer store over UCX


@dataclasses.dataclass(frozen=True)
class NixlSettings:
    """Options of ``nixl://host:port`` (URL query, ``LMCACHE_NIXL_<NAME>`` env, or keyword overrides)."""

    host: str = setting("", doc="Host of the peer's control port (the URL's host).")
    port: int = setting(0, doc="The peer's control port (the URL's port).", min=1, max=65535)
    timeout: float = setting(30.0, doc="Seconds to wait for a control reply or a transfer.", min=0.001)
    connect_timeout: float = setting(5.0, doc="Seconds to wait for the control connection.", min=0.001)
    workers: int = setting(4, doc="Threads of the backend's executor (NIXL calls and transfers).", min=1, max=256)
    progress_thread: bool = setting(
        False,
        doc="Run the NIXL agent's progress thread. Off: transfers progress while they are waited on, and a "
        "progress thread that polls all the time takes CPU the transfers need where cores are few "
        "(2 cores, UCX over TCP: ~3.0 -> ~3.8 GB/s puts). Turn it on where cores are plenty. Either way "
        "it sleeps until UCX has an event, so an idle agent takes no CPU.",
    )
    ucx_workers: int = setting(
        1,
        doc="UCX workers of the agent. 1: the agent runs one call at a time, so transfers the host CPU copies "
        "(UCX over CMA on one host, or TCP) run one after another, all made by one lane thread. More: transfers "
        "from different executor threads run in parallel (NIXL maps each thread to a worker by a hash of its id, "
        "so give a few more than workers). Same-host CMA, 2 cores, 4-8 workers: puts ~9-10 -> ~12-13.5 GB/s, gets "
        "~10-11.5 -> ~12-13.6; the raw SDK gains more (gets ~15 -> ~19-27 GB/s), as the checksums and control "
        "messages then take CPU and memory bandwidth from the copies. No effect on what a NIC moves.",
        min=1,
        max=64,
    )
    native_lane: str = setting(
        "auto",
        doc="With one UCX worker, make the data path's NIXL calls and checksums in native code (a C lane built "
        "on first use with the host's C compiler; see lmcache.backends.nixl_native) instead of a Python thread. "
        "auto: use it when it builds and loads, else the Python lane; on: fail to open without it; off: never.",
        choices=("auto", "on", "off"),
    )


class NixlBackend(StorageBackend):
    """Values in a NIXL peer's registered DRAM pool, moved by one-sided UCX transfers.

    Args:
        settings: Parsed options (``host`` and ``port`` are required).
    """

    schemes: ClassVar[tuple[str, ...]] = ("nixl",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False, shared=True, device_buffers=False, listing=True, integrity_checked=True, bounded=True
    )

    def __init__(self, settings: NixlSettings) -> None:
        super().__init__()
        if not settings.host or not settings.port:
            raise ConfigError("nixl://: a peer URL needs host and port, e.g. nixl://127.0.0.1:7400")
        if settings.native_lane == "on" and settings.ucx_workers > 1:
            raise ConfigError("nixl://: native_lane=on needs ucx_workers=1 (with more, executor threads copy)")
        self.settings = settings
        self._executor: ThreadPoolExecutor | None = None
        self._lane: ThreadPoolExecutor | None = None  # see _LaneBatch; None with several UCX workers
        self._native: NativeLane | None = None  # the native lane, when it replaces _lane
        # (start, end, NIXL registration) of long-lived memory: register_host_memory, header slabs
        self._host_regs: tuple[tuple[int, int, Any], ...] = ()
        self._slabs: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._agent: Any = None
        self._remote: str | None = None
        self._pool_addr = 0
        self._pool_len = 0
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiters: dict[int, asyncio.Future[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)
        self._groups = itertools.count(1)
        self._conn_lock: asyncio.Lock | None = None
        self._connects = 0

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``nixl://host:port?…``, or a :class:`NixlPosixBackend` from ``nixl:///dir?backend=posix``.

        Raises:
            ConfigError: A malformed URL, an unknown option or a bad value.
        """
        parts = split_url(url)
        if not parts.netloc:
            query = parse_qsl(parts.query, keep_blank_values=True)
            backend = [v for k, v in query if k == "backend"]
            if backend and backend[-1].lower() == "posix":
                rest = urlencode([(k, v) for k, v in query if k != "backend"], quote_via=quote)
                return NixlPosixBackend.from_url(
                    f"nixl+posix://{parts.path}" + (f"?{rest}" if rest else ""), **overrides
                )  # type: ignore[return-value]
            raise ConfigError(
                f"nixl://: {url!r} names no peer; use nixl://host:port for a peer store or "
                "nixl+posix:///abs/dir (nixl:///abs/dir?backend=posix) for files"
            )
        if parts.path not in ("", "/") or parts.fragment or parts.username:
            raise ConfigError(f"nixl://: expected nixl://host:port?options, got {url!r}")
        location: dict[str, object] = {"host": parts.hostname or ""}
        if parts.port is not None:
            location["port"] = parts.port
        return cls(parse_backend_url(url, cls.schemes, NixlSettings, location, overrides, split=parts))

    @property
    def url(self) -> str:
        """``nixl://host:port`` plus every option that differs from its default."""
        s = self.settings
        host = f"[{s.host}]" if ":" in s.host else s.host
        query = settings_query(s, skip=("host", "port"))
        return f"nixl://{host}:{s.port}" + (f"?{query}" if query else "")

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        import_nixl()  # a missing SDK is a MissingDependencyError before any thread starts
        self._conn_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="lmcache-nixl")
        try:
            name = f"lmcache-nixl-{os.getpid()}-{secrets.token_hex(4)}"
            s = self.settings
            self._agent = await run_blocking(
                self._executor, _make_agent, name, ["UCX"], s.progress_thread, s.ucx_workers
            )
            if s.ucx_workers <= 1:
                if s.native_lane != "off":
                    self._native = await run_blocking(self._executor, self._open_native)
                if self._native is None:
                    self._lane = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-nixl-lane")
            # Frame headers of concurrent batches go into slabs of one arena registered once.
            slabs = s.workers + 1
            arena = np.empty(slabs * _HEADER_SLAB, dtype=np.uint8)
            await self._register_host_memory(memoryview(arena))
            for i in range(slabs):
                self._slabs.put(arena[i * _HEADER_SLAB : (i + 1) * _HEADER_SLAB])
            await self._connect()
        except BaseException:
            await self._close()
            raise

    async def _close(self) -> None:
        self._drop_connection(BackendUnavailableError("nixl://: the backend was closed"))
        executor, self._executor = self._executor, None
        lane, self._lane = self._lane, None
        agent, self._agent = self._agent, None
        remote, self._remote = self._remote, None
        loop = asyncio.get_running_loop()
        if executor is not None:
            if agent is not None and remote is not None:
                with contextlib.suppress(Exception):
                    await loop.run_in_executor(executor, agent.remove_remote_agent, remote)
            await loop.run_in_executor(None, executor.shutdown, True)
        if lane is not None:  # after the batches that queue on it; its deregistrations run before the agent goes
            await loop.run_in_executor(None, lane.shutdown, True)
        native, self._native = self._native, None
        if native is not None:  # every batch has ended with the executor
            await loop.run_in_executor(None, native.close)

    def _open_native(self) -> NativeLane | None:
        """The native lane for this backend's agent; None (logged) where it cannot run and may be skipped.

        Raises:
            BackendUnavailableError: ``native_lane=on`` and it cannot run.
        """
        try:
            return nixl_native.open_lane(self._agent)
        except OSError as exc:
            if self.settings.native_lane == "on":
                raise BackendUnavailableError(f"nixl://: the native lane cannot run here: {exc}") from None
            logger.info("nixl://: using the Python lane (the native one cannot run here: %s)", exc)
            return None

    # -- control connection ------------------------------------------------------------------

    async def _connect(self) -> None:
        s = self.settings
        where = f"nixl://{s.host}:{s.port}"
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(s.host, s.port), s.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise BackendUnavailableError(f"{where}: cannot reach the peer's control port: {exc}") from None
        self._reader, self._writer = reader, writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read_replies(reader))
        body = await self._request(Op.HELLO, b"", connect=False)
        try:
            r = Reader(body)
            pool_addr, pool_len = r.u64(), r.u64()
            metadata = r.blob()
            r.end()
        except ProtocolError as exc:
            self._drop_connection(BackendUnavailableError(f"{where}: bad HELLO reply"))
            raise PermanentBackendError(f"{where}: the peer's HELLO reply is malformed: {exc}") from None
        agent, old = self._agent, self._remote

        def add_remote() -> str:
            if old is not None:
                with contextlib.suppress(Exception):
                    agent.remove_remote_agent(old)  # a restarted peer: its old metadata is stale
            try:
                name = agent.add_remote_agent(metadata)
            except Exception as exc:
                raise BackendUnavailableError(f"{where}: NIXL rejected the peer's metadata: {exc}") from None
            return name.decode() if isinstance(name, bytes) else str(name)

        self._remote = await run_blocking(self._executor, add_remote)
        self._pool_addr, self._pool_len = pool_addr, pool_len
        self._connects += 1
        logger.debug("%s: connected (pool of %d bytes, agent %s)", where, pool_len, self._remote)

    async def _ensure_connection(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            return
        assert self._conn_lock is not None
        async with self._conn_lock:
            if self._writer is None or self._writer.is_closing():
                await self._connect()

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        exc: BaseException = BackendUnavailableError(
            f"nixl://{self.settings.host}:{self.settings.port}: the control connection closed"
        )
        try:
            while True:
                op, req_id, body = await read_message(reader)
                fut = self._waiters.pop(req_id, None)
                if fut is not None and not fut.done():
                    fut.set_result((op, body))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except ProtocolError as e:
            exc = PermanentBackendError(f"nixl://{self.settings.host}:{self.settings.port}: {e}")
        except asyncio.CancelledError:
            return
        finally:
            if self._reader is reader:
                self._drop_connection(exc)

    def _drop_connection(self, exc: BaseException) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if writer is not None:
            writer.close()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # the waiter may be gone (cancelled): never warn about it

    async def _request(self, op: int, body: bytes, *, connect: bool = True) -> bytes:
        if connect:
            await self._ensure_connection()
        writer = self._writer
        if writer is None:
            raise BackendUnavailableError(f"nixl://{self.settings.host}:{self.settings.port}: not connected")
        req_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        self._waiters[req_id] = fut
        try:
            writer.write(pack_message(op, req_id, body))
            await writer.drain()
            reply_op, reply = await asyncio.wait_for(fut, self.settings.timeout)
        except asyncio.TimeoutError:
            # A reply may still arrive later and would be matched to nothing: drop the connection
            # so the peer frees whatever this request held, and start clean on the next call.
            self._drop_connection(BackendTimeoutError("nixl://: a control request timed out"))
            raise BackendTimeoutError(
                f"nixl://{self.settings.host}:{self.settings.port}: no reply within {self.settings.timeout:g} s"
            ) from None
        except (ConnectionError, OSError) as exc:
            self._drop_connection(BackendUnavailableError(str(exc)))
            raise BackendUnavailableError(
                f"nixl://{self.settings.host}:{self.settings.port}: control connection failed: {exc}"
            ) from None
        finally:
            self._waiters.pop(req_id, None)
        if reply_op == Op.ERROR:
            raise PermanentBackendError(
                f"nixl://{self.settings.host}:{self.settings.port}: the peer refused a request: "
                f"{reply.decode('utf-8', 'replace')}"
            )
        return reply

    def _send_nowait(self, op: int, body: bytes) -> None:
        """Send a request whose reply nobody waits for (releases, aborts; safe in ``finally``)."""
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(pack_message(op, 0, body))

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await run_blocking(self._executor, fn, *args)

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        out: list[bool] = []
        for i in range(0, len(keys), MAX_BATCH):
            part = keys[i : i + MAX_BATCH]
            reply = await self._request(Op.CONTAINS, pack_keys([k.to_string().encode() for k in part]))
            if len(reply) != len(part):
                raise PermanentBackendError("nixl://: malformed CONTAINS reply")
            out.extend(b == 1 for b in reply)
        return out

    async def _delete(self, keys: list[CacheKey]) -> None:
        for i in range(0, len(keys), MAX_BATCH):
            await self._request(Op.DELETE, pack_keys([k.to_string().encode() for k in keys[i : i + MAX_BATCH]]))

    async def _ping(self) -> None:
        await self._request(Op.PING, b"")

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        r = Reader(await self._request(Op.LIST, b""))
        entries = [(r.key(), r.u64()) for _ in range(r.count())]
        r.end()
        for raw, size in entries:
            try:
                key = CacheKey.from_string(raw.decode())
            except Exception:  # a key another client stored in another format: not ours
                continue
            yield key, size

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key, _size in self._list_entries():
            yield key

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "peer": f"{self.settings.host}:{self.settings.port}",
            "connected": self._writer is not None,
            "pool_bytes": self._pool_len,
            "connects": self._connects,
            "native_lane": self._native is not None,
        }

    async def peer_stats(self) -> dict[str, int]:
        """The peer's capacity, used bytes and entry count (one control round trip)."""
        capacity, used, entries = struct.unpack("<QQQ", await self._request(Op.STATS, b""))
        return {"capacity_bytes": capacity, "used_bytes": used, "entries": entries}

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results: list[PutResult | None] = [None] * len(keys)
        for start in range(0, len(keys), MAX_BATCH):
            end = start + MAX_BATCH
            part = await self._put_part(keys[start:end], srcs[start:end])
            results[start:end] = part
        return results  # type: ignore[return-value]

    async def _put_part(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        raw = [k.to_string().encode() for k in keys]
        hlens = [frame.header_size(len(b), 0, _FRAME_ALIGN) for b in raw]
        group = next(self._groups)
        body = (
            _U64.pack(group)
            + _U32.pack(len(keys))
            + b"".join(
                pack_key(b) + _U64.pack(h + s.nbytes) + _U32.pack(h) for b, h, s in zip(raw, hlens, srcs, strict=True)
            )
        )
        try:
            return await self._reserve_write_commit(group, keys=keys, srcs=srcs, hlens=hlens, body=body)
        except BaseException:
            # Cancelled or failed anywhere after the RESERVE was sent: abort the group. The peer
            # handles one connection's requests in order, so the abort follows the reservation;
            # aborting a group that reserved nothing, or was committed, changes nothing.
            self._send_nowait(Op.COMMIT, _U64.pack(group) + b"\x00")
            raise

    async def _reserve_write_commit(
        self,
        group: int,
        *,
        keys: list[CacheKey],
        srcs: list[memoryview],
        hlens: list[int],
        body: bytes,
    ) -> list[PutResult]:
        reply = Reader(await self._request(Op.RESERVE, body))
        if reply.count() != len(keys):
            raise PermanentBackendError("nixl://: malformed RESERVE reply")
        results: list[PutResult] = []
        todo: list[int] = []
        offsets: list[int] = []
        for i in range(len(keys)):
            status, offset = reply.unpack(_STATUS)
            if status == Status.OK:
                todo.append(i)
                offsets.append(offset)
                results.append(STORED)
            elif status == Status.EXISTS:
                results.append(EXISTS)
            elif status == Status.TOO_LARGE:
                results.append(rejected("too_large"))
            else:
                results.append(rejected("capacity"))
        reply.end()
        if not todo:
            return results
        try:
            await self._call(
                self._write_values,
                [keys[i] for i in todo],
                [srcs[i] for i in todo],
                [hlens[i] for i in todo],
                offsets,
            )
            ok = 1
        except BackendError as exc:
            self.record_error("write", exc)
            ok = 0
            for i in todo:
                results[i] = rejected("error")
        # Not waited for: the peer handles a connection's messages in order, so every later
        # request of ours sees the commit, and a commit cannot fail on the peer's side. Waiting
        # only added a round trip per batch.
        writer = self._writer
        if writer is None or writer.is_closing():
            raise BackendUnavailableError(f"nixl://{self.settings.host}:{self.settings.port}: connection lost")
        writer.write(pack_message(Op.COMMIT, 0, _U64.pack(group) + bytes([ok])))
        return results

    def _write_values(self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int]) -> None:
        """WRITE each value's header and payload (straight from its src) into its reserved extent.

        Values go in groups of ~:data:`_GROUP_BYTES` of payload, one transfer each. On the lane
        (one UCX worker) every payload transfer is queued at once and this thread checksums each
        group from the moment the lane starts copying it, then queues one transfer of all the
        headers; with several workers each group is checksummed, then posted here with its
        headers. Checksumming a group while the lane copied the previous one (or the whole
        batch first) made the checksum and the copy read every byte from memory separately.
        """
        with self._header_buffer(sum(hlens)) as headers:
            if self._native is not None:
                self._write_native(self._native, keys, srcs, hlens=hlens, offsets=offsets, headers=headers)
            else:
                self._write_groups(keys, srcs, hlens, offsets, headers)

    def _write_native(
        self,
        native: NativeLane,
        keys: list[CacheKey],
        srcs: list[memoryview],
        *,
        hlens: list[int],
        offsets: list[int],
        headers: np.ndarray,
    ) -> None:
        """The native lane's put: one job, one WRITE per value, each checksummed as the lane starts copying it.

        The headers, which carry the checksums, go last in one more WRITE of the same job: encoded
        here with a placeholder, their checksums filled in by the lane once every value is hashed.
        COMMIT publishes the values only after the whole job is done.
        """
        haddr = _addr(headers)
        pool = self._pool_addr
        starts = list(itertools.accumulate(hlens, initial=0))
        regions = [(haddr, headers.nbytes, 0)]
        transfers: list[tuple[list[tuple[int, int, int]], list[tuple[int, int]]]] = []
        patches: list[tuple[int, int, int]] = []
        for j, (key, src, h) in enumerate(zip(keys, srcs, hlens, strict=True)):
            n = src.nbytes
            head = frame.encode_header(key, src, alignment=_FRAME_ALIGN, checksum=0 if n else None)
            if len(head) != h:
                raise PermanentBackendError(f"nixl://: header of {key} is {len(head)} bytes, reserved {h}")
            headers[starts[j] : starts[j] + h] = np.frombuffer(head, dtype=np.uint8)
            if n:
                a = _addr(src)
                regions.append((a, n, 0))
                patches.append((haddr + starts[j], frame.header_tail_len(head), len(transfers)))
                transfers.append(([(a, pool + offsets[j] + h, n)], [(a, n)]))
        transfers.append(([(haddr + starts[j], pool + offsets[j], hlens[j]) for j in range(len(keys))], []))
        with _registered(self._agent, self._unregistered(regions), "DRAM"):
            self._run_native(native, nixl_native.WRITE, transfers, hash_at_start=True, headers=patches)

    def _run_native(
        self,
        native: NativeLane,
        op: int,
        transfers: list[tuple[list[tuple[int, int, int]], list[tuple[int, int]]]],
        *,
        hash_at_start: bool,
        headers: list[tuple[int, int, int]] | None = None,
    ) -> list[int]:
        """Run one job (``nixl_native.READ`` or ``WRITE``) on the native lane and wait for it.

        Returns the checksums of its hashed ranges.

        Raises:
            BackendTimeoutError: Not done within the timeout (the job is cancelled and waited for:
                none of its transfers runs after this returns).
            BackendUnavailableError: A transfer failed, or the lane is stopping.
        """
        name = "WRITE" if op == nixl_native.WRITE else "READ"
        if not transfers:
            return []
        remote = self._remote
        if remote is None:
            raise BackendUnavailableError("nixl://: not connected to the peer")
        try:
            job = native.submit(remote, op, transfers, hash_at_start=hash_at_start, headers=headers or ())
        except OSError as exc:
            raise BackendUnavailableError(f"nixl://: {exc}") from None
        timeout = self.settings.timeout
        ended = job.wait(timeout)
        if not ended:
            job.cancel()
            job.wait(None)  # aborted or finished: the caller's buffers are free again
        status, failed_at, what, sums = job.result()
        if not ended:
            raise BackendTimeoutError(f"NIXL: a {name} did not finish within {timeout:g} s")
        if status != 0:
            raise BackendUnavailableError(
                f"NIXL: a {name} failed ({what} of transfer {failed_at + 1} of {len(transfers)}: status {status})"
            )
        return sums

    def _unregistered(self, regions: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """The regions that lie outside long-lived registered memory."""
        regs = self._host_regs
        if not regs:
            return regions
        return [r for r in regions if not any(s <= r[0] and r[0] + r[1] <= e for s, e, _ in regs)]

    def _write_groups(
        self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int], headers: np.ndarray
    ) -> None:
        haddr = _addr(headers)
        pool = self._pool_addr
        regions = [(haddr, headers.nbytes, 0)] + [(_addr(s), s.nbytes, 0) for s in srcs if s.nbytes]
        starts = list(itertools.accumulate(hlens, initial=0))
        groups = split_by_size([s.nbytes for s in srcs], _GROUP_BYTES)  # headers are ~100s of bytes
        batch = self._batch(regions)

        def encode(j: int) -> None:
            key, src, h = keys[j], srcs[j], hlens[j]
            head = frame.encode_header(key, src, alignment=_FRAME_ALIGN)  # checksums the payload
            if len(head) != h:
                raise PermanentBackendError(f"nixl://: header of {key} is {len(head)} bytes, reserved {h}")
            headers[starts[j] : starts[j] + h] = np.frombuffer(head, dtype=np.uint8)

        def header_descs(group: range) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
            local = [(haddr + starts[j], hlens[j], 0) for j in group]
            return local, [(pool + offsets[j], hlens[j], 0) for j in group]

        def payload_descs(group: range) -> tuple[list[tuple[int, int, int]], list[tuple[int, int, int]]]:
            local = [(_addr(srcs[j]), srcs[j].nbytes, 0) for j in group if srcs[j].nbytes]
            return local, [(pool + offsets[j] + hlens[j], srcs[j].nbytes, 0) for j in group if srcs[j].nbytes]

        try:
            if isinstance(batch, _LaneBatch):
                # Every payload is queued at once; each group is checksummed from the moment the
                # lane starts copying it, so the two read the same bytes within microseconds and
                # the lane's copy reads them from cache instead of memory (checksumming groups
                # ahead of the lane made the copy beside it ~20% slower). The headers, which
                # carry the checksums, follow in one more transfer; COMMIT publishes the values
                # only after every transfer of the batch is done.
                started = [threading.Event() for _ in groups]
                for group, event in zip(groups, started, strict=True):
                    batch.post("WRITE", *payload_descs(group), event)
                for group, event in zip(groups, started, strict=True):
                    batch.wait_started(event)
                    for j in group:
                        encode(j)
                batch.post("WRITE", *header_descs(range(len(keys))))
            else:
                # Several UCX workers: posting copies on this thread, so checksum first.
                for group in groups:
                    for j in group:
                        encode(j)
                    hl, hr = header_descs(group)
                    pl, pr = payload_descs(group)
                    batch.post("WRITE", hl + pl, hr + pr)
        except BaseException:
            batch.close(cancel=True)  # waits for every transfer already posted
            raise
        failure = batch.close()
        if failure is not None:
            raise failure

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        results: list[int | None] = []
        for start in range(0, len(keys), MAX_BATCH):
            end = start + MAX_BATCH
            results.extend(await self._get_part(keys[start:end], dsts[start:end]))
        return results

    async def _get_part(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        reply = Reader(await self._request(Op.LOOKUP, pack_keys([k.to_string().encode() for k in keys])))
        if reply.count() != len(keys):
            raise PermanentBackendError("nixl://: malformed LOOKUP reply")
        hits: list[tuple[CacheKey, memoryview, int, int, int]] = []  # key, dst, offset, header, payload
        index: list[int] = []
        leases: list[int] = []
        for i in range(len(keys)):
            found, lease, offset, frame_len, hlen = reply.unpack(_HIT)
            if found:
                leases.append(lease)
                index.append(i)
                hits.append((keys[i], dsts[i], offset, hlen, frame_len - hlen))
        reply.end()
        results: list[int | None] = [None] * len(keys)
        if not hits:
            return results
        try:
            for key, dst, _off, _h, n in hits:
                check_dst_size(key, dst, n)  # raises before any byte moves
            outcomes = await self._call(self._read_values, hits)
        finally:
            self._send_nowait(Op.RELEASE, _U32.pack(len(leases)) + b"".join(_U64.pack(x) for x in leases))
        corrupt: list[CacheKey] = []
        for i, (key, *_), outcome in zip(index, hits, outcomes, strict=True):
            if isinstance(outcome, IntegrityError):
                self.record_corrupt(key, outcome)
                corrupt.append(key)
            else:
                results[i] = outcome
        if corrupt:
            # Like file://, drop a damaged value so that a later put can store it again.
            self._send_nowait(Op.DELETE, pack_keys([k.to_string().encode() for k in corrupt]))
        return results

    def _read_values(self, hits: list[tuple[CacheKey, memoryview, int, int, int]]) -> list[int | IntegrityError]:
        """READ each hit's header and payload (payload straight into its dst), then verify it.

        Values go in groups of ~:data:`_GROUP_BYTES` of payload, one transfer each. On the lane
        (one UCX worker) the whole batch is queued at once and this thread verifies each group
        once its transfer is done, while the lane copies the next ones; batches then finish in
        the order they came, so the next batch's lookup overlaps the copies of the others. With
        several workers a group is verified as soon as its transfer is done, with at most the
        next group in flight. Each transfer costs ~50-100 us of NIXL calls (descriptor lists,
        ``createXferReq``, release) on the thread that posts it, so groups are not small (on
        the lane, 2 MiB values, 1 GiB rounds: gets at 0.66-0.76 of the raw SDK with one value
        per transfer, 0.77-0.86 with 16 MiB groups).
        """
        with self._header_buffer(sum(h for *_, h, _n in hits)) as headers:
            if self._native is not None:
                return self._read_native(self._native, hits, headers)
            return self._read_groups(hits, headers)

    def _read_native(
        self, native: NativeLane, hits: list[tuple[CacheKey, memoryview, int, int, int]], headers: np.ndarray
    ) -> list[int | IntegrityError]:
        """The native lane's get: one READ per value (header and payload), hashed as soon as it lands.

        A value checked right after its transfer is still in cache; with the lane and the
        hashing thread in native code, a transfer per value costs a few microseconds.
        """
        haddr = _addr(headers)
        pool = self._pool_addr
        starts = list(itertools.accumulate((h for *_, h, _n in hits), initial=0))
        regions = [(haddr, headers.nbytes, 0)]
        transfers: list[tuple[list[tuple[int, int, int]], list[tuple[int, int]]]] = []
        for j, (_key, dst, off, h, n) in enumerate(hits):
            descs = [(haddr + starts[j], pool + off, h)]
            ranges: list[tuple[int, int]] = []
            if n:
                a = _addr(dst)
                regions.append((a, n, 0))
                descs.append((a, pool + off + h, n))
                ranges.append((a, n))
            transfers.append((descs, ranges))
        with _registered(self._agent, self._unregistered(regions), "DRAM"):
            sums = iter(self._run_native(native, nixl_native.READ, transfers, hash_at_start=False))
        return [
            _verify(key, headers[starts[j] : starts[j] + h], dst, h, n, checksum=next(sums) if n else None)
            for j, (key, dst, _off, h, n) in enumerate(hits)
        ]

    def _read_groups(
        self, hits: list[tuple[CacheKey, memoryview, int, int, int]], headers: np.ndarray
    ) -> list[int | IntegrityError]:
        haddr = _addr(headers)
        pool = self._pool_addr
        regions = [(haddr, headers.nbytes, 0)] + [(_addr(dst), n, 0) for _k, dst, _o, _h, n in hits if n]
        groups = split_by_size([n for *_, n in hits], _GROUP_BYTES)  # headers are ~100s of bytes
        starts = list(itertools.accumulate((h for *_, h, _n in hits), initial=0))
        out: list[int | IntegrityError] = []
        batch = self._batch(regions)

        def post(group: range) -> None:
            local: list[tuple[int, int, int]] = []
            remote: list[tuple[int, int, int]] = []
            for j in group:
                _key, dst, off, h, n = hits[j]
                local.append((haddr + starts[j], h, 0))
                remote.append((pool + off, h, 0))
                if n:
                    local.append((_addr(dst), n, 0))
                    remote.append((pool + off + h, n, 0))
            batch.post("READ", local, remote)

        def verify(g: int) -> None:
            batch.wait(g)
            for j in groups[g]:
                key, dst, _off, h, n = hits[j]
                out.append(_verify(key, headers[starts[j] : starts[j] + h], dst, h, n))

        try:
            done = 0
            for g, group in enumerate(groups):
                post(group)
                # Posting on the lane only queues: queue the whole batch at once, so the lane
                # finishes batches in order and the next batch's lookup overlaps the copies.
                while not batch.queued and (done < g or (done == g and batch.is_done(g))):
                    verify(done)
                    done += 1
            while done < len(groups):
                verify(done)
                done += 1
        except BaseException:
            batch.close(cancel=True)  # waits for every transfer already posted
            raise
        batch.close()
        return out

    # -- long-lived memory ----------------------------------------------------------------------

    def _nixl_thread(self) -> ThreadPoolExecutor | None:
        return self._lane or self._executor

    async def _register_host_memory(self, view: memoryview) -> None:
        addr, nbytes = _addr(view), view.nbytes
        reg = await run_blocking(self._nixl_thread(), _register, self._agent, [(addr, nbytes, 0)], "DRAM")
        self._host_regs = (*self._host_regs, (addr, addr + nbytes, reg))  # replaced whole: batch threads read it

    async def _unregister_host_memory(self, view: memoryview) -> None:
        addr, end = _addr(view), _addr(view) + view.nbytes
        for entry in self._host_regs:
            if entry[0] == addr and entry[1] == end:
                self._host_regs = tuple(e for e in self._host_regs if e is not entry)
                # On the lane, this follows every transfer already queued.
                await run_blocking(self._nixl_thread(), self._agent.deregister_memory, entry[2])
                return

    @contextlib.contextmanager
    def _header_buffer(self, nbytes: int) -> Iterator[np.ndarray]:
        """A buffer for ``nbytes`` of a batch's frame headers, held until every transfer is done.

        A free registered slab when one is big enough; otherwise a new array, which the batch
        registers with its other buffers.
        """
        slab: np.ndarray | None = None
        if nbytes <= _HEADER_SLAB:
            with contextlib.suppress(queue.Empty):
                slab = self._slabs.get_nowait()
        try:
            yield np.empty(max(nbytes, 1), dtype=np.uint8) if slab is None else slab[: max(nbytes, 1)]
        finally:
            if slab is not None:
                self._slabs.put(slab)

    def _batch(self, regions: list[tuple[int, int, int]]) -> _DirectBatch | _LaneBatch:
        """The NIXL calls of one batch: queued on the lane (one UCX worker), else made here.

        Regions inside long-lived registered memory are not registered again.
        """
        agent, lane = self._agent, self._lane
        if agent is None:
            raise BackendUnavailableError("nixl://: the backend was closed")
        regions = self._unregistered(regions)
        if lane is not None:
            return _LaneBatch(lane, agent, self._post, regions, self.settings.timeout)
        if self.settings.ucx_workers <= 1:  # the lane is gone: closing
            raise BackendUnavailableError("nixl://: the backend was closed")
        return _DirectBatch(agent, self._post, regions, self.settings.timeout)

    def _post(self, op: str, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]) -> _Xfer | None:
        return _post(
            self._agent,
            op,
            local=local,
            local_type="DRAM",
            remote=remote,
            remote_type="DRAM",
            remote_agent=self._remote or "",
        )

    async def corrupt_for_tests(self, key: CacheKey) -> bool:
        """Flip a byte of ``key``'s stored value on the peer (needs ``--debug-ops``; tests only)."""
        return (await self._request(Op.CORRUPT, pack_key(key.to_string().encode()))) == b"\x01"


# ---------------------------------------------------------------------------------------------
# nixl+posix:///dir — files through NIXL's POSIX backend


@dataclasses.dataclass(frozen=True)
class NixlPosixSettings(FileSettings):
    """Options of ``nixl+posix://``: those of ``file://`` (``o_direct`` must stay false), plus ``timeout``."""

    timeout: float = setting(30.0, doc="Seconds to wait for one NIXL file transfer.", min=0.001)


class NixlPosixBackend(FileBackend):
    """``file://``'s store and format, with file bytes moved by NIXL's POSIX backend (DRAM↔FILE)."""

    schemes: ClassVar[tuple[str, ...]] = ("nixl+posix",)
    settings_cls: ClassVar[type[FileSettings]] = NixlPosixSettings
    settings: NixlPosixSettings

    def __init__(self, settings: FileSettings) -> None:
        if not isinstance(settings, NixlPosixSettings):
            settings = NixlPosixSettings(
                **{f.name: getattr(settings, f.name) for f in dataclasses.fields(FileSettings)}
            )
        if settings.o_direct:
            raise ConfigError("nixl+posix://: o_direct is not supported (NIXL's POSIX backend does its own I/O)")
        super().__init__(settings)
        self._agent: Any = None
        self._agent_name = ""

    def _url_items(self) -> list[tuple[str, str]]:
        items = super()._url_items()
        if self.settings.timeout != NixlPosixSettings.timeout:
            items.append(("timeout", f"{self.settings.timeout:g}"))
        return items

    async def _open(self) -> None:
        import_nixl()
        await super()._open()
        self._agent_name = f"lmcache-nixl-posix-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self._agent = await run_blocking(self._executor, _make_agent, self._agent_name, ["POSIX"], False)
        except BaseException:
            await super()._close()
            raise

    async def _close(self) -> None:
        await super()._close()
        self._agent = None

    def _extra_stats(self) -> dict[str, Any]:
        return {**super()._extra_stats(), "nixl_backend": "POSIX"}

    def _xfer(self, agent: Any, op: str, local: list[tuple[int, int, int]], remote: list[tuple[int, int, int]]) -> None:
        _transfer(
            agent,
            op,
            local=local,
            local_type="DRAM",
            remote=remote,
            remote_type="FILE",
            remote_agent=self._agent_name,
            timeout=self.settings.timeout,
        )

    def _read_at(self, fd: int, view: memoryview, offset: int, want: int) -> int:
        size = os.fstat(fd).st_size
        want = max(0, min(want, size - offset, view.nbytes))
        if want == 0:
            return 0
        addr = _addr(view)
        agent = self._agent
        try:
            with _registered(agent, [(addr, want, 0)], "DRAM"), _registered(agent, [(offset, want, fd)], "FILE"):
                self._xfer(agent, "READ", [(addr, want, 0)], [(offset, want, fd)])
        except BackendError as exc:
            raise OSError(5, f"NIXL POSIX read failed: {exc}") from None  # the file path maps OSError
        return want

    def _write_frame(self, fd: int, header: bytes, src: memoryview, total: int) -> None:
        head = np.frombuffer(header, dtype=np.uint8)
        haddr, hlen = _addr(head), len(header)
        local = [(haddr, hlen, 0)]
        remote = [(0, hlen, fd)]
        if src.nbytes:
            local.append((_addr(src), src.nbytes, 0))
            remote.append((hlen, src.nbytes, fd))
        agent = self._agent
        try:
            with _registered(agent, local, "DRAM"), _registered(agent, [(0, total, fd)], "FILE"):
                self._xfer(agent, "WRITE", local, remote)
        except BackendError as exc:
            raise OSError(5, f"NIXL POSIX write failed: {exc}") from None
        size = os.fstat(fd).st_size
        if size != total:
            raise OSError(5, f"NIXL POSIX write left {size} of {total} bytes")
