"""Shared output for every ``lmcache bench`` workload: statistics, a terminal table, JSON files.

Each workload builds a JSON-ready ``dict`` (parameters, per-round numbers, medians, ratios) and
hands it to :func:`write_json`; :func:`machine_info` stamps where it ran and :func:`render_table`
prints the human-readable summary. Nothing here knows about backends or engines, so later
workloads (long-doc-qa, multi-round-qa) reuse it as is.

Conventions shared by all workloads:

* Throughput is in decimal GB/s (1e9 bytes per second); sizes in parameters are bytes.
* Latencies are in milliseconds; percentiles use linear interpolation between samples.
* A *ratio* is ``system / baseline`` measured in the same run on the same bytes: above 1 means
  the system beats the baseline for throughput, below 1 means it is slower.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmcache.errors import ConfigError

__all__ = [
    "DEFAULT_RESULTS_DIR",
    "check_json_path",
    "default_json_path",
    "format_float",
    "machine_info",
    "median",
    "percentile",
    "ratio",
    "render_table",
    "utc_timestamp",
    "write_json",
]

#: Where results go when no ``--json`` path is given (relative to the working directory).
DEFAULT_RESULTS_DIR = Path("bench-results")


def median(values: Iterable[float]) -> float | None:
    """The median of ``values``, or None when there are none."""
    data = [v for v in values if v is not None]
    return statistics.median(data) if data else None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ``values`` with linear interpolation; None if empty."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def ratio(system: float | None, baseline: float | None) -> float | None:
    """``system / baseline``, or None when either is missing or the baseline is zero."""
    if system is None or baseline is None or baseline <= 0:
        return None
    return system / baseline


def utc_timestamp() -> str:
    """A compact UTC timestamp for file names, e.g. ``20261123T130501Z``."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: CPU count, Python, platform, library versions."""
    import numpy as np

    from lmcache import __version__

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "lmcache": __version__,
        "numpy": np.__version__,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    try:  # the usable CPU set can be smaller than the machine's (containers, taskset)
        info["cpu_affinity"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["cpu_affinity"] = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        page_size = os.sysconf("SC_PAGE_SIZE")
        info["memory_bytes"] = int(pages) * int(page_size)
    except (AttributeError, OSError, ValueError):
        info["memory_bytes"] = None
    info["argv"] = list(sys.argv)
    return info


def default_json_path(workload: str, tag: str, results_dir: Path | None = None) -> Path:
    """``bench-results/<workload>-<tag>-<timestamp>.json`` (the directory is not created here)."""
    safe_tag = "".join(c if c.isalnum() or c in "-_." else "_" for c in tag) or "default"
    return (results_dir or DEFAULT_RESULTS_DIR) / f"{workload}-{safe_tag}-{utc_timestamp()}.json"


def _json_default(obj: Any) -> Any:
    # numpy scalars and paths show up in results; anything else is a bug worth seeing.
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: Path | str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path``, creating parent directories.

    The file is written to a temporary name and renamed, so a reader never sees half a result.

    Returns:
        The path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def check_json_path(path: Path | str) -> None:
    """Fail now, not after a long benchmark, when :func:`write_json` could not write ``path``.

    A file is created and removed in the folder the result will go to (folders that do not exist
    yet must be creatable), which also catches read-only file systems and running as root.

    Raises:
        ConfigError: ``path`` is a folder, or its folder cannot be created or written.
    """
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path}: is a directory; give a file name")
    folder = target.parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory", str(existing))
        if existing != folder:
            # Nothing is created before the run: check the nearest existing folder instead.
            if not os.access(existing, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied", str(existing))
            return
        fd, probe = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise ConfigError(f"cannot write --json {path}: {exc.strerror or exc}{where}") from None


def format_float(value: float | None, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals (3 significant digits below 1), ``-`` for None."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 1:
        return f"{value:.3g}"
    return f"{value:.{digits}f}"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> str:
    """A plain-text table with right-aligned numeric columns.

    Args:
        headers: Column titles.
        rows: Cells; floats are formatted with :func:`format_float`, None shows as ``-``.
        title: An optional line printed above the table.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        out = []
        for i, v in enumerate(values):
            out.append(v.rjust(widths[i]) if numeric[i] and i > 0 else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    parts = []
    if title:
        parts.append(title)
    parts.append(line(headers))
    parts.append("  ".join("-" * w for w in widths))
    parts.extend(line(row) for row in cells)
    return "\n".join(parts)


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format_float(v)
    return str(v)
