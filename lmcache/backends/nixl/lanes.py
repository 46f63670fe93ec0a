"""How ``nixl://`` makes the NIXL calls of its data path: one :class:`Lane` interface, three lanes.

A backend picks its lane once, at open (:func:`open_lane`), and from then on every put and get
moves its values through that lane's :meth:`Lane.write` and :meth:`Lane.read`:

* :class:`CLane`, *the native lane* (one UCX worker, ``native_lane=auto`` where the C lane of
  :mod:`lmcache.backends.nixl.native` builds and loads, or ``on``). One C thread makes every
  NIXL call of the data path through NIXL's C API, one value per transfer; a second C thread
  hashes each value as the lane starts copying it (a put: the hash runs ahead of the copy over
  the same bytes, so the copy reads them from cache) or as soon as it has landed (a get: still
  in cache). No Python runs between transfers. A put is one job: its frame headers are encoded
  here with a placeholder checksum and written by the job's last transfer, after the lane has
  filled in each header's checksums.
* :class:`PythonLane` (one UCX worker, no native lane). With one UCX worker the agent runs one
  call at a time and holds its lock for a whole CPU copy (UCX over CMA or TCP), so one thread
  (the lane) makes every call of the data path, never waits for the lock, and always has the
  next transfer queued, while the callers checksum and verify on other cores. NIXL's bindings
  release the GIL in ``createXferReq`` and ``postXferReq``, so a Python thread that posts
  transfers takes the GIL back several times per transfer; this lane therefore moves values in
  groups of ~:data:`_GROUP_BYTES` per transfer, and a get verifies a group once it has landed.
* :class:`DirectLane` (``ucx_workers > 1``): the agent takes a shared lock for transfers and
  each executor thread posts and waits for its own batch's transfers, so copies run in parallel.

All three share a :class:`PeerLink` with their backend: the agent, the peer's agent name and
pool (which change when the backend reconnects) and the long-lived registrations (which need no
registration per batch). Measured figures for each lane are in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, ClassVar

import numpy as np

from lmcache.backends.base import split_by_size
from lmcache.backends.buffers import buffer_address
from lmcache.backends.nixl import native, sdk
from lmcache.backends.nixl.sdk import registered
from lmcache.backends.nixl.wire import FRAME_ALIGN
from lmcache.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    IntegrityError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde import frame

__all__ = ["CLane", "DirectLane", "Hit", "Lane", "PeerLink", "PythonLane", "Region", "open_lane"]

logger = logging.getLogger(__name__)

#: Bytes of payload per transfer of a put or a get on the Python and direct lanes.
_GROUP_BYTES = 16 << 20

#: ``(address, length, device)`` of a memory region, as NIXL's descriptor lists take it.
Region = tuple[int, int, int]
#: One value of a get: ``(key, dst, offset in the pool, header length, payload length)``.
Hit = tuple[CacheKey, memoryview, int, int, int]


@dataclasses.dataclass
class PeerLink:
    """What a backend shares with its lane: its agent, the peer it is connected to, and its long-lived memory.

    Attributes:
        agent: The backend's NIXL agent (None once the backend closes).
        timeout: Seconds to wait for one transfer.
        remote: The peer's agent name, None until connected (replaced on a reconnect).
        pool_addr: Address of the peer's pool.
        pool_len: Bytes of the peer's pool.
        host_regs: ``(start, end, NIXL registration)`` of long-lived registered memory
            (``register_host_memory``, header slabs); replaced whole, as batch threads read it.
    """

    agent: Any = None
    timeout: float = 30.0
    remote: str | None = None
    pool_addr: int = 0
    pool_len: int = 0
    host_regs: tuple[tuple[int, int, Any], ...] = ()

    def unregistered(self, regions: list[Region]) -> list[Region]:
        """The regions that lie outside long-lived registered memory."""
        regs = self.host_regs
        if not regs:
            return regions
        return [r for r in regions if not any(s <= r[0] and r[0] + r[1] <= e for s, e, _ in regs)]


class Lane(abc.ABC):
    """The NIXL calls of a backend's data path (blocking methods: run them on the backend's executor)."""

    #: What :func:`open_lane` logs and tests check: ``native``, ``python`` or ``direct``.
    name: ClassVar[str]

    def __init__(self, link: PeerLink) -> None:
        self.link = link

    @property
    def thread(self) -> ThreadPoolExecutor | None:
        """The thread that must make this lane's registrations (queued behind its transfers), if any."""
        return None

    @abc.abstractmethod
    def write(
        self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int], headers: np.ndarray
    ) -> None:
        """WRITE each value's frame header and payload (straight from its src) into its reserved extent.

        ``hlens``: each frame header's length; ``offsets``: each extent's offset in the pool;
        ``headers``: a buffer of ``sum(hlens)`` bytes for the encoded headers, held until every
        transfer is done.

        Raises:
            BackendError: A transfer failed or timed out (every transfer posted has ended).
        """

    @abc.abstractmethod
    def read(self, hits: list[Hit], headers: np.ndarray) -> list[int | IntegrityError]:
        """READ each hit's header and payload (payload straight into its dst), then verify it.

        Returns each value's length, or the :class:`~lmcache.errors.IntegrityError` it failed with.

        Raises:
            BackendError: A transfer failed or timed out (every transfer posted has ended).
        """

    def close(self) -> None:  # noqa: B027 (a lane without threads of its own has nothing to stop)
        """Stop the lane's threads (every batch must have ended)."""


