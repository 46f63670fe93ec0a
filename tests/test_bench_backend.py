"""``lmcache bench backend`` / ``bench keys``: tiny workloads through the real CLI, plus the checks
that stop a broken backend from posting numbers (fault-injecting fakes on top of memory://)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lmcache.backends import registry
from lmcache.backends.base import PutResult, PutStatus
from lmcache.backends.memory import MemoryBackend
from lmcache.bench import backend as bench_backend
from lmcache.bench import baselines, report
from lmcache.bench.backend import BenchParams, MemcpyBaseline, register_baseline, run_backend_bench
from lmcache.errors import BackendError, CapacityError, ConfigError, IntegrityError
from lmcache.keys import CacheKey

TINY = ["--value-size", "64KiB", "--count", "6", "--batch", "2", "--concurrency", "2", "--repeat", "2"]


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=180,
    )


def check_phase(phase: dict[str, Any]) -> None:
    assert phase["gbps"] > 0
    assert phase["wall_s"] > 0
    assert 0 < phase["p50_ms"] <= phase["p99_ms"]


def check_result(data: dict[str, Any], scheme: str, baseline_name: str | None, rounds: int) -> None:
    assert data["workload"] == "backend"
    assert data["scheme"] == scheme
    p = data["params"]
    assert (p["value_size"], p["count"], p["batch"], p["concurrency"], p["repeat"]) == (64 << 10, 6, 2, 2, 2)
    assert p["round_bytes"] == 6 * (64 << 10)
    assert len(data["rounds"]) == rounds
    for r in data["rounds"]:
        systems = ["backend"] + (["baseline"] if baseline_name else [])
        assert sorted(r["order"]) == sorted(systems)
        for system in systems:
            for op in ("put", "get"):
                check_phase(r[system][op])
                assert r[system][op]["batches"] == 3
    # Rounds alternate which system runs first.
    if baseline_name and rounds >= 2:
        assert data["rounds"][0]["order"] != data["rounds"][1]["order"]
    for op in ("put", "get"):
        assert data["median"]["backend"][op]["gbps"] > 0
        if baseline_name:
            assert data["median"]["baseline"][op]["gbps"] > 0
            assert data["ratio"][f"{op}_gbps"] > 0
        else:
            assert data["ratio"][f"{op}_gbps"] is None
    if baseline_name:
        assert data["baseline"]["name"] == baseline_name
    else:
        assert data["baseline"] is None
    stats = data["backend_stats"]
    puts = p["count"] * rounds
    assert stats["stored"] == puts
    assert stats["hits"] == puts
    assert stats["misses"] == 0
    assert stats["corrupt"] == 0
    m = data["machine"]
    assert m["cpu_count"] >= 1
    assert m["python"].count(".") == 2
    assert m["platform"]


def test_memory_backend_bench_writes_valid_json(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "mem.json"
    proc = run_cli(
        "bench", "backend", "--url", "memory://?capacity=8MiB", *TINY, "--keys-tokens", "5000", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    assert "put" in proc.stdout and "baseline" in proc.stdout and "ChunkHasher" in proc.stdout
    data = json.loads(out.read_text())
    check_result(data, "memory", "memcpy", rounds=3)
    assert data["rounds"][0]["warmup"] is True
    assert data["params"]["capacity_override"] is None
    keys = data["keys"]
    assert keys["params"]["tokens"] == 5000
    assert keys["chunks"] == 5000 // 256
    assert keys["median"]["tokens_per_s"] > 0
    assert keys["median"]["ms_per_1m_tokens"] > 0
    # Every round deletes its keys: nothing is left in the pool.
    assert data["backend_stats"]["entries"] == 0
    assert data["backend_stats"]["used_bytes"] == 0


def test_file_backend_bench_writes_valid_json(tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = tmp_path / "file.json"
    proc = run_cli(
        "bench", "backend", "--url", f"file://{store}", *TINY, "--warmup", "0", "--keys-tokens", "0", "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    check_result(data, "file", "raw-file", rounds=2)
    assert "keys" not in data
    assert data["baseline"]["fsync"] in ("none", "data", "full")
    # The raw-file scratch directory is gone and the store holds none of the benchmark's keys.
    assert not [p for p in store.rglob("*") if ".lmcache-bench-baseline-" in p.name]
    proc = run_cli("ls", f"file://{store}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_default_json_path_and_no_baseline(tmp_path: Path) -> None:
    proc = run_cli(
        "bench", "backend", "--url", "memory://?capacity=4MiB", *TINY, "--baseline", "none", "--keys-tokens", "0",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = list((tmp_path / "bench-results").glob("backend-memory-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    check_result(data, "memory", None, rounds=3)


def test_bench_keys_cli(tmp_path: Path) -> None:
    out = tmp_path / "keys.json"
    proc = run_cli("bench", "keys", "--tokens", "10000", "--chunk-size", "100", "--repeat", "2", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "ms / 1M tokens" in proc.stdout
    data = json.loads(out.read_text())
    assert data["chunks"] == 100
    assert len(data["rounds"]) == 2
    assert data["median"]["tokens_per_s"] > 0
    assert data["ratio_vs_flat_blake2b"] > 0
    assert isinstance(data["goal"]["met"], bool)
    assert data["machine"]["cpu_count"] >= 1


def test_capacity_is_raised_to_fit_when_the_url_sets_none(tmp_path: Path) -> None:
    # The environment makes the default pool too small; the URL names no capacity, so the
    # benchmark overrides it rather than failing on the first rejected put.
    env = {**os.environ, "LMCACHE_MEMORY_CAPACITY": "64KiB"}
    out = tmp_path / "o.json"
    proc = run_cli("bench", "backend", "--url", "memory://", *TINY, "--keys-tokens", "0", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert data["params"]["capacity_override"] >= 6 * (64 << 10)
    assert data["backend_stats"]["capacity_bytes"] >= 6 * (64 << 10)


# ---------------------------------------------------------------------------------------------
# In-process: a broken backend cannot post a number


class FlipByteBackend(MemoryBackend):
    """Fault injection: returns values with one byte flipped."""

    schemes = ("flipbyte",)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out = await super()._get_into(keys, dsts)
        for d in dsts:
            d[len(d) // 2] ^= 0xFF
        return out


class NoCopyBackend(MemoryBackend):
    """Fault injection: claims full reads but writes nothing into the destination."""

    schemes = ("nocopy",)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        return [len(d) for d in dsts]


class StaleBackend(MemoryBackend):
    """Fault injection: ignores deletes and answers each get with the value put one round earlier."""

    schemes = ("stale",)
    ROUND = 4  # values per round in ``tiny()``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.put_order: list[CacheKey] = []

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        self.put_order.extend(keys)
        return await super()._put(keys, srcs)

    async def _delete(self, keys: list[CacheKey]) -> None:
        return None

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        pos = {k: i for i, k in enumerate(self.put_order)}
        mapped = [self.put_order[pos[k] - self.ROUND] if pos[k] >= self.ROUND else k for k in keys]
        return await super()._get_into(mapped, dsts)


class ExistsBackend(MemoryBackend):
    """Fault injection: reports EXISTS for every put, as a store that was never emptied would."""

    schemes = ("exists",)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        await super()._put(keys, srcs)
        return [PutResult(PutStatus.EXISTS) for _ in keys]


@pytest.fixture
def fake_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in (FlipByteBackend, NoCopyBackend, StaleBackend, ExistsBackend):
        scheme = cls.schemes[0]
        target = f"{__name__}:{cls.__name__}"
        monkeypatch.setitem(registry.BUILTIN_BACKENDS, scheme, registry._Builtin(target, None))
        monkeypatch.setitem(baselines._BASELINES, target, "lmcache.bench.baselines.memory:make")


def tiny(url: str, **kw: Any) -> BenchParams:
    base: dict[str, Any] = {
        "value_size": 4096,
        "count": 4,
        "batch": 2,
        "concurrency": 2,
        "repeat": 2,
        "warmup": 0,
        "keys_tokens": 0,
    }
    base.update(kw)
    return BenchParams(url=url, **base)


@pytest.mark.usefixtures("fake_schemes")
@pytest.mark.parametrize("scheme", ["flipbyte", "nocopy"])
async def test_wrong_bytes_fail_the_run(scheme: str) -> None:
    with pytest.raises(IntegrityError, match="read back wrong"):
        await run_backend_bench(tiny(f"{scheme}://?capacity=1MiB"))


@pytest.mark.usefixtures("fake_schemes")
async def test_stale_values_from_an_earlier_round_fail_the_run() -> None:
    with pytest.raises(IntegrityError, match="round 1: backend get"):
        await run_backend_bench(tiny("stale://?capacity=1MiB"))


@pytest.mark.usefixtures("fake_schemes")
async def test_exists_on_a_fresh_key_fails_the_run() -> None:
    with pytest.raises(BackendError, match="EXISTS"):
        await run_backend_bench(tiny("exists://?capacity=1MiB"))


async def test_rejected_put_is_a_capacity_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # The URL's capacity fits the working set on paper, but the pool is fragmented by a value
    # another tenant holds: the benchmark must stop with a clear error, not report numbers.
    async def full_put(self: MemoryBackend, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        return [PutResult(PutStatus.REJECTED, "capacity") for _ in keys]

    monkeypatch.setattr(MemoryBackend, "_put", full_put)
    with pytest.raises(CapacityError, match="does not fit"):
        await run_backend_bench(tiny("memory://?capacity=1MiB"))


async def test_explicit_small_capacity_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="capacity=8KiB"):
        await run_backend_bench(tiny("memory://?capacity=8KiB"))


async def test_bad_baseline_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--baseline"):
        await run_backend_bench(tiny("memory://?capacity=1MiB", baseline="sometimes"))


async def test_in_process_result_counts_every_round() -> None:
    result = await run_backend_bench(tiny("memory://?capacity=1MiB", warmup=1, repeat=3))
    assert [r["warmup"] for r in result["rounds"]] == [True, False, False, False]
    assert [r["order"][0] for r in result["rounds"]] == ["backend", "baseline", "backend", "baseline"]
    assert result["backend_stats"]["stored"] == 4 * 4
    assert result["backend_stats"]["deletes"] == 4 * 4
    # Medians are over the measured rounds only.
    measured = [r["backend"]["get"]["gbps"] for r in result["rounds"][1:]]
    assert result["median"]["backend"]["get"]["gbps"] == sorted(measured)[1]


async def test_checked_baseline_runs_beside_the_raw_one_and_rotates_the_order() -> None:
    result = await run_backend_bench(tiny("memory://?capacity=1MiB", checked=True, repeat=3))
    assert [r["order"] for r in result["rounds"]] == [
        ["backend", "baseline", "checked"],
        ["baseline", "checked", "backend"],
        ["checked", "backend", "baseline"],
    ]
    assert result["checked_baseline"]["name"] == "memcpy+xxh3"
    assert result["checked_baseline"]["raw"]["name"] == "memcpy"
    assert result["params"]["checked"] is True
    for op in ("put", "get"):
        checked = result["median"]["checked"][op]["gbps"]
        assert checked > 0
        assert result["ratio"][f"{op}_gbps_checked_vs_raw"] == report.ratio(
            checked, result["median"]["baseline"][op]["gbps"]
        )
        assert result["ratio"][f"{op}_gbps_vs_checked"] == report.ratio(
            result["median"]["backend"][op]["gbps"], checked
        )


async def test_checked_baseline_without_a_raw_one_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="--checked"):
        await run_backend_bench(tiny("memory://?capacity=1MiB", checked=True, baseline="none"))
    monkeypatch.setattr(baselines, "_BASELINES", {})
    with pytest.raises(ConfigError, match="--checked"):
        await run_backend_bench(tiny("memory://?capacity=1MiB", checked=True))


async def test_checked_baseline_catches_bytes_that_changed_in_its_store() -> None:
    w = bench_backend.Workload(4096, 4, 2)
    inner = MemcpyBaseline(w)
    checked = bench_backend.CheckedBaseline(inner, threads=2)
    await checked.open()
    try:
        await checked.put_batch(range(0, 2), [w.srcs[0], w.srcs[1]])
        assert await checked.get_batch(range(0, 2), [w.dsts[0], w.dsts[1]]) == [4096, 4096]
        inner._pool[1, 100] ^= 0xFF  # damage the raw store's copy, behind the checked baseline's back
        with pytest.raises(IntegrityError, match="slot 1 does not match"):
            await checked.get_batch(range(0, 2), [w.dsts[0], w.dsts[1]])
        await checked.end_round()  # forgets the round's checksums
        with pytest.raises(IntegrityError, match="slot 0 does not match"):
            await checked.get_batch(range(0, 1), [w.dsts[0]])
    finally:
        await checked.aclose()


def test_cli_checked_adds_the_row_and_its_ratios(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = run_cli(
        "bench",
        "backend",
        "--url",
        "memory://?capacity=4MiB",
        *TINY,
        "--checked",
        "--keys-tokens",
        "0",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "vs checked" in proc.stdout and "memcpy+xxh3" in proc.stdout
    lines = [ln.split() for ln in proc.stdout.splitlines() if ln.startswith(("put ", "get "))]
    assert sorted((ln[0], ln[1]) for ln in lines) == sorted(
        (op, s) for op in ("put", "get") for s in ("backend", "baseline", "checked")
    )
    data = json.loads(out.read_text())
    assert data["median"]["checked"]["get"]["gbps"] > 0


# ---------------------------------------------------------------------------------------------
# The baseline registry


def test_register_baseline_refuses_silent_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmcache.bench.baselines import memory as memory_baselines

    monkeypatch.setattr(baselines, "_BASELINES", dict(baselines._BASELINES))
    monkeypatch.setitem(registry.BUILTIN_BACKENDS, "newscheme", registry._Builtin("some.module:NewBackend", None))
    with pytest.raises(ConfigError, match="already registered"):
        register_baseline("memory", memory_baselines.make)
    register_baseline("memory", memory_baselines.make, replace=True)
    register_baseline("newscheme", "some.module:factory")
    assert "newscheme" in bench_backend.baseline_schemes()


class TwoSchemeBackend(MemoryBackend):
    """memory:// under two schemes of its own (as rediss/unix/valkey are all the Redis backend)."""

    schemes = ("twoa", "twob")


