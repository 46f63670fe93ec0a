"""Deliberately broken variants of the example backend, each run through the conformance suite.

Not collected by the normal run (the name has no ``test_`` prefix): ``test_conformance_mutants.py``
runs this module in a child pytest and checks that each mutant fails the tests meant to catch
its bug, while the unbroken example backend passes the same tests. That is how we know the suite
can fail at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest
from lmcache_conformance import BackendTests
from lmcache_example_plugin.backend import ExampleBackend, raw_store

from lmcache.backends.base import STORED, PutResult, StorageBackend, check_dst_size
from lmcache.errors import IntegrityError
from lmcache.keys import CacheKey
from lmcache.serde.frame import decode_frame, encode_header, parse_header


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
            ExampleBackend.__init__(self, self.settings)  # back to a new, never opened backend
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


class IgnoresScope(ExampleBackend):
    """Names a value by its chunk hash and only part of its scope: one ``ignored`` field is dropped.

    Two tenants whose keys differ only in that field share one value: a data leak.
    """

    ignored: ClassVar[str] = "tags"
    _blank: ClassVar[dict[str, Any]] = {
        "model": "any-model",
        "world_size": 1 << 16,
        "rank": 0,
        "dtype": "any-dtype",
        "tags": (),
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._listed: dict[str, CacheKey] = {}  # so listing still names the keys it was given

    def _unscoped(self, keys: list[CacheKey]) -> list[CacheKey]:
        return [dataclasses.replace(k, **{self.ignored: self._blank[self.ignored]}) for k in keys]

    def stored_name(self, key: CacheKey) -> str:
        """The name ``key``'s value is stored under (for the suite's bypass hook)."""
        return self._unscoped([key])[0].to_string()

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return await super()._contains(self._unscoped(keys))

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        return await super()._get_into(self._unscoped(keys), dsts)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        unscoped = self._unscoped(keys)
        results = await super()._put(unscoped, srcs)
        for key, u, r in zip(keys, unscoped, results, strict=True):
            if r is STORED:
                self._listed[u.to_string()] = key
        return results

    async def _delete(self, keys: list[CacheKey]) -> None:
        await super()._delete(self._unscoped(keys))

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        for name in list(self._data()):
            yield self._listed.get(name) or CacheKey.from_string(name)


class IgnoresModel(IgnoresScope):
    ignored = "model"


class IgnoresWorldSize(IgnoresScope):
    ignored = "world_size"


class IgnoresRank(IgnoresScope):
    ignored = "rank"


class IgnoresDtype(IgnoresScope):
    ignored = "dtype"


class IgnoresTags(IgnoresScope):
    ignored = "tags"


class DropsPastBatch32(ExampleBackend):
    """Stores the first 32 values of a batch and reports the rest STORED without storing them."""

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        results = await super()._put(keys[:32], srcs[:32])
        return results + [STORED] * (len(keys) - 32)


class LeaksTask(ExampleBackend):
    """Starts a heartbeat task when it opens and forgets to cancel it when it closes."""

    beats = 0

    async def _open(self) -> None:
        await super()._open()

        async def heartbeat() -> None:
            while True:
                await asyncio.sleep(0.05)
                self.beats += 1

        self._heartbeat = asyncio.get_running_loop().create_task(heartbeat())


class LeaksThread(ExampleBackend):
    """Starts a flusher thread when it opens and never tells it to stop."""

    async def _open(self) -> None:
        await super()._open()
        self._stop = threading.Event()  # _close never sets it
        # A daemon, so that the leak cannot keep the mutant run's process alive.
        self._flusher = threading.Thread(target=self._flush_until_stopped, name="example-flusher", daemon=True)
        self._flusher.start()

    def _flush_until_stopped(self) -> None:
        while not self._stop.wait(0.05):
            pass


class LosesValuesUnderAValueCap(ExampleBackend):
    """Declares a cap on single values (not a capacity), yet loses a held value now and then.

    Deleting a key it does not hold removes the oldest value it does hold (think of an index
    that falls back to slot 0). With ``max_value_bytes`` set, the model test used to allow it
    misses as if it were bounded.
    """

    capabilities = dataclasses.replace(ExampleBackend.capabilities, max_value_bytes=64 << 20)

    async def _delete(self, keys: list[CacheKey]) -> None:
        data = self._data()
        for key in keys:
            if data.pop(key.to_string(), None) is None and data:
                data.pop(next(iter(data)))


class KeepsDeletedBytes(ExampleBackend):
    """Hides deleted values behind tombstones and never frees their stored bytes (a storage leak)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deleted: set[str] = set()

    def _visible(self, keys: list[CacheKey]) -> list[int]:
        return [i for i, k in enumerate(keys) if k.to_string() not in self._deleted]

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        found = await super()._contains(keys)
        return [hit and k.to_string() not in self._deleted for k, hit in zip(keys, found, strict=True)]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        visible = self._visible(keys)
        got = await super()._get_into([keys[i] for i in visible], [dsts[i] for i in visible])
        out: list[int | None] = [None] * len(keys)
        for i, n in zip(visible, got, strict=True):
            out[i] = n
        return out

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        for key in keys:
            if key.to_string() in self._deleted:  # storing again replaces the hidden value
                self._deleted.discard(key.to_string())
                self._data().pop(key.to_string(), None)
        return await super()._put(keys, srcs)

    async def _delete(self, keys: list[CacheKey]) -> None:
        data = self._data()
        self._deleted.update(k.to_string() for k in keys if k.to_string() in data)

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key in super()._list_keys():
            if key.to_string() not in self._deleted:
                yield key


