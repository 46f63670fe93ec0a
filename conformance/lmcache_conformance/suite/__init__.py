"""``BackendTests``: the reusable conformance suite every ``StorageBackend`` must pass.

The suite is a set of per-topic mixins, each a module of this package and each a subclass of
:class:`~lmcache_conformance.suite.base.SuiteBase` (the hooks, fixtures and helpers they share):

=======================  ===================================================================
mixin                    what its tests check
=======================  ===================================================================
``LifecycleTests``       open/close idempotent, closed is final, lazy open, ``aclose`` leaks nothing
``RoundTripTests``       every size through every source and destination buffer kind
``ArgumentTests``        malformed calls raise ``InvalidArgumentError`` and change nothing
``BatchTests``           misses as data, order, large batches, duplicates, first writer wins, deletes
``ScopeIsolationTests``  model, world size, rank, dtype and tags are part of a key's identity
``CancellationTests``    cancelled calls write nothing late and leave no partial value
``ConcurrencyTests``     batches at once, readers beside writers, the event loop keeps ticking
``UrlTests``             URL round trip, unknown options refused, secrets kept out of repr
``HealthTests``          ``ping`` and the counters of ``stats()``
``IntegrityTests``       damaged values are counted misses (through the bypass hooks)
``ListingTests``         ``list_keys``/``list_entries``, or ``UnsupportedOperationError``
``ModelTests``           random call sequences agree with a dict (Hypothesis state machine)
=======================  ===================================================================

:class:`BackendTests` composes all of them. A backend's test module subclasses it (the base
class has no ``Test`` prefix, so pytest collects only the subclasses), or composes only the
mixins that apply to a partial backend, and provides ONE of:

* a fixture ``backend_url`` returning the URL to test (at class, module or conftest level), or
* an override of :meth:`SuiteBase.make_backend` returning a new, unopened backend.

Example::

    import pytest
    from lmcache_conformance import BackendTests

    class TestMyBackend(BackendTests):
        large_value_bytes = 1 << 20  # optional knobs, see the mixins' class attributes

        @pytest.fixture
        def backend_url(self, tmp_path):
            return f"mystore://{tmp_path}"

        async def read_raw(self, backend, key):  # optional bypass hooks
            ...  # the stored bytes of key, read without the backend's methods (None if absent)

        async def write_raw(self, backend, key, data):
            ...  # replace the stored bytes of key, without the backend's methods

The suite reads ``capabilities`` to decide what to check (listing, integrity checks, bounded
capacity) instead of guessing. It uses fresh random keys in every test, so it may run against
shared servers holding other data; on a persistent or shared backend it deletes the keys a test
stored when the test ends, and it closes every backend it opens. Async tests and fixtures use
pytest-asyncio explicitly, so the suite also runs in projects without ``asyncio_mode=auto``.

This package may import only ``lmcache``'s public contract (base, registry, keys, errors) and its
own test dependencies (pytest, pytest-asyncio, numpy; torch and hypothesis when installed).
"""

from __future__ import annotations

from .arguments import ArgumentTests
from .base import SuiteBase
from .batches import BatchTests
from .cancellation import CancellationTests
from .concurrency import ConcurrencyTests
from .health import HealthTests
from .integrity import IntegrityTests
from .lifecycle import LifecycleTests
from .listing import ListingTests
from .model import ModelTests
from .round_trip import RoundTripTests
from .scope import ScopeIsolationTests
from .support import SENTINEL, dest_bytes, expect_bytes, make_dest, make_source, random_key, random_value
from .urls import UrlTests

__all__ = [
    "SENTINEL",
    "ArgumentTests",
    "BackendTests",
    "BatchTests",
    "CancellationTests",
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
    "dest_bytes",
    "expect_bytes",
    "make_dest",
    "make_source",
    "random_key",
    "random_value",
]


class BackendTests(
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
):
    """The whole conformance suite; subclass it as ``TestXxx(BackendTests)``.

    Knobs (class attributes) a subclass may set, each documented on the mixin whose tests use
    it: ``large_value_bytes``, ``odd_value_bytes`` and ``clean_up_keys`` (:class:`SuiteBase`);
    ``close_grace_seconds`` (:class:`LifecycleTests`); ``large_batch_values``
    (:class:`BatchTests`); ``cancel_batch_values``, ``supports_cancellation_check``,
    ``cancelled_dst_all_or_nothing`` (:class:`CancellationTests`); ``loop_batch_bytes``,
    ``min_loop_ticks``, ``concurrent_batches``, ``concurrent_value_bytes``
    (:class:`ConcurrencyTests`); ``hypothesis_max_examples``, ``hypothesis_steps``,
    ``hypothesis_shrink`` (:class:`ModelTests`).

    Hooks a subclass may override: :meth:`~SuiteBase.make_backend` and the bypass hooks
    :meth:`~SuiteBase.read_raw`, :meth:`~SuiteBase.write_raw` and
    :meth:`~SuiteBase.corrupt_value` (derived from the other two when both exist); fixtures
    ``backend_url`` (required unless ``make_backend`` is overridden) and ``secret_url``
    (optional, a URL holding a password or secret option).
    """
