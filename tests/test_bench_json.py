"""``lmcache bench … --json PATH`` into a path it cannot write fails before the benchmark runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmcache.bench.report import check_json_path
from lmcache.errors import ConfigError


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lmcache", "bench", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
@pytest.mark.parametrize("workload", ["keys", "host"])
def test_unwritable_json_path_fails_in_one_line_before_the_run(tmp_path: Path, where: str, workload: str) -> None:
    (tmp_path / "plain").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    target = tmp_path / "plain" / "out.json" if where == "under_a_file" else tmp_path / "folder"
    proc = _bench(workload, "--json", str(target), cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmcache: error:") and "--json" in lines[0], proc.stderr
    assert proc.stdout == ""  # nothing ran: no table, no "results:" line


def test_check_json_path_accepts_writable_places_and_creates_nothing(tmp_path: Path) -> None:
    check_json_path(tmp_path / "out.json")
    check_json_path(tmp_path / "new" / "deeper" / "out.json")  # write_json creates the folders later
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="is a directory"):
        check_json_path(tmp_path)
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="cannot write --json"):
        check_json_path(tmp_path / "f" / "x" / "out.json")
