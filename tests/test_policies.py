"""Tests of the eviction policies: order, byte accounting, protection and the name registry."""

from __future__ import annotations

import pytest

from lmcache.config import LMCacheConfig
from lmcache.errors import ConfigError
from lmcache.keys import CacheKey
from lmcache.policies import _REGISTRY as REGISTRY
from lmcache.policies import (
    EvictionPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    make_policy,
    policy_names,
    register_policy,
)


def key(i: int) -> CacheKey:
    return CacheKey("test-model", 1, 0, i.to_bytes(32, "big"), "float16")


def filled(policy: EvictionPolicy, n: int, size: int = 10) -> EvictionPolicy:
    for i in range(n):
        policy.on_insert(key(i), size)
    return policy


@pytest.mark.parametrize("cls", [LRUPolicy, FIFOPolicy, LFUPolicy, S3FIFOPolicy])
def test_victims_cover_the_bytes_asked_for_in_insert_order_when_untouched(cls: type[EvictionPolicy]) -> None:
    p = filled(cls(), 5)
    assert p.victims(25) == [key(0), key(1), key(2)]  # 30 bytes >= 25
    assert p.victims(10) == [key(0)]
    assert p.victims(0) == []
    assert p.victims(10_000) == [key(i) for i in range(5)]  # all it knows, even if short
    # victims() only proposes: nothing was forgotten.
    assert len(p) == 5 and p.tracked_bytes == 50


@pytest.mark.parametrize("cls", [LRUPolicy, FIFOPolicy, LFUPolicy, S3FIFOPolicy])
def test_byte_accounting_through_insert_reinsert_and_remove(cls: type[EvictionPolicy]) -> None:
    p = cls()
    p.on_insert(key(1), 100)
    p.on_insert(key(2), 50)
    p.on_insert(key(1), 70)  # a re-insert replaces the size, it does not add a second entry
    assert len(p) == 2 and p.tracked_bytes == 120
    p.on_remove(key(1))
    p.on_remove(key(99))  # unknown keys are ignored
    p.on_access(key(99))
    assert key(1) not in p and key(2) in p
    assert len(p) == 1 and p.tracked_bytes == 50
    p.on_remove(key(2))
    assert len(p) == 0 and p.tracked_bytes == 0 and p.victims(1) == []


@pytest.mark.parametrize("cls", [LRUPolicy, FIFOPolicy, LFUPolicy, S3FIFOPolicy])
def test_protected_keys_are_never_proposed(cls: type[EvictionPolicy]) -> None:
    p = filled(cls(), 4)
    assert p.victims(20, protected={key(0), key(2)}) == [key(1), key(3)]
    assert p.victims(100, protected={key(i) for i in range(4)}) == []


def test_lru_access_moves_a_key_to_the_back() -> None:
    p = filled(LRUPolicy(), 4)
    p.on_access(key(0))
    p.on_access(key(2))
    assert p.victims(40) == [key(1), key(3), key(0), key(2)]
    p.on_insert(key(1), 10)  # re-inserting counts as use
    assert p.victims(10) == [key(3)]


def test_fifo_ignores_reads_and_reinserts() -> None:
    p = filled(FIFOPolicy(), 3)
    p.on_access(key(0))
    p.on_insert(key(0), 10)
    assert p.victims(30) == [key(0), key(1), key(2)]


def test_lfu_evicts_the_least_used_first_ties_by_age() -> None:
    p = filled(LFUPolicy(), 4)
    for _ in range(3):
        p.on_access(key(0))
    p.on_access(key(1))
    p.on_access(key(3))
    # counts: k0=4, k1=2, k2=1, k3=2 → k2, then k1 before k3 (it reached 2 first), then k0
    assert p.victims(40) == [key(2), key(1), key(3), key(0)]
    p.on_remove(key(2))
    p.on_insert(key(2), 10)  # a removed key starts over at 1
    assert p.victims(10) == [key(2)]


def test_lfu_reinsert_keeps_the_count() -> None:
    p = filled(LFUPolicy(), 2)
    p.on_access(key(0))
    p.on_insert(key(0), 99)
    assert p.victims(10) == [key(1)]
    assert p.tracked_bytes == 109


def run_cache(policy: EvictionPolicy, capacity: int, trace: list[int], size: int = 10) -> set[int]:
    """Replay ``trace`` through a cache of ``capacity`` bytes; return the ids held at the end."""
    held: set[int] = set()
    for i in trace:
        if i in held:
            policy.on_access(key(i))
            continue
        if policy.tracked_bytes + size > capacity:
            for victim in policy.victims(policy.tracked_bytes + size - capacity):
                policy.on_remove(victim)
                held.discard(int.from_bytes(victim.chunk_hash, "big"))
        policy.on_insert(key(i), size)
        held.add(i)
        assert policy.tracked_bytes <= capacity and len(policy) == len(held)
    return held


def test_s3fifo_keeps_a_hot_set_through_a_one_hit_scan() -> None:
    hot = list(range(5))
    warm = hot * 3  # inserted, then read twice: they graduate to the main queue
    scan = list(range(100, 160))  # sixty keys seen once, far more than fit
    assert set(hot) <= run_cache(S3FIFOPolicy(), 100, warm + scan)  # washed through the small queue
    assert not set(hot) & run_cache(LRUPolicy(), 100, warm + scan)  # LRU lost them all
    assert not set(hot) & run_cache(FIFOPolicy(), 100, warm + scan)


def test_s3fifo_ghost_hits_go_straight_to_main() -> None:
    p = S3FIFOPolicy()
    for i in range(10):
        p.on_insert(key(i), 10)
    (victim,) = p.victims(10)
    assert victim == key(0)
    p.on_remove(victim)  # evicted unread: remembered as a ghost
    p.on_insert(key(0), 10)  # back quickly: main queue, so the small queue is drained first
    assert key(0) not in p.victims(90)


def test_s3fifo_rejects_a_bad_ratio() -> None:
    with pytest.raises(ConfigError):
        S3FIFOPolicy(small_ratio=1.5)


def test_every_registered_name_is_a_valid_config_choice() -> None:
    assert {"lru", "fifo", "lfu", "s3fifo"} <= set(policy_names())
    for name in policy_names():
        assert LMCacheConfig.load(environ={}, eviction_policy=name.upper()).eviction_policy == name
        assert isinstance(make_policy(name)(), EvictionPolicy)
    with pytest.raises(ConfigError, match="eviction_policy"):
        LMCacheConfig.load(environ={}, eviction_policy="mru")
    assert isinstance(make_policy("s3fifo")(), S3FIFOPolicy)
    assert isinstance(make_policy("LRU")(), LRUPolicy)


def test_unknown_policy_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown eviction policy .mru.*fifo.*lfu.*lru.*s3fifo"):
        make_policy("mru")


def test_register_a_custom_policy_and_pass_factories_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lmcache.policies._REGISTRY", dict(REGISTRY))

    class Newest(LRUPolicy):
        """Evicts the most recent key first (a policy written by a user)."""

        def victims(self, n_bytes, protected=frozenset()):  # type: ignore[no-untyped-def]
            return list(reversed(super().victims(self.tracked_bytes, protected)))[:1]

    register_policy("newest", Newest)
    assert make_policy("newest") is Newest
    assert "newest" in policy_names()
    with pytest.raises(ConfigError, match="already registered"):
        register_policy("lru", Newest)
    register_policy("lru", Newest, replace=True)
    assert make_policy("lru") is Newest

    def factory() -> EvictionPolicy:
        return FIFOPolicy()

    assert make_policy(factory) is factory
