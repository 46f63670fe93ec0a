"""``lmcache bench backend``: put/get throughput and latency of one backend against a raw baseline.

What it measures
----------------
Each round puts ``count`` values of ``value_size`` bytes in batches of ``batch`` keys, with
``concurrency`` batches in flight, then reads them all back with ``get_into`` into preallocated
destination buffers. Throughput is bytes moved over the wall time of the phase (decimal GB/s);
latency is the time of each batch call (p50/p99 in ms). The same bytes go through a *baseline* in
the same round: the raw operation the backend is built on (a memcpy for ``memory://``, plain file
writes and reads for ``file://``), so the reported ratio ``backend / baseline`` says how much the
backend costs over the hardware floor on this machine, whatever the machine.

Method, and why
---------------
* Rounds alternate which system goes first (backend then baseline, then the other way), and the
  report gives medians over rounds: shared, noisy machines drift within seconds, and interleaving
  spreads the drift over both sides. ``--warmup`` rounds (default 1) run first and are kept in the
  JSON but left out of the medians: they pay first-touch page faults of pools and buffers.
* Every round uses fresh keys (values are immutable: re-putting a held key is an ``EXISTS``
  no-op that would post an impossibly fast number) and deletes them afterwards, so the store only
  ever holds one round's working set. A put that is not ``STORED`` stops the run with an error.
  For a bounded backend whose URL sets no capacity, capacity is raised to fit the working set.
* Every value of every get (backend and baseline) is compared byte for byte with what was put,
  outside the timed region; destination buffers are poisoned before each get phase, and each
  round stamps its values differently, so a backend returning stale, foreign or no bytes fails
  the run with :class:`~lmcache.errors.IntegrityError` instead of posting a fast number.
* Source and destination buffers are allocated and touched once, up front, page aligned: an
  engine copies between its preallocated (pinned) KV buffers and the cache, never into fresh
  allocations.
* Latency is per batch *call* with ``concurrency`` calls in flight. A backend that interleaves its
  batches on the event loop shows about ``concurrency`` times its service time, while a baseline
  that runs each batch to completion does not; compare latencies at ``--concurrency 1`` and
  throughput at any concurrency. The ratio in the table is for throughput.

The default value size, 2 MiB, is one 256-token chunk of a small GQA model in fp16: 256 tokens
x 16 layers x 2 (K and V) x 2 KV heads x 64 head dim x 2 bytes. For scale, Llama-3-8B's
256-token chunk is 32 MiB (32 layers x 8 KV heads x 128 dim); pass ``--value-size 32MiB`` for it.

Baselines (the extension point)
-------------------------------
The baselines live in :mod:`lmcache.bench.baselines`, one module per store, registered by backend
class with :func:`register_baseline` (so every scheme a class serves gets its baseline), either
as a factory or as a lazy ``"package.module:factory"`` path (so registering one imports no SDK).
A factory takes the backend under test (built, not yet opened: read its settings for paths,
servers, fsync policy, and build clients with its public factories) and the :class:`Workload`,
and returns a :class:`Baseline` or None when no raw equivalent exists for that configuration. A
baseline implements ``put_batch``/``get_batch`` over the same slots and buffers the backend sees,
plus optional ``open``/``end_round``/``aclose``. Built in: a memcpy into a preallocated pool for
``memory://`` (:class:`MemcpyBaseline`), plain file I/O in the backend's root for ``file://``
(:class:`RawFileBaseline`), raw redis-py and a raw-socket RESP client for the Redis schemes, raw
aioboto3 for ``s3://``, the raw Mooncake store for ``mooncake://``, raw NIXL transfers for
``nixl://``, and a memcpy through ``/dev/shm`` or a raw socket for ``lm://``. Backends without a
baseline report the backend alone (ratio ``-``).

``--checked`` adds a third system: a second instance of the raw baseline wrapped in
:class:`CheckedBaseline`, which makes lmcache's integrity check around it (xxh3 of each source
before a put, of what landed after a get, compared). Its ratio to the raw baseline is what the
check alone costs on this host; the backend's ratio to it is what lmcache costs beyond the check.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

import numpy as np

from lmcache.backends.base import PutStatus, StorageBackend, redact_url, split_url
from lmcache.backends.registry import open_backend
from lmcache.bench import non_negative_int, page_aligned, positive_int, report, size_arg
from lmcache.bench.baselines import Baseline, BaselineFactory, baseline_schemes, make_baselines, register_baseline
from lmcache.bench.baselines.checked import CheckedBaseline
from lmcache.bench.baselines.file import RawFileBaseline
from lmcache.bench.baselines.memory import MemcpyBaseline
from lmcache.config import format_size
from lmcache.errors import BackendError, CapacityError, ConfigError, IntegrityError
from lmcache.keys import CacheKey

__all__ = [
    "DEFAULT_TOTAL",
    "DEFAULT_VALUE_SIZE",
    "Baseline",
    "BaselineFactory",
    "BenchParams",
    "CheckedBaseline",
    "MemcpyBaseline",
    "RawFileBaseline",
    "Workload",
    "add_parser",
    "baseline_schemes",
    "register_baseline",
    "run_backend_bench",
    "run_cli",
]

logger = logging.getLogger(__name__)

DESCRIPTION = "put/get throughput and latency of a backend URL against a raw baseline"
#: One 256-token fp16 chunk of a small GQA model (16 layers, 2 KV heads, head dim 64).
DEFAULT_VALUE_SIZE = 2 << 20
#: Bytes per round when neither --count nor --total is given: fits the default memory:// pool.
DEFAULT_TOTAL = 256 << 20
# Per-value allowance for headers/alignment when sizing a bounded backend (frames pad to 4 KiB).
_PER_VALUE_OVERHEAD = 8 << 10
_POISON = 0xA5
_STAMP_BYTES = 16


# ---------------------------------------------------------------------------------------------
# Parameters and the workload


@dataclasses.dataclass(frozen=True)
class BenchParams:
    """Options of one ``bench backend`` run (see ``lmcache bench backend --help``)."""

    url: str
    value_size: int = DEFAULT_VALUE_SIZE
    count: int | None = None
    total: int | None = None
    batch: int = 16
    concurrency: int = 4
    repeat: int = 5
    warmup: int = 1
    baseline: str = "auto"
    checked: bool = False
    keys_tokens: int = 1_000_000
    seed: int = 0
    register_memory: bool = True

    def resolved_count(self) -> int:
        """Values per round: ``count``, else ``total / value_size`` rounded up, else the default."""
        if self.count is not None:
            return self.count
        total = self.total if self.total is not None else DEFAULT_TOTAL
        return max(1, -(-total // self.value_size))


class Workload:
    """The buffers and keys one run moves: ``count`` slots of ``value_size`` bytes.

    ``srcs`` and ``dsts`` are ``(count, value_size)`` uint8 arrays, allocated and touched once;
    row ``i`` is slot ``i``. Each round stamps its id into every source row so that values differ
    between rounds, and gets fresh keys.
    """

    def __init__(self, value_size: int, count: int, batch: int, concurrency: int = 1, seed: int = 0) -> None:
        self.value_size = value_size
        self.count = count
        self.batch = batch
        self.concurrency = concurrency
        self.run_id = uuid.uuid4().hex  # keys never collide with an earlier run on a persistent store
        rng = np.random.default_rng(seed)
        # Random bytes: a compressing or deduplicating backend gets no unfair advantage.
        self.srcs = page_aligned(count, value_size)
        for row in self.srcs:  # row by row: no temporary the size of the working set
            row[...] = rng.integers(0, 256, size=value_size, dtype=np.uint8)
        self.dsts = page_aligned(count, value_size)
        self.dsts.fill(_POISON)  # touch every page now, not inside a timed get
        self.batches: list[range] = [range(i, min(i + batch, count)) for i in range(0, count, batch)]

    @property
    def round_bytes(self) -> int:
        """Bytes moved per phase (one put or one get of every slot)."""
        return self.value_size * self.count

    def stamp(self, round_no: int) -> None:
        """Make this round's values unique: write the round number and slot into each row."""
        n = min(_STAMP_BYTES, self.value_size)
        for slot in range(self.count):
            tag = np.frombuffer(
                round_no.to_bytes(8, "little") + slot.to_bytes(8, "little"),
                dtype=np.uint8,
            )
            self.srcs[slot, :n] = tag[:n]

    def keys(self, round_no: int) -> list[CacheKey]:
        """Fresh keys for every slot of ``round_no``."""
        return [
            CacheKey(
                "lmcache-bench",
                1,
                0,
                hashlib.blake2b(f"{self.run_id}:{round_no}:{slot}".encode(), digest_size=32).digest(),
                "uint8",
            )
            for slot in range(self.count)
        ]

    def poison(self) -> None:
        """Overwrite every destination so that bytes left over from an earlier get cannot pass."""
        self.dsts.fill(_POISON)

    def verify(self, what: str, lengths: Sequence[int | None]) -> None:
        """Check every slot came back whole and equal to its source.

        Raises:
            IntegrityError: A miss, a wrong length or different bytes.
        """
        bad: list[str] = []
        for slot in range(self.count):
            n = lengths[slot]
            if n is None:
                bad.append(f"slot {slot}: miss")
            elif n != self.value_size:
                bad.append(f"slot {slot}: {n} bytes instead of {self.value_size}")
            elif not np.array_equal(self.dsts[slot], self.srcs[slot]):
                bad.append(f"slot {slot}: bytes differ from what was put")
        if bad:
            raise IntegrityError(
                f"{what}: {len(bad)} of {self.count} values read back wrong ({'; '.join(bad[:3])}); "
                "refusing to report numbers for a backend that returns wrong data"
            )


