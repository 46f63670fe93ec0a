"""Zero-code mode (``pytest --pyargs lmcache_conformance --lmcache-backend-url=URL``) tidies up.

It runs in a third party's project and may be pointed at a shared or persistent store: it must
delete what it stored and write no ``.hypothesis/`` folder into the working directory, and its
help must say to use a scratch location.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def run_pytest(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A child pytest from ``cwd`` (an empty folder: no pyproject, as in a stranger's project)."""
    cmd = [sys.executable, "-m", "pytest", *args]
    env = {k: v for k, v in os.environ.items() if k != "HYPOTHESIS_STORAGE_DIRECTORY"}
    return subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.timeout(660)
def test_zero_code_run_leaves_nothing_behind(tmp_path: Path) -> None:
    cwd = tmp_path / "project"
    store = tmp_path / "store"
    cwd.mkdir()
    # file:// is persistent, so anything the suite left behind is still there to count.
    args = [
        "--pyargs",
        "lmcache_conformance",
        f"--lmcache-backend-url=file://{store}?capacity=1GiB",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    ]
    out = run_pytest(args, cwd)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    assert "passed" in out.stdout, tail
    assert sorted(p.name for p in cwd.iterdir()) == [], "zero-code mode wrote into the working directory"
    left = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert left == [], f"zero-code mode left {len(left)} stored values behind, e.g. {left[:3]}"


def test_zero_code_help_says_to_use_a_scratch_location(tmp_path: Path) -> None:
    out = run_pytest(["--help"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "--lmcache-backend-url" in text
    assert "scratch location" in text
