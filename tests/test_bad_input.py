"""Bad input every backend refuses alike, through the StorageBackend template methods (issue 17 §3).

Each check lives once in ``lmcache.backends.base``: a key whose text does not fit the value frame,
tags that are not strings, batches given as generators, and calls on a closed backend (empty
batches included). memory:// (which never builds key text), file:// (which frames values) and a
tiered stack of both must answer the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import lmcache
from lmcache.backends.base import StorageBackend
from lmcache.errors import BackendClosedError, InvalidArgumentError
from lmcache.keys import MAX_KEY_BYTES, CacheKey, KeyScope, check_key_length
from lmcache.tiered import TieredBackend

URLS = ["memory://?capacity=4MiB", "file://{tmp}/kv", "tiered"]


@pytest.fixture(params=URLS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    if request.param == "tiered":
        b: StorageBackend = TieredBackend.from_urls(["memory://?capacity=4MiB", f"file://{tmp_path}/t"])
    else:
        b = lmcache.open_backend(request.param.format(tmp=tmp_path))
    async with b:
        yield b


def _key(model: str, i: int = 0) -> CacheKey:
    return KeyScope.create(model).key(bytes([i]) * 32)


async def test_a_key_over_the_frame_limit_is_refused_by_every_backend(backend: StorageBackend) -> None:
    long_key = _key("m" * MAX_KEY_BYTES)
    ok = _key("m")
    with pytest.raises(InvalidArgumentError, match="over the limit"):
        await backend.put([ok, long_key], [b"a", b"b"])
    with pytest.raises(InvalidArgumentError):
        await backend.get_into([long_key], [bytearray(8)])
    with pytest.raises(InvalidArgumentError):
        await backend.contains([long_key])
    with pytest.raises(InvalidArgumentError):
        await backend.delete([long_key])
    assert await backend.contains([ok]) == [False]  # the batch was refused whole, before any write


async def test_long_tags_count_towards_the_limit(backend: StorageBackend) -> None:
    # Quoting writes each UTF-8 byte of a non-ASCII character as %XX: "é" takes 6 bytes of key text.
    key = KeyScope.create("m", tags={"tenant": "é" * (MAX_KEY_BYTES // 5)}).key(b"\x01" * 32)
    with pytest.raises(InvalidArgumentError):
        check_key_length(key)
    with pytest.raises(InvalidArgumentError):
        await backend.put([key], [b"x"])


async def test_generators_of_buffers_work(backend: StorageBackend) -> None:
    keys = [_key("m", i) for i in range(3)]
    results = await backend.put(iter(keys), (bytes([i]) * 10 for i in range(3)))
    assert all(r.ok for r in results)
    dsts = [bytearray(10) for _ in keys]
    assert await backend.get_into((k for k in keys), (d for d in dsts)) == [10, 10, 10]
    assert dsts == [bytearray([i]) * 10 for i in range(3)]
    with pytest.raises(InvalidArgumentError, match="2 buffers"):
        await backend.get_into(keys, (d for d in dsts[:2]))
    with pytest.raises(InvalidArgumentError, match="sequence"):
        await backend.get_into(keys, 5)  # type: ignore[arg-type]


async def test_every_call_after_close_raises_even_with_an_empty_batch(backend: StorageBackend) -> None:
    await backend.aclose()
    with pytest.raises(BackendClosedError):
        await backend.put([], [])
    with pytest.raises(BackendClosedError):
        await backend.get_into([], [])
    with pytest.raises(BackendClosedError):
        await backend.contains([])
    with pytest.raises(BackendClosedError):
        await backend.delete([])
    with pytest.raises(BackendClosedError):
        await backend.put([_key("m")], [b"x"])


def test_tags_must_be_strings() -> None:
    with pytest.raises(InvalidArgumentError, match="strings"):
        KeyScope.create("m", tags={"tenant": 5})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError, match="strings"):
        CacheKey("m", 1, 0, b"\x00" * 32, "float16", (("tenant", 5),))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        CacheKey("m", 1, 0, b"\x00" * 32, "float16", (("tenant",),))  # type: ignore[arg-type]


def test_a_key_with_int_tags_never_reaches_a_backend() -> None:
    # Before: memory:// stored it while file:// failed every put with a TypeError inside quoting.
    with pytest.raises(InvalidArgumentError):
        KeyScope("m", tags=(("tenant", 5),)).key(b"\x00" * 32)  # type: ignore[arg-type]
