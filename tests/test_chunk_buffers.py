from __future__ import annotations

import itertools
import threading

import pytest
import torch

from lmcache.chunk_buffers import ChunkBufferPool
from lmcache.errors import CapacityError, InvalidArgumentError, StateError
from lmcache.layouts import KVGeometry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def pool(clock):
    with ChunkBufferPool(1000, 3, clock=clock, default_ttl=10.0, pin_memory=False) as p:
        yield p


def test_slots_are_aligned_and_disjoint(pool):
    leases = [pool.acquire() for _ in range(3)]
    ptrs = sorted(lease.tensor().data_ptr() for lease in leases)
    assert all(p % 4096 == 0 for p in ptrs)
    assert all(b - a >= 1000 for a, b in itertools.pairwise(ptrs))
    for i, lease in enumerate(leases):
        lease.tensor().fill_(i + 1)
    for i, lease in enumerate(leases):
        assert bool((lease.tensor() == i + 1).all())
    assert pool.stats()["in_use"] == 3


def test_release_makes_the_slot_reusable_without_new_memory(pool):
    a = pool.acquire()
    ptr = a.tensor().data_ptr()
    a.release()
    assert pool.in_use == 0
    b = pool.acquire()
    assert b.tensor().data_ptr() == ptr  # the warm slot comes back first
    assert pool.stats()["released"] == 1


def test_context_manager_releases(pool):
    with pool.acquire(100) as lease:
        assert lease.valid
        lease.memoryview()[:3] = b"abc"
        assert bytes(lease.tensor()[:3].numpy()) == b"abc"
    assert not lease.valid and pool.in_use == 0
    lease.release()  # a second release is a no-op
    with pytest.raises(StateError, match="released"):
        lease.tensor()


def test_typed_views(clock):
    geo = KVGeometry(2, 2, 4, "bfloat16")
    with ChunkBufferPool.for_geometry(geo, 2, chunk_tokens=8, clock=clock, pin_memory=False) as pool:
        assert pool.slot_nbytes == geo.chunk_nbytes(8)
        lease = pool.acquire(shape=geo.chunk_shape(3))
        t = lease.tensor()
        assert t.shape == geo.chunk_shape(3) and t.dtype == torch.bfloat16 and t.is_contiguous()
        assert lease.nbytes == geo.chunk_nbytes(3)
        assert lease.chunk(3).shape == geo.chunk_shape(3)
        with pytest.raises(InvalidArgumentError):
            lease.chunk(4)  # more than the lease covers
        full = pool.acquire()
        assert full.chunk().shape == geo.chunk_shape(8)
        with pytest.raises(InvalidArgumentError):
            pool.acquire(geo.chunk_nbytes(8) + 1, timeout=0)


def test_chunk_needs_a_geometry(pool):
    with pytest.raises(StateError):
        pool.acquire().chunk()


def test_expired_lease_is_reclaimed_and_stale_use_raises(pool, clock):
    stale = pool.acquire(ttl=5.0)
    slot = stale.slot
    view = stale.tensor()
    view.fill_(7)
    clock.advance(5.0)
    # Expired: dead at once, even before anyone reclaims its slot.
    assert not stale.valid
    with pytest.raises(StateError, match="expired"):
        stale.tensor()
    with pytest.raises(StateError, match="expired"):
        stale.renew()
    # Fill the pool: the expired slot is reclaimed and handed out again.
    others = [pool.acquire() for _ in range(3)]
    assert slot in {o.slot for o in others}
    assert pool.stats()["expired"] == 1
    with pytest.raises(StateError):
        stale.memoryview()
    with pytest.raises(StateError, match="expired before release"):
        stale.release()
    # The stale release did not free the new holder's slot.
    assert pool.in_use == 3
    assert all(o.valid for o in others)


def test_release_after_expiry_reports_it_and_frees(pool, clock):
    lease = pool.acquire(ttl=1.0)
    clock.advance(2.0)
    with pytest.raises(StateError):
        lease.release()
    assert pool.in_use == 0


def test_exit_after_expiry_raises_unless_an_error_is_in_flight(pool, clock):
    with pytest.raises(StateError), pool.acquire(ttl=1.0):
        clock.advance(1.5)
    with pytest.raises(KeyError), pool.acquire(ttl=1.0):  # the original error is not masked
        clock.advance(1.5)
        raise KeyError("boom")
    assert pool.in_use == 0