def open_lane(link: PeerLink, *, ucx_workers: int, native_lane: str) -> Lane:
    """The lane for an agent with ``ucx_workers`` UCX workers (blocking: may build the native lane).

    Args:
        link: The backend's link, its agent made.
        ucx_workers: The agent's UCX workers (more than one: :class:`DirectLane`).
        native_lane: ``auto``, ``on`` or ``off`` (see ``NixlSettings.native_lane``).

    Raises:
        BackendUnavailableError: ``native_lane=on`` and the native lane cannot run here.
    """
    if ucx_workers > 1:
        return DirectLane(link)
    if native_lane != "off":
        try:
            return CLane(link, native.open_lane(link.agent))
        except OSError as exc:
            if native_lane == "on":
                raise BackendUnavailableError(f"nixl://: the native lane cannot run here: {exc}") from None
            logger.info("nixl://: using the Python lane (the native one cannot run here: %s)", exc)
    return PythonLane(link)


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
# The native lane


class CLane(Lane):
    """The native lane: NIXL calls and checksums in C threads (see :mod:`lmcache.backends.nixl.native`).

    Args:
        link: The backend's link.
        lane: The started C lane of ``link.agent``.
    """

    name: ClassVar[str] = "native"

    def __init__(self, link: PeerLink, lane: native.NativeLane) -> None:
        super().__init__(link)
        self.native = lane

    def close(self) -> None:
        self.native.close()

    def write(
        self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int], headers: np.ndarray
    ) -> None:
        """One job, one WRITE per value, each checksummed as the lane starts copying it.

        The headers, which carry the checksums, go last in one more WRITE of the same job: encoded
        here with a placeholder, their checksums filled in by the lane once every value is hashed.
        COMMIT publishes the values only after the whole job is done.
        """
        haddr = buffer_address(headers)
        pool = self.link.pool_addr
        starts = list(itertools.accumulate(hlens, initial=0))
        regions = [(haddr, headers.nbytes, 0)]
        transfers: list[tuple[list[Region], list[tuple[int, int]]]] = []
        patches: list[tuple[int, int, int]] = []
        for j, (key, src, h) in enumerate(zip(keys, srcs, hlens, strict=True)):
            n = src.nbytes
            head = frame.encode_header(key, src, alignment=FRAME_ALIGN, checksum=0 if n else None)
            if len(head) != h:
                raise PermanentBackendError(f"nixl://: header of {key} is {len(head)} bytes, reserved {h}")
            headers[starts[j] : starts[j] + h] = np.frombuffer(head, dtype=np.uint8)
            if n:
                a = buffer_address(src)
                regions.append((a, n, 0))
                patches.append((haddr + starts[j], frame.header_tail_len(head), len(transfers)))
                transfers.append(([(a, pool + offsets[j] + h, n)], [(a, n)]))
        transfers.append(([(haddr + starts[j], pool + offsets[j], hlens[j]) for j in range(len(keys))], []))
        with registered(self.link.agent, self.link.unregistered(regions), "DRAM"):
            self._run(native.WRITE, transfers, hash_at_start=True, headers=patches)

    def read(self, hits: list[Hit], headers: np.ndarray) -> list[int | IntegrityError]:
        """One READ per value (header and payload), hashed as soon as it lands.

        A value checked right after its transfer is still in cache; with the lane and the
        hashing thread in native code, a transfer per value costs a few microseconds.
        """
        haddr = buffer_address(headers)
        pool = self.link.pool_addr
        starts = list(itertools.accumulate((h for *_, h, _n in hits), initial=0))
        regions = [(haddr, headers.nbytes, 0)]
        transfers: list[tuple[list[Region], list[tuple[int, int]]]] = []
        for j, (_key, dst, off, h, n) in enumerate(hits):
            descs = [(haddr + starts[j], pool + off, h)]
            ranges: list[tuple[int, int]] = []
            if n:
                a = buffer_address(dst)
                regions.append((a, n, 0))
                descs.append((a, pool + off + h, n))
                ranges.append((a, n))
            transfers.append((descs, ranges))
        with registered(self.link.agent, self.link.unregistered(regions), "DRAM"):
            sums = iter(self._run(native.READ, transfers, hash_at_start=False))
        return [
            _verify(key, headers[starts[j] : starts[j] + h], dst, h, n, checksum=next(sums) if n else None)
            for j, (key, dst, _off, h, n) in enumerate(hits)
        ]

    def _run(
        self,
        op: int,
        transfers: list[tuple[list[Region], list[tuple[int, int]]]],
        *,
        hash_at_start: bool,
        headers: list[tuple[int, int, int]] | None = None,
    ) -> list[int]:
        """Run one job (``native.READ`` or ``WRITE``) on the lane and wait for it.

        Returns the checksums of its hashed ranges.

        Raises:
            BackendTimeoutError: Not done within the timeout (the job is cancelled and waited for:
                none of its transfers runs after this returns).
            BackendUnavailableError: A transfer failed, or the lane is stopping.
        """
        name = "WRITE" if op == native.WRITE else "READ"
        if not transfers:
            return []
        remote = self.link.remote
        if remote is None:
            raise BackendUnavailableError("nixl://: not connected to the peer")
        try:
            job = self.native.submit(remote, op, transfers, hash_at_start=hash_at_start, headers=headers or ())
        except OSError as exc:
            raise BackendUnavailableError(f"nixl://: {exc}") from None
        timeout = self.link.timeout
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