# ---------------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class PhaseResult:
    """One timed phase: every batch of a round through one system, one direction."""

    nbytes: int
    wall_s: float
    latencies_s: list[float]

    def as_dict(self) -> dict[str, Any]:
        lat_ms = [x * 1e3 for x in self.latencies_s]
        return {
            "gbps": self.nbytes / self.wall_s / 1e9 if self.wall_s > 0 else None,
            "wall_s": self.wall_s,
            "p50_ms": report.percentile(lat_ms, 50),
            "p99_ms": report.percentile(lat_ms, 99),
            "batches": len(lat_ms),
        }


async def _timed_phase(
    batches: Sequence[range], concurrency: int, value_size: int, op: Callable[[range], Awaitable[None]]
) -> PhaseResult:
    """Run ``op`` over every batch of slots with ``concurrency`` workers; time each call and the whole."""
    latencies: list[float] = []
    pending = iter(batches)

    async def worker() -> None:
        for b in pending:  # a shared iterator: each batch is taken by exactly one worker
            t0 = time.perf_counter()
            await op(b)
            latencies.append(time.perf_counter() - t0)

    workers = min(concurrency, len(batches))
    start = time.perf_counter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    wall = time.perf_counter() - start
    nbytes = sum(len(b) for b in batches) * value_size
    return PhaseResult(nbytes=nbytes, wall_s=wall, latencies_s=latencies)