class PlainSubBackend(TwoSchemeBackend):
    """A subclass: another store, with no baseline of its own."""

    schemes = ("plainsub",)


async def test_a_baseline_registered_for_a_class_serves_each_of_its_schemes_and_no_subclass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(baselines, "_BASELINES", {})
    for scheme, cls in (("twoa", TwoSchemeBackend), ("twob", TwoSchemeBackend), ("plainsub", PlainSubBackend)):
        target = f"{cls.__module__}:{cls.__qualname__}"
        monkeypatch.setitem(registry.BUILTIN_BACKENDS, scheme, registry._Builtin(target, None))
    register_baseline(TwoSchemeBackend, "lmcache.bench.baselines.memory:make")
    assert {"twoa", "twob"} <= set(bench_backend.baseline_schemes())
    assert "plainsub" not in bench_backend.baseline_schemes()
    assert "memory" not in bench_backend.baseline_schemes()
    for scheme in ("twoa", "twob"):
        assert (await run_backend_bench(tiny(f"{scheme}://?capacity=1MiB")))["baseline"]["name"] == "memcpy"
    assert (await run_backend_bench(tiny("plainsub://?capacity=1MiB")))["baseline"] is None
    with pytest.raises(ConfigError, match="no backend serves URL scheme 'nosuchscheme'"):
        register_baseline("nosuchscheme", "some.module:factory")