# ---------------------------------------------------------------------------------------------
# The Python and direct lanes: values in groups, one transfer per group


_PostFn = Callable[[str, list[Region], list[Region]], sdk.Xfer | None]


class _DirectBatch:
    """The NIXL calls of one batch, made by the calling thread (an agent with several UCX workers).

    The batch's regions are registered from construction to :meth:`close`; :meth:`post` starts
    one transfer, :meth:`wait` finishes one, :meth:`close` finishes the rest (a failure midway
    still waits for every posted transfer before deregistering) and returns the first failure.
    """

    queued: ClassVar[bool] = False  # post() returns once the transfer is posted

    def __init__(self, agent: Any, post: _PostFn, regions: list[Region], timeout: float) -> None:
        self._agent = agent
        self._post = post
        self._timeout = timeout
        self._xfers: list[sdk.Xfer | None] = []
        self._regs = sdk.registered(agent, regions, "DRAM")
        self._regs.__enter__()

    def post(self, op: str, local: list[Region], remote: list[Region]) -> None:
        self._xfers.append(self._post(op, local, remote))

    def is_done(self, i: int) -> bool:
        return sdk.is_done(self._agent, self._xfers[i])

    def wait(self, i: int) -> None:
        xfer, self._xfers[i] = self._xfers[i], None
        sdk.wait(self._agent, xfer, self._timeout)

    def close(self, *, cancel: bool = False) -> BackendError | None:
        try:
            return sdk.finish(self._agent, self._xfers, self._timeout)
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
        regions: list[Region],
        timeout: float,
    ) -> None:
        self._lane = lane
        self._agent = agent
        self._post = post
        self._timeout = timeout
        self._reg: Any = None
        self._failed: BackendError | None = None
        self._futures: list[Future[sdk.Xfer | None] | None] = []
        if any(n > 0 for _a, n, _d in regions):
            self._submit(self._register, regions)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return self._lane.submit(fn, *args)
        except RuntimeError:  # shut down: the backend is closing
            raise BackendUnavailableError("nixl://: the backend was closed") from None

    def _register(self, regions: list[Region]) -> None:
        try:
            self._reg = sdk.register(self._agent, regions, "DRAM")
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
        local: list[Region],
        remote: list[Region],
        started: threading.Event | None,
    ) -> sdk.Xfer | None:
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
        local: list[Region],
        remote: list[Region],
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

    def _posted(self, fut: Future[sdk.Xfer | None], timeout: float | None) -> sdk.Xfer | None:
        try:
            return fut.result(timeout)
        except FutureTimeout:
            raise BackendTimeoutError(f"NIXL: a transfer was not posted within {self._timeout:g} s") from None

    def wait(self, i: int) -> None:
        fut, self._futures[i] = self._futures[i], None
        if fut is not None:
            sdk.wait(self._agent, self._posted(fut, self._timeout), self._timeout)

    def close(self, *, cancel: bool = False) -> BackendError | None:
        failure: BackendError | None = None
        futures, self._futures = self._futures, []
        for fut in futures:
            if fut is None or (cancel and fut.cancel()):
                continue  # waited for, or (after a failure) never started
            try:
                sdk.wait(self._agent, self._posted(fut, None), self._timeout)
            except BackendError as exc:
                failure = failure or exc
        with contextlib.suppress(BackendUnavailableError):
            self._submit(self._deregister)  # a closing backend drops its registrations with the agent
        return failure


