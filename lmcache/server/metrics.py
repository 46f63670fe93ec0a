"""Prometheus metrics of ``lmcache server`` (served at ``GET /metrics`` of the control API).

Counters moved by the request path (cheap: a dict lookup and an add):

* ``lmcache_requests_total{op}`` and ``lmcache_request_seconds{op}`` (histogram) per operation;
* ``lmcache_lookup_{hit,miss}_{requests,tokens}_total``: hits and misses of lookups and gets, in
  requests and in tokens (a chunk counts ``chunk_size`` tokens);
* ``lmcache_bytes_total{op}`` and ``lmcache_value_bytes{op}`` (histogram) for ``put``/``get``;
* ``lmcache_errors_total{backend,kind}``: errors answered by the server (``backend="server"``).

Read from the tiered backend at scrape time (a custom collector, so nothing is double-counted):
per-tier hits, misses, bytes read and written, evictions, promotions, errors and timeouts,
calls skipped while a tier is suspended, and keys whose lookup, get or put a fault cost
(``lmcache_tier_*_total{tier,url}``), per-tier used and capacity bytes, live sessions, mapped
shared memory, pins, and the process's resident memory.

Each server has its own registry, so several servers (tests) can live in one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from lmcache.server.daemon import CacheServer

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SIZE_BUCKETS = tuple(float(1 << s) for s in range(10, 31, 2))
_TIER_COUNTERS = (
    ("hits", "hits"),
    ("misses", "misses"),
    ("errors", "errors"),
    ("timeouts", "timeouts"),
    ("evictions", "evictions"),
    ("promotions", "promotions"),
    ("writeback_written", "writeback_written"),
    ("writeback_dropped", "writeback_dropped"),
    ("skipped", "skipped"),
    ("lookup_failures", "lookup_failures"),
    ("get_failures", "get_failures"),
    ("put_failures", "put_failures"),
)


class ServerMetrics:
    """The metrics of one :class:`~lmcache.server.daemon.CacheServer`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter("lmcache_requests", "Requests served, by operation.", ["op"], registry=r)
        self.latency = Histogram(
            "lmcache_request_seconds",
            "Time to serve a request, by operation.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes = Counter("lmcache_bytes", "Value bytes moved, by operation.", ["op"], registry=r)
        self.value_bytes = Histogram(
            "lmcache_value_bytes", "Sizes of values moved, by operation.", ["op"], buckets=_SIZE_BUCKETS, registry=r
        )
        self.hit_requests = Counter("lmcache_hit_requests", "Keys found by gets and lookups.", registry=r)
        self.miss_requests = Counter("lmcache_miss_requests", "Keys not found by gets and lookups.", registry=r)
        self.hit_tokens = Counter("lmcache_hit_tokens", "Tokens found (chunks x chunk_size).", registry=r)
        self.miss_tokens = Counter("lmcache_miss_tokens", "Tokens not found (chunks x chunk_size).", registry=r)
        self.errors = Counter("lmcache_errors", "Errors, by backend and kind.", ["backend", "kind"], registry=r)
        self.tier_latency = Histogram(
            "lmcache_tier_seconds",
            "Time of one call into a tier, by tier and operation.",
            ["tier", "op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tier_bytes = Histogram(
            "lmcache_tier_value_bytes",
            "Sizes of values moved into (put) and out of (get) each tier.",
            ["tier", "op"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self._bound = False

    def bind(self, server: CacheServer) -> None:
        """Export ``server``'s per-tier counters and gauges at scrape time (once)."""
        if not self._bound:
            self._bound = True
            self.registry.register(_TierCollector(server))

    def observe(self, op: str, seconds: float) -> None:
        """One request of ``op`` took ``seconds``."""
        self.requests.labels(op).inc()
        self.latency.labels(op).observe(seconds)

    def error(self, backend: str, kind: str) -> None:
        """Count an error of ``kind`` (``backend="server"`` for protocol/auth/request errors)."""
        self.errors.labels(backend, kind).inc()

    def tier0_in_place(self, op: str, sizes: Sequence[int], seconds: float) -> None:
        """Count tier-0 values moved in place (leased reads, reserved writes).

        Those bypass the timed tier calls, so they are added to the same per-tier histograms here.
        """
        if not sizes:
            return
        self.tier_latency.labels("0", op).observe(seconds)
        hist = self.tier_bytes.labels("0", op)
        for n in sizes:
            hist.observe(n)

    def put(self, nbytes: int) -> None:
        """Bytes stored by a put."""
        self.bytes.labels("put").inc(nbytes)
        self.value_bytes.labels("put").observe(nbytes)

    def get(self, sizes: Sequence[int | None], chunk_size: int) -> None:
        """Outcome of a get (one size per key, None for a miss)."""
        hits = sum(1 for n in sizes if n is not None)
        misses = len(sizes) - hits
        moved = sum(n for n in sizes if n is not None)
        self._hits(hits, misses, chunk_size)
        self.bytes.labels("get").inc(moved)
        for n in sizes:
            if n is not None:
                self.value_bytes.labels("get").observe(n)

    def lookup(self, hit_chunks: int, total_chunks: int, chunk_size: int) -> None:
        """Outcome of a prefix lookup."""
        self._hits(hit_chunks, total_chunks - hit_chunks, chunk_size)

    def _hits(self, hits: int, misses: int, chunk_size: int) -> None:
        if hits:
            self.hit_requests.inc(hits)
            self.hit_tokens.inc(hits * chunk_size)
        if misses:
            self.miss_requests.inc(misses)
            self.miss_tokens.inc(misses * chunk_size)

    def render(self) -> bytes:
        """The exposition text."""
        return generate_latest(self.registry)


class _TierCollector:
    """Reads per-tier counters and gauges from the tiered backend at scrape time."""

    def __init__(self, server: CacheServer) -> None:
        self._server = server

    def collect(self) -> Iterator[Any]:
        server = self._server
        stats = server.stats()
        tiers = stats["backend"].get("tiers", [])
        labels = ["tier", "url"]
        for name, field in _TIER_COUNTERS:
            fam = CounterMetricFamily(
                f"lmcache_tier_{name}", f"Tier {field} counted by the tiered backend.", labels=labels
            )
            for i, t in enumerate(tiers):
                fam.add_metric([str(i), str(t.get("url", ""))], float(t.get(field, 0) or 0))
            yield fam
        read = CounterMetricFamily("lmcache_tier_bytes_read", "Bytes read from each tier.", labels=labels)
        written = CounterMetricFamily("lmcache_tier_bytes_written", "Bytes written to each tier.", labels=labels)
        errs = CounterMetricFamily("lmcache_tier_backend_errors", "Errors counted by each tier backend.", labels=labels)
        used = GaugeMetricFamily("lmcache_tier_used_bytes", "Bytes held by each bounded tier.", labels=labels)
        cap = GaugeMetricFamily("lmcache_tier_capacity_bytes", "Capacity of each bounded tier.", labels=labels)
        for i, t in enumerate(tiers):
            lv = [str(i), str(t.get("url", ""))]
            b = t.get("backend", {}) or {}
            read.add_metric(lv, float(b.get("bytes_read", 0) or 0))
            written.add_metric(lv, float(b.get("bytes_written", 0) or 0))
            errs.add_metric(lv, float((b.get("errors", 0) or 0) + (b.get("corrupt", 0) or 0)))
            if isinstance(b.get("used_bytes"), int):
                used.add_metric(lv, float(b["used_bytes"]))
            if isinstance(b.get("capacity_bytes"), int):
                cap.add_metric(lv, float(b["capacity_bytes"]))
        yield from (read, written, errs, used, cap)
        s = stats["server"]
        for name, help_text in (
            ("sessions", "Connected lm:// clients."),
            ("shm_segments", "Client shared-memory segments mapped now."),
            ("shm_bytes_mapped", "Bytes of client shared memory mapped now."),
            ("pinned_keys", "Keys pinned against eviction now."),
        ):
            g = GaugeMetricFamily(f"lmcache_server_{name}", help_text)
            g.add_metric([], float(s[name]))
            yield g
        rss = GaugeMetricFamily("lmcache_server_resident_bytes", "Resident memory of the server process.")
        rss.add_metric([], float(_rss_bytes()))
        yield rss


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")
