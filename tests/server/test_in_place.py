"""Zero-copy puts and gets of ``lm+unix://`` clients: values written and read in the server's pool.

:meth:`LMServerBackend.reserve_in_place` / :meth:`commit_in_place` let a caller write a value's
payload straight into reserved tier-0 blocks (the PD producer gathers vLLM's KV there), and
:meth:`get_in_place` hands back checked views of stored values (the consumer scatters from
them). Both must interoperate with ordinary puts and gets, detect corruption, and refuse where
no shared pool exists (TCP without shared memory).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import LMServer

from lmcache.backends.base import PutStatus
from lmcache.keys import CacheKey
from lmcache.server.client import LMServerBackend


def _key(name: str) -> CacheKey:
    return CacheKey("in-place-test", 1, 0, hashlib.blake2b(name.encode(), digest_size=32).digest(), "uint8")


def _value(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, n, dtype=np.uint8)


async def test_a_value_written_in_place_reads_back_both_ways(lm_server: LMServer) -> None:
    keys = [_key(f"a-{i}") for i in range(3)]
    values = [_value(i, 4096 + 64 * i) for i in range(3)]
    async with LMServerBackend.from_url(lm_server.url("lm+unix")) as backend:
        held = await backend.reserve_in_place(keys, [v.nbytes for v in values])
        assert held is not None and held.states == ["reserved"] * 3
        for i, v in enumerate(values):
            view = held.payload(i)
            assert view is not None and view.nbytes == v.nbytes
            np.frombuffer(view, dtype=np.uint8)[:] = v
        backend.seal_in_place(held, 1)  # framed early (as each is written); the commit frames the rest
        assert held.sealed == {1}
        # Reserved but not committed: nobody sees the values yet.
        assert await backend.contains(keys) == [False] * 3
        results = await backend.commit_in_place(held)
        assert [r.status if r else None for r in results] == [PutStatus.STORED] * 3
        # An ordinary get reads them (header and checksum written by the commit).
        dsts = [np.zeros_like(v) for v in values]
        assert await backend.get_into(keys, dsts) == [v.nbytes for v in values]
        assert all(np.array_equal(a, b) for a, b in zip(values, dsts, strict=True))
        # In place: checked views, a miss is None, a wrong size is None.
        got = await backend.get_in_place([*keys, _key("missing")], [v.nbytes for v in values] + [10])
        assert got is not None
        try:
            assert got.payloads[3] is None
            for v, p in zip(values, got.payloads[:3], strict=True):
                assert p is not None and np.array_equal(np.frombuffer(p, dtype=np.uint8), v)
        finally:
            backend.release_in_place(got)
        wrong = await backend.get_in_place(keys[:1], [values[0].nbytes + 1])
        assert wrong is not None and wrong.payloads == [None]
        backend.release_in_place(wrong)
        # A second reservation of a held key is EXISTS, not a copy.
        again = await backend.reserve_in_place(keys[:1], [values[0].nbytes])
        assert again is not None and again.states == ["exists"] and again.payload(0) is None
        assert [r.status for r in await backend.commit_in_place(again) if r] == [PutStatus.EXISTS]
        await backend.delete(keys)


async def test_an_aborted_reservation_stores_nothing(lm_server: LMServer) -> None:
    key = _key("aborted")
    async with LMServerBackend.from_url(lm_server.url("lm+unix")) as backend:
        held = await backend.reserve_in_place([key], [1000])
        assert held is not None
        results = await backend.commit_in_place(held, abort=True)
        assert results[0] is not None and results[0].status is PutStatus.REJECTED
        assert await backend.contains([key]) == [False]
        # The key is free again for an ordinary put.
        assert (await backend.put([key], [_value(1, 1000)]))[0].status is PutStatus.STORED
        await backend.delete([key])


async def test_a_corrupt_value_read_in_place_is_a_counted_miss(lm_server: LMServer) -> None:
    key = _key("corrupt")
    value = _value(7, 2048)
    async with LMServerBackend.from_url(lm_server.url("lm+unix")) as backend:
        held = await backend.reserve_in_place([key], [value.nbytes])
        assert held is not None
        view = held.payload(0)
        assert view is not None
        np.frombuffer(view, dtype=np.uint8)[:] = value
        await backend.commit_in_place(held)
        # Damage the payload after the commit (a stray writer): the checksum must catch it.
        with lm_server.raw() as raw:
            frame = raw.get_frame(key.to_string(), 1 << 20)
            assert frame is not None
            damaged = bytearray(frame)
            damaged[-1] ^= 0xFF
            raw.delete([key.to_string()])
            assert raw.put_frame(key.to_string(), bytes(damaged)) == "stored"
        got = await backend.get_in_place([key], [value.nbytes])
        assert got is not None and got.payloads == [None]
        backend.release_in_place(got)
        assert backend.stats()["corrupt"] >= 1
        await backend.delete([key])


async def test_without_shared_memory_in_place_is_refused(lm_server: LMServer) -> None:
    async with LMServerBackend.from_url(lm_server.url("lm", shm="false")) as backend:
        assert await backend.reserve_in_place([_key("tcp")], [10]) is None
        assert await backend.get_in_place([_key("tcp")], [10]) is None


@pytest.mark.parametrize("n", [3])
async def test_in_place_gets_larger_than_one_request_are_refused(lm_server: LMServer, n: int) -> None:
    """The caller splits what does not fit in half the segment (``shm_size``)."""
    async with LMServerBackend.from_url(lm_server.url("lm+unix", shm_size="1MiB")) as backend:
        assert await backend.get_in_place([_key(f"big-{i}") for i in range(n)], [400_000] * n) is None
