"""The conformance suite's per-topic mixins compose into ``BackendTests`` and into partial suites.

``BackendTests`` holds exactly the tests of its mixins, each defined once; a backend may compose
only some mixins; and ``corrupt_value`` comes from the ``read_raw``/``write_raw`` bypass hooks
when a test class implements both.
"""

from __future__ import annotations

import asyncio
import inspect

import pytest
from lmcache_conformance import (
    ArgumentTests,
    BackendTests,
    BatchTests,
    CancellationTests,
    ConcurrencyTests,
    HealthTests,
    IntegrityTests,
    LifecycleTests,
    ListingTests,
    ModelTests,
    RoundTripTests,
    ScopeIsolationTests,
    SuiteBase,
    UrlTests,
)

from lmcache.backends.base import StorageBackend
from lmcache.keys import CacheKey

MIXINS = (
    LifecycleTests,
    RoundTripTests,
    ArgumentTests,
    BatchTests,
    ScopeIsolationTests,
    CancellationTests,
    ConcurrencyTests,
    UrlTests,
    HealthTests,
    IntegrityTests,
    ListingTests,
    ModelTests,
)


def own_tests(cls: type) -> set[str]:
    return {name for name, obj in vars(cls).items() if name.startswith("test_") and inspect.isfunction(obj)}


def test_backend_tests_holds_each_mixins_tests_once() -> None:
    seen: dict[str, str] = {}
    for mixin in MIXINS:
        assert issubclass(mixin, SuiteBase) and issubclass(BackendTests, mixin)
        assert not mixin.__name__.startswith("Test"), "a mixin must not be collected on its own"
        for name in own_tests(mixin):
            assert name not in seen, f"{name} is defined by both {seen[name]} and {mixin.__name__}"
            seen[name] = mixin.__name__
    every = {name for name in dir(BackendTests) if name.startswith("test_")}
    assert every == set(seen)
    assert own_tests(BackendTests) == set(), "BackendTests only composes; its tests live in the mixins"
    assert len(every) >= 45


class TestPartialMemoryBackend(LifecycleTests, BatchTests):
    """A partial suite, as docs/plugins.md shows it: two mixins against memory://."""

    @pytest.fixture
    def backend_url(self) -> str:
        return "memory://?capacity=64MiB"


def test_a_partial_suite_holds_only_its_mixins_tests() -> None:
    names = {name for name in dir(TestPartialMemoryBackend) if name.startswith("test_")}
    assert names == own_tests(LifecycleTests) | own_tests(BatchTests)
    assert "test_round_trip_sources" not in names
    assert TestPartialMemoryBackend.large_batch_values == 300  # the mixin's knob comes along


class _ReadOnlyHook(IntegrityTests):
    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        return b"stored"


class _DictHooks(IntegrityTests):
    def __init__(self) -> None:
        self.stored: dict[CacheKey, bytes] = {}

    async def read_raw(self, backend: StorageBackend, key: CacheKey) -> bytes | None:
        return self.stored.get(key)

    async def write_raw(self, backend: StorageBackend, key: CacheKey, data: bytes) -> None:
        self.stored[key] = data


KEY = CacheKey("m", 1, 0, b"\x01" * 32, "uint8")


@pytest.mark.parametrize("suite_cls", [IntegrityTests, _ReadOnlyHook], ids=["no_hooks", "read_raw_only"])
def test_corrupt_value_is_not_implemented_without_both_raw_hooks(suite_cls: type[IntegrityTests]) -> None:
    with pytest.raises(NotImplementedError):
        asyncio.run(suite_cls().corrupt_value(None, KEY))  # type: ignore[arg-type]


def test_corrupt_value_comes_from_the_raw_hooks() -> None:
    suite = _DictHooks()
    suite.stored[KEY] = b"header+payload"
    asyncio.run(suite.corrupt_value(None, KEY))  # type: ignore[arg-type]
    assert suite.stored[KEY] == b"header+payloa" + bytes([ord("d") ^ 0xFF])
