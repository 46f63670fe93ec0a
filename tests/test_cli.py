"""The ``lmcache`` command line, run as a real subprocess (console script and ``python -m``)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

import lmcache
from lmcache.backends.registry import open_backend
from lmcache.keys import ChunkHasher, KeyScope

if TYPE_CHECKING:
    from s3_servers import S3Target

# Session fixture s3_moto (moto's S3 server as a child process, stopped by PID).
pytest_plugins = ["s3_servers"]

CONSOLE_SCRIPT = Path(sys.executable).parent / "lmcache"


def run_cli(*args: str, cwd: Path | None = None, module: str = "lmcache") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("lmcache"), lines[0]
    assert "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_version_via_python_m() -> None:
    proc = run_cli("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"lmcache {lmcache.__version__} ")


def test_version_via_cli_module() -> None:
    proc = run_cli("version", module="lmcache.cli")
    assert proc.returncode == 0, proc.stderr
    assert lmcache.__version__ in proc.stdout


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="the lmcache console script is not installed in this venv")
def test_console_script_runs() -> None:
    proc = subprocess.run([str(CONSOLE_SCRIPT), "version"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert lmcache.__version__ in proc.stdout


def test_help_lists_every_subcommand() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for name in ("bench", "ls", "stats", "version"):
        assert name in proc.stdout
    proc = run_cli("bench", "--help")
    assert proc.returncode == 0
    assert "backend" in proc.stdout
    assert "keys" in proc.stdout


def test_unknown_scheme_is_one_line_exit_2() -> None:
    proc = run_cli("bench", "backend", "--url", "nosuch://host/x")
    assert_one_line_error(proc, "nosuch", "known schemes")


@pytest.mark.parametrize("command", ["ls", "stats"])
def test_malformed_url_is_one_line_exit_2(command: str) -> None:
    proc = run_cli(command, "not-a-url")
    assert_one_line_error(proc, "not a backend URL")


def test_unknown_backend_option_is_one_line_exit_2() -> None:
    proc = run_cli("stats", "memory://?capacity=1MiB&frobnicate=1")
    assert_one_line_error(proc, "frobnicate")


def test_bad_cli_option_value_is_one_line_exit_2() -> None:
    proc = run_cli("bench", "backend", "--url", "memory://", "--batch", "0")
    assert_one_line_error(proc, "--batch")
    proc = run_cli("bench", "backend", "--url", "memory://", "--value-size", "lots")
    assert_one_line_error(proc, "--value-size")


def test_unknown_cli_option_and_missing_command_exit_2() -> None:
    assert_one_line_error(run_cli("bench", "backend", "--url", "memory://", "--frobnicate"), "--frobnicate")
    assert_one_line_error(run_cli())
    assert_one_line_error(run_cli("bench"))
    assert_one_line_error(run_cli("bench", "nosuchworkload"), "nosuchworkload")


def test_capacity_too_small_for_the_working_set_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = run_cli(
        "bench",
        "backend",
        "--url",
        "memory://?capacity=1MiB",
        "--value-size",
        "1MiB",
        "--count",
        "4",
        "--json",
        str(tmp_path / "out.json"),
    )
    assert_one_line_error(proc, "capacity")
    assert not (tmp_path / "out.json").exists()


def test_stats_prints_json() -> None:
    proc = run_cli("stats", "memory://?capacity=4MiB")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["url"] == "memory://?capacity=4MiB"
    assert data["backend"].endswith("MemoryBackend")
    assert data["capabilities"]["listing"] is True
    assert data["stats"]["capacity_bytes"] == 4 << 20
    assert data["stats"]["hits"] == 0


def test_ls_empty_memory_backend() -> None:
    proc = run_cli("ls", "memory://?capacity=1MiB")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "0 key(s)" in proc.stderr


async def _fill(url: str, n: int, size: int) -> list[str]:
    keys = ChunkHasher(4).keys(list(range(4 * n)), KeyScope.create("cli-test"))
    async with open_backend(url) as backend:
        values = [np.full(size, i, dtype=np.uint8) for i in range(n)]
        results = await backend.put(keys, values)
        assert all(r.ok for r in results)
    return sorted(k.to_string() for k in keys)


def test_ls_and_stats_on_a_file_store(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    expected = asyncio.run(_fill(url, 3, 1000))

    proc = run_cli("ls", url)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert sorted(r[0] for r in rows) == expected
    assert all(r[1] == "-" or int(r[1]) >= 1000 for r in rows)
    assert "3 key(s)" in proc.stderr

    proc = run_cli("ls", url, "--json", "--limit", "2")
    assert proc.returncode == 0, proc.stderr
    entries = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(entries) == 2
    assert {e["key"] for e in entries} <= set(expected)

    proc = run_cli("stats", url)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["capabilities"]["persistent"] is True
    assert isinstance(data["stats"], dict)


def test_a_workload_that_cannot_import_does_not_break_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lmcache.bench
    from lmcache.cli import main

    monkeypatch.setitem(lmcache.bench.WORKLOADS, "broken", "lmcache.bench.no_such_workload_module")
    assert main(["version"]) == 0
    assert lmcache.__version__ in capsys.readouterr().out
    assert main(["bench", "broken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("lmcache: error:")
    assert "lmcache bench broken" in err[0]


# -- ls and stats only look; fsck finds and repairs ----------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every entry under ``root``: (mode, mtime_ns, content of regular files)."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
        out[str(path)] = (st.st_mode, st.st_mtime_ns, data)
    return out


def _damage_store(root: Path) -> dict[str, str]:
    """Damage a filled file:// store: a torn value, a directory at a key's name, a stale temp file."""
    values = sorted(root.glob("??/*.kv"))
    torn = values[0]
    torn.write_bytes(torn.read_bytes()[:100])
    directory = torn.parent / ("f" * 40 + ".kv")
    directory.mkdir()
    stale = values[1].parent / f".{values[1].stem}.4242.abcdef.tmp"
    stale.write_bytes(b"half a value")
    return {str(torn): "torn", str(directory): "not_a_file", str(stale): "stale_temp"}