def test_renew_extends_the_lease(pool, clock):
    lease = pool.acquire(ttl=5.0)
    clock.advance(4.0)
    assert lease.renew(5.0) == clock.now + 5.0
    clock.advance(4.0)
    assert lease.valid
    assert pool.reclaim_expired() == 0
    clock.advance(1.0)
    assert pool.reclaim_expired() == 1
    assert not lease.valid


def test_exhaustion_raises_capacity_error(pool):
    held = [pool.acquire() for _ in range(3)]
    with pytest.raises(CapacityError):
        pool.acquire(timeout=0)
    assert pool.try_acquire() is None
    assert pool.stats()["capacity_errors"] == 2
    held[0].release()
    assert pool.try_acquire() is not None


def test_waiting_acquire_gets_a_released_slot(clock):
    with ChunkBufferPool(64, 1, clock=clock, pin_memory=False) as pool:
        held = pool.acquire()
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=3600)))
        waiter.start()
        while pool.stats()["waits"] < 1:  # until the waiter is inside acquire
            threading.Event().wait(0.001)
        held.release()
        waiter.join(timeout=30)
        assert not waiter.is_alive() and len(got) == 1


def test_waiting_acquire_gets_an_expiring_slot_and_times_out(clock):
    with ChunkBufferPool(64, 1, clock=clock, pin_memory=False) as pool:
        pool.acquire(ttl=5.0)
        errors: list[BaseException] = []
        results: list[object] = []

        def wait(timeout: float) -> None:
            try:
                results.append(pool.acquire(timeout=timeout))
            except CapacityError as exc:
                errors.append(exc)

        waiter = threading.Thread(target=wait, args=(3600,))
        waiter.start()
        while pool.stats()["waits"] < 1:
            threading.Event().wait(0.001)
        clock.advance(6.0)  # the holder forgot: its lease expires and the waiter gets the slot
        waiter.join(timeout=30)
        assert len(results) == 1 and not errors

        late = threading.Thread(target=wait, args=(2.0,))
        late.start()
        while pool.stats()["waits"] < 2:
            threading.Event().wait(0.001)
        clock.advance(2.5)  # its timeout passes before any slot frees
        late.join(timeout=30)
        assert len(errors) == 1


def test_closed_pool(clock):
    pool = ChunkBufferPool(64, 2, clock=clock, pin_memory=False)
    lease = pool.acquire()
    pool.close()
    pool.close()
    with pytest.raises(StateError):
        lease.tensor()
    with pytest.raises(StateError):
        pool.acquire()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"slot_nbytes": 0, "num_slots": 1},
        {"slot_nbytes": 8, "num_slots": 0},
        {"slot_nbytes": 8, "num_slots": 1, "alignment": 3},
    ],
)
def test_bad_pool_arguments(kwargs):
    with pytest.raises(InvalidArgumentError):
        ChunkBufferPool(**kwargs)


def test_bad_acquire_arguments(pool):
    with pytest.raises(InvalidArgumentError):
        pool.acquire(ttl=0)
    with pytest.raises(InvalidArgumentError):
        pool.acquire(timeout=-1)
    with pytest.raises(InvalidArgumentError):
        pool.acquire(8, shape=(4,), dtype=torch.float32)
    with pytest.raises(InvalidArgumentError):
        pool.acquire(6, dtype=torch.float32)
    assert pool.in_use == 0


def test_pinning_follows_cuda_availability():
    with ChunkBufferPool(64, 1) as pool:
        assert pool.pinned == torch.cuda.is_available()


def test_thread_safety_smoke():
    # Real clock: many threads acquire, write a thread-unique pattern, check it, release.
    pool = ChunkBufferPool(256, 4, default_ttl=60.0, default_timeout=30.0, pin_memory=False)
    failures: list[str] = []

    def worker(tid: int) -> None:
        for _ in range(200):
            with pool.acquire(256) as lease:
                t = lease.tensor()
                t.fill_(tid)
                if not bool((t == tid).all()):
                    failures.append(f"thread {tid} saw another thread's bytes")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    stats = pool.stats()
    pool.close()
    assert not failures
    assert stats["acquired"] == stats["released"] == 8 * 200
    assert stats["in_use"] == 0