async def test_lazy_baseline_path_is_resolved_and_used(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def factory(backend: Any, workload: bench_backend.Workload) -> MemcpyBaseline:
        calls.append(type(backend).__name__)
        return MemcpyBaseline(workload)

    monkeypatch.setattr(baselines, "_BASELINES", {"lmcache.backends.memory:MemoryBackend": f"{__name__}:_lazy_factory"})
    monkeypatch.setitem(globals(), "_lazy_factory", factory)
    result = await run_backend_bench(tiny("memory://?capacity=1MiB"))
    assert calls == ["MemoryBackend"]
    assert result["baseline"]["name"] == "memcpy"


async def test_scheme_without_baseline_reports_backend_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "_BASELINES", {})
    result = await run_backend_bench(tiny("memory://?capacity=1MiB"))
    assert result["baseline"] is None
    assert result["ratio"]["put_gbps"] is None
    assert "baseline" not in result["median"]


# ---------------------------------------------------------------------------------------------
# report helpers


def test_percentile_and_median() -> None:
    assert report.percentile([], 50) is None
    assert report.percentile([3.0], 99) == 3.0
    assert report.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert report.percentile(list(range(101)), 99) == 99
    assert report.median([3, 1, 2]) == 2
    assert report.median([]) is None
    assert report.ratio(2.0, 4.0) == 0.5
    assert report.ratio(1.0, 0.0) is None
    assert report.ratio(None, 1.0) is None


