"""``lmcache bench vllm-mixed`` without vLLM, and the slow tier it configures vLLM with.

The bench's options, its workload (hits and misses interleaved, misses fresh), its summary and
JSON shape are checked here on made-up child results; the vLLM runs themselves are in
tests/vllm/test_slow_tier.py. :class:`~lmcache.bench.tier_faults.DelayBackend` is checked as a
backend (the whole conformance suite, through its ``delay+memory://`` plugin scheme) and for what
it adds: which calls wait, and the event log a test reads instead of timing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from lmcache_conformance import BackendTests

from lmcache.bench.qa import vllm_mixed
from lmcache.bench.tier_faults import DelayBackend, delay_plugin_dir, read_delay_log
from lmcache.errors import ConfigError
from lmcache.keys import CacheKey

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def delay_scheme(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``delay+<scheme>://`` URLs resolve in this process (the plugin's metadata on sys.path)."""
    folder = tmp_path / "plugins"
    monkeypatch.syspath_prepend(delay_plugin_dir(folder))
    return folder


def _key(i: int) -> CacheKey:
    return CacheKey("test-delay", 1, 0, i.to_bytes(32, "big"), "float16")


class TestDelayBackendConformance(BackendTests):
    """The wrapper keeps the whole StorageBackend contract."""

    @pytest.fixture
    def backend_url(self, delay_scheme: Path) -> str:
        return "delay+memory://?capacity=256MiB&get_delay=0.001&put_delay=0.001"


def test_url_options_are_the_wrapper_s_and_the_rest_the_inner_backend_s(delay_scheme: Path, tmp_path: Path) -> None:
    from lmcache.backends.registry import open_backend

    log = tmp_path / "log.jsonl"
    b = open_backend(f"delay+memory://?capacity=1MiB&get_delay=250ms&contains_delay=0.01&delay_log={log}")
    assert isinstance(b, DelayBackend)
    assert (b.get_delay, b.put_delay, b.contains_delay, b.delay_log) == (0.25, 0.0, 0.01, str(log))
    assert b.inner.url.startswith("memory://") and "capacity" in b.inner.url and "delay" not in b.inner.url
    again = DelayBackend.from_url(b.url)
    assert again.url == b.url


@pytest.mark.parametrize("query", ["get_delay=-1", "get_delay=soon", "put_delay=nan"])
def test_a_bad_delay_is_a_config_error_naming_it(query: str) -> None:
    with pytest.raises(ConfigError, match=query.partition("=")[0]):
        DelayBackend.from_url(f"delay+memory://?{query}")


def test_not_a_delay_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="delay"):
        DelayBackend.from_url("memory://?get_delay=1")


