"""Model mixin: random call sequences checked against a dict (Hypothesis state machine).

This module may import only ``lmcache``'s public contract and the suite's own test dependencies.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np
import pytest

from lmcache.backends.base import PutResult, PutStatus
from lmcache.keys import CacheKey

from .base import SuiteBase
from .support import SENTINEL, private_hypothesis_home, random_key, untouched

__all__ = ["ModelTests"]


class ModelTests(SuiteBase):
    """Random put/get/delete/contains/lookup_prefix sequences agree with a dict (first writer wins).

    Attributes:
        hypothesis_max_examples: Examples of the stateful model test.
        hypothesis_steps: Steps per example of the stateful model test.
        hypothesis_shrink: Shrink a failing sequence to a minimal one. Shrinking is unbounded
            in steps and can take minutes on a slow machine; turn it off where only
            "does it fail" matters (the suite's own mutant run).
    """

    hypothesis_max_examples: ClassVar[int] = 25
    hypothesis_steps: ClassVar[int] = 25
    hypothesis_shrink: ClassVar[bool] = True

    def test_stateful_against_a_dict_model(self) -> None:
        """Random put/get/delete/contains sequences agree with a dict (first writer wins)."""
        pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
        from hypothesis import HealthCheck, Phase, settings
        from hypothesis import strategies as st
        from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

        suite = self
        max_value = 2048
        n_keys = 6
        index = st.integers(0, n_keys - 1)
        values = st.binary(max_size=max_value)

        class BackendModel(RuleBasedStateMachine):
            def __init__(self) -> None:
                super().__init__()
                self.loop = asyncio.new_event_loop()
                self.backend = suite.make_backend()
                self.keys = [random_key("stateful") for _ in range(n_keys)]
                self.model: dict[CacheKey, bytes] = {}
                # Steps so far, quoted in failures: a backend with background work can fail in a
                # way Hypothesis cannot replay, and then this is the only trace of what happened.
                self.history: list[str] = []
                caps = self.backend.capabilities
                # Only a backend that declares a capacity (bounded) may reject puts for room or
                # lose values to a tier's eviction policy. A cap on single values is no licence
                # to lose anything: values over it are rejected as too large, and that is all.
                self.exact = not caps.bounded
                self.max_value_bytes = caps.max_value_bytes
                self.run(self.backend.open())

            def run(self, coro: Any) -> Any:
                return self.loop.run_until_complete(coro)

            def name(self, key: CacheKey) -> str:
                return f"k{self.keys.index(key)}"

            def check(self, ok: bool, what: str) -> None:
                if not ok:
                    steps = "\n  ".join(self.history[-40:])
                    mode = "exact: not bounded, so no misses allowed" if self.exact else "bounded: misses allowed"
                    raise AssertionError(f"{what} ({mode}); steps so far:\n  {steps}")

            @rule(items=st.lists(st.tuples(index, values), max_size=4))
            def put(self, items: list[tuple[int, bytes]]) -> None:
                keys = [self.keys[i] for i, _ in items]
                results = self.run(self.backend.put(keys, [v for _, v in items]))
                self.history.append(
                    f"put({[f'{self.name(k)}:{len(v)}B' for k, (_, v) in zip(keys, items, strict=True)]})"
                    f" -> {[r.status.value for r in results]}"
                )
                self.check(len(results) == len(items), "put returned the wrong number of results")
                first: dict[CacheKey, PutResult] = {}
                for k, (_, v), r in zip(keys, items, results, strict=True):
                    n = self.name(k)
                    if k in first:
                        # A duplicate in the batch follows its first occurrence.
                        expected = PutStatus.EXISTS if first[k].ok else PutStatus.REJECTED
                        self.check(r.status is expected, f"duplicate {n} in one put reported {r.status.value}")
                        continue
                    first[k] = r
                    if r.status is PutStatus.STORED:
                        self.check(not self.exact or k not in self.model, f"held key {n} was stored again")
                        self.model[k] = v
                    elif r.status is PutStatus.EXISTS:
                        self.check(k in self.model, f"put reported EXISTS for {n}, which is not held")
                    elif self.max_value_bytes is not None and len(v) > self.max_value_bytes:
                        self.check(r.reason == "too_large", f"{n} over max_value_bytes rejected as {r.reason}")
                    else:
                        self.check(not self.exact, f"a backend without bounded=True rejected {n}: {r}")

            @rule(idx=st.lists(index, max_size=5))
            def get(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                dsts = [np.full(max_value, SENTINEL, dtype=np.uint8) for _ in keys]
                got = self.run(self.backend.get_into(keys, dsts))
                self.history.append(f"get_into({[self.name(k) for k in keys]}) -> {got}")
                for k, n, d in zip(keys, got, dsts, strict=True):
                    if n is None:
                        self.check(not self.exact or k not in self.model, f"held key {self.name(k)} read as a miss")
                        self.check(untouched(d.tobytes()), f"a miss of {self.name(k)} wrote into its buffer")
                    else:
                        self.check(k in self.model, f"{self.name(k)} read as a hit but was deleted or never stored")
                        self.check(d[:n].tobytes() == self.model[k], f"{self.name(k)} read other bytes than stored")
                        self.check(untouched(d[n:].tobytes()), f"get_into of {self.name(k)} wrote past the value")

            @rule(idx=st.lists(index, max_size=5))
            def contains(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                found = self.run(self.backend.contains(keys))
                self.history.append(f"contains({[self.name(k) for k in keys]}) -> {found}")
                for k, hit in zip(keys, found, strict=True):
                    if hit:
                        self.check(k in self.model, f"contains reported {self.name(k)}, deleted or never stored")
                    else:
                        self.check(not self.exact or k not in self.model, f"contains missed held {self.name(k)}")

            @rule(idx=st.lists(index, max_size=3))
            def delete(self, idx: list[int]) -> None:
                keys = [self.keys[i] for i in idx]
                self.run(self.backend.delete(keys))
                self.history.append(f"delete({[self.name(k) for k in keys]})")
                for k in keys:
                    self.model.pop(k, None)

            @rule()
            def lookup_prefix(self) -> None:
                n = self.run(self.backend.lookup_prefix(self.keys))
                self.history.append(f"lookup_prefix(k0..k{n_keys - 1}) -> {n}")
                expected = 0
                while expected < n_keys and self.keys[expected] in self.model:
                    expected += 1
                if self.exact:
                    self.check(n == expected, f"lookup_prefix returned {n}, expected {expected}")
                else:
                    self.check(n <= expected, f"lookup_prefix returned {n}, more than the {expected} held")

            @invariant()
            def still_open(self) -> None:
                self.check(self.backend.is_open, "the backend closed itself")

            @invariant()
            def holds_what_the_model_holds(self) -> None:
                # After every step, not only when a rule happens to read the key back: a lost
                # delete or a lost put shows up at the step that caused it.
                if not self.exact:
                    return
                found = self.run(self.backend.contains(self.keys))
                for k, hit in zip(self.keys, found, strict=True):
                    self.check(hit == (k in self.model), f"contains({self.name(k)}) is {hit} after the last step")

            def teardown(self) -> None:
                try:
                    self.run(suite._close_cleanly(self.backend))
                finally:
                    self.loop.close()

        # Never write a .hypothesis folder into a user's project: no example database, and the
        # rest of Hypothesis's storage goes to a temporary folder.
        with private_hypothesis_home():
            run_state_machine_as_test(
                BackendModel,
                settings=settings(
                    max_examples=self.hypothesis_max_examples,
                    stateful_step_count=self.hypothesis_steps,
                    deadline=None,
                    database=None,
                    phases=tuple(Phase) if self.hypothesis_shrink else tuple(p for p in Phase if p is not Phase.shrink),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                ),
            )
