"""``lmcache bench host``: the ceiling this host puts on a backend that checks what it moves.

Every value lmcache stores carries an xxh3 checksum (DESIGN.md §3 rule 8): a put hashes the
source, a get hashes what landed in ``dst`` before handing it to an engine. A backend whose
transport copies with the CPU (``nixl://`` over UCX/CMA on one host, ``memory://``, ``lm://``
over shared memory) therefore makes one more pass over memory than a raw copy of the same
bytes, and on a host with little memory bandwidth per core that pass slows the copy beside it.
This workload measures that ceiling on the host itself, with no store involved:

* ``copy``: one thread copies ``--size`` bytes in groups of ``--group`` bytes (the raw SDK's
  floor: what UCX over CMA does);
* ``checksum``: one thread hashes them;
* ``copy, then check`` (a verifying get): one thread copies group after group while a second
  thread hashes each group once it has landed;
* ``check, then copy`` (a put): a second thread hashes each group, then the first copies it;
* ``fused``: :func:`lmcache.serde.frame.copy_with_checksum`, each 256 KiB step copied, then
  hashed while in L2 (only possible where lmcache makes the copy itself).

A verifying backend cannot reach a higher ratio to a raw copy than the pipelined rows' ratio to
``copy``, whatever it does besides. The two threads are pinned to different CPUs where the host
has two. Medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmcache.bench import positive_int, report, size_arg
from lmcache.config import format_size
from lmcache.errors import ConfigError
from lmcache.serde import frame

__all__ = ["DESCRIPTION", "add_parser", "bench_host", "print_summary", "run_cli"]

DESCRIPTION = "memory copy vs copy + checksum on this host: the ceiling for a verifying backend"

_ROWS = ("copy", "checksum", "copy_then_check", "check_then_copy", "fused")


@contextlib.contextmanager
def _on_cpu(cpu: int | None) -> Iterator[None]:
    """Pin the calling thread to ``cpu`` for the block (no-op where pinning is unavailable)."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def _cpus() -> tuple[int | None, int | None]:
    """Two distinct CPUs this process may run on, else (None, None)."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    allowed = sorted(os.sched_getaffinity(0))
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else (None, None)


def _pipelined(
    groups: list[tuple[int, int]],
    first: Callable[[int, int], Any],
    second: Callable[[int, int], Any],
    *,
    first_in_helper: bool,
) -> None:
    """Run ``first`` on each group, and ``second`` on it once ``first`` is done, in two threads.

    This thread runs on the first CPU and a helper on the second: a verifying get copies here
    and checks in the helper (``first_in_helper=False``), a put checksums in the helper first.
    """
    handoff: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    cpu_a, cpu_b = _cpus()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for off, n in groups:
                first(off, n)
                handoff.put((off, n))
        finally:
            handoff.put(None)

    def consume() -> None:
        while (item := handoff.get()) is not None:
            second(*item)

    helper_part, own_part = (produce, consume) if first_in_helper else (consume, produce)

    def helper() -> None:
        with _on_cpu(cpu_b):
            try:
                helper_part()
            except BaseException as exc:  # raised in the caller after the join
                failure.append(exc)

    thread = threading.Thread(target=helper, name="lmcache-bench-host", daemon=True)
    thread.start()
    try:
        with _on_cpu(cpu_a):
            own_part()
    finally:
        thread.join()
    if failure:
        raise failure[0]


def bench_host(*, size: int = 1 << 30, group: int = 16 << 20, repeat: int = 7) -> dict[str, Any]:
    """Time a copy, a checksum, and the two pipelined together, on ``size`` bytes.

    Args:
        size: Bytes per round (source and destination each take this much memory).
        group: Bytes per step of the pipelined rows (``nixl://`` moves 16 MiB per transfer).
        repeat: Rounds; medians are reported.

    Returns:
        A JSON-ready dict: params, per-round seconds, medians, GB/s and each row's ratio to ``copy``.

    Raises:
        ConfigError: ``group`` is larger than ``size``.
    """
    if group > size:
        raise ConfigError(f"bench host: --group {format_size(group)} is larger than --size {format_size(size)}")
    src = np.ones(size, dtype=np.uint8)  # written, so every page is mapped before timing
    dst = np.zeros(size, dtype=np.uint8)
    sa, da = src.ctypes.data, dst.ctypes.data
    dview = memoryview(dst)
    sview = memoryview(src)
    groups = [(off, min(group, size - off)) for off in range(0, size, group)]

    def copy(off: int, n: int) -> None:
        ctypes.memmove(da + off, sa + off, n)  # releases the GIL, like a NIXL transfer

    def check_dst(off: int, n: int) -> None:
        frame.payload_checksum(dview[off : off + n])

    def check_src(off: int, n: int) -> None:
        frame.payload_checksum(sview[off : off + n])

    cpu_a, _ = _cpus()

    def serial(step: Callable[[int, int], Any]) -> Callable[[], None]:
        def run() -> None:
            with _on_cpu(cpu_a):
                for off, n in groups:
                    step(off, n)

        return run

    runs: dict[str, Callable[[], None]] = {
        "copy": serial(copy),
        "checksum": serial(check_dst),
        "copy_then_check": lambda: _pipelined(groups, copy, check_dst, first_in_helper=False),
        "check_then_copy": lambda: _pipelined(groups, check_src, copy, first_in_helper=True),
        "fused": lambda: frame.copy_with_checksum(dst, src),
    }
    seconds: dict[str, list[float]] = {name: [] for name in _ROWS}
    for _ in range(repeat + 1):  # the first round warms up and is dropped
        for name in _ROWS:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                runs[name]()
                seconds[name].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    for name in _ROWS:
        seconds[name] = seconds[name][1:]
    med = {name: report.median(seconds[name]) for name in _ROWS}
    gbps = {name: size / s / 1e9 if s else None for name, s in med.items()}
    return {
        "workload": "host",
        "params": {"size": size, "group": group, "repeat": repeat, "cpus": list(_cpus())},
        "seconds": seconds,
        "median_s": med,
        "gbps": gbps,
        "ratio_vs_copy": {name: report.ratio(gbps[name], gbps["copy"]) for name in _ROWS},
    }


def print_summary(result: dict[str, Any]) -> None:
    """Print the host table to stdout."""
    p = result["params"]
    title = (
        f"host: {format_size(p['size'])} per round, groups of {format_size(p['group'])}, "
        f"CPUs {p['cpus']}, median of {p['repeat']}"
    )
    labels = {
        "copy": "copy (raw floor)",
        "checksum": "checksum (xxh3)",
        "copy_then_check": "copy, then check (get)",
        "check_then_copy": "check, then copy (put)",
        "fused": "fused 256 KiB steps",
    }
    rows = [
        [labels[name], result["gbps"][name], result["median_s"][name] * 1e3, result["ratio_vs_copy"][name]]
        for name in _ROWS
    ]
    print(report.render_table(["operation", "GB/s", "ms / round", "ratio vs copy"], rows, title=title))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench host`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("host", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=size_arg, default=1 << 30, help="bytes per round (default 1GiB; twice this is used)")
    p.add_argument("--group", type=size_arg, default=16 << 20, help="bytes per pipelined step (default 16MiB)")
    p.add_argument("--repeat", type=positive_int, default=7, help="rounds; the median is reported (default 7)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench host`` from parsed arguments."""
    result = bench_host(size=args.size, group=args.group, repeat=args.repeat)
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("host", format_size(args.size)), result)
    print(f"results: {path}")
    return 0
