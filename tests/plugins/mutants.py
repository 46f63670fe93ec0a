"""Deliberately broken variants of the example backend, each run through the conformance suite.

Not collected by the normal run (the name has no ``test_`` prefix): ``test_conformance_mutants.py``
runs this module in a child pytest and checks that each mutant fails the tests meant to catch
its bug, while the unbroken example backend passes the same tests. That is how we know the suite
can fail at all.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import ClassVar

import pytest
from lmcache_conformance import BackendTests
from lmcache_example_plugin.backend import ExampleBackend, raw_store

from lmcache.backends.base import STORED, PutResult, StorageBackend, _State, check_dst_size
from lmcache.keys import CacheKey
from lmcache.serde.frame import encode_header, parse_header


class LastWriterWins(ExampleBackend):
    """Overwrites values on a second put (values must be immutable)."""

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        for key, src in zip(keys, srcs, strict=True):
            self._data()[key.to_string()] = encode_header(key, src) + bytes(src)
        return [STORED] * len(keys)


class WritesMissBuffers(ExampleBackend):
    """Zero-fills the buffer of a miss (a miss must leave its dst untouched)."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out = await super()._get_into(keys, dsts)
        for n, dst in zip(out, dsts, strict=True):
            if n is None:
                dst[:] = bytes(dst.nbytes)
        return out


class SkipsChecksum(ExampleBackend):
    """Trusts the header and never verifies the payload checksum."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out: list[int | None] = []
        for key, dst in zip(keys, dsts, strict=True):
            frame = self._data().get(key.to_string())
            if frame is None:
                out.append(None)
                continue
            header = parse_header(frame, key)
            check_dst_size(key, dst, header.payload_len)
            dst[: header.payload_len] = memoryview(frame)[header.payload_offset : header.total_len]
            out.append(header.payload_len)
        return out


class AliasesSources(ExampleBackend):
    """Keeps a reference to the caller's source buffer instead of copying it."""

    _aliases: ClassVar[dict[str, memoryview]] = {}

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results = await super()._put(keys, srcs)
        for key, src in zip(keys, srcs, strict=True):
            self._aliases[key.to_string()] = src
        return results

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out = await super()._get_into(keys, dsts)
        for key, n, dst in zip(keys, out, dsts, strict=True):
            alias = self._aliases.get(key.to_string())
            if n is not None and alias is not None:
                dst[:n] = alias
        return out


class WritesAfterCancel(ExampleBackend):
    """Copies in a shielded task that keeps writing into buffers after the caller is cancelled."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        parent = super()

        async def copy_all() -> list[int | None]:
            out: list[int | None] = []
            for key, dst in zip(keys, dsts, strict=True):
                out += await parent._get_into([key], [dst])
                await asyncio.sleep(0.001)
            return out

        return await asyncio.shield(copy_all())


class Reopenable(ExampleBackend):
    """Lets a closed backend be opened again (closed must be final)."""

    async def open(self) -> None:
        if self.is_closed:
            self._state = _State.NEW
        await super().open()


class LeaksSecrets(ExampleBackend):
    """Shows its full URL, token included, in repr."""

    def __repr__(self) -> str:
        return f"LeaksSecrets({self.url!r})"


class ReordersResults(ExampleBackend):
    """Answers a batch in key order instead of input order."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        order = sorted(range(len(keys)), key=lambda i: keys[i].chunk_hash)
        got = await super()._get_into([keys[i] for i in order], [dsts[i] for i in order])
        return got  # bytes went to the right buffers, but the sizes come back sorted


class OverrunsBuffers(ExampleBackend):
    """Zero-pads the rest of a larger destination buffer."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out = await super()._get_into(keys, dsts)
        for n, dst in zip(out, dsts, strict=True):
            if n is not None:
                dst[n:] = bytes(dst.nbytes - n)
        return out


class ForgetsDeletes(ExampleBackend):
    """Ignores deletes."""

    async def _delete(self, keys: list[CacheKey]) -> None:
        return None


class DeletesLater(ExampleBackend):
    """Deletes in the background, after ``delete`` has returned."""

    async def _delete(self, keys: list[CacheKey]) -> None:
        parent = super()

        async def later() -> None:
            await asyncio.sleep(0.02)
            if self.is_open:
                await parent._delete(keys)

        self._later = asyncio.ensure_future(later())


class ExampleSuite(BackendTests):
    """The suite against ``backend_cls``; subclasses pick the mutant."""

    backend_cls: ClassVar[type[ExampleBackend]] = ExampleBackend
    url_options: ClassVar[str] = ""
    # A mutant only has to fail; shrinking its failing sequence took minutes on a slow CI box.
    hypothesis_shrink: ClassVar[bool] = False

    def make_backend(self) -> StorageBackend:
        return self.backend_cls.from_url(f"example://mutant-{uuid.uuid4().hex}{self.url_options}")

    @pytest.fixture
    def secret_url(self) -> str:
        return "example://secrets?token=tok-5d1e0b9a"

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        store = raw_store(backend.settings.name)  # type: ignore[attr-defined]
        frame = bytearray(store[key.to_string()])
        frame[-1] ^= 0xFF
        store[key.to_string()] = bytes(frame)


class TestUnbroken(ExampleSuite):
    pass


class TestLastWriterWins(ExampleSuite):
    backend_cls = LastWriterWins


class TestWritesMissBuffers(ExampleSuite):
    backend_cls = WritesMissBuffers


class TestSkipsChecksum(ExampleSuite):
    backend_cls = SkipsChecksum


class TestAliasesSources(ExampleSuite):
    backend_cls = AliasesSources


class TestWritesAfterCancel(ExampleSuite):
    backend_cls = WritesAfterCancel


class TestReopenable(ExampleSuite):
    backend_cls = Reopenable


class TestLeaksSecrets(ExampleSuite):
    backend_cls = LeaksSecrets


class TestReordersResults(ExampleSuite):
    backend_cls = ReordersResults


class TestOverrunsBuffers(ExampleSuite):
    backend_cls = OverrunsBuffers


class TestForgetsDeletes(ExampleSuite):
    backend_cls = ForgetsDeletes


class TestDeletesLater(ExampleSuite):
    backend_cls = DeletesLater


class TestBlocksTheLoop(ExampleSuite):
    url_options = "?yield_every=1GiB"  # never yields during a batch


#: Mutant class -> suite tests that must fail for it (and pass for ``TestUnbroken``).
EXPECTED_FAILURES: dict[str, tuple[str, ...]] = {
    "TestLastWriterWins": ("test_put_is_idempotent_first_writer_wins", "test_stateful_against_a_dict_model"),
    "TestWritesMissBuffers": ("test_miss_is_data_and_dst_untouched", "test_mixed_hits_and_misses"),
    "TestSkipsChecksum": ("test_corrupt_value_is_a_counted_miss",),
    "TestAliasesSources": ("test_source_mutation_after_put_does_not_change_value",),
    "TestWritesAfterCancel": ("test_cancelled_get_into_never_writes_late",),
    "TestReopenable": ("test_closed_is_final", "test_close_before_open_is_final"),
    "TestLeaksSecrets": ("test_repr_redacts_secrets",),
    "TestReordersResults": ("test_batch_order_is_preserved",),
    "TestOverrunsBuffers": ("test_get_into_larger_dst_writes_only_the_value",),
    "TestForgetsDeletes": ("test_delete_then_miss", "test_stateful_against_a_dict_model"),
    "TestDeletesLater": ("test_delete_is_not_undone_by_background_work",),
    "TestBlocksTheLoop": ("test_event_loop_keeps_ticking_during_large_batch",),
}
