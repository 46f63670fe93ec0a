"""lmcache.pool: the allocator, reserve/commit/lease index and pool mapping shared by memory://,
the cache server's tier 0 and the nixl peer."""

from __future__ import annotations

import mmap
import os
import stat

import pytest

from lmcache.backends.nixl.peer import PeerStore
from lmcache.backends.nixl.wire import Status
from lmcache.errors import CapacityError
from lmcache.pool import Lease, LeasedIndex, Refused, Reservation, map_pool
from lmcache.pool.mapping import SHM_DIR


def test_a_lease_outlives_a_delete_and_the_last_release_frees_once() -> None:
    idx: LeasedIndex[str] = LeasedIndex(1024)
    res = idx.reserve("a", 1024)
    assert isinstance(res, Reservation) and idx.commit(res)
    one, two = idx.lease("a"), idx.lease("a")
    assert isinstance(one, Lease) and isinstance(two, Lease)
    assert idx.delete("a") and not idx.contains("a")
    assert idx.reserve("b", 64) is Refused.FULL  # leased bytes are never handed out
    idx.release(one)
    idx.release(one)  # a second release of the same lease does nothing
    assert idx.used == 1024
    idx.release(two)
    assert idx.used == 0 and idx.allocator.free_list() == [(0, 1024)]


def test_a_delete_leaves_a_reservation_alone_unless_told_to_cancel_it() -> None:
    idx: LeasedIndex[str] = LeasedIndex(1024)
    kept = idx.reserve("k", 512)
    assert isinstance(kept, Reservation)
    assert not idx.delete("k") and idx.reserve("k", 512) is Refused.BUSY
    assert idx.commit(kept) and idx.contains("k")  # ordered after the delete: published
    gone = idx.reserve("g", 512)
    assert isinstance(gone, Reservation)
    assert idx.delete("g", cancel_reservation=True)
    assert idx.reserve("x", 64) is Refused.FULL  # the writer still owns its bytes
    assert not idx.commit(gone) and not idx.contains("g")
    assert idx.used == 512
    assert not idx.commit(kept)  # settled already: nothing happens


def test_handles_from_before_a_clear_never_free_into_the_new_pool() -> None:
    idx: LeasedIndex[str] = LeasedIndex(1024)
    res = idx.reserve("r", 512)
    done = idx.reserve("d", 512)
    assert isinstance(res, Reservation) and isinstance(done, Reservation) and idx.commit(done)
    lease = idx.lease("d")
    assert lease is not None
    idx.clear()
    fresh = idx.reserve("f", 1024)
    assert isinstance(fresh, Reservation)
    idx.abort(res)
    idx.release(lease)
    assert idx.used == 1024 and idx.reserve("y", 64) is Refused.FULL


def test_the_nixl_peer_allocates_best_fit_like_memory() -> None:
    s = PeerStore(1024)
    blocks = {}
    for name, n in ((b"a", 256), (b"b", 64), (b"c", 128), (b"d", 576)):
        st, res = s.reserve(name, n, 16)
        assert st == Status.OK and res is not None
        s.commit(res, ok=True)
        blocks[name] = res.offset
    s.delete(b"a")
    s.delete(b"c")
    st, res = s.reserve(b"e", 128, 16)
    assert st == Status.OK and res is not None
    assert res.offset == blocks[b"c"], "the smallest free block that fits, not the first"


def test_a_shared_pool_is_a_private_dev_shm_file_unlinked_at_close() -> None:
    if not os.access(SHM_DIR, os.W_OK):
        pytest.skip("needs a writable /dev/shm")
    pool = map_pool(1 << 20, shared=True, hugepages=False, prefault=True)
    try:
        assert pool.name is not None and pool.size == 1 << 20
        path = SHM_DIR / pool.name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        pool.view[:5] = b"hello"
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 1 << 20) as other:
            assert other[:5] == b"hello"  # another mapping of the name sees the same bytes
    finally:
        pool.close()
    assert not path.exists()
    private = map_pool(1 << 20, shared=False, hugepages=True, prefault=False)
    assert private.name is None and private.address != 0
    private.close()


def test_prefault_beyond_available_memory_is_refused_for_every_pool() -> None:
    for shared in (False, True):
        with pytest.raises(CapacityError, match="prefault"):
            map_pool(1 << 50, shared=shared, hugepages=False, prefault=True, owner="test")