def test_only_loads_wait_by_default_and_each_load_is_logged(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    b = DelayBackend.from_url(f"delay+memory://?capacity=1MiB&get_delay=0.01&delay_log={log}")

    async def go() -> tuple[list[int | None], list[bool]]:
        async with b:
            await b.put([_key(1)], [b"value"])
            found = await b.contains([_key(1), _key(2)])
            dsts = [bytearray(8), bytearray(8)]
            return await b.get_into([_key(1), _key(2)], dsts), found

    got, found = asyncio.run(go())
    assert got == [5, None] and found == [True, False]
    assert b.stats()["delayed_calls"] == {"get": 1, "put": 0, "contains": 0}
    events = read_delay_log(log)
    assert [e["event"] for e in events] == ["start", "end"]
    assert events[0]["t"] <= events[1]["t"] and events[1]["hits"] == 1 and events[1]["keys"] == 2


def test_a_load_cancelled_while_it_waits_writes_nothing(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    b = DelayBackend.from_url(f"delay+memory://?capacity=1MiB&get_delay=30&delay_log={log}")
    dst = bytearray(8)

    async def go() -> None:
        async with b:
            await b.put([_key(1)], [b"value"])
            task = asyncio.ensure_future(b.get_into([_key(1)], [dst]))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    assert dst == bytearray(8)
    assert read_delay_log(log)[-1]["failed"] is True


def test_another_process_finds_the_scheme_through_its_path(tmp_path: Path) -> None:
    """What a vLLM child does: PYTHONPATH names the plugin folder, the config names the URL."""
    folder = delay_plugin_dir(tmp_path / "plugins")
    code = (
        "from lmcache.config import LMCacheConfig; from lmcache.tiered import TieredBackend;"
        "c = LMCacheConfig.load(environ={}, tiers=['delay+memory://?capacity=1MiB&get_delay=0.2']);"
        "t = TieredBackend.from_config(c).tiers[0];"
        # A tier other than memory:// reads through a (raw) codec layer: the slow tier is inside it.
        "print(type(getattr(t, 'inner', t)).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONPATH": folder}, cwd=ROOT
    )
    assert out.stdout.strip() == "DelayBackend"


# ---------------------------------------------------------------------------------------------
# The bench


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    vllm_mixed.add_parser(parser.add_subparsers())
    return parser.parse_args(["vllm-mixed", *argv])


def test_defaults_are_the_issue_s_workload() -> None:
    a = _args()
    assert (a.hit_tokens, a.slow_delay, a.model, a.runs) == (4096, 0.2, "smollm2", ["fast", "slow-async", "slow-sync"])


@pytest.mark.parametrize("argv", [["--runs", "fast,bogus"], ["--slow-delay", "-0.1"], ["--pairs", "0"]])
def test_bad_options_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _args(*argv)
    assert "error" in capsys.readouterr().err


def test_the_workload_interleaves_hits_on_stored_documents_with_fresh_misses() -> None:
    a = _args("--model", "random", "--pairs", "2", "--rounds", "3", "--hit-tokens", "300", "--miss-tokens", "100")
    docs, rounds = vllm_mixed.workload(a, None)
    assert len(docs) == 2 and all(len(d) == 300 for d in docs)
    assert len(rounds) == 3
    for rnd in rounds:
        assert [r["kind"] for r in rnd] == ["hit", "miss", "hit", "miss"]
        for r in rnd:
            if r["kind"] == "hit":
                assert r["tokens"][:300] in docs and len(r["tokens"]) == 300 + a.question_tokens
            else:
                assert len(r["tokens"]) == 100
    misses = [tuple(r["tokens"]) for rnd in rounds for r in rnd if r["kind"] == "miss"]
    assert len(set(misses)) == len(misses)
    # Nothing a miss starts with was stored: its first chunk cannot hit.
    assert not any(m[: a.chunk_size] == tuple(d[: a.chunk_size]) for m in misses for d in docs)


def test_each_process_starts_with_uncounted_warmup_rounds() -> None:
    a = _args("--rounds", "3", "--slow-delay", "0.2")
    plan = {name: (is_async, labels, delays) for name, is_async, labels, delays in vllm_mixed.process_plan(a)}
    assert set(plan) == {"async", "sync"}
    _, labels, delays = plan["async"]
    assert labels == ["warmup", "fast", "slow-async", "slow-async", "fast", "fast", "slow-async"]
    assert delays == [0.0, 0.0, 0.2, 0.2, 0.0, 0.0, 0.2]
    _, labels, delays = plan["sync"]
    assert labels == ["warmup"] + ["slow-sync"] * 6 and delays == [0.0] + [0.2] * 6
    # Both processes run the same rounds (outputs are compared round by round).
    assert len(plan["async"][1]) == len(plan["sync"][1])
    a = _args("--warmup-rounds", "0", "--runs", "fast,slow-async")
    assert [labels for _, _, labels, _ in vllm_mixed.process_plan(a)] == [
        ["fast", "slow-async", "slow-async"] * 1 + ["fast", "fast", "slow-async"]
    ]


def _child_out(miss: list[float], hit: list[float], tokens: int = 7) -> dict[str, Any]:
    rounds = [
        [
            {"id": "hit0", "kind": "hit", "ttft_s": h, "tokens": [tokens]},
            {"id": "miss0", "kind": "miss", "ttft_s": m, "tokens": [1]},
        ]
        for m, h in zip(miss, hit, strict=True)
    ]
    return {"rounds": rounds, "store_s": 1.0, "max_num_batched_tokens": 4096}


def test_the_result_has_percentiles_per_kind_the_goal_and_the_output_check(tmp_path: Path) -> None:
    a = _args()
    end = [{"event": "start"}, {"event": "end"}]
    results = {
        "fast": vllm_mixed.run_entry("memory://", True, _child_out([1.0, 1.0, 1.2], [0.5, 0.5, 0.5]), [], {}),
        "slow-async": vllm_mixed.run_entry(
            "delay+memory://", True, _child_out([1.05, 1.0, 1.3], [0.9, 0.9, 0.9]), end * 3, {"loaded_tokens": 3}
        ),
        "slow-sync": vllm_mixed.run_entry("delay+memory://", False, _child_out([1.4, 1.4, 1.4], [1.4] * 3, 8), end, {}),
    }
    result = vllm_mixed.assemble(a, results)
    runs = result["runs"]
    assert runs["fast"]["miss"] == {"p50_s": 1.0, "p90_s": pytest.approx(1.16), "n": 3}
    assert runs["slow-async"]["slow_load_calls"] == 3 and runs["slow-sync"]["slow_load_calls"] == 1
    assert result["goal"]["miss_p50_ratio"] == pytest.approx(1.05) and result["goal"]["met"] is True
    assert result["goal"]["sync_miss_p50_ratio"] == pytest.approx(1.4)
    # The sync run generated other tokens for its hits: the output check names it.
    assert [r["outputs_match"] for r in runs.values()] == [True, True, False]
    assert result["outputs_match"] is False
    json.dumps(result)  # JSON-ready
    text = vllm_mixed.table(result)
    assert "slow-async" in text and "goal: misses' p50 slow-async / fast = 1.050" in text and "met" in text


def test_a_missed_goal_says_so() -> None:
    results = {
        "fast": vllm_mixed.run_entry("memory://", True, _child_out([1.0], [0.5]), [], {}),
        "slow-async": vllm_mixed.run_entry("delay+memory://", True, _child_out([1.2], [0.9]), [], {}),
    }
    result = vllm_mixed.assemble(_args("--runs", "fast,slow-async"), results)
    assert result["goal"]["met"] is False and "sync_miss_p50_ratio" not in result["goal"]
    assert "NOT met" in vllm_mixed.table(result)


def test_without_the_vllm_venv_the_bench_says_what_to_build(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="vLLM-CPU"):
        vllm_mixed.run(_args("--vllm-python", str(tmp_path / "nope"), "--model", "random"))


# ---------------------------------------------------------------------------------------------
# vllm-long-doc-qa's warm-TTFT goals


def test_warm_ttft_goal_against_recompute_and_vllm_s_own_hit() -> None:
    from lmcache.bench.qa.vllm_long_doc import table, warm_goal

    def run(warm: float, own: float) -> dict[str, Any]:
        return {
            "cold_ttft_s": 20.0,
            "warm_ttft_s": warm,
            "own_hit_ttft_s": own,
            "connector_stats": {"loaded_tokens": 8192},
            "outputs_match": True,
            "differing_prompts": 0,
            "warm_profile_s": {"lookup": 0.002, "load": 0.3},
        }

    result: dict[str, Any] = {
        "params": {"block_size": 128, "docs": 1, "doc_tokens": 4096, "questions": 3, "max_tokens": 8},
        "model": "smollm2",
        "without_lmcache": {"cold_ttft_s": 20.0, "warm_ttft_s": 18.0, "own_hit_ttft_s": 0.5},
        "with_lmcache": {"256": run(0.6, 0.55), "80": run(0.8, 0.5)},
    }
    goal = warm_goal(result)
    assert goal["chunks"]["256"]["speedup_vs_recompute"] == pytest.approx(30.0)
    assert goal["chunks"]["256"]["vs_vllm_prefix_cache"] == pytest.approx(0.6 / 0.55)
    assert goal["chunks"]["256"]["met"] is True
    # 22.5x recompute, but 1.6x vLLM's own hit: missed.
    assert goal["chunks"]["80"]["met"] is False
    result["goal"] = goal
    text = table(result)
    assert "goal, chunk 80" in text and "NOT met" in text and "lookup 2.0 ms, load 300.0 ms" in text


def test_fast_and_slow_async_rounds_alternate_in_one_process() -> None:
    assert vllm_mixed.round_labels(["fast", "slow-async", "slow-sync"], 3) == [
        "fast",
        "slow-async",
        "slow-async",
        "fast",
        "fast",
        "slow-async",
    ]
    assert vllm_mixed.round_labels(["slow-async"], 2) == ["slow-async"] * 2
    assert vllm_mixed.round_labels(["slow-sync"], 2) == ["slow-sync"] * 2


def test_the_control_file_switches_the_load_delay_within_one_backend(tmp_path: Path) -> None:
    log, control = tmp_path / "log.jsonl", tmp_path / "delay"
    b = DelayBackend.from_url(f"delay+memory://?get_delay=0.02&delay_log={log}&delay_control={control}")
    assert DelayBackend.from_url(b.url).delay_control == str(control)

    async def load() -> None:
        await b.get_into([_key(1)], [bytearray(8)])

    async def go() -> None:
        async with b:
            await load()  # no control file yet: the configured delay
            control.write_text("0")
            await load()
            control.write_text("0.01")
            await load()

    asyncio.run(go())
    assert [e["delay"] for e in read_delay_log(log) if e["event"] == "start"] == [0.02, 0.0, 0.01]
    assert b.stats()["delayed_calls"]["get"] == 2


def test_on_real_text_no_miss_starts_like_a_stored_document_or_another_miss() -> None:
    """The first real-text misses used to start with the first stored document (a hidden hit)."""
    from lmcache.bench.qa.common import vllm_model_dir
    from lmcache.errors import MissingDependencyError

    try:
        model = vllm_model_dir("smollm2")
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2's tokenizer cannot be built here: {exc}")
    a = _args("--pairs", "2", "--rounds", "3", "--hit-tokens", "1024", "--miss-tokens", "512")
    docs, rounds = vllm_mixed.workload(a, model, 6)
    firsts = [tuple(r["tokens"][: a.chunk_size]) for rnd in rounds for r in rnd if r["kind"] == "miss"]
    assert len(firsts) == 12 and len(set(firsts)) == 12
    assert not set(firsts) & {tuple(d[: a.chunk_size]) for d in docs}
