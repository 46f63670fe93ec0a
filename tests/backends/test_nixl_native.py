"""The native NIXL lane (``lmcache/backends/nixl/_lane.c``) on its own: order, checksums, failures, cancels.

These tests build the lane with the host's C compiler and drive it through a fault-injecting
stand-in for NIXL's C API: Python callbacks that copy between in-process buffers, and can be told
to leave a transfer in progress, or to refuse one. That lets them reach what a real peer over
UCX/CMA never does here (a transfer stuck in progress, aborted by a cancel). The lane against the
real NIXL SDK and a real peer is tested in ``test_nixl.py``.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from lmcache.backends.nixl import native as nixl_native
from lmcache.backends.nixl.native import CANCELLED, READ, WRITE, NativeJob, NativeLane

pytestmark = [
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc) to build the native lane"),
    pytest.mark.timeout(60),
]

IN_PROG, ERR_BACKEND = 1, -2
_vp = ctypes.c_void_p
_DL_CREATE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.POINTER(_vp), ctypes.c_bool)
_DL_DESTROY = ctypes.CFUNCTYPE(ctypes.c_int, _vp)
_DL_ADD = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint64)
_REQ_CREATE = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_int, _vp, _vp, ctypes.c_char_p, ctypes.POINTER(_vp), _vp)
_REQ_POST = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp, _vp)
_REQ_ONE = ctypes.CFUNCTYPE(ctypes.c_int, _vp, _vp)
_REQ_DESTROY = ctypes.CFUNCTYPE(ctypes.c_int, _vp)


class FakeNixl:
    """NIXL's C API as the lane calls it, over in-process memory (fault injection only).

    A READ copies remote -> local, a WRITE local -> remote. ``stuck`` holds transfer numbers
    (in creation order) that stay in progress until released; ``refuse`` those whose request
    creation fails; ``slow`` those that finish on their third status poll.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dlists: dict[int, list[tuple[int, int]]] = {}
        self.reqs: dict[int, dict[str, object]] = {}
        self.ids = iter(range(1, 1 << 30))
        self.created = 0
        self.stuck: set[int] = set()
        self.refuse: set[int] = set()
        self.slow: set[int] = set()
        self.gate: dict[int, threading.Event] = {}  # posting these waits for the event
        self.at_gate = threading.Event()  # set when a post starts waiting at its gate
        self.posted: list[tuple[str, int]] = []  # (remote agent, transfer number) in post order
        self.released_in_progress = 0
        self.callbacks = [
            _DL_CREATE(self.dl_create),
            _DL_DESTROY(self.dl_destroy),
            _DL_ADD(self.dl_add),
            _REQ_CREATE(self.req_create),
            _REQ_POST(self.req_post),
            _REQ_ONE(self.req_status),
            _REQ_ONE(self.req_release),
            _REQ_DESTROY(self.req_destroy),
        ]

    def api(self) -> nixl_native._Api:
        api = nixl_native._Api()
        for (field, _), cb in zip(nixl_native._Api._fields_, self.callbacks, strict=False):
            setattr(api, field, ctypes.cast(cb, _vp).value)
        api.hash = nixl_native._hash_function()
        return api

    def dl_create(self, _mem: int, out: ctypes._Pointer, _sorted: bool) -> int:  # type: ignore[type-arg]
        with self.lock:
            i = next(self.ids)
            self.dlists[i] = []
        out[0] = i
        return 0

    def dl_destroy(self, dl: int) -> int:
        with self.lock:
            self.dlists.pop(dl)
        return 0

    def dl_add(self, dl: int, addr: int, n: int, _dev: int) -> int:
        with self.lock:
            self.dlists[dl].append((addr, n))
        return 0

    def req_create(self, _agent: int, op: int, local: int, remote: int, name: bytes, out: object, _opt: int) -> int:
        with self.lock:
            number = self.created
            self.created += 1
            if number in self.refuse:
                return ERR_BACKEND
            i = next(self.ids)
            self.reqs[i] = {
                "op": op,
                "pairs": list(zip(self.dlists[local], self.dlists[remote], strict=True)),
                "number": number,
                "name": name.decode(),
                "polls": 0,
                "done": False,
            }
        out[0] = i  # type: ignore[index]
        return 0

    def _move(self, req: dict[str, object]) -> None:
        for (la, n), (ra, _n) in req["pairs"]:  # type: ignore[attr-defined]
            src, dst = (ra, la) if req["op"] == READ else (la, ra)
            ctypes.memmove(dst, src, n)
        req["done"] = True

    def req_post(self, _agent: int, r: int, _opt: int) -> int:
        req = self.reqs[r]
        number = int(req["number"])  # type: ignore[call-overload]
        if number in self.gate:
            self.at_gate.set()
            self.gate[number].wait(10)
        self.posted.append((str(req["name"]), number))
        if req["number"] in self.stuck or req["number"] in self.slow:
            return IN_PROG
        self._move(req)
        return 0

    def req_status(self, _agent: int, r: int) -> int:
        req = self.reqs[r]
        if req["number"] in self.stuck:
            return IN_PROG
        req["polls"] = int(req["polls"]) + 1  # type: ignore[call-overload]
        if int(req["polls"]) < 3:  # type: ignore[call-overload]
            return IN_PROG
        if not req["done"]:
            self._move(req)
        return 0

    def req_release(self, _agent: int, r: int) -> int:
        req = self.reqs[r]
        if not req["done"]:
            self.released_in_progress += 1  # NIXL aborts a transfer released in progress
        return 0

    def req_destroy(self, r: int) -> int:
        with self.lock:
            self.reqs.pop(r)
        return 0


