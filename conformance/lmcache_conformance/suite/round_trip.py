"""Round-trip mixin: values of every size through every kind of source and destination buffer.

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from lmcache.backends.base import StorageBackend
from lmcache.errors import BackendClosedError, InvalidBufferError

from .base import SuiteBase
from .support import (
    DEST_KINDS,
    SENTINEL,
    SIZES,
    SOURCE_KINDS,
    KiB,
    dest_bytes,
    expect_bytes,
    import_torch,
    make_dest,
    make_source,
    random_key,
    random_value,
    untouched,
)

__all__ = ["RoundTripTests"]


class RoundTripTests(SuiteBase):
    """Values come back byte for byte, through every kind of buffer.

    Sources and destinations are bytes, bytearray, memoryview, numpy, torch and registered host
    memory; buffers that cannot take a value raise ``InvalidBufferError``; nothing is written
    outside a value's bytes, and a source may be reused once ``put`` returns.
    """

    @pytest.mark.asyncio
    @pytest.mark.parametrize("src_kind", SOURCE_KINDS)
    @pytest.mark.parametrize("size_name", list(SIZES))
    async def test_round_trip_sources(self, backend: StorageBackend, size_name: str, src_kind: str) -> None:
        n = self._size(size_name)
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [make_source(src_kind, value)])
        assert await backend.contains([key]) == [True]
        expect_bytes(await self.read(backend, key, n), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("dst_kind", DEST_KINDS)
    @pytest.mark.parametrize("size_name", list(SIZES))
    async def test_round_trip_destinations(self, backend: StorageBackend, size_name: str, dst_kind: str) -> None:
        n = self._size(size_name)
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [value])
        dst = make_dest(dst_kind, n)
        assert await backend.get_into([key], [dst]) == [n]
        expect_bytes(dest_bytes(dst), value)
        if isinstance(dst, memoryview):  # a window into a larger buffer: nothing outside it changes
            parent = bytes(dst.obj)  # type: ignore[arg-type]
            assert untouched(parent[:8] + parent[8 + n :]), "get_into wrote outside its memoryview"

    @pytest.mark.asyncio
    @pytest.mark.parametrize("when", ["before_open", "after_open"])
    async def test_registered_host_memory_round_trip(self, when: str) -> None:
        """Values move through views of registered host memory, then through it once unregistered."""
        n = self.odd_value_bytes
        pool = np.full(4 * n + 24, SENTINEL, dtype=np.uint8)
        keys = [random_key(), random_key(), random_key()]
        values = [random_value(n) for _ in keys]
        async with self.fresh_backend() as b:
            self._require_fits(b, n)
            if when == "after_open":
                await b.open()
            await b.register_host_memory(pool)
            await b.register_host_memory(pool)  # a second time changes nothing
            srcs = [pool[8 + i * n : 8 + (i + 1) * n] for i in range(3)]
            for src, value in zip(srcs, values, strict=True):
                src[:] = np.frombuffer(value, dtype=np.uint8)
            await self.put_all(b, keys, srcs)
            pool[:] = SENTINEL
            assert await b.get_into(keys, [pool[8 + i * n : 8 + (i + 1) * n] for i in range(3)]) == [n] * 3
            for i, value in enumerate(values):
                expect_bytes(pool[8 + i * n : 8 + (i + 1) * n].tobytes(), value)
            assert untouched(pool[:8].tobytes() + pool[8 + 3 * n :].tobytes()), "wrote outside its views"
            await b.unregister_host_memory(pool)
            await b.unregister_host_memory(pool)  # unknown by now: ignored
            pool[:] = SENTINEL
            assert await b.get_into(keys[:1], [pool[8 : 8 + n]]) == [n]
            expect_bytes(pool[8 : 8 + n].tobytes(), values[0])

    @pytest.mark.asyncio
    async def test_registering_host_memory_checks_its_input(self) -> None:
        async with self.fresh_backend() as b:
            with pytest.raises(InvalidBufferError):
                await b.register_host_memory(object())
            await b.register_host_memory(bytearray())  # nothing to register
            await b.aclose()
            with pytest.raises(BackendClosedError):
                await b.register_host_memory(bytearray(16))

    @pytest.mark.asyncio
    async def test_device_buffers(self, backend: StorageBackend) -> None:
        torch = import_torch()
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device: device buffers are checked on a GPU machine")
        key, value = random_key(), random_value(64 * KiB)
        src = torch.frombuffer(bytearray(value), dtype=torch.uint8).cuda()
        if not backend.capabilities.device_buffers:
            with pytest.raises(InvalidBufferError):
                await backend.put([key], [src])
            await self.put_all(backend, [key], [value])
            with pytest.raises(InvalidBufferError):
                await backend.get_into([key], [torch.zeros(64 * KiB, dtype=torch.uint8, device="cuda")])
            return
        await self.put_all(backend, [key], [src])
        dst = torch.full((64 * KiB + 7,), SENTINEL, dtype=torch.uint8, device="cuda")
        assert await backend.get_into([key], [dst]) == [64 * KiB]
        host = dst.cpu().numpy().tobytes()
        expect_bytes(host[: 64 * KiB], value)
        assert untouched(host[64 * KiB :]), "get_into wrote past the end of the value"

    @pytest.mark.asyncio
    async def test_get_into_larger_dst_writes_only_the_value(self, backend: StorageBackend) -> None:
        n = self.odd_value_bytes
        self._require_fits(backend, n)
        key, value = random_key(), random_value(n)
        await self.put_all(backend, [key], [value])
        dst = np.full(n + 4097, SENTINEL, dtype=np.uint8)
        assert await backend.get_into([key], [dst]) == [n]
        expect_bytes(dst[:n].tobytes(), value)
        assert untouched(dst[n:].tobytes()), "get_into wrote past the end of the value"

    @pytest.mark.asyncio
    async def test_get_into_too_small_dst_raises(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(1000)
        await self.put_all(backend, [key], [value])
        with pytest.raises(InvalidBufferError):
            await backend.get_into([key], [bytearray(999)])
        # The failed call leaves the value intact.
        expect_bytes(await self.read(backend, key, 1000), value)

    @pytest.mark.asyncio
    @pytest.mark.parametrize("kind", ["bytes", "readonly_numpy", "readonly_memoryview"])
    async def test_get_into_read_only_dst_raises(self, backend: StorageBackend, kind: str) -> None:
        key, value = random_key(), random_value(64)
        await self.put_all(backend, [key], [value])
        if kind == "bytes":
            dst: Any = bytes(64)
        elif kind == "readonly_numpy":
            dst = np.zeros(64, dtype=np.uint8)
            dst.flags.writeable = False
        else:
            dst = memoryview(bytes(64))
        with pytest.raises(InvalidBufferError):
            await backend.get_into([key], [dst])

    @pytest.mark.asyncio
    async def test_source_mutation_after_put_does_not_change_value(self, backend: StorageBackend) -> None:
        key, value = random_key(), random_value(4096)
        src = bytearray(value)
        await self.put_all(backend, [key], [src])
        src[:] = b"\x00" * len(src)
        expect_bytes(await self.read(backend, key, 4096), value)