class _GroupedLane(Lane):
    """What the Python and direct lanes share: values moved in groups, each a batch of NIXL calls made in Python."""

    def post(self, op: str, local: list[Region], remote: list[Region]) -> sdk.Xfer | None:
        """Start one transfer between local DRAM and the peer's pool (see :func:`~lmcache.backends.nixl.sdk.post`)."""
        return sdk.post(
            self.link.agent,
            op,
            local=local,
            local_type="DRAM",
            remote=remote,
            remote_type="DRAM",
            remote_agent=self.link.remote or "",
        )

    @abc.abstractmethod
    def _batch(self, regions: list[Region]) -> _DirectBatch | _LaneBatch:
        """The NIXL calls of one batch; regions inside long-lived registered memory are not registered again."""

    def write(
        self, keys: list[CacheKey], srcs: list[memoryview], hlens: list[int], offsets: list[int], headers: np.ndarray
    ) -> None:
        """Values in groups of ~:data:`_GROUP_BYTES` of payload, one transfer each (headers included).

        On the Python lane every payload transfer is queued at once and this thread checksums
        each group from the moment the lane starts copying it, then queues one transfer of all
        the headers; on the direct lane each group is checksummed, then posted here with its
        headers. Checksumming a group while the lane copied the previous one (or the whole batch
        first) made the checksum and the copy read every byte from memory separately.
        """
        haddr = buffer_address(headers)
        pool = self.link.pool_addr
        regions = [(haddr, headers.nbytes, 0)] + [(buffer_address(s), s.nbytes, 0) for s in srcs if s.nbytes]
        starts = list(itertools.accumulate(hlens, initial=0))
        groups = split_by_size([s.nbytes for s in srcs], _GROUP_BYTES)  # headers are ~100s of bytes
        batch = self._batch(regions)

        def encode(j: int) -> None:
            key, src, h = keys[j], srcs[j], hlens[j]
            head = frame.encode_header(key, src, alignment=FRAME_ALIGN)  # checksums the payload
            if len(head) != h:
                raise PermanentBackendError(f"nixl://: header of {key} is {len(head)} bytes, reserved {h}")
            headers[starts[j] : starts[j] + h] = np.frombuffer(head, dtype=np.uint8)

        def header_descs(group: range) -> tuple[list[Region], list[Region]]:
            local = [(haddr + starts[j], hlens[j], 0) for j in group]
            return local, [(pool + offsets[j], hlens[j], 0) for j in group]

        def payload_descs(group: range) -> tuple[list[Region], list[Region]]:
            local = [(buffer_address(srcs[j]), srcs[j].nbytes, 0) for j in group if srcs[j].nbytes]
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

    def read(self, hits: list[Hit], headers: np.ndarray) -> list[int | IntegrityError]:
        """Values in groups of ~:data:`_GROUP_BYTES` of payload, one transfer each, verified per group.

        On the Python lane the whole batch is queued at once and this thread verifies each group
        once its transfer is done, while the lane copies the next ones; batches then finish in
        the order they came, so the next batch's lookup overlaps the copies of the others. On
        the direct lane a group is verified as soon as its transfer is done, with at most the
        next group in flight. Each transfer costs ~50-100 us of NIXL calls (descriptor lists,
        ``createXferReq``, release) on the thread that posts it, so groups are not small.
        """
        haddr = buffer_address(headers)
        pool = self.link.pool_addr
        regions = [(haddr, headers.nbytes, 0)] + [(buffer_address(dst), n, 0) for _k, dst, _o, _h, n in hits if n]
        groups = split_by_size([n for *_, n in hits], _GROUP_BYTES)  # headers are ~100s of bytes
        starts = list(itertools.accumulate((h for *_, h, _n in hits), initial=0))
        out: list[int | IntegrityError] = []
        batch = self._batch(regions)

        def post(group: range) -> None:
            local: list[Region] = []
            remote: list[Region] = []
            for j in group:
                _key, dst, off, h, n = hits[j]
                local.append((haddr + starts[j], h, 0))
                remote.append((pool + off, h, 0))
                if n:
                    local.append((buffer_address(dst), n, 0))
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


