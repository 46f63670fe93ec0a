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
* ``check, then copy`` (a put checksumming ahead): a second thread hashes each group, then the
  first copies it (the hashing runs as far ahead as it can);
* ``check alongside copy`` (a put as ``nixl://`` makes it): the second thread starts hashing each
  group when the first starts copying it, so the two read the same bytes moments apart and the
  copy finds them in cache (a get cannot: its bytes must have landed before they are checked);
* ``fused``: :func:`lmcache.serde.frame.copy_with_checksum`, each 256 KiB step copied, then
  hashed while in L2 (only possible where lmcache makes the copy itself);
* the ``cma`` rows (Linux): the same get and puts, with the copy made as UCX makes it on one
  host, by ``process_vm_readv``/``writev`` of 512 KiB steps to and from a child process holding
  a pool mapped as the NIXL peer maps its own (private, huge-page advised, prefaulted), each
  against the bare CMA copy. ``--no-cma`` skips them; where the kernel refuses (ptrace
  restrictions) the JSON says why.

A verifying get cannot reach a higher ratio to a raw copy than the ``copy, then check`` rows'
ratio to their bare copy, whatever it does besides (for ``nixl://`` on one host: the ``cma``
rows), unless it checks groups small enough to still be in cache when they have landed; a put
can do as well as its ``alongside`` row. The two threads are pinned to different CPUs where the
host has two. Medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmcache.bench import page_aligned, positive_int, report, size_arg
from lmcache.config import format_size
from lmcache.errors import ConfigError
from lmcache.serde import frame

__all__ = ["DESCRIPTION", "add_parser", "bench_host", "print_summary", "run_cli"]

logger = logging.getLogger(__name__)

DESCRIPTION = "memory copy vs copy + checksum on this host: the ceiling for a verifying backend"

_ROWS = ("copy", "checksum", "copy_then_check", "check_then_copy", "check_with_copy", "fused")


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
    _on_two_cpus(own_part, helper_part)


def _alongside(
    groups: list[tuple[int, int]], copy: Callable[[int, int], Any], check: Callable[[int, int], Any]
) -> None:
    """Copy each group on the first CPU while a helper on the second checks it, starting together.

    The helper waits for the copier to start a group, then hashes it at its own (higher) speed:
    it runs a little ahead of the copy over the same bytes, never more than one group.
    """
    started = [threading.Event() for _ in groups]

    def checker() -> None:
        for (off, n), event in zip(groups, started, strict=True):
            event.wait()
            check(off, n)

    def copier() -> None:
        for (off, n), event in zip(groups, started, strict=True):
            event.set()
            copy(off, n)

    def release_checker() -> None:
        for event in started:
            event.set()  # a copy that failed must not leave the checker waiting

    _on_two_cpus(copier, checker, then=release_checker)


def _on_two_cpus(own: Callable[[], None], other: Callable[[], None], *, then: Callable[[], None] | None = None) -> None:
    """Run ``own`` here on the first CPU and ``other`` in a helper thread on the second.

    ``then`` runs once ``own`` is over, also when it failed (to release a helper waiting for
    it); a failure in the helper is raised here after the join.
    """
    cpu_a, cpu_b = _cpus()
    failure: list[BaseException] = []

    def helper() -> None:
        with _on_cpu(cpu_b):
            try:
                other()
            except BaseException as exc:  # raised in the caller after the join
                failure.append(exc)

    thread = threading.Thread(target=helper, name="lmcache-bench-host", daemon=True)
    thread.start()
    try:
        with _on_cpu(cpu_a):
            own()
    finally:
        if then is not None:
            then()
        thread.join()
    if failure:
        raise failure[0]


#: The other process of the CMA rows: the NIXL peer's own pool mapping (private, huge-page
#: advised, prefaulted); it prints the pool's address and holds it until its stdin closes.
_HOLDER = """
import ctypes, sys
from lmcache.backends.nixl.peer import map_pool
pool = map_pool(int(sys.argv[1]), prefault=True)
print(ctypes.addressof(ctypes.c_char.from_buffer(pool)), flush=True)
sys.stdin.read()
"""


#: Bytes per CMA call: what UCX's CMA transport moved per ``process_vm_readv``/``writev`` call
#: for ``nixl://`` (strace of ``lmcache bench backend``, UCX from ``nixl-cu12`` 1.5.1).
_CMA_STEP = 512 << 10


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@contextlib.contextmanager
def _other_process_memory(size: int) -> Iterator[tuple[int, int]]:
    """``(pid, address)`` of ``size`` bytes held by a child process for the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(size)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise OSError(f"the memory-holding child process failed (exit status {proc.wait(10)})")
        yield proc.pid, int(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cma_call(name: str) -> Callable[[int, int, int, int], None]:
    """``move(pid, local, remote, n)`` through ``process_vm_readv``/``writev``, ``_CMA_STEP`` per call.

    Raises:
        OSError: Not Linux, or the kernel refused (e.g. ptrace restrictions).
    """
    if not sys.platform.startswith("linux"):
        raise OSError("cross-memory attach (process_vm_readv) is Linux-only")
    fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    fn.restype = ctypes.c_ssize_t
    vec = ctypes.POINTER(_IOVec)
    fn.argtypes = [ctypes.c_int, vec, ctypes.c_ulong, vec, ctypes.c_ulong, ctypes.c_ulong]

    def move(pid: int, local: int, remote: int, n: int) -> None:
        for off in range(0, n, _CMA_STEP):
            step = min(_CMA_STEP, n - off)
            lv, rv = _IOVec(local + off, step), _IOVec(remote + off, step)
            moved = fn(pid, ctypes.byref(lv), 1, ctypes.byref(rv), 1, 0)
            if moved < 0:
                err = ctypes.get_errno()
                raise OSError(err, f"{name}: {os.strerror(err)}")
            if moved != step:
                raise OSError(f"{name}: moved {moved} of {step} bytes")

    return move


def _rates(size: int, seconds: dict[str, list[float]]) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """Median seconds and GB/s of each row, ``size`` bytes per round."""
    med = {name: report.median(times) for name, times in seconds.items()}
    return med, {name: size / s / 1e9 if s else None for name, s in med.items()}


def _timed_rounds(runs: dict[str, Callable[[], Any]], repeat: int) -> dict[str, list[float]]:
    """Seconds of each run per round, rows interleaved; the first round warms up and is dropped."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat + 1):
        for name, run in runs.items():
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    return {name: times[1:] for name, times in seconds.items()}


def bench_host(*, size: int = 1 << 30, group: int = 16 << 20, repeat: int = 7, cma: bool = True) -> dict[str, Any]:
    """Time a copy, a checksum, and the two pipelined together, on ``size`` bytes.

    Args:
        size: Bytes per round (source and destination each take this much memory, and as much
            again in a child process for the CMA rows).
        group: Bytes per step of the pipelined rows (``nixl://`` moves 16 MiB per transfer).
        repeat: Rounds; medians are reported.
        cma: Also time the same with the copy made by ``process_vm_readv``/``writev`` to and from
            another process's memory (UCX's same-host path); skipped, with the reason recorded,
            where the kernel does not allow it.

    Returns:
        A JSON-ready dict: params, per-round seconds, medians, GB/s, each row's ratio to
        ``copy`` and, under ``cma``, the CMA rows and their ratios to the bare CMA copies.

    Raises:
        ConfigError: ``group`` is larger than ``size``.
    """
    if group > size:
        raise ConfigError(f"bench host: --group {format_size(group)} is larger than --size {format_size(size)}")
    # Page aligned, as an engine's KV pool and the peer's pool are: misaligned buffers copy at
    # half speed on some CPUs and would understate the copy. Written, so every page is mapped.
    src, dst = page_aligned(1, size).reshape(-1), page_aligned(1, size).reshape(-1)
    src.fill(1)
    dst.fill(0)
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

    runs: dict[str, Callable[[], Any]] = {
        "copy": serial(copy),
        "checksum": serial(check_dst),
        "copy_then_check": lambda: _pipelined(groups, copy, check_dst, first_in_helper=False),
        "check_then_copy": lambda: _pipelined(groups, check_src, copy, first_in_helper=True),
        "check_with_copy": lambda: _alongside(groups, copy, check_src),
        "fused": lambda: frame.copy_with_checksum(dst, src),
    }
    seconds = _timed_rounds(runs, repeat)
    med, gbps = _rates(size, seconds)
    result: dict[str, Any] = {
        "workload": "host",
        "params": {"size": size, "group": group, "repeat": repeat, "cpus": list(_cpus())},
        "seconds": seconds,
        "median_s": med,
        "gbps": gbps,
        "ratio_vs_copy": {name: report.ratio(gbps[name], gbps["copy"]) for name in _ROWS},
    }
    if cma:
        result["cma"] = _bench_cma(
            size=size,
            groups=groups,
            dst=dst,
            src=src,
            check_dst=check_dst,
            check_src=check_src,
            serial=serial,
            repeat=repeat,
        )
    return result


def _bench_cma(
    *,
    size: int,
    groups: list[tuple[int, int]],
    dst: np.ndarray,
    src: np.ndarray,
    check_dst: Callable[[int, int], None],
    check_src: Callable[[int, int], None],
    serial: Callable[[Callable[[int, int], Any]], Callable[[], None]],
    repeat: int,
) -> dict[str, Any]:
    """The CMA rows: reads into ``dst`` and writes from ``src`` against a child's memory."""
    try:
        read, write = _cma_call("process_vm_readv"), _cma_call("process_vm_writev")
        with _other_process_memory(size) as (pid, remote):
            read(pid, dst.ctypes.data, remote, min(size, 4096))  # a refusal shows here, untimed

            def cma_read(off: int, n: int) -> None:
                read(pid, dst.ctypes.data + off, remote + off, n)

            def cma_write(off: int, n: int) -> None:
                write(pid, src.ctypes.data + off, remote + off, n)

            runs: dict[str, Callable[[], Any]] = {
                "cma_read": serial(cma_read),
                "cma_read_then_check": lambda: _pipelined(groups, cma_read, check_dst, first_in_helper=False),
                "cma_write": serial(cma_write),
                "check_then_cma_write": lambda: _pipelined(groups, check_src, cma_write, first_in_helper=True),
                "check_with_cma_write": lambda: _alongside(groups, cma_write, check_src),
            }
            seconds = _timed_rounds(runs, repeat)
    except OSError as exc:
        logger.info("bench host: no CMA rows: %s", exc)
        return {"skipped": str(exc)}
    med, gbps = _rates(size, seconds)
    return {
        "seconds": seconds,
        "median_s": med,
        "gbps": gbps,
        "ratio_vs_cma": {
            "cma_read_then_check": report.ratio(gbps["cma_read_then_check"], gbps["cma_read"]),
            "check_then_cma_write": report.ratio(gbps["check_then_cma_write"], gbps["cma_write"]),
            "check_with_cma_write": report.ratio(gbps["check_with_cma_write"], gbps["cma_write"]),
        },
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
        "check_with_copy": "check alongside copy (put)",
        "fused": "fused 256 KiB steps",
    }
    rows = [
        [labels[name], result["gbps"][name], result["median_s"][name] * 1e3, result["ratio_vs_copy"][name], "copy"]
        for name in _ROWS
    ]
    c = result.get("cma")
    if c and "gbps" in c:
        for name, label, ref in (
            ("cma_read", "CMA read from another process", None),
            ("cma_read_then_check", "CMA read, then check (get)", "cma_read"),
            ("cma_write", "CMA write to another process", None),
            ("check_then_cma_write", "check, then CMA write (put)", "cma_write"),
            ("check_with_cma_write", "check alongside CMA write (put)", "cma_write"),
        ):
            ratio = c["ratio_vs_cma"][name] if ref else 1.0
            rows.append([label, c["gbps"][name], c["median_s"][name] * 1e3, ratio, ref or name])
    print(report.render_table(["operation", "GB/s", "ms / round", "ratio", "vs"], rows, title=title))
    if c and "skipped" in c:
        print(f"no CMA rows: {c['skipped']}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench host`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("host", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--size",
        type=size_arg,
        default=1 << 30,
        help="bytes per round (default 1GiB; three times this is held, twice without the CMA rows)",
    )
    p.add_argument("--group", type=size_arg, default=16 << 20, help="bytes per pipelined step (default 16MiB)")
    p.add_argument("--repeat", type=positive_int, default=7, help="rounds; the median is reported (default 7)")
    p.add_argument("--no-cma", dest="cma", action="store_false", help="skip the rows against another process")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench host`` from parsed arguments."""
    result = bench_host(size=args.size, group=args.group, repeat=args.repeat, cma=args.cma)
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("host", format_size(args.size)), result)
    print(f"results: {path}")
    return 0