def test_render_table_aligns_columns() -> None:
    text = report.render_table(["op", "GB/s"], [["put", 12.3456], ["get", None]], title="T")
    lines = text.splitlines()
    assert lines[0] == "T"
    assert lines[1].split() == ["op", "GB/s"]
    assert lines[3].split() == ["put", "12.35"]
    assert lines[4].split() == ["get", "-"]
    assert len({len(line) for line in lines[1:4]}) == 1


def test_write_json_creates_directories_and_rejects_nan(tmp_path: Path) -> None:
    path = report.write_json(tmp_path / "a" / "b.json", {"x": 1.5})
    assert json.loads(path.read_text()) == {"x": 1.5}
    with pytest.raises(ValueError):
        report.write_json(tmp_path / "c.json", {"x": float("nan")})
    assert report.default_json_path("backend", "redis+cluster").name.startswith("backend-redis_cluster-")


async def test_unloadable_lazy_baseline_runs_without_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        baselines, "_BASELINES", {"lmcache.backends.memory:MemoryBackend": "lmcache.bench.no_such_module:make"}
    )
    result = await run_backend_bench(tiny("memory://?capacity=1MiB"))
    assert result["baseline"] is None
    assert result["median"]["backend"]["put"]["gbps"] > 0


async def test_composite_backend_without_capacity_setting_runs(tmp_path: Path) -> None:
    # tiered:// is bounded through its tiers and has no capacity option of its own: the
    # benchmark must not try to override one, and reports it without a baseline.
    url = f"tiered://?tier=memory://&tier=file://{tmp_path / 'store'}"
    result = await run_backend_bench(tiny(url))
    assert result["params"]["capacity_override"] is None
    assert result["baseline"] is None
    assert result["median"]["backend"]["get"]["gbps"] > 0
