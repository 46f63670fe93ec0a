"""``lmcache bench tier-faults``: a memory-tier-hit workload while the remote tier is healthy, dead or hung.

What it measures
----------------
A ``memory://`` + ``redis://`` :class:`~lmcache.tiered.TieredBackend` serves ``--workers``
concurrent callers, each calling ``get_into`` in a loop for ``--duration`` seconds. Most calls
read keys held by the memory tier (hits that never touch Redis); every ``--miss-every``-th call
reads keys held nowhere, so it asks Redis. The same workload runs three times in one process,
against a fresh ``redis-server`` each time:

* ``healthy``: the server answers;
* ``dead``: the server was killed (SIGKILL) just before the measured window; its port refuses;
* ``hung``: the server was stopped (SIGSTOP) just before the window: the kernel still accepts
  connections and requests, nobody answers them.

The fault comes before the window on purpose: finding out that the tier is down (the one wait the
circuit breaker allows) is part of what is measured. Reported per scenario: calls per second and
its ratio to ``healthy`` (the goal: at least 0.90 for ``dead`` and ``hung``), the longest single
call (the goal: ``tier_timeout``, plus 10% for unwinding a cancelled call on a shared loop), how
many calls took longer than ``tier_timeout``, how many waited at least half of it and in how many
separate episodes (calls released together count once; the goal: no more than one per
``tier_retry_after`` of the window), and the stack's counters for the Redis tier (errors,
timeouts, skipped calls).

Every hit is compared with the bytes that were put (outside the timed call), so a stack that
answered fast with wrong or no data fails the run instead of posting a good number. Callers
yield to the event loop between calls (as an engine does between model steps): a memory-tier
hit completes without suspending, and without that one caller could hold the loop.

A slow tier
-----------
:class:`DelayBackend` wraps any backend and waits a fixed time in each call before passing it on
(``delay+memory://?get_delay=0.2``, once :func:`delay_plugin_dir` is on the path); its
``delay_log`` records when each load started and ended. ``lmcache bench vllm-mixed`` and
``tests/vllm/test_slow_tier.py`` configure vLLM children with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, unquote

from lmcache.backends.base import PutResult, StorageBackend, redact_url
from lmcache.backends.registry import BUILTIN_BACKENDS
from lmcache.backends.wrapper import WrappedBackend
from lmcache.bench import positive_int, report, size_arg
from lmcache.config import parse_duration
from lmcache.errors import ConfigError, IntegrityError
from lmcache.keys import CacheKey

__all__ = [
    "DelayBackend",
    "add_parser",
    "bench_tier_faults",
    "delay_plugin_dir",
    "print_summary",
    "read_delay_log",
    "run_cli",
]

DESCRIPTION = "memory-tier-hit throughput with the redis tier healthy vs dead vs hung (circuit breaker)"
SCENARIOS = ("healthy", "dead", "hung")
GOAL_RATIO = 0.90
# A call cut at tier_timeout returns a few ms later (cancellation unwinds, the loop is shared).
LATENCY_SLACK = 1.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _find_server(explicit: str | None) -> str:
    for candidate in (explicit, shutil.which("redis-server"), shutil.which("valkey-server")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError("bench tier-faults needs redis-server or valkey-server (apt-get install redis-server)")


class _Server:
    """A throwaway redis-server child process on a free loopback port, stopped by its PID."""

    def __init__(self, binary: str, folder: str) -> None:
        self.port = _free_port()
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.proc = subprocess.Popen(
            [*argv, "--dir", folder],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            time.sleep(0.05)

    def fault(self, scenario: str) -> None:
        if scenario == "dead":
            self.proc.kill()
            self.proc.wait()
        elif scenario == "hung":
            os.kill(self.proc.pid, signal.SIGSTOP)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()


def _key(i: int) -> CacheKey:
    return CacheKey("lmcache-bench/tier-faults", 1, 0, i.to_bytes(32, "big"), "float16")


def _episodes(ends: list[float], gap: float) -> int:
    """How many separate episodes the blocked calls ending at ``ends`` form (``gap`` apart)."""
    count = 0
    last = -math.inf
    for t in sorted(ends):
        if t - last > gap:
            count += 1
        last = t
    return count


async def _scenario(scenario: str, binary: str, folder: str, p: dict[str, Any]) -> dict[str, Any]:
    from lmcache.tiered import TieredBackend

    size, batch, n_keys = p["value_size"], p["batch"], p["keys"]
    tier_timeout = p["tier_timeout"]
    server = _Server(binary, folder)
    capacity = max(64 << 20, 2 * n_keys * size)
    stack = TieredBackend.from_urls(
        [f"memory://?capacity={capacity}", f"redis://127.0.0.1:{server.port}?prefix=lmcache-bench-faults:"],
        tier_timeout=tier_timeout,
        tier_retry_after=p["tier_retry_after"],
        close_timeout=1,
    )
    values = [os.urandom(size) for _ in range(n_keys)]
    keys = [_key(i) for i in range(n_keys)]
    latencies: list[float] = []
    blocked_ends: list[float] = []
    calls = 0
    try:
        await stack.open()
        results = await stack.put(keys, values)
        if not all(r.ok for r in results):
            raise RuntimeError(f"{scenario}: the memory tier did not take the working set")
        await stack.flush(timeout=30)
        server.fault(scenario)
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + p["duration"]
        miss_base = 1 << 40

        async def worker(w: int) -> None:
            nonlocal calls
            dsts = [bytearray(size) for _ in range(batch)]
            i = 0
            while loop.time() < stop_at:
                i += 1
                if i % p["miss_every"] == 0:
                    idx = [miss_base + (w << 20) + i * batch + j for j in range(batch)]  # held nowhere
                    miss = True
                else:
                    idx = [(w * 7919 + i * batch + j) % n_keys for j in range(batch)]
                    miss = False
                t0 = time.perf_counter()
                got = await stack.get_into([_key(k) for k in idx], dsts)
                t1 = time.perf_counter()
                latencies.append(t1 - t0)
                calls += 1
                if t1 - t0 >= tier_timeout / 2:
                    blocked_ends.append(t1)
                for k, n, dst in zip(idx, got, dsts, strict=True):
                    want = None if miss else size
                    if n != want or (not miss and dst != values[k]):
                        raise IntegrityError(f"{scenario}: key {k} read {n} bytes, expected {want} and its value")
                # A memory-tier hit completes without suspending: without this, one caller could
                # keep the loop to itself, as no engine does (it awaits its model between calls).
                await asyncio.sleep(0)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(p["workers"])))
        elapsed = time.perf_counter() - t_start
        tier = stack.stats()["tiers"][1]
    finally:
        server.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stack.aclose(), max(10.0, 3 * tier_timeout))
    over = sum(1 for t in latencies if t > tier_timeout)
    return {
        "scenario": scenario,
        "calls": calls,
        "elapsed_s": elapsed,
        "calls_per_s": calls / elapsed,
        "latency_ms": {
            "p50": report.percentile(latencies, 50) * 1e3,  # type: ignore[operator]
            "p99": report.percentile(latencies, 99) * 1e3,  # type: ignore[operator]
            "max": max(latencies) * 1e3,
        },
        "calls_over_tier_timeout": over,
        "calls_over_half_tier_timeout": len(blocked_ends),
        "blocked_episodes": _episodes(blocked_ends, gap=tier_timeout / 4),
        "redis_tier": {k: tier[k] for k in ("errors", "timeouts", "skipped", "get_failures", "suspended")},
    }


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One scenario over rounds: the median calls/s, the worst latencies and counts."""
    out = dict(runs[0])
    out["calls_per_s"] = report.median(r["calls_per_s"] for r in runs)
    out["calls"] = sum(r["calls"] for r in runs)
    out["elapsed_s"] = sum(r["elapsed_s"] for r in runs)
    out["latency_ms"] = {q: max(r["latency_ms"][q] for r in runs) for q in ("p50", "p99", "max")}
    for name in ("calls_over_tier_timeout", "calls_over_half_tier_timeout", "blocked_episodes"):
        out[name] = max(r[name] for r in runs)
    out["redis_tier"] = {
        k: (max(r["redis_tier"][k] for r in runs) if k != "suspended" else runs[-1]["redis_tier"][k])
        for k in runs[0]["redis_tier"]
    }
    return out