def _fit_capacity(url: str, probe: StorageBackend, payload: int, needed: int) -> dict[str, Any]:
    """Overrides that make a bounded backend hold the working set (empty when it already does).

    Args:
        url: The backend URL as given.
        probe: The backend built from ``url`` (not opened), to read its effective settings.
        payload: Bytes of the working set's values alone.
        needed: A generous estimate of what they take stored (headers, alignment).

    Raises:
        ConfigError: The URL sets a capacity smaller than the values alone.
    """
    settings = getattr(probe, "settings", None)
    if not probe.capabilities.bounded or not hasattr(settings, "capacity"):
        return {}  # unbounded, or bounded through parts it configures itself (tiered:// tiers)
    capacity = settings.capacity
    query = dict(parse_qsl(split_url(url).query, keep_blank_values=True))
    if "capacity" in query:
        # Only what cannot possibly fit fails here; a near miss surfaces as a rejected put.
        if isinstance(capacity, int) and capacity < payload:
            raise ConfigError(
                f"the benchmark's working set is {format_size(payload)} but the URL sets "
                f"capacity={query['capacity']}; raise capacity or lower --total/--count"
            )
        return {}
    if capacity is None or (isinstance(capacity, int) and capacity < needed):
        return {"capacity": needed}
    return {}


