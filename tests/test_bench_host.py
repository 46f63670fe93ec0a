"""``lmcache bench host``: the copy vs copy + checksum ceiling, on tiny sizes through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lmcache.bench import host
from lmcache.errors import ConfigError

ROWS = {"copy", "checksum", "copy_then_check", "check_then_copy", "check_with_copy", "fused"}


def test_bench_host_reports_every_row_against_the_copy() -> None:
    result = host.bench_host(size=4 << 20, group=1 << 20, repeat=2)
    assert result["workload"] == "host"
    assert set(result["gbps"]) == ROWS
    assert all(len(result["seconds"][name]) == 2 for name in ROWS)  # the warm-up round is dropped
    assert all(result["gbps"][name] > 0 for name in ROWS)
    assert result["ratio_vs_copy"]["copy"] == pytest.approx(1.0)
    for name in ROWS:
        assert result["ratio_vs_copy"][name] == pytest.approx(result["gbps"][name] / result["gbps"]["copy"])


def test_cma_rows_compare_against_the_bare_cma_copies() -> None:
    result = host.bench_host(size=4 << 20, group=1 << 20, repeat=2)
    cma = result["cma"]
    if "skipped" in cma:  # only where the kernel refuses cross-memory attach
        pytest.skip(cma["skipped"])
    rows = {"cma_read", "cma_read_then_check", "cma_write", "check_then_cma_write", "check_with_cma_write"}
    assert set(cma["gbps"]) == rows
    assert all(cma["gbps"][name] > 0 and len(cma["seconds"][name]) == 2 for name in rows)
    g, ratios = cma["gbps"], cma["ratio_vs_cma"]
    assert ratios["cma_read_then_check"] == pytest.approx(g["cma_read_then_check"] / g["cma_read"])
    assert ratios["check_then_cma_write"] == pytest.approx(g["check_then_cma_write"] / g["cma_write"])
    assert ratios["check_with_cma_write"] == pytest.approx(g["check_with_cma_write"] / g["cma_write"])


def test_no_cma_leaves_the_rows_out() -> None:
    assert "cma" not in host.bench_host(size=1 << 20, group=1 << 20, repeat=1, cma=False)


def test_other_process_memory_really_moves_bytes_and_goes_away() -> None:
    try:
        read, write = host._cma_call("process_vm_readv"), host._cma_call("process_vm_writev")
    except OSError as exc:
        pytest.skip(str(exc))
    size = (4 << 20) + 4096  # more than one CMA step, and a partial last one
    src = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    back = np.zeros(size, dtype=np.uint8)
    with host._other_process_memory(size) as (pid, remote):
        assert pid != os.getpid()
        write(pid, src.ctypes.data, remote, size)
        read(pid, back.ctypes.data, remote, size)
        with pytest.raises(OSError):  # past the child's mapping: the kernel refuses, we raise
            read(pid, back.ctypes.data, remote + size + (1 << 30), 4096)
    assert np.array_equal(src, back)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the child exited and was reaped


def test_group_larger_than_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="larger than --size"):
        host.bench_host(size=1 << 20, group=2 << 20, repeat=1)


@pytest.mark.parametrize("first_in_helper", [False, True])
def test_pipeline_runs_second_after_first_for_every_group(first_in_helper: bool) -> None:
    groups = [(i * 10, 10) for i in range(50)]
    done_first: set[tuple[int, int]] = set()
    order: list[tuple[int, int]] = []
    threads: dict[str, set[int]] = {"first": set(), "second": set()}

    def first(off: int, n: int) -> None:
        threads["first"].add(threading.get_ident())
        done_first.add((off, n))

    def second(off: int, n: int) -> None:
        threads["second"].add(threading.get_ident())
        assert (off, n) in done_first  # never before its first step
        order.append((off, n))

    host._pipelined(groups, first, second, first_in_helper=first_in_helper)
    assert order == groups
    assert len(threads["first"]) == len(threads["second"]) == 1
    assert threads["first"] != threads["second"]
    main = threading.get_ident()
    assert (main in threads["second"]) is first_in_helper


def _boom(off: int, n: int) -> None:
    if off == 30:
        raise ValueError("step failed")


def _fine(off: int, n: int) -> None:
    pass


@pytest.mark.parametrize("first_in_helper", [False, True])
def test_pipeline_failure_in_the_helper_reaches_the_caller(first_in_helper: bool) -> None:
    steps = (_boom, _fine) if first_in_helper else (_fine, _boom)
    with pytest.raises(ValueError, match="step failed"):
        host._pipelined([(i * 10, 10) for i in range(10)], *steps, first_in_helper=first_in_helper)


def test_alongside_checks_a_group_only_once_the_copier_has_taken_it_up() -> None:
    groups = [(i * 10, 10) for i in range(50)]
    copied: list[tuple[int, int]] = []
    checked: list[tuple[int, int]] = []
    threads: dict[str, set[int]] = {"copy": set(), "check": set()}

    def copy(off: int, n: int) -> None:
        threads["copy"].add(threading.get_ident())
        copied.append((off, n))

    def check(off: int, n: int) -> None:
        threads["check"].add(threading.get_ident())
        i = groups.index((off, n))
        # The copier takes up group i only after copying group i - 1.
        assert i == 0 or groups[i - 1] in copied
        checked.append((off, n))

    host._alongside(groups, copy, check)
    assert copied == checked == groups
    assert threads["copy"] == {threading.get_ident()}
    assert len(threads["check"]) == 1 and threads["check"] != threads["copy"]


@pytest.mark.parametrize("failing", ["copy", "check"])
def test_alongside_failures_reach_the_caller_without_leaving_the_helper_waiting(failing: str) -> None:
    steps = (_boom, _fine) if failing == "copy" else (_fine, _boom)  # a failed copy still releases the checker
    with pytest.raises(ValueError, match="step failed"):
        host._alongside([(i * 10, 10) for i in range(10)], *steps)


def test_cli_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "host.json"
    args = ["bench", "host", "--size", "2MiB", "--group", "512KiB", "--repeat", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "copy, then check (get)" in proc.stdout
    assert "CMA read, then check (get)" in proc.stdout or "no CMA rows" in proc.stdout
    data = json.loads(out.read_text())
    assert data["params"] == {"size": 2 << 20, "group": 512 << 10, "repeat": 1, "cpus": data["params"]["cpus"]}
    assert set(data["ratio_vs_copy"]) == ROWS
    assert data["machine"]["cpu_count"] >= 1


def test_cli_rejects_a_bad_size() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lmcache", "bench", "host", "--size", "lots"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--size" in proc.stderr and "Traceback" not in proc.stderr
