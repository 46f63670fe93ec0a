"""Benchmark workloads behind ``lmcache bench <workload>``.

Every workload is a module with three names:

* ``DESCRIPTION``: one line for ``lmcache bench --help``;
* ``add_parser(subparsers) -> argparse.ArgumentParser``: registers ``bench <name>`` and its options;
* ``run_cli(args: argparse.Namespace) -> int``: runs it, prints a table, writes JSON, returns the
  exit status.

To add a workload, write ``lmcache/bench/<name>.py`` with those names (a question-answering
workload goes in :mod:`lmcache.bench.qa`, beside ``long-doc-qa`` and ``multi-round-qa``, and
reuses :mod:`lmcache.bench.qa.common`) and add one line to :data:`WORKLOADS`; the CLI imports a
workload module only to build its parser, and runs it through :func:`checked_json_output` (an
unwritable ``--json`` path fails before the run). Shared output (tables, JSON files, machine info,
medians and ratios) lives in :mod:`lmcache.bench.report`. Performance goals are ratios against a
baseline measured in the same run, never absolute thresholds.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from os import PathLike

import numpy as np

from lmcache.backends import buffers
from lmcache.config import format_size, parse_size

__all__ = ["WORKLOADS", "checked_json_output", "non_negative_int", "page_aligned", "positive_int", "size_arg"]

#: ``bench`` subcommand name → module implementing it (imported when the CLI parser is built).
WORKLOADS: dict[str, str] = {
    "backend": "lmcache.bench.backend",
    "codec": "lmcache.bench.codec",
    "host": "lmcache.bench.host",
    "keys": "lmcache.bench.keys",
    "kernels": "lmcache.bench.kernels",
    "long-doc-qa": "lmcache.bench.qa.long_doc",
    "vllm-long-doc-qa": "lmcache.bench.qa.vllm_long_doc",
    "vllm-mixed": "lmcache.bench.qa.vllm_mixed",
    "vllm-pd": "lmcache.bench.qa.vllm_pd",
    "multi-round-qa": "lmcache.bench.qa.multi_round",
    "rag": "lmcache.bench.rag",
    "sglang": "lmcache.bench.sglang",
    "tier-faults": "lmcache.bench.tier_faults",
}


def checked_json_output(run_cli: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Wrap a workload's ``run_cli`` so that an unwritable ``--json PATH`` fails before it runs.

    Workloads name the option's destination ``json_path`` or ``json``; either is checked with
    :func:`lmcache.bench.report.check_json_path` (a ``ConfigError``: one line from the CLI).
    """

    @functools.wraps(run_cli)
    def run_checked(args: argparse.Namespace) -> int:
        from lmcache.bench.report import check_json_path

        path = getattr(args, "json_path", None) or getattr(args, "json", None)
        if isinstance(path, (str, PathLike)):
            check_json_path(path)
        return run_cli(args)

    return run_checked


def positive_int(text: str) -> int:
    """Parse an integer ≥ 1 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Parse an integer ≥ 0 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def size_arg(text: str) -> int:
    """Parse a positive byte size (an argparse type) such as ``2MiB``, ``512KiB`` or ``4096``."""
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not {exc}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {format_size(value)}")
    return value


def page_aligned(rows: int, cols: int) -> np.ndarray:
    """A ``(rows, cols)`` uint8 array starting on a page boundary, like a pinned KV pool.

    Rows are page aligned too when ``cols`` is a multiple of the page size, which O_DIRECT
    paths (raw or in a backend) need to skip a staging copy. A plain ``numpy`` allocation of this
    size starts 16 bytes past a page boundary (the allocator's header): copies between it and
    64-byte aligned memory ran at half speed on an AMD EPYC VM (``rep movsb`` with source and
    destination differently aligned within a cache line).
    """
    return buffers.page_aligned(rows * cols).reshape(rows, cols)