class ServesTruncatedValues(ExampleBackend):
    """Serves what is left of a value cut short in storage, checking the payload only when whole."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out: list[int | None] = []
        for key, dst in zip(keys, dsts, strict=True):
            frame = self._data().get(key.to_string())
            if frame is None:
                out.append(None)
                continue
            header = parse_header(frame, key)
            payload = memoryview(frame)[header.payload_offset : header.total_len]
            if len(payload) == header.payload_len:
                header.verify_payload(payload)
            dst[: len(payload)] = payload
            out.append(len(payload))
        return out


class SkipsKeyCheck(ExampleBackend):
    """Checks each value's checksum but not the key its frame names."""

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out: list[int | None] = []
        for key, dst in zip(keys, dsts, strict=True):
            frame = self._data().get(key.to_string())
            if frame is None:
                out.append(None)
                continue
            try:
                _, payload = decode_frame(frame)  # no expected key: any valid frame passes
            except IntegrityError as exc:
                self.record_corrupt(key, exc)
                out.append(None)
                continue
            check_dst_size(key, dst, payload.nbytes)
            dst[: payload.nbytes] = payload
            out.append(payload.nbytes)
        return out


class ExampleSuite(BackendTests):
    """The suite against ``backend_cls``; subclasses pick the mutant."""

    backend_cls: ClassVar[type[ExampleBackend]] = ExampleBackend
    url_options: ClassVar[str] = ""
    # A mutant only has to fail; shrinking its failing sequence took minutes on a slow CI box.
    hypothesis_shrink: ClassVar[bool] = False
    # A leaked thread only has to be seen; the example backend starts none of its own.
    close_grace_seconds: ClassVar[float] = 0.5

    def make_backend(self) -> StorageBackend:
        return self.backend_cls.from_url(f"example://mutant-{uuid.uuid4().hex}{self.url_options}")

    @pytest.fixture
    def secret_url(self) -> str:
        return "example://secrets?token=tok-5d1e0b9a"

    # The bypass hooks; corrupt_value comes from them (the suite flips the last stored byte).
    def _stored_name(self, backend: StorageBackend, key: CacheKey) -> str:
        return backend.stored_name(key) if isinstance(backend, IgnoresScope) else key.to_string()

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        return raw_store(backend.settings.name).get(self._stored_name(backend, key))  # type: ignore[attr-defined]

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        raw_store(backend.settings.name)[self._stored_name(backend, key)] = data  # type: ignore[attr-defined]


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