@pytest.fixture
def fake() -> FakeNixl:
    return FakeNixl()


@pytest.fixture
def lane(fake: FakeNixl) -> Iterator[NativeLane]:
    lib = nixl_native.build()
    handle = nixl_native._AgentHandle(0x1000)  # never dereferenced by the fake
    lane = NativeLane(lib, fake.api(), handle)
    yield lane
    lane.close()


def _buf(data: bytes) -> tuple[ctypes.Array[ctypes.c_char], int]:
    buf = ctypes.create_string_buffer(data, len(data))
    return buf, ctypes.addressof(buf)


def _read_values(
    lane: NativeLane, count: int
) -> tuple[list[bytes], list[tuple[object, int]], list[tuple[object, int]], NativeJob]:
    """Submit a READ of ``count`` random 1000-byte values, one per transfer, each hashed."""
    values = [os.urandom(1000) for _ in range(count)]
    remote = [_buf(v) for v in values]
    local = [_buf(b"\0" * 1000) for _ in values]
    transfers = [([(la, ra, 1000)], [(la, 1000)]) for (_l, la), (_r, ra) in zip(local, remote, strict=True)]
    return values, local, remote, lane.submit("p", READ, transfers, hash_at_start=False)


def test_build_is_cached_on_disk_and_keyed_by_its_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl_native, "_built", {})
    monkeypatch.setenv("LMCACHE_NATIVE_DIR", str(tmp_path))
    nixl_native.build()
    built = list(tmp_path.glob("nixl_lane-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(nixl_native, "_built", {})
    nixl_native.build()
    assert list(tmp_path.glob("nixl_lane-*.so")) == built and built[0].stat().st_mtime_ns == stamp, "rebuilt"
    assert not list(tmp_path.glob(".nixl_lane-*")), "a temporary file was left behind"


def test_the_lane_source_ships_beside_its_module_as_package_data() -> None:
    """The C file is found next to ``native.py``, and pyproject's package data puts it in the wheel there."""
    tomllib = pytest.importorskip("tomllib")
    source = nixl_native._SOURCE
    assert source.is_file() and source.parent == Path(nixl_native.__file__).parent
    config = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"].get(nixl_native.__name__.rpartition(".")[0], [])
    assert any(fnmatch.fnmatch(source.name, g) for g in globs), f"{source.name} is not package data: {globs}"


def test_a_missing_source_is_an_oserror_that_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install without the C file: an OSError (so ``native_lane=auto`` keeps the Python lane) naming it."""
    monkeypatch.setattr(nixl_native, "_built", {})
    monkeypatch.setattr(nixl_native, "_SOURCE", tmp_path / "_lane.c")
    with pytest.raises(OSError, match=r"source .*_lane\.c cannot be read"):
        nixl_native.build()


def test_a_failing_compiler_is_an_oserror_with_its_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl_native, "_built", {})
    monkeypatch.setenv("LMCACHE_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "cc -Wl,--no-such-linker-flag")
    with pytest.raises(OSError, match="building the native NIXL lane failed"):
        nixl_native.build()
    with pytest.raises(OSError, match="building the native NIXL lane failed"):
        nixl_native.build()  # remembered: not retried on every open
    assert not list(tmp_path.glob("*.so"))


def test_reads_land_in_order_and_each_is_hashed(fake: FakeNixl, lane: NativeLane) -> None:
    values = [os.urandom(n) for n in (1, 4096, 100_000, 0, 3 << 20)]
    remote = [_buf(v) for v in values]
    local = [_buf(b"\0" * len(v)) for v in values]
    transfers = [
        ([(la, ra, len(v))] if v else [(la, ra, 0)], [(la, len(v))])
        for (_l, la), (_r, ra), v in zip(local, remote, values, strict=True)
    ]
    fake.slow = {2}  # finishes on a later poll: hashed only once it has landed
    job = lane.submit("peer-a", READ, transfers, hash_at_start=False)
    assert job.wait(10)
    status, _at, _what, sums = job.result()
    assert status == 0
    assert [bytes(b.raw) for b, _ in local] == values
    assert sums == [xxhash.xxh3_64_intdigest(v) for v in values]
    assert fake.posted == [("peer-a", i) for i in range(5)]


def test_writes_hash_their_sources_from_the_moment_the_lane_takes_them_up(fake: FakeNixl, lane: NativeLane) -> None:
    values = [os.urandom(64 << 10) for _ in range(6)]
    srcs = [_buf(v) for v in values]
    dsts = [_buf(b"\0" * len(v)) for v in values]
    fake.gate = {0: threading.Event()}  # holds the lane inside the first transfer's copy
    job = lane.submit(
        "p",
        WRITE,
        [([(sa, da, len(v))], [(sa, len(v))]) for (_s, sa), (_d, da), v in zip(srcs, dsts, values, strict=True)],
        hash_at_start=True,
    )
    assert fake.at_gate.wait(10)
    deadline = time.monotonic() + 10
    while lane.stats()["hashed_bytes"] < len(values[0]) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert lane.stats()["hashed_bytes"] == len(values[0]), "the first source was not hashed while it was copied"
    assert bytes(dsts[0][0].raw) == b"\0" * len(values[0]), "the copy had not started yet"
    fake.gate[0].set()
    assert job.wait(10)
    status, _at, _what, sums = job.result()
    assert status == 0 and sums == [xxhash.xxh3_64_intdigest(v) for v in values]
    assert [bytes(d.raw) for d, _ in dsts] == values


def test_a_refused_transfer_fails_the_job_and_nothing_after_it_is_posted(fake: FakeNixl, lane: NativeLane) -> None:
    fake.refuse = {1}
    _values, local, remote, job = _read_values(lane, 4)
    assert job.wait(10)
    status, at, what, _sums = job.result()
    assert (status, at, what) == (ERR_BACKEND, 1, "createXferReq")
    assert [n for _name, n in fake.posted] == [0], "transfers after the refused one were posted"
    assert fake.created == 2 and not fake.reqs, "a request was left unreleased"
    nxt = lane.submit("p", READ, [([(local[3][1], remote[3][1], 1000)], [])], hash_at_start=False)
    assert nxt.wait(10) and nxt.result()[0] == 0, "the lane kept serving after a failed job"


def test_a_stuck_transfer_times_out_and_a_cancel_aborts_it(fake: FakeNixl, lane: NativeLane) -> None:
    fake.stuck = {1}
    values, local, _remote, job = _read_values(lane, 3)
    t0 = time.monotonic()
    assert not job.wait(0.3), "a job with a stuck transfer ended"
    assert time.monotonic() - t0 >= 0.25
    job.cancel()
    assert job.wait(10), "a cancelled job did not end"
    status, at, _what, _sums = job.result()
    assert (status, at) == (CANCELLED, 1)
    assert fake.released_in_progress == 1 and not fake.reqs, "the stuck transfer was not aborted"
    # The transfers around it were in the lane's window: done before the job ended, never after.
    assert [n for _name, n in fake.posted] == [0, 1, 2]
    assert bytes(local[1][0].raw) == b"\0" * 1000
    assert bytes(local[0][0].raw) == values[0] and bytes(local[2][0].raw) == values[2]


class _PutJob:
    """A put as ``nixl://`` submits it: one WRITE per value, then one of their frame headers."""

    def __init__(self, lane: NativeLane, remote: str, sizes: list[int], *, hash_at_start: bool) -> None:
        from lmcache.keys import CacheKey
        from lmcache.serde import frame

        self.keys = [CacheKey("native-test", 1, 0, bytes([i]) * 32, "uint8") for i in range(len(sizes))]
        self.values = [os.urandom(n) for n in sizes]
        heads = [frame.encode_header(k, v, checksum=0) for k, v in zip(self.keys, self.values, strict=True)]
        self.bufs = [_buf(v) for v in self.values]
        dsts = [_buf(b"\0" * len(v)) for v in self.values]
        self.hsrc = [_buf(h) for h in heads]
        self.hdst = [_buf(b"\0" * len(h)) for h in heads]
        self.transfers = [
            ([(sa, da, len(v))], [(sa, len(v))])
            for (_s, sa), (_d, da), v in zip(self.bufs, dsts, self.values, strict=True)
        ]
        self.transfers.append(
            ([(ha, hd, len(h)) for (_a, ha), (_b, hd), h in zip(self.hsrc, self.hdst, heads, strict=True)], [])
        )
        self.dsts = dsts  # kept alive until the job ends
        patches = [
            (ha, frame.header_tail_len(h), i) for i, ((_a, ha), h) in enumerate(zip(self.hsrc, heads, strict=True))
        ]
        self.job = lane.submit(remote, WRITE, self.transfers, hash_at_start=hash_at_start, headers=patches)

    def check_written(self) -> None:
        """Each written header, followed by its payload, decodes and carries the payload's xxh3."""
        from lmcache.serde import frame

        for key, value, (written, _addr) in zip(self.keys, self.values, self.hdst, strict=True):
            header, payload = frame.decode_frame(bytes(written.raw) + value, expected_key=key)
            assert bytes(payload) == value and header.checksum == xxhash.xxh3_64_intdigest(value)


@pytest.mark.parametrize("hash_at_start", [True, False], ids=["hashed-from-start", "hashed-once-landed"])
def test_a_put_job_fills_in_its_frame_headers_before_writing_them(
    fake: FakeNixl, lane: NativeLane, hash_at_start: bool
) -> None:
    """Headers encoded with a placeholder checksum leave with the payloads' checksums, and check out.

    The payload transfers are still in progress when posted, so hashing them once landed needs
    the lane to keep polling them while it waits for their checksums.
    """
    fake.slow = {0, 1, 2}
    put = _PutJob(lane, "p", [70_000, 5, 1 << 20], hash_at_start=hash_at_start)
    assert put.job.wait(10) and put.job.result()[0] == 0
    put.check_written()
    assert [name for name, _n in fake.posted] == ["p"] * 4, "the headers did not go last, in the same job"
    transfers, hsrc = put.transfers, put.hsrc
    with pytest.raises(OSError, match="did not take the job"):
        lane.submit("p", WRITE, transfers, hash_at_start=True, headers=[(hsrc[0][1], 10, 3)])  # no range 3


_HASH = ctypes.CFUNCTYPE(ctypes.c_uint64, _vp, ctypes.c_size_t)


def test_a_put_waiting_for_its_checksums_lets_the_next_jobs_go_ahead(fake: FakeNixl) -> None:
    """The lane does not idle while a put's values are still being hashed: later jobs go ahead."""
    real = _HASH(nixl_native._hash_function())
    held, hashing = threading.Event(), threading.Event()
    slow_size = 70_001

    def gated_hash(addr: int, n: int) -> int:
        if n == slow_size:  # the put's value: held until the test lets it go
            hashing.set()
            held.wait(10)
        return int(real(addr, n))

    hash_cb = _HASH(gated_hash)
    api = fake.api()
    api.hash = ctypes.cast(hash_cb, _vp).value
    lane = NativeLane(nixl_native.build(), api, nixl_native._AgentHandle(0x1000))
    try:
        put = _PutJob(lane, "a", [slow_size], hash_at_start=True)
        assert hashing.wait(10)
        value = os.urandom(1000)
        (_r, far), (near, addr) = _buf(value), _buf(b"\0" * 1000)
        nxt = lane.submit("b", READ, [([(addr, far, 1000)], [])], hash_at_start=False)
        assert nxt.wait(5) and nxt.result()[0] == 0, "the next job waited for the put's checksums"
        assert bytes(near.raw) == value
        assert not put.job.wait(0), "the put ended before its value was hashed"
        assert fake.posted == [("a", 0), ("b", 1)], "the put's headers went before their checksums were in"
        held.set()
        assert put.job.wait(10) and put.job.result()[0] == 0
        put.check_written()
        assert fake.posted == [("a", 0), ("b", 1), ("a", 2)]
    finally:
        held.set()
        lane.close()