class PythonLane(_GroupedLane):
    """One Python thread makes every NIXL call of the data path (one UCX worker, no native lane)."""

    name: ClassVar[str] = "python"

    def __init__(self, link: PeerLink) -> None:
        super().__init__(link)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmcache-nixl-lane")

    @property
    def thread(self) -> ThreadPoolExecutor:
        """The lane thread: registrations queue behind the transfers already queued."""
        return self._thread

    def _batch(self, regions: list[Region]) -> _LaneBatch:
        agent = self.link.agent
        if agent is None:
            raise BackendUnavailableError("nixl://: the backend was closed")
        return _LaneBatch(self._thread, agent, self.post, self.link.unregistered(regions), self.link.timeout)

    def close(self) -> None:
        # After the batches that queue on it; its deregistrations run before the agent goes.
        self._thread.shutdown(wait=True)


class DirectLane(_GroupedLane):
    """Each executor thread makes its own batch's NIXL calls (an agent with several UCX workers)."""

    name: ClassVar[str] = "direct"

    def _batch(self, regions: list[Region]) -> _DirectBatch:
        agent = self.link.agent
        if agent is None:
            raise BackendUnavailableError("nixl://: the backend was closed")
        return _DirectBatch(agent, self.post, self.link.unregistered(regions), self.link.timeout)