class TestIgnoresModel(ExampleSuite):
    backend_cls = IgnoresModel


class TestIgnoresWorldSize(ExampleSuite):
    backend_cls = IgnoresWorldSize


class TestIgnoresRank(ExampleSuite):
    backend_cls = IgnoresRank


class TestIgnoresDtype(ExampleSuite):
    backend_cls = IgnoresDtype


class TestIgnoresTags(ExampleSuite):
    backend_cls = IgnoresTags


class TestDropsPastBatch32(ExampleSuite):
    backend_cls = DropsPastBatch32


class TestLeaksTask(ExampleSuite):
    backend_cls = LeaksTask


class TestLeaksThread(ExampleSuite):
    backend_cls = LeaksThread


class TestLosesValuesUnderAValueCap(ExampleSuite):
    backend_cls = LosesValuesUnderAValueCap


class TestKeepsDeletedBytes(ExampleSuite):
    backend_cls = KeepsDeletedBytes


class TestServesTruncatedValues(ExampleSuite):
    backend_cls = ServesTruncatedValues


class TestSkipsKeyCheck(ExampleSuite):
    backend_cls = SkipsKeyCheck


#: Mutant class -> suite tests that must fail for it (and pass for ``TestUnbroken``).
EXPECTED_FAILURES: dict[str, tuple[str, ...]] = {
    "TestLastWriterWins": (
        "test_put_is_idempotent_first_writer_wins",
        "test_stateful_against_a_dict_model",
        "test_raw_bytes_follow_put_and_delete",
    ),
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
    # A name with [parameter] must fail in that parametrisation; the message names the rule.
    "TestIgnoresModel": ("test_scope_is_part_of_key_identity[model]",),
    "TestIgnoresWorldSize": ("test_scope_is_part_of_key_identity[world_size]",),
    "TestIgnoresRank": ("test_scope_is_part_of_key_identity[rank]",),
    "TestIgnoresDtype": ("test_scope_is_part_of_key_identity[dtype]",),
    "TestIgnoresTags": (
        "test_scope_is_part_of_key_identity[tag_value]",
        "test_scope_is_part_of_key_identity[tag_name]",
        "test_scope_is_part_of_key_identity[no_tags]",
        "test_scope_is_part_of_key_identity[extra_tag]",
    ),
    "TestDropsPastBatch32": ("test_large_batch_of_small_values",),
    "TestLeaksTask": ("test_aclose_leaves_no_tasks_or_threads",),
    "TestLeaksThread": ("test_aclose_leaves_no_tasks_or_threads",),
    "TestLosesValuesUnderAValueCap": ("test_stateful_against_a_dict_model",),
    # Caught only through the bypass hooks (read_raw/write_raw): the backend's own methods agree.
    "TestKeepsDeletedBytes": ("test_raw_bytes_follow_put_and_delete",),
    "TestServesTruncatedValues": ("test_truncated_value_is_a_counted_miss",),
    "TestSkipsKeyCheck": ("test_value_under_another_key_is_a_counted_miss",),
}

#: Words each mutant's failure message must contain: the rule it broke, named.
EXPECTED_MESSAGES: dict[str, str] = {
    "TestIgnoresModel": "scope isolation (model)",
    "TestIgnoresWorldSize": "scope isolation (world_size)",
    "TestIgnoresRank": "scope isolation (rank)",
    "TestIgnoresDtype": "scope isolation (dtype)",
    "TestIgnoresTags": "scope isolation (",
    "TestDropsPastBatch32": "large batch: 268 of 300 values reported STORED are not held",
    "TestLeaksTask": "close leaks tasks",
    "TestLeaksThread": "close leaks threads",
    "TestLosesValuesUnderAValueCap": "exact: not bounded",
    "TestKeepsDeletedBytes": "a delete left the value's stored bytes behind",
    "TestServesTruncatedValues": "was returned as a hit",
    "TestSkipsKeyCheck": "another key's value was returned as a hit",
}