def test_ls_and_stats_never_change_the_store_and_report_damage(tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = f"file://{root}"
    asyncio.run(_fill(url, 4, 1000))
    damaged = _damage_store(root)
    before = _tree(root)

    proc = run_cli("ls", url)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 3  # the torn value is not listed
    assert "3 damaged file(s)" in proc.stderr
    for path, reason in damaged.items():
        assert f"{reason}\t{path}" in proc.stderr
    assert _tree(root) == before

    proc = run_cli("stats", url)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["stats"]["damaged_files"] == 3
    assert data["stats"]["read_only"] is True
    assert {d["path"]: d["reason"] for d in data["damaged_files"]} == damaged
    assert not any(d["removed"] for d in data["damaged_files"])
    assert _tree(root) == before


def test_ls_and_stats_of_a_tiered_url_open_its_file_tier_read_only(tmp_path: Path) -> None:
    from urllib.parse import quote

    root = tmp_path / "store"
    asyncio.run(_fill(f"file://{root}", 4, 1000))
    damaged = _damage_store(root)
    before = _tree(root)
    for tier in (f"file://{root}", f"file://{root}?codec=zstd"):
        url = "tiered://?tier=" + quote("memory://?capacity=1MiB", safe="") + "&tier=" + quote(tier, safe="")
        proc = run_cli("ls", url)
        assert proc.returncode == 0, proc.stderr
        assert "3 damaged file(s)" in proc.stderr, proc.stderr
        assert _tree(root) == before  # read-only: the damage is reported, nothing is removed
        proc = run_cli("stats", url)
        assert proc.returncode == 0, proc.stderr
        reported = json.loads(proc.stdout)["damaged_files"]
        assert {d["path"]: d["reason"] for d in reported} == damaged
        assert _tree(root) == before


def test_ls_never_creates_a_missing_directory(tmp_path: Path) -> None:
    proc = run_cli("ls", f"file://{tmp_path / 'missing'}")
    assert_one_line_error(proc, "no such cache directory")
    assert not (tmp_path / "missing").exists()


def test_fsck_reports_then_repairs(tmp_path: Path) -> None:
    root = tmp_path / "store"
    url = f"file://{root}"
    asyncio.run(_fill(url, 4, 1000))
    damaged = _damage_store(root)
    before = _tree(root)

    proc = run_cli("fsck", url)
    assert proc.returncode == 4, (proc.stdout, proc.stderr)
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    assert {r[1]: r[0] for r in rows} == damaged
    assert "3 good value(s)" in proc.stderr and "3 damaged" in proc.stderr
    assert _tree(root) == before

    proc = run_cli("fsck", url, "--json")
    assert proc.returncode == 4
    report = json.loads(proc.stdout)
    assert (report["values"], report["damaged"], report["removed"]) == (3, 3, 0)
    assert {f["path"]: f["reason"] for f in report["files"]} == damaged

    proc = run_cli("fsck", url, "--repair")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert all(line.endswith("\tremoved") for line in proc.stdout.splitlines())
    assert not any(Path(p).exists() for p in damaged)

    proc = run_cli("fsck", url, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["damaged"] == 0


def test_fsck_of_another_scheme_is_one_line_exit_2() -> None:
    assert_one_line_error(run_cli("fsck", "memory://"), "fsck checks file://")


# -- -vv never prints credentials ----------------------------------------------------------------


def test_debug_logging_never_prints_the_s3_session_token(s3_moto: S3Target) -> None:
    token = "FQoGZXIvYXdzEXAMPLE" + "Z" * 40 + "SessionToken/+=="
    proc = run_cli("-vv", "stats", s3_moto.url(aws_session_token=token))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["backend"].endswith("S3Backend")  # the request succeeded
    output = proc.stdout + proc.stderr
    # botocore logged the signed request (the header name is there) but not the token's value.
    assert "x-amz-security-token" in output.lower()
    assert token not in output
    assert token[:24] not in output
