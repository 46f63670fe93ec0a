"""The reusable StorageBackend conformance suite, shipped as a pytest plugin.

Subclass :class:`BackendTests` in a backend's test module (see :mod:`lmcache_conformance.suite`),
or compose only the per-topic mixins that apply to a partial backend (``LifecycleTests``,
``RoundTripTests``, ``BatchTests``, ``CancellationTests``, ``IntegrityTests``…), or run it with
no code against any URL::

    pytest --pyargs lmcache_conformance --lmcache-backend-url='memory://?capacity=1GiB'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

# Rewrite the suite's asserts (readable failures) even where it is imported as a library; the
# name covers every module of the suite package.
pytest.register_assert_rewrite("lmcache_conformance.suite")

if TYPE_CHECKING:
    from lmcache_conformance.codecs import CodecTests
    from lmcache_conformance.suite import (
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
        expect_bytes,
    )

__all__ = [
    "ArgumentTests",
    "BackendTests",
    "BatchTests",
    "CancellationTests",
    "CodecTests",
    "ConcurrencyTests",
    "HealthTests",
    "IntegrityTests",
    "LifecycleTests",
    "ListingTests",
    "ModelTests",
    "RoundTripTests",
    "ScopeIsolationTests",
    "SuiteBase",
    "UrlTests",
    "expect_bytes",
]


def __getattr__(name: str) -> Any:
    # Lazy: the pytest11 entry point imports this package in every pytest run of every project
    # where lmcache is installed; lmcache, numpy and the suite load only when someone uses them.
    if name == "CodecTests":
        from lmcache_conformance.codecs import CodecTests

        return CodecTests
    if name in __all__:
        from lmcache_conformance import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