async def run_backend_bench(params: BenchParams) -> dict[str, Any]:
    """Run the benchmark and return the JSON-ready result (see the module docstring).

    Raises:
        ConfigError: Bad URL or options, or a capacity too small for the working set.
        IntegrityError: A get returned bytes different from those put.
        CapacityError: The backend rejected a put for lack of room.
        BackendError: The backend failed or reported ``EXISTS`` for a fresh key.
    """
    if params.baseline not in ("auto", "none"):
        raise ConfigError(f"--baseline must be auto or none, not {params.baseline!r}")
    scheme = split_url(params.url).scheme
    probe = open_backend(params.url)  # no I/O: validates the URL and shows the effective settings
    cls = type(probe)
    count = params.resolved_count()
    # Aligned to 4 KiB so that block-granular allocators (pools, frames, file systems) fit too.
    needed = count * (-(-params.value_size // 4096) * 4096 + _PER_VALUE_OVERHEAD) + (1 << 20)
    overrides = _fit_capacity(params.url, probe, count * params.value_size, needed)
    backend = cls.from_url(params.url, **overrides) if overrides else probe
    shown_url = redact_url(backend.url, cls.secret_options)

    workload = Workload(params.value_size, count, params.batch, params.concurrency, seed=params.seed)
    made = make_baselines(backend, workload, scheme) if params.baseline == "auto" else []
    baseline = made[0] if made else None
    extras = made[1:]
    baselines: dict[str, Baseline] = {} if baseline is None else {"baseline": baseline}
    for extra in extras:
        baselines[extra.name] = extra
    if params.checked:
        # Its own instance of the raw baseline: stores may refuse a second put of a slot.
        inner = (make_baselines(backend, workload, scheme) or [None])[0] if baseline is not None else None
        if inner is None:
            raise ConfigError(f"--checked needs the raw baseline of {scheme}://, and this run has none")
        baselines["checked"] = CheckedBaseline(inner, params.concurrency)

    rounds: list[dict[str, Any]] = []
    total_rounds = params.warmup + params.repeat
    async with backend:
        if params.register_memory:
            # What an engine does with its staging pool: the workload's arrays live for the whole
            # run, so backends that register memory for transfers (nixl://) do it once. The raw
            # baselines register the same arrays once too.
            await backend.register_host_memory(workload.srcs)
            await backend.register_host_memory(workload.dsts)
        opened: list[Baseline] = []
        # Setup made many objects (torch alone brings ~10^6): a full cyclic-GC pass over them
        # took ~90 ms here, landing in whichever timed phase triggered it. Freeze them, as
        # serving engines do after start-up; both systems run under the same rule.
        try:
            for b in baselines.values():
                await b.open()
                opened.append(b)
            gc.collect()
            gc.freeze()
            for r in range(total_rounds):
                rounds.append(await _one_round(r, r < params.warmup, backend, baselines, workload))
                logger.info("round %s/%s done", r + 1, total_rounds)
        finally:
            gc.unfreeze()
            for b in reversed(opened):
                await b.aclose()
        stats = backend.stats()

    measured = [r for r in rounds if not r["warmup"]]
    systems = ["backend", *baselines]
    medians: dict[str, dict[str, dict[str, float | None]]] = {}
    for system in systems:
        medians[system] = {}
        for op in ("put", "get"):
            medians[system][op] = {
                metric: report.median(r[system][op][metric] for r in measured)
                for metric in ("gbps", "p50_ms", "p99_ms")
            }
    ratios: dict[str, float | None] = {}
    for op in ("put", "get"):
        b = medians["backend"][op]
        base = medians.get("baseline", {}).get(op, {})
        ratios[f"{op}_gbps"] = report.ratio(b["gbps"], base.get("gbps"))
        # Latency ratio > 1 means the backend is slower per batch than the baseline.
        ratios[f"{op}_p50_ms"] = report.ratio(b["p50_ms"], base.get("p50_ms"))
        for extra in extras:
            ratios[f"{op}_gbps_vs_{extra.name}"] = report.ratio(b["gbps"], medians[extra.name][op]["gbps"])
        if "checked" in medians:
            checked = medians["checked"][op]["gbps"]
            # The checked raw baseline's share of the raw one: the ceiling for a verifying client.
            ratios[f"{op}_gbps_checked_vs_raw"] = report.ratio(checked, base.get("gbps"))
            ratios[f"{op}_gbps_vs_checked"] = report.ratio(b["gbps"], checked)
    result: dict[str, Any] = {
        "workload": "backend",
        "url": shown_url,
        "scheme": scheme,
        "backend_class": f"{cls.__module__}.{cls.__qualname__}",
        "params": {
            "value_size": params.value_size,
            "count": count,
            "round_bytes": workload.round_bytes,
            "batch": params.batch,
            "concurrency": params.concurrency,
            "repeat": params.repeat,
            "warmup": params.warmup,
            "baseline": params.baseline,
            "checked": params.checked,
            "capacity_override": overrides.get("capacity"),
            "seed": params.seed,
            "register_memory": params.register_memory,
        },
        "baseline": baseline.describe() if baseline is not None else None,
        "checked_baseline": baselines["checked"].describe() if "checked" in baselines else None,
        "extra_baselines": [extra.describe() for extra in extras],
        "units": {
            "gbps": "1e9 bytes/s over the wall time of a phase",
            "p50_ms": "per batch call",
            "ratio": "backend / baseline",
        },
        "verified": "every value of every get, byte for byte",
        "rounds": rounds,
        "median": medians,
        "ratio": ratios,
        "backend_stats": stats,
    }
    return result


#: One phase's operation on one batch of slots.
_BatchOp = Callable[[range], Awaitable[None]]


async def _one_round(
    r: int,
    warmup: bool,
    backend: StorageBackend,
    baselines: dict[str, Baseline],
    w: Workload,
) -> dict[str, Any]:
    w.stamp(r)
    keys = w.keys(r)
    # Rotate who goes first so slow drift of a shared machine does not always favour one side.
    names = ["backend", *baselines]
    order = names[r % len(names) :] + names[: r % len(names)]
    out: dict[str, Any] = {"round": r, "warmup": warmup, "order": order}
    for name in order:
        out[name] = {}
    lengths: dict[str, list[int | None]] = {}

    async def backend_put(b: range) -> None:
        results = await backend.put([keys[s] for s in b], [w.srcs[s] for s in b])
        for s, res in zip(b, results, strict=True):
            if res.status is PutStatus.STORED:
                continue
            if res.status is PutStatus.EXISTS:
                raise BackendError(f"{backend!r} reported EXISTS for a fresh key (slot {s}); numbers would be inflated")
            if res.reason in ("capacity", "too_large"):
                raise CapacityError(
                    f"{backend!r} rejected a put ({res.reason}) in round {r}: the working set of "
                    f"{format_size(w.round_bytes)} does not fit; raise its capacity or lower --total/--count"
                )
            raise BackendError(f"{backend!r} rejected a put: {res.reason}")

    async def backend_get(b: range) -> None:
        got = await backend.get_into([keys[s] for s in b], [w.dsts[s] for s in b])
        for s, n in zip(b, got, strict=True):
            lengths["backend"][s] = n

    def baseline_ops(name: str, base: Baseline) -> tuple[_BatchOp, _BatchOp]:
        async def put(b: range) -> None:
            await base.put_batch(b, [w.srcs[s] for s in b])

        async def get(b: range) -> None:
            got = await base.get_batch(b, [w.dsts[s] for s in b])
            for s, n in zip(b, got, strict=True):
                lengths[name][s] = n

        return put, get

    puts: dict[str, _BatchOp] = {"backend": backend_put}
    gets: dict[str, _BatchOp] = {"backend": backend_get}
    for name, base in baselines.items():
        puts[name], gets[name] = baseline_ops(name, base)
    ok = False
    try:
        for name in order:
            phase = await _timed_phase(w.batches, w.concurrency, w.value_size, puts[name])
            out[name]["put"] = phase.as_dict()
        for name in order:
            w.poison()
            lengths[name] = [None] * w.count
            phase = await _timed_phase(w.batches, w.concurrency, w.value_size, gets[name])
            out[name]["get"] = phase.as_dict()
            w.verify(f"round {r}: {name} get", lengths[name])
        ok = True
    finally:
        # Leave nothing behind in a persistent store, also when the round failed.
        try:
            await backend.delete(keys)
            for base in baselines.values():
                await base.end_round()
        except Exception:
            if ok:
                raise
            logger.warning("cleaning up after failed round %s also failed: %r", r, sys.exc_info()[1])
    return out


# ---------------------------------------------------------------------------------------------
# Output and CLI


def print_summary(result: dict[str, Any]) -> None:
    """Print the result as a table on stdout."""
    p = result["params"]
    base = result["baseline"]
    title = (
        f"lmcache bench backend: {result['url']}\n"
        f"{format_size(p['value_size'])} values x {p['count']} per round ({format_size(p['round_bytes'])}), "
        f"batch {p['batch']}, concurrency {p['concurrency']}, median of {p['repeat']} rounds "
        f"(+{p['warmup']} warmup), every get verified\n"
        f"baseline: {base['name'] + ' - ' + base['doc'] if base else 'none'}"
    )
    checked = result.get("checked_baseline")
    if checked:
        title += (
            f"\nchecked: {checked['name']} - the raw baseline plus xxh3 of every value, compared (what lmcache checks)"
        )
    extras = [e["name"] for e in result.get("extra_baselines", [])]
    for e in result.get("extra_baselines", []):
        title += f"\n{e['name']}: {e['doc']}"
    rows = []
    for op in ("put", "get"):
        for system in ("backend", "baseline", *extras, "checked"):
            m = result["median"].get(system, {}).get(op)
            if m is None:
                continue
            ratio = {
                "backend": result["ratio"][f"{op}_gbps"],
                "checked": result["ratio"].get(f"{op}_gbps_checked_vs_raw"),
            }.get(system)
            row = [op, system, m["gbps"], m["p50_ms"], m["p99_ms"], ratio]
            if checked:
                row.append(result["ratio"].get(f"{op}_gbps_vs_checked") if system == "backend" else None)
            rows.append(row)
    headers = ["op", "system", "GB/s", "p50 ms/batch", "p99 ms/batch", "ratio (GB/s vs baseline)"]
    if checked:
        headers.append("vs checked")
    print(report.render_table(headers, rows, title=title))
    for name in extras:
        put, get = result["ratio"].get(f"put_gbps_vs_{name}"), result["ratio"].get(f"get_gbps_vs_{name}")
        print(f"backend / {name}: put {_fmt_ratio(put)}, get {_fmt_ratio(get)}")
    if base and p["concurrency"] > 1:
        # A backend that interleaves batches on the event loop shows about concurrency x its
        # service time per batch, a baseline that runs each batch to completion does not.
        print(
            f"note: latencies are per call with {p['concurrency']} batches in flight and depend on how each side "
            "schedules them; compare latencies with --concurrency 1, throughput at any concurrency"
        )


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench backend`` on the ``bench`` subparsers."""
    p = subparsers.add_parser(
        "backend",
        help=DESCRIPTION,
        description=(
            "Measure put/get throughput (GB/s) and per-batch latency of a backend against a raw "
            "baseline run in the same process on the same bytes (memcpy for memory://, raw file "
            "I/O for file://). Every get is verified. Prints a table and writes JSON."
        ),
    )
    p.add_argument("--url", required=True, help="backend URL, e.g. 'memory://?capacity=1GiB' or file:///tmp/lmc")
    p.add_argument(
        "--value-size",
        type=size_arg,
        default=DEFAULT_VALUE_SIZE,
        help="bytes per value (default 2MiB: one 256-token fp16 chunk of a 16-layer, 2-KV-head, dim-64 model)",
    )
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--count", type=positive_int, help="values per round")
    amount.add_argument("--total", type=size_arg, help=f"bytes per round (default {format_size(DEFAULT_TOTAL)})")
    p.add_argument("--batch", type=positive_int, default=16, help="keys per put/get call (default 16)")
    p.add_argument("--concurrency", type=positive_int, default=4, help="batches in flight (default 4)")
    p.add_argument("--repeat", type=positive_int, default=5, help="measured rounds; medians reported (default 5)")
    p.add_argument("--warmup", type=non_negative_int, default=1, help="unreported first rounds (default 1)")
    p.add_argument(
        "--baseline", choices=("auto", "none"), default="auto", help="run the scheme's raw baseline (default auto)"
    )
    p.add_argument(
        "--checked",
        action="store_true",
        help="also run the raw baseline with lmcache's integrity check added (xxh3 of each source before a put, "
        "of what landed after a get, compared): the ceiling for any verifying client of the same SDK; "
        "its store needs room for one more working set",
    )
    p.add_argument(
        "--keys-tokens",
        type=non_negative_int,
        default=1_000_000,
        help="also time ChunkHasher on this many tokens (default 1000000; 0 skips)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random values (default 0)")
    p.add_argument(
        "--no-register-memory",
        dest="register_memory",
        action="store_false",
        help="do not declare the workload's buffers with register_host_memory (an engine declares its pool); "
        "backends that register memory for transfers (nixl://) then do it on every call",
    )
    p.add_argument(
        "--json",
        dest="json_path",
        metavar="PATH",
        help="write results here (default bench-results/backend-<scheme>-<timestamp>.json)",
    )
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench backend`` from parsed arguments."""
    from lmcache.bench import keys as keys_bench

    params = BenchParams(
        url=args.url,
        value_size=args.value_size,
        count=args.count,
        total=args.total,
        batch=args.batch,
        concurrency=args.concurrency,
        repeat=args.repeat,
        warmup=args.warmup,
        baseline=args.baseline,
        checked=args.checked,
        keys_tokens=args.keys_tokens,
        seed=args.seed,
        register_memory=args.register_memory,
    )
    result = asyncio.run(run_backend_bench(params))
    if params.keys_tokens:
        result["keys"] = keys_bench.bench_keys(tokens=params.keys_tokens, repeat=params.repeat)
    result["machine"] = report.machine_info()
    print_summary(result)
    if "keys" in result:
        print()
        keys_bench.print_summary(result["keys"])
    path = report.write_json(args.json_path or report.default_json_path("backend", result["scheme"]), result)
    print(f"\nresults: {path}")
    return 0