def bench_tier_faults(
    *,
    duration: float = 10.0,
    workers: int = 8,
    value_size: int = 64 << 10,
    batch: int = 4,
    keys: int = 256,
    miss_every: int = 10,
    tier_timeout: float = 1.0,
    tier_retry_after: float = 1.0,
    redis_server: str | None = None,
    rounds: int = 3,
) -> dict[str, Any]:
    """Run the healthy, dead and hung scenarios in one process and compare them.

    Args:
        duration: Seconds each scenario's measured window lasts.
        workers: Concurrent callers.
        value_size: Bytes per value.
        batch: Keys per ``get_into`` call.
        keys: Values held by the memory tier (the hits).
        miss_every: Every this-many-th call of a worker reads keys held nowhere (asks Redis).
        tier_timeout: The stack's ``tier_timeout`` (seconds).
        tier_retry_after: The stack's ``tier_retry_after`` (seconds).
        redis_server: Path of ``redis-server``/``valkey-server`` (default: from ``PATH``).
        rounds: Rounds of the three scenarios, in rotated order; calls per second is the median
            over rounds, the latency figures and counts the worst round's.

    Returns:
        A JSON-ready dict: parameters, one entry per scenario, ratios to healthy and the goals.
    """
    binary = _find_server(redis_server)
    params: dict[str, Any] = {
        "duration": duration,
        "workers": workers,
        "value_size": value_size,
        "batch": batch,
        "keys": keys,
        "miss_every": miss_every,
        "tier_timeout": tier_timeout,
        "tier_retry_after": tier_retry_after,
        "redis_server": binary,
        "rounds": rounds,
    }

    async def run_all() -> list[list[dict[str, Any]]]:
        out = []
        for r in range(rounds):
            # Rotate the order each round: a shared host's load drifts within seconds.
            order = SCENARIOS[r % 3 :] + SCENARIOS[: r % 3]
            got = {}
            for scenario in order:
                with tempfile.TemporaryDirectory(prefix="lmcache-bench-faults-") as folder:
                    got[scenario] = await _scenario(scenario, binary, folder, params)
            out.append([got[name] for name in SCENARIOS])
        return out

    per_round = asyncio.run(run_all())
    scenarios = [_combine([rnd[i] for rnd in per_round]) for i in range(len(SCENARIOS))]
    healthy = scenarios[0]["calls_per_s"]
    ratios = {s["scenario"]: report.ratio(s["calls_per_s"], healthy) for s in scenarios}
    allowed_episodes = max(1, math.ceil(duration / tier_retry_after)) if tier_retry_after > 0 else None
    faulted = [s for s in scenarios if s["scenario"] != "healthy"]
    return {
        "workload": "tier-faults",
        "params": params,
        "scenarios": scenarios,
        "rounds": per_round,
        "ratio_vs_healthy": ratios,
        "goal": {
            "ratio_at_least": GOAL_RATIO,
            "blocked_episodes_at_most": allowed_episodes,
            "max_latency_ms_at_most": LATENCY_SLACK * tier_timeout * 1e3,
            "met": all(
                (ratios[s["scenario"]] or 0) >= GOAL_RATIO
                and s["latency_ms"]["max"] <= LATENCY_SLACK * tier_timeout * 1e3
                and (allowed_episodes is None or s["blocked_episodes"] <= allowed_episodes)
                for s in faulted
            ),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    """Print the scenarios table to stdout."""
    p = result["params"]
    title = (
        f"tier-faults: memory:// + redis://, {p['workers']} callers, {p['batch']} x {p['value_size']} B per get, "
        f"1 in {p['miss_every']} a miss, tier_timeout {p['tier_timeout']:g}s, "
        f"tier_retry_after {p['tier_retry_after']:g}s, {p['duration']:g}s each, median of {p['rounds']} rounds"
    )
    headers = [
        "redis",
        "calls/s",
        "ratio",
        "p50 ms",
        "p99 ms",
        "max ms",
        f"> {p['tier_timeout']:g}s",
        f">= {p['tier_timeout'] / 2:g}s",
        "episodes",
        "errors",
        "timeouts",
        "skipped",
    ]
    rows = []
    for s in result["scenarios"]:
        lat, t = s["latency_ms"], s["redis_tier"]
        rows.append(
            [
                s["scenario"],
                s["calls_per_s"],
                result["ratio_vs_healthy"][s["scenario"]],
                lat["p50"],
                lat["p99"],
                lat["max"],
                s["calls_over_tier_timeout"],
                s["calls_over_half_tier_timeout"],
                s["blocked_episodes"],
                t["errors"],
                t["timeouts"],
                t["skipped"],
            ]
        )
    print(report.render_table(headers, rows, title=title))
    goal = result["goal"]
    print(
        f"goal: dead and hung >= {goal['ratio_at_least']:.2f} x healthy, longest call <= "
        f"{goal['max_latency_ms_at_most']:.0f} ms, <= {goal['blocked_episodes_at_most']} blocking episodes: "
        f"{'met' if goal['met'] else 'NOT met'}"
    )


# -- a slow tier for tests and benchmarks ---------------------------------------------------------

#: URL options :class:`DelayBackend` takes for itself (the rest go to the wrapped backend).
DELAY_OPTIONS = ("get_delay", "put_delay", "contains_delay", "delay_log", "delay_control")
DELAY_PREFIX = "delay+"


class DelayBackend(WrappedBackend):
    """Any backend, made slow: each call waits a fixed time before the wrapped backend serves it.

    A fault-injection wrapper for tests and benchmarks (a remote tier with a long round trip),
    served as ``delay+<scheme>://…`` once :func:`delay_plugin_dir` is on ``sys.path``, e.g.
    ``delay+memory://?capacity=1GiB&get_delay=0.2``. The delay applies per call (one batch of
    keys), before the wrapped backend is asked; a call cancelled while it waits writes nothing.
    With ``delay_log=PATH`` every ``get_into`` appends two JSON lines to ``PATH`` (``start`` and
    ``end``, with ``time.monotonic()``, which every process on a Linux host shares, and the pid),
    so a test can see when a load was pending without timing anything itself. With
    ``delay_control=PATH`` each ``get_into`` reads its delay (seconds, as text) from ``PATH`` when
    the file exists, so a benchmark can switch the tier between fast and slow within one run.

    Args:
        inner: The backend that stores the values (owned: closed by :meth:`aclose`).
        get_delay: Seconds each ``get_into`` call waits.
        put_delay: Seconds each ``put`` call waits.
        contains_delay: Seconds each ``contains`` call waits (lookups; 0 by default, so only
            loads are slow).
        delay_log: File that ``get_into`` events are appended to (None: no log).
        delay_control: File holding the current ``get_delay`` (read per call; None: fixed).
    """

    #: ``delay+<scheme>`` for every built-in scheme (a tiered stack is slowed tier by tier).
    schemes: ClassVar[tuple[str, ...]] = tuple(DELAY_PREFIX + s for s in BUILTIN_BACKENDS if s != "tiered")

    def __init__(
        self,
        inner: StorageBackend,
        *,
        get_delay: float = 0.0,
        put_delay: float = 0.0,
        contains_delay: float = 0.0,
        delay_log: str | None = None,
        delay_control: str | None = None,
    ) -> None:
        super().__init__(inner)
        for name, value in (("get_delay", get_delay), ("put_delay", put_delay), ("contains_delay", contains_delay)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}: expected a duration of 0 seconds or more, got {value!r}")
        self.get_delay = float(get_delay)
        self.put_delay = float(put_delay)
        self.contains_delay = float(contains_delay)
        self.delay_log = delay_log
        self.delay_control = delay_control
        # Host buffers only: the wrapper adds latency, not a device path.
        self.capabilities = dataclasses.replace(inner.capabilities, device_buffers=False)  # type: ignore[misc]
        self.delayed_calls = {"get": 0, "put": 0, "contains": 0}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> DelayBackend:
        """Build ``delay+<backend url>`` with the delay options in its query (no I/O).

        Raises:
            ConfigError: The URL does not start with ``delay+`` or a delay option is invalid.
        """
        from lmcache.backends.registry import open_backend

        if not url.startswith(DELAY_PREFIX):
            raise ConfigError(f"a delay tier URL starts with {DELAY_PREFIX!r}, got {redact_url(url)!r}")
        base, _, query = url[len(DELAY_PREFIX) :].partition("?")
        kept: list[str] = []
        options: dict[str, Any] = {}
        for part in query.split("&") if query else ():
            name, _, value = part.partition("=")
            if name in DELAY_OPTIONS:
                options[name] = unquote(value)
            else:
                kept.append(part)
        for name in DELAY_OPTIONS:
            if name in overrides:
                options[name] = overrides.pop(name)
        parsed: dict[str, Any] = {}
        for name, value in options.items():
            if name in ("delay_log", "delay_control"):
                parsed[name] = str(value) or None
                continue
            try:
                parsed[name] = parse_duration(value)
            except ValueError as exc:
                raise ConfigError(f"{name}={value!r}: {exc}") from None
        inner = open_backend(base + ("?" + "&".join(kept) if kept else ""), **overrides)
        return cls(inner, **parsed)

    @property
    def url(self) -> str:
        """``delay+`` and the wrapped backend's URL, plus the delay options that are set."""
        inner = self.inner.url
        extra = [
            f"{name}={getattr(self, name):g}"
            for name in ("get_delay", "put_delay", "contains_delay")
            if getattr(self, name)
        ]
        for name in ("delay_log", "delay_control"):
            if getattr(self, name):
                extra.append(f"{name}=" + quote(getattr(self, name), safe="/"))
        if not extra:
            return DELAY_PREFIX + inner
        return DELAY_PREFIX + inner + ("&" if "?" in inner else "?") + "&".join(extra)

    def _log(self, event: str, **fields: Any) -> None:
        if not self.delay_log:
            return
        line = json.dumps({"op": "get", "event": event, "t": time.monotonic(), "pid": os.getpid(), **fields})
        # One short append per event: lines from several processes do not interleave.
        with open(self.delay_log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def stats(self) -> dict[str, Any]:
        """The wrapped backend's stats, plus the delays and how many calls waited."""
        out = super().stats()
        out["delays_s"] = {"get": self.get_delay, "put": self.put_delay, "contains": self.contains_delay}
        out["delayed_calls"] = dict(self.delayed_calls)
        return out

    # -- data path ---------------------------------------------------------------------------

    async def _wait(self, op: str, delay: float) -> None:
        if delay > 0:
            self.delayed_calls[op] += 1
            await asyncio.sleep(delay)

    def _get_delay(self) -> float:
        if self.delay_control:
            try:
                return max(0.0, float(Path(self.delay_control).read_text().strip()))
            except (OSError, ValueError):
                pass  # no control file (yet), or one being rewritten: the configured delay
        return self.get_delay

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        await self._wait("contains", self.contains_delay)
        return await self.inner.contains(keys)

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        delay = self._get_delay()
        self._log("start", keys=len(keys), delay=delay)
        try:
            await self._wait("get", delay)
            got = await self.inner.get_into(keys, dsts)
        except BaseException:
            self._log("end", keys=len(keys), hits=0, failed=True)
            raise
        self._log("end", keys=len(keys), hits=sum(n is not None for n in got))
        return got

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        await self._wait("put", self.put_delay)
        return await self.inner.put(keys, srcs)


def delay_plugin_dir(folder: str | os.PathLike[str]) -> str:
    """Make ``delay+<scheme>://`` URLs openable by any process that has ``folder`` on ``sys.path``.

    Writes a minimal distribution's metadata into ``folder`` whose ``lmcache.backends`` entry
    points map ``delay+<scheme>`` to :class:`DelayBackend` for every built-in scheme: the
    ordinary plugin mechanism, so a vLLM child (and the workers it spawns) finds the slow tier
    through ``PYTHONPATH`` without any change to the registry.

    Returns:
        ``folder`` as a string, to prepend to ``PYTHONPATH`` (or ``sys.path``).
    """
    root = Path(folder)
    meta = root / "lmcache_delay_tier-0.0.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: lmcache-delay-tier\nVersion: 0.0\n")
    target = f"{DelayBackend.__module__}:{DelayBackend.__name__}"
    lines = [f"{scheme} = {target}" for scheme in DelayBackend.schemes]
    (meta / "entry_points.txt").write_text("[lmcache.backends]\n" + "\n".join(lines) + "\n")
    return str(root)


def read_delay_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events a :class:`DelayBackend` appended to ``path`` (none if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench tier-faults`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("tier-faults", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per scenario and round (default 10)")
    p.add_argument("--rounds", type=positive_int, default=3, help="rounds; medians reported (default 3)")
    p.add_argument("--workers", type=positive_int, default=8, help="concurrent callers (default 8)")
    p.add_argument("--value-size", type=size_arg, default=64 << 10, help="bytes per value (default 64KiB)")
    p.add_argument("--batch", type=positive_int, default=4, help="keys per get_into (default 4)")
    p.add_argument("--keys", type=positive_int, default=256, help="values held by the memory tier (default 256)")
    p.add_argument("--miss-every", type=positive_int, default=10, help="every Nth call misses (default 10)")
    p.add_argument("--tier-timeout", type=float, default=1.0, help="the stack's tier_timeout (default 1)")
    p.add_argument("--tier-retry-after", type=float, default=1.0, help="the stack's tier_retry_after (default 1)")
    p.add_argument("--redis-server", metavar="PATH", help="redis-server or valkey-server binary (default: PATH)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench tier-faults`` from parsed arguments (the goal's verdict is printed and in the JSON)."""
    if not args.duration > 0 or not args.tier_timeout > 0 or args.tier_retry_after < 0:
        raise ConfigError("--duration and --tier-timeout must be positive, --tier-retry-after not negative")
    result = bench_tier_faults(
        duration=args.duration,
        workers=args.workers,
        value_size=args.value_size,
        batch=args.batch,
        keys=args.keys,
        miss_every=args.miss_every,
        tier_timeout=args.tier_timeout,
        tier_retry_after=args.tier_retry_after,
        redis_server=args.redis_server,
        rounds=args.rounds,
    )
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("tier-faults", "memory-redis"), result)
    print(f"results: {path}")
    return 0
