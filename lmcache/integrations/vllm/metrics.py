"""lmcache's counters in vLLM's own statistics: ``KVConnectorStats`` and Prometheus metrics.

vLLM asks every connector (workers after each step, the scheduler after each output) for a
:class:`KVConnectorStats` of what happened since the last ask, adds them up across workers and
hands the sum to its stat loggers: the periodic log line and, through
:class:`LMCachePromMetrics`, counters in vLLM's ``/metrics`` (``vllm:lmcache_*``, with vLLM's
``model_name``/``engine`` labels).
"""

from __future__ import annotations

from typing import Any

from lmcache.errors import MissingDependencyError

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("vllm", "vllm", "lmcache.integrations.vllm") from exc

__all__ = ["PROM_COUNTERS", "PROM_SECONDS", "LMCacheKVConnectorStats", "LMCachePromMetrics"]

#: Connector counters exported as Prometheus counters ``vllm:lmcache_<name>``, with their help text.
PROM_COUNTERS: dict[str, str] = {
    "lookups": "Prompt lookups in lmcache (scheduler)",
    "matched_requests": "Requests with an lmcache hit vLLM accepted",
    "matched_tokens": "Tokens vLLM was told lmcache holds beyond its own prefix cache",
    "load_requests": "Loads from lmcache into vLLM's KV cache",
    "loaded_tokens": "Tokens loaded from lmcache into vLLM's KV cache",
    "loaded_bytes": "KV bytes loaded from lmcache into vLLM's KV cache",
    "load_failures": "Loads that failed or came up short (vLLM recomputes the rest)",
    "failed_tokens": "Planned tokens a load could not deliver",
    "save_requests": "Stores handed to lmcache",
    "saved_tokens": "Tokens handed to lmcache stores (chunks already cached are skipped by lmcache)",
    "saved_bytes": "KV bytes handed to lmcache stores",
    "decode_saved_tokens": "Generated tokens handed to lmcache stores (save_decode_tokens)",
    "save_failures": "Stores that failed",
    "announced_blocks": "vLLM blocks announced in BlockStored KV events",
    "removed_blocks": "vLLM blocks announced in BlockRemoved KV events (no tier holds them any more)",
    "async_loads_started": "Asynchronous loads started (async_loading)",
    "idle_waits": "Steps without a forward pass that waited for an asynchronous load in flight",
    "saves_skipped": "Stores skipped because the request's load had failed",
    "pd_transfers_sent": "PD transfers a prefill instance sent (kv_producer)",
    "pd_sent_tokens": "Prompt tokens of the PD transfers sent",
    "pd_sent_bytes": "KV bytes of the PD transfers sent",
    "pd_in_place_sends": "PD transfers written straight into the cache server's shared-memory pool",
    "pd_send_failures": "PD transfers whose send failed (the decoder is told by a failure mark)",
    "pd_failure_marks": "Failure marks a prefill instance published for its failed sends",
    "pd_transfers_received": "PD transfers a decode instance loaded (kv_consumer)",
    "pd_loaded_bytes": "KV bytes of the PD transfers loaded",
    "pd_transfer_timeouts": "PD transfers that did not land within pd_transfer_timeout (recomputed or failed)",
    "pd_transfers_failed": "PD transfers the decoder found marked failed (recomputed or failed at once)",
    "pd_bad_params": "Requests whose kv_transfer_params lmcache could not use",
}

#: Connector time counters (microseconds) exported as ``vllm:lmcache_<name>_seconds`` counters.
PROM_SECONDS: dict[str, tuple[str, str]] = {
    "pd_send_us": ("pd_send", "Seconds PD sends took, copy out of vLLM's blocks until the completion mark landed"),
    "pd_send_copy_us": ("pd_send_copy", "Seconds PD sends spent copying out of vLLM's blocks"),
    "pd_wait_us": ("pd_wait", "Seconds decode instances waited for PD transfers to appear"),
    "pd_load_us": ("pd_load", "Seconds PD loads took, gets and copies into vLLM's blocks"),
    "pd_load_copy_us": ("pd_load_copy", "Seconds PD loads spent copying into vLLM's blocks"),
}


class LMCacheKVConnectorStats(KVConnectorStats):
    """Counter increments since the last report; aggregation adds them up."""

    def reset(self) -> None:
        """Forget every increment."""
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        """Add ``other``'s increments to these."""
        for key, value in (other.data or {}).items():
            if isinstance(value, (int, float)):
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        """The summed increments (for vLLM's periodic log line)."""
        return {f"lmcache_{k}": v for k, v in sorted(self.data.items()) if isinstance(v, (int, float))}

    def is_empty(self) -> bool:
        """True when nothing was counted."""
        return not any(self.data.values())


class LMCachePromMetrics(KVConnectorPromMetrics):
    """One Prometheus counter per :data:`PROM_COUNTERS` and :data:`PROM_SECONDS` entry, per vLLM engine."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters: dict[str, dict[int, Any]] = {}
        series = [(key, key, doc) for key, doc in PROM_COUNTERS.items()]
        series += [(key, f"{name}_seconds", doc) for key, (name, doc) in PROM_SECONDS.items()]
        for key, name, doc in series:
            metric = self._counter_cls(name=f"vllm:lmcache_{name}", documentation=doc, labelnames=labelnames)
            self.counters[key] = {idx: metric.labels(*values) for idx, values in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        """Add one report's increments to the counters of engine ``engine_idx``."""
        for key, value in transfer_stats_data.items():
            per_engine = self.counters.get(key)
            if per_engine is not None and engine_idx in per_engine and isinstance(value, (int, float)) and value > 0:
                per_engine[engine_idx].inc(value / 1e6 if key in PROM_SECONDS else value)
