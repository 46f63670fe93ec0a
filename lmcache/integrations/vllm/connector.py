"""lmcache as a vLLM v1 KV connector (``KVConnectorBase_V1``).

vLLM builds one connector per role: the **scheduler** side decides what to load and store and
hands a :class:`LMCacheConnectorMetadata` to the **worker** side each step, which moves KV
between vLLM's paged cache and lmcache.

* ``get_num_new_matched_tokens`` looks the prompt up (whole chunks) and reports the tokens lmcache
  holds beyond vLLM's own prefix cache; a hit covering the whole prompt is reported one token
  short so vLLM still computes the last token's logits.
* ``build_connector_meta`` turns the plan into loads (token range + block table) and stores (the
  full chunks of the prompt and, with ``save_decode_tokens``, of the generated tokens, once their
  KV is computed, chunked prefill included), so a chat's next turn hits on the previous answer.
* With ``async_loading`` (the default) ``get_num_new_matched_tokens`` answers ``(n, True)``: vLLM
  parks the request, the worker loads on its load thread while other requests run, and reports
  the load through ``get_finished``. Otherwise the worker loads in ``start_load_kv`` before the
  forward. Stores run after the forward in ``wait_for_save``; both copy all layers of a chunk at
  once through :class:`lmcache.kernels.PagedKV`. Stores copy out of vLLM's blocks before
  returning; the puts land asynchronously.
* With ``layerwise`` (off by default) synchronous loads and all stores move one layer at a time
  on a copy thread, overlapped with the forward pass: ``wait_for_layer_load`` waits for its
  layer only and ``save_kv_layer`` hands each computed layer over
  (:mod:`lmcache.integrations.vllm.layerwise`). Stored values are the same either way.
* Counters reach vLLM's stat loggers and ``/metrics`` (``vllm:lmcache_*``) through the
  ``KVConnectorStats`` hooks (:mod:`lmcache.integrations.vllm.metrics`).
* ``kv_role`` ``kv_producer``/``kv_consumer`` (prefill/decode disaggregation through a shared
  tier, vLLM's ``kv_transfer_params`` protocol): the role logic is in
  :mod:`lmcache.integrations.vllm.pd`, called from small hooks here (docs/pd.md).
* A load that comes up short (a backend failed, a chunk vanished or is corrupt) reports the blocks
  it could not fill through ``get_block_ids_with_load_errors``; with ``kv_load_failure_policy:
  recompute`` vLLM recomputes them. Stores of that request in that step are skipped, so KV that
  was never loaded is never stored.

Keys are the engine-independent lmcache keys (:class:`~lmcache.keys.ChunkHasher` over token ids,
scope = model id + :class:`~lmcache.layouts.KVGeometry` identity, TP world size and rank), so a
prefix stored through the transformers integration under the same ``model_id`` is a hit here.

Scheduler and workers: with one worker (TP=1, the ``uni`` executor) both roles live in one process
and share one :class:`~lmcache.engine.CacheEngine`; otherwise lookups go to the tiers directly,
and when every tier is ``memory://`` a ``file://`` tier is added (see
:meth:`ConnectorSettings.shared_config`). Multimodal prompts and prompt embeddings are not cached
(their token ids do not identify their KV); pipeline parallelism and hybrid (sliding-window,
Mamba) KV caches are rejected.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import threading
from typing import TYPE_CHECKING, Any

import torch

from lmcache.engine import CacheEngine
from lmcache.errors import MissingDependencyError, UnsupportedOperationError
from lmcache.integrations.vllm.events import EvictionWatch, block_removed_events, chunk_keys_of_blocks
from lmcache.integrations.vllm.idle import IdleWait
from lmcache.integrations.vllm.layerwise import LayerwiseKV, LayerwiseLoads, LayerwiseSaves
from lmcache.integrations.vllm.metrics import (
    PROM_COUNTERS,
    PROM_SECONDS,
    LMCacheKVConnectorStats,
    LMCachePromMetrics,
)
from lmcache.integrations.vllm.pd import PDScheduler, PDWorker, TransferRef, TransferSave
from lmcache.integrations.vllm.slots import (
    ConnectorSettings,
    SlotMappedKV,
    acquire_engine,
    bind_paged_kv,
    blocks_covering,
    clear_scope,
    release_engine,
    write_stats,
)
from lmcache.kernels import PagedKV
from lmcache.layouts import VLLM_CPU_VEC, VLLM_MLA, VLLM_PAGED, KVGeometry, KVLayout, dtype_name

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.v1.metrics.cache_hit_source import CacheHitSource
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("vllm", "vllm", "lmcache.integrations.vllm") from exc

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["LMCacheConnectorMetadata", "LMCacheConnectorV1", "LoadSpec", "SaveSpec", "vllm_kv_layout"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadSpec:
    """Load tokens ``[start, end)`` of ``tokens``' cached prefix into the request's blocks."""

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    asynchronous: bool = False  # off the forward path, reported through ``get_finished``
    transfer: TransferRef | None = None  # a prefill instance's transfer (kv_consumer), see pd.py


@dataclasses.dataclass
class SaveSpec:
    """Store the chunks of ``tokens`` ending after ``start`` from the request's blocks."""

    req_id: str
    tokens: list[int]
    start: int
    block_ids: list[int]


@dataclasses.dataclass
class LMCacheConnectorMetadata(KVConnectorMetadata):
    """What the scheduler-side connector tells the workers for one step."""

    loads: list[LoadSpec] = dataclasses.field(default_factory=list)
    saves: list[SaveSpec] = dataclasses.field(default_factory=list)
    reset: bool = False  # the scheduler reset the cache: workers clear theirs before this step
    transfers: list[TransferSave] = dataclasses.field(default_factory=list)  # kv_producer sends, see pd.py


@dataclasses.dataclass
class _ReqState:
    """Scheduler-side view of a running request."""

    prompt: list[int]
    block_ids: list[int]
    saved_upto: int = 0
    announced_blocks: int = 0  # vLLM blocks announced in BlockStored events
    request: Request | None = None  # vLLM's live request: its ``all_token_ids`` grows as it decodes

    def tokens(self, with_output: bool) -> list[int]:
        """The prompt, or the prompt and the tokens generated so far."""
        if with_output and self.request is not None:
            return list(self.request.all_token_ids)
        return self.prompt

    def num_tokens(self, with_output: bool) -> int:
        """``len(self.tokens(with_output))`` without copying the tokens."""
        if with_output and self.request is not None:
            return len(self.request.all_token_ids)
        return len(self.prompt)


@dataclasses.dataclass
class _LoadPlan:
    computed: int  # tokens vLLM had itself
    end: int  # tokens valid after the load (what vLLM was told, plus ``computed``)
    hit: int  # end of the last hit chunk (>= end)


def _geometry(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> KVGeometry:
    """This worker's KV geometry, from vLLM's KV cache spec (known to both roles)."""
    model_config = vllm_config.model_config
    if kv_cache_config is not None and kv_cache_config.kv_cache_groups:
        groups = kv_cache_config.kv_cache_groups
        specs = {type(g.kv_cache_spec).__name__ for g in groups}
        if len(groups) != 1 or not specs <= {"FullAttentionSpec", "MLAAttentionSpec"}:
            raise UnsupportedOperationError(
                f"lmcache's vLLM connector supports one full-attention KV cache group, got {sorted(specs)}"
            )
        spec = groups[0].kv_cache_spec
        layers = len(groups[0].layer_names)
        dtype = dtype_name(spec.dtype)
        if type(spec).__name__ == "MLAAttentionSpec":
            return KVGeometry.mla(layers, spec.head_size, dtype)
        return KVGeometry(layers, spec.num_kv_heads, spec.head_size, dtype)
    # Without a KV cache config (older vLLM), fall back to the model config.
    parallel = vllm_config.parallel_config
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = dtype_name(model_config.dtype if cache_dtype == "auto" else cache_dtype)
    layers = model_config.get_num_layers(parallel)
    if model_config.use_mla:
        return KVGeometry.mla(layers, model_config.get_head_size(), dtype)
    return KVGeometry(layers, model_config.get_num_kv_heads(parallel), model_config.get_head_size(), dtype)


#: vLLM 0.32 attention backends whose per-layer ``[blocks, heads, block_size, content]`` view
#: holds each token's K then V in the content axis (they split it with ``.split(head_size, -1)``).
_CONTENT_KV_BACKENDS = frozenset({"FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION"})
#: vLLM-CPU ISAs whose block format is :data:`~lmcache.layouts.VLLM_CPU_VEC` (checked at start).
_CPU_VEC_ISAS = frozenset({"vec", "vec16"})
#: KV cache dtypes stored as plain elements of the model dtype (quantized caches carry scales).
_PLAIN_CACHE_DTYPES = frozenset({"auto", "float16", "bfloat16", "float32"})


def _attention_layers(vllm_config: VllmConfig, layer_names: list[str]) -> list[Any]:
    ctx = vllm_config.compilation_config.static_forward_context
    missing = [n for n in layer_names if n not in ctx]
    if missing:
        raise UnsupportedOperationError(f"lmcache: vLLM has no attention layer named {missing[0]!r}")
    return [ctx[n] for n in layer_names]


def vllm_kv_layout(vllm_config: VllmConfig, layer_names: list[str], geometry: KVGeometry) -> tuple[KVLayout, str]:
    """The KV layout of vLLM's paged cache, from the attention backend vLLM picked for these layers.

    For the CPU backend the block format depends on the ISA vLLM picked for the layers; only the
    ``vec`` and ``vec16`` formats are known (and :func:`check_cpu_block_format` verifies them
    against vLLM's own write kernel).

    Returns:
        The layout and a description (backend name, ISA) for logs.

    Raises:
        UnsupportedOperationError: A backend, ISA or KV cache dtype lmcache does not know.
    """
    layers = _attention_layers(vllm_config, layer_names)
    names = {layer.get_attn_backend().get_name() for layer in layers}
    if len(names) != 1:
        raise UnsupportedOperationError(f"lmcache: layers use several attention backends: {sorted(names)}")
    name = names.pop()
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if cache_dtype not in _PLAIN_CACHE_DTYPES:
        raise UnsupportedOperationError(
            f"lmcache does not support vLLM's quantized KV cache dtype {cache_dtype!r} (attention backend {name})"
        )
    if geometry.is_mla:
        if name.endswith("MLA"):
            return VLLM_MLA, name
        raise UnsupportedOperationError(f"lmcache does not know the MLA KV layout of vLLM attention backend {name!r}")
    if name in _CONTENT_KV_BACKENDS:
        return VLLM_PAGED, name
    if name == "CPU_ATTN":
        isas = {getattr(layer, "isa", None) for layer in layers}
        if None in isas:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isas = {
                _get_attn_isa(
                    vllm_config.model_config.dtype,
                    vllm_config.cache_config.block_size,
                    geometry.head_dim,
                    cache_dtype,
                )
            }
        if len(isas) != 1 or not isas <= _CPU_VEC_ISAS:
            raise UnsupportedOperationError(
                f"lmcache does not know the block format of vLLM-CPU's attention ISA {sorted(map(str, isas))} "
                f"(known: {sorted(_CPU_VEC_ISAS)})"
            )
        return VLLM_CPU_VEC, f"{name}/{isas.pop()}"
    raise UnsupportedOperationError(f"lmcache does not know the KV layout of vLLM attention backend {name!r}")


def check_cpu_block_format(isa: str, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int) -> None:
    """Write known K and V through vLLM-CPU's own cache kernel and read them back as lmcache does.

    Covers a partial block and a block boundary. Guards against a vLLM build whose block format
    differs from :data:`~lmcache.layouts.VLLM_CPU_VEC` for ``isa``.

    Raises:
        UnsupportedOperationError: lmcache reads other values than vLLM wrote.
    """
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(0)
    tokens = block_size + 3
    shape = (tokens, num_kv_heads, head_dim)
    key = torch.randn(shape, generator=gen).to(dtype)
    value = torch.randn(shape, generator=gen).to(dtype)
    cache = torch.zeros(3, num_kv_heads, block_size, 2 * head_dim, dtype=dtype)
    key_cache, value_cache = cache.view(3, num_kv_heads, 2 * block_size, head_dim).chunk(2, dim=2)
    slots = torch.arange(block_size - 2, block_size - 2 + tokens, dtype=torch.int64)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)
    geometry = KVGeometry(1, num_kv_heads, head_dim, dtype_name(dtype))
    out = torch.empty(geometry.chunk_shape(tokens), dtype=dtype)
    PagedKV([cache], layout=VLLM_CPU_VEC, block_size=block_size, geometry=geometry).gather(slots, out)
    if not (torch.equal(out[0, 0], key) and torch.equal(out[0, 1], value)):
        raise UnsupportedOperationError(
            f"vLLM-CPU's block format for ISA {isa!r} is not the one lmcache knows ({VLLM_CPU_VEC.name}); "
            "refusing to move KV in a layout it would scramble"
        )


def _layer_order(name: str) -> tuple[int, str]:
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return (int(m.group(1)) if m else 1 << 30, name)


class LMCacheConnectorV1(KVConnectorBase_V1):
    """lmcache's vLLM connector; see the module docstring and docs/vllm.md."""

    _cache_hit_source = CacheHitSource.EXTERNAL_UNSPECIFIED

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = ConnectorSettings.from_extra_config(extra)
        parallel = vllm_config.parallel_config
        if parallel.pipeline_parallel_size > 1:
            raise UnsupportedOperationError("lmcache's vLLM connector does not support pipeline parallelism yet")
        self.block_size: int = vllm_config.cache_config.block_size
        self.geometry = _geometry(vllm_config, kv_cache_config)
        self.model_id = self.settings.model_id or self.settings.config.model_name or str(vllm_config.model_config.model)
        self.world_size = parallel.tensor_parallel_size
        backend = getattr(parallel, "distributed_executor_backend", None)
        # One worker under the in-process executor: scheduler and worker share a process.
        self.cross_process = parallel.world_size > 1 or backend not in (None, "uni")
        self.config = self.settings.shared_config(self.model_id, self.cross_process)
        self.chunk_size = self.config.chunk_size
        self._engine: CacheEngine | None = None
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {}
        self._reported: dict[str, int] = {}  # counters as of the last get_kv_connector_stats
        self._stats_name = (
            f"{'scheduler' if role == KVConnectorRole.SCHEDULER else 'worker'}-{os.getpid()}-{id(self):x}"
        )
        # Scheduler side.
        self._plans: dict[str, _LoadPlan] = {}
        self._to_load: dict[str, _LoadPlan] = {}
        self._reqs: dict[str, _ReqState] = {}
        self._requests: dict[str, Request] = {}  # live requests seen by a lookup, until they finish
        self._async_ready: list[LoadSpec] = []  # asynchronous loads for the next step's metadata
        self._events: list[Any] = []  # BlockStored events for vLLM's KV event publisher (take_events)
        # BlockRemoved: the chunks behind announced blocks, checked at a bounded rate (events.py).
        kv_events = getattr(vllm_config, "kv_events_config", None)
        watch = role == KVConnectorRole.SCHEDULER and bool(getattr(kv_events, "enable_kv_cache_events", False))
        self._watch = EvictionWatch(
            self.settings.eviction_check_interval if watch else 0.0, self.settings.eviction_check_keys
        )
        self._lookup_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._prefetched: dict[str, concurrent.futures.Future[int]] = {}  # lookups started on arrival
        self._reset_pending = False
        self._pd = PDScheduler(self._kv_transfer_config.kv_role, self._count)  # prefill/decode roles
        # Worker side.
        self.layout_source = ""
        self.kv: PagedKV | None = None
        self.rank = 0
        self._load_errors: set[int] = set()
        self._failed_reqs: set[str] = set()
        self._count_lock = threading.Lock()  # asynchronous loads count from their own thread
        self._load_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loading: dict[str, tuple[LoadSpec, concurrent.futures.Future[set[int]]]] = {}
        self._idle = IdleWait()  # a step without a forward waits briefly for those loads (idle.py)
        self._layerwise: LayerwiseKV | None = None  # bound when ``layerwise`` is on
        self._lw_loads: tuple[list[LoadSpec], LayerwiseLoads] | None = None  # this step's layer-wise loads
        self._lw_saves: LayerwiseSaves | None = None  # this step's layer-wise stores
        self._pd_worker = PDWorker(self.settings.pd_transfer_timeout, self._count)
        logger.info(
            "lmcache connector (%s): model %s, %s, chunk %d tokens, tiers %s",
            role.name,
            self.model_id,
            self.geometry.identity,
            self.chunk_size,
            self.config.tiers,
        )

    # -- shared --------------------------------------------------------------------------------

    def _count(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            self.counters[name] = self.counters.get(name, 0) + n

    @property
    def requires_kv_delivery(self) -> bool:
        """False for ``kv_both``: as a cache, a dropped store is a future miss, never lost data."""
        if self._kv_transfer_config.kv_role == "kv_both":
            return False
        return super().requires_kv_delivery

    def get_kv_connector_stats(self) -> LMCacheKVConnectorStats | None:
        """Counter increments since the last call (vLLM sums them across workers and roles)."""
        with self._count_lock:
            exported = {k: v for k, v in self.counters.items() if k in PROM_COUNTERS or k in PROM_SECONDS}
            delta = {k: v - self._reported.get(k, 0) for k, v in exported.items()}
            self._reported = exported
        delta = {k: v for k, v in delta.items() if v}
        return LMCacheKVConnectorStats(data=delta) if delta else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> LMCacheKVConnectorStats:
        """Rebuild reported stats from their dict form (in vLLM's stat loggers)."""
        return LMCacheKVConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> LMCachePromMetrics:
        """``vllm:lmcache_*`` counters in vLLM's ``/metrics``."""
        return LMCachePromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def stats(self) -> dict[str, Any]:
        """The connector's counters plus its engine's."""
        with self._count_lock:
            counters = dict(self.counters)
        out: dict[str, Any] = {"role": self.role.name, "pid": os.getpid(), **counters}
        if self._engine is not None:
            out["engine"] = {k: v for k, v in self._engine.stats().items() if k != "backend"}
        return out

    def _write_stats(self) -> None:
        write_stats(self.settings.stats_dir, self._stats_name, self.stats())

    def _get_engine(self) -> CacheEngine:
        with self._lock:
            if self._engine is None:
                self._engine = acquire_engine(
                    self.geometry, self.model_id, self.config, world_size=self.world_size, rank=self.rank
                )
            return self._engine

    def shutdown(self) -> None:
        """Finish in-flight loads, flush pending stores and release the engine."""
        self._watch.close()
        if self._layerwise is not None:
            self._layerwise.close()
        for attr in ("_load_pool", "_lookup_pool"):
            pool = getattr(self, attr)
            if pool is not None:
                pool.shutdown(wait=True)
                setattr(self, attr, None)
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None:
            self._write_stats_of(engine)
            release_engine(engine)

    def _write_stats_of(self, engine: CacheEngine) -> None:
        engine.flush(timeout=30)
        stats = self.stats()
        stats["engine"] = {k: v for k, v in engine.stats().items() if k != "backend"}
        write_stats(self.settings.stats_dir, self._stats_name, stats)

    # -- scheduler side ------------------------------------------------------------------------

    @staticmethod
    def _cacheable(request: Request) -> bool:
        return (
            bool(request.prompt_token_ids)
            and not request.mm_features
            and getattr(request, "prompt_embeds", None) is None
        )

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens lmcache can load beyond the ``num_computed_tokens`` vLLM already has."""
        if not self._cacheable(request):
            return 0, False
        prompt = request.prompt_token_ids
        assert prompt is not None
        self._requests[request.request_id] = request
        self._pd.note(request)  # a prefill instance's request sends its prompt (pd.py)
        transfer = self._pd.match(request, num_computed_tokens)
        if transfer is not None:  # a decode instance's request loads the prefill's transfer
            self._prefetched.pop(request.request_id, None)
            return transfer
        hit = self._lookup(request.request_id, prompt)
        self._count("lookups")
        end = min(hit, len(prompt) - 1)  # vLLM must compute at least the last prompt token
        new = end - num_computed_tokens
        if new <= 0:
            self._plans.pop(request.request_id, None)
            return 0, False
        self._plans[request.request_id] = _LoadPlan(num_computed_tokens, end, hit)
        return new, self.settings.async_loading

    def on_new_request(self, request: Request) -> None:
        """Start the request's lookup on arrival, so its latency hides behind queueing."""
        if not self._cacheable(request):
            return
        if self._lookup_pool is None:
            self._lookup_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="lmcache-lookup")
        prompt = list(request.prompt_token_ids or ())
        self._prefetched[request.request_id] = self._lookup_pool.submit(self._get_engine().lookup, prompt)

    def _lookup(self, req_id: str, prompt: list[int]) -> int:
        """The prompt's hit: the lookup started on arrival if there is one, else a lookup now.

        Either way the scheduler waits at most about ``lookup_budget`` (the engine bounds a
        lookup by it; a started one has had part of it already). A lookup not back in time, or
        failed, is a miss.
        """
        fut = self._prefetched.pop(req_id, None)
        try:
            if fut is not None:
                try:
                    return fut.result(timeout=2 * self.config.lookup_budget + 0.05)
                except concurrent.futures.TimeoutError:
                    self._count("lookups_late")
                    return 0
            return self._get_engine().lookup(prompt)
        except Exception as exc:  # a lookup is advisory: never fail scheduling over it
            logger.warning("lmcache lookup failed, treating it as a miss: %s", exc)
            return 0

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        """Commit the load planned for ``request`` once vLLM has given it blocks."""
        incoming = self._pd.take_incoming(request.request_id)
        if incoming is not None:
            ref, computed = incoming
            if num_external_tokens > 0:  # always asynchronous: the load may wait for the transfer
                prompt = list(request.prompt_token_ids or ())
                block_ids = list(blocks.get_block_ids()[0])
                end = computed + num_external_tokens
                self._async_ready.append(LoadSpec(request.request_id, prompt, computed, end, block_ids, True, ref))
                self._count("matched_requests")
                self._count("matched_tokens", num_external_tokens)
            return
        plan = self._plans.pop(request.request_id, None)
        if num_external_tokens <= 0 or plan is None:
            return
        # vLLM may grant fewer tokens than offered; the load ends where vLLM's count ends.
        plan.end = plan.computed + num_external_tokens
        if self.settings.async_loading:
            # vLLM parks the request (WAITING_FOR_REMOTE_KVS) and schedules it once the workers
            # report the load finished; it is not in a scheduler output before then.
            prompt = list(request.prompt_token_ids or ())
            block_ids = list(blocks.get_block_ids()[0])
            self._async_ready.append(
                LoadSpec(request.request_id, prompt[: plan.hit], plan.computed, plan.end, block_ids, True)
            )
        else:
            self._to_load[request.request_id] = plan
        self._count("matched_requests")
        self._count("matched_tokens", num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads and stores."""
        meta = LMCacheConnectorMetadata()
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = new.prompt_token_ids
            if not prompt or new.mm_features or getattr(new, "prompt_embeds", None) is not None:
                self._to_load.pop(new.req_id, None)
                continue
            state = _ReqState(
                list(prompt), list(new.block_ids[0]) if new.block_ids else [], request=self._requests.get(new.req_id)
            )
            self._reqs[new.req_id] = state
            self._plan_load(new.req_id, state, meta)
            self._plan_save(new.req_id, state, new.num_computed_tokens + scheduled.get(new.req_id, 0), meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                # A preempted request comes back with a whole new block table.
                state.block_ids = list(new_blocks[0]) if new_blocks else []
            elif new_blocks:
                state.block_ids.extend(new_blocks[0])
            self._plan_load(req_id, state, meta)
            self._plan_save(req_id, state, cached.num_computed_tokens[i] + scheduled.get(req_id, 0), meta)
        for req_id in scheduler_output.finished_req_ids:
            self._reqs.pop(req_id, None)
            self._to_load.pop(req_id, None)
            self._requests.pop(req_id, None)
        meta.loads.extend(self._async_ready)
        self._async_ready = []
        if self._reset_pending:
            meta.reset, self._reset_pending = True, False
        if meta.loads or meta.saves or meta.transfers:
            self._write_stats()
        return meta

    def reset_cache(self) -> bool:
        """Forget every chunk of this model (vLLM's ``reset_prefix_cache(reset_external=True)``).

        Clears the tiers this process reaches now and tells the workers (next step's metadata) to
        clear theirs, so a worker-local ``memory://`` tier is emptied too.
        """
        self._plans.clear()
        self._to_load.clear()
        self._prefetched.clear()  # started before the reset: they may name deleted chunks
        self._reset_pending = True
        ok = clear_scope(self._get_engine())
        self._count("resets")
        return ok

    def _plan_load(self, req_id: str, state: _ReqState, meta: LMCacheConnectorMetadata) -> None:
        plan = self._to_load.pop(req_id, None)
        if plan is None:
            return
        tokens = state.prompt[: plan.hit]
        meta.loads.append(LoadSpec(req_id, tokens, plan.computed, plan.end, list(state.block_ids)))

    def _plan_save(self, req_id: str, state: _ReqState, computed: int, meta: LMCacheConnectorMetadata) -> None:
        if self._pd.sending(req_id):  # the whole prompt goes at once, as a transfer (pd.py)
            transfer = self._pd.plan_save(req_id, state.prompt, computed, state.block_ids, self.block_size)
            if transfer is not None:
                meta.transfers.append(transfer)
            return
        # With save_decode_tokens the generated tokens count too: ``computed`` covers them once
        # the step that feeds them runs (the newest sampled token has no KV yet and is excluded,
        # as is anything beyond the tokens known now, e.g. under async scheduling).
        limit = min(computed, state.num_tokens(self.settings.save_decode_tokens))
        end = limit - limit % self.chunk_size
        if self.config.save_partial_chunks and limit == len(state.prompt):
            end = limit
        if end <= state.saved_upto:
            return
        blocks = state.block_ids[: -(-end // self.block_size)]
        if len(blocks) * self.block_size < end:
            return  # the block table is not known that far yet; retried next step
        tokens = state.tokens(self.settings.save_decode_tokens)
        meta.saves.append(SaveSpec(req_id, tokens[:end], state.saved_upto, list(blocks)))
        self._announce(state, tokens, end)
        if end > len(state.prompt):
            self._count("decode_saved_tokens", end - max(state.saved_upto, len(state.prompt)))
        state.saved_upto = end

    def _announce(self, state: _ReqState, tokens: list[int], end: int) -> None:
        """Queue a ``BlockStored`` event for the vLLM blocks the stores up to ``end`` now cover whole.

        The events carry vLLM's own block hashes (``request.block_hashes``, the ones its prefix
        cache publishes) and ``medium="LMCACHE"``, so KV-aware routers that follow vLLM's events
        learn what lmcache holds. A store that later fails is not retracted (a router's view is a
        hint; a miss costs a recompute). Blocks that a chunk covers only in part are announced
        once a later store covers them.
        """
        request = state.request
        if request is None:
            return
        try:
            from vllm.distributed.kv_events import BlockStored
            from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

            hashes = list(request.block_hashes)
            if len(hashes) != request.num_tokens // self.block_size:
                return  # vLLM hashes in other units than its blocks here: no event rather than a wrong one
            first, last = state.announced_blocks, min(end // self.block_size, len(hashes))
            if last <= first:
                return
            self._events.append(
                BlockStored(
                    block_hashes=[maybe_convert_block_hash(h) for h in hashes[first:last]],
                    parent_block_hash=maybe_convert_block_hash(hashes[first - 1]) if first else None,
                    token_ids=list(tokens[first * self.block_size : last * self.block_size]),
                    block_size=self.block_size,
                    lora_id=None,
                    medium="LMCACHE",
                    lora_name=None,
                    group_idx=0,
                )
            )
            if self._watch.enabled:
                self._watch.track(
                    [maybe_convert_block_hash(h) for h in hashes[first:last]],
                    chunk_keys_of_blocks(self._get_engine(), tokens, end, range(first, last), self.block_size),
                )
            state.announced_blocks = last
            self._count("announced_blocks", last - first)
        except Exception as exc:  # events are advisory: never fail scheduling over them
            logger.debug("lmcache: no KV event for request %s: %s", request.request_id, exc)

    def take_events(self) -> list[Any]:
        """KV events since the last call (vLLM publishes them with its own).

        ``BlockStored`` for the blocks stores cover, and ``BlockRemoved`` for announced blocks
        whose chunks no tier holds any more (found by :class:`EvictionWatch`'s bounded checks).
        """
        if self._watch.enabled and self._engine is not None:
            self._events.extend(self._removed_events(self._engine))
        out, self._events = self._events, []
        return out

    def _removed_events(self, engine: CacheEngine) -> list[Any]:
        try:
            # The check runs on the engine's own loop, never on the scheduler thread.
            removed = self._watch.poll(engine._loop.submit, lambda: getattr(engine.backend, "tiers", [engine.backend]))
        except Exception as exc:  # events are advisory: never fail scheduling over them
            logger.debug("lmcache: eviction check failed: %s", exc)
            return []
        if removed:
            self._count("removed_blocks", len(removed))
            self._write_stats()
        return block_removed_events(removed)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget the request; stores copy out during the step, so blocks can be freed at once.

        With ``save_decode_tokens`` every whole chunk of the prompt and the answer was stored by
        the step that computed its last token, so nothing is left to do here.
        """
        self._reqs.pop(request.request_id, None)
        self._requests.pop(request.request_id, None)
        self._prefetched.pop(request.request_id, None)
        self._plans.pop(request.request_id, None)
        self._to_load.pop(request.request_id, None)
        # A prefill instance holds the blocks until its transfer is sent (``finished_sending``).
        sent = self._pd.finished(request)
        return sent if sent is not None else (False, None)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[CacheHitSource, int]:
        """Where the external hit came from: ``p2p`` for a PD transfer, else lmcache's source.

        A transfer's tokens were computed by another vLLM instance; lmcache's tiers are not told
        apart. vLLM asks right after :meth:`update_state_after_alloc`, which queued the request's load.
        """
        if not num_external_tokens:
            return {}
        rid = request.request_id
        if any(load.req_id == rid and load.transfer is not None for load in self._async_ready):
            return {CacheHitSource.P2P: num_external_tokens}
        return {self._cache_hit_source: num_external_tokens}

    # -- worker side ---------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        """Bind vLLM's paged KV in the layout of vLLM's attention backend and open the engine.

        Raises:
            UnsupportedOperationError: The backend's layout is not one lmcache knows.
        """
        names = sorted(kv_caches, key=_layer_order)
        layout, source = vllm_kv_layout(self._vllm_config, names, self.geometry)
        if layout is VLLM_CPU_VEC:
            check_cpu_block_format(
                source.rpartition("/")[2],
                self.geometry.torch_dtype,
                self.block_size,
                self.geometry.num_kv_heads,
                self.geometry.head_dim,
            )
        self.kv = bind_paged_kv([kv_caches[n] for n in names], self.geometry, self.block_size, layout)
        if self.settings.layerwise:
            self._layerwise = LayerwiseKV(self.kv, [kv_caches[n] for n in names], names)
        self.layout_source = source
        if self.world_size > 1:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self.rank = get_tensor_model_parallel_rank()
        self._get_engine()
        logger.info("lmcache connector bound %r (attention backend %s)", self.kv, source)

    def _meta(self) -> LMCacheConnectorMetadata | None:
        if not self.has_connector_metadata():
            return None
        meta = self._get_connector_metadata()
        return meta if isinstance(meta, LMCacheConnectorMetadata) else None

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        """Load every planned prefix into its blocks.

        Synchronous loads finish here, before the forward; with ``layerwise`` they go to the copy
        thread instead and :meth:`wait_for_layer_load` waits for each layer. Asynchronous ones go
        to the load thread: their requests are parked by vLLM (no forward touches their blocks)
        until :meth:`get_finished` reports them.
        """
        self._idle.step(forward_context)
        meta = self._meta()
        if meta is not None and meta.reset and self.kv is not None:
            clear_scope(self._get_engine())
        if meta is None or not meta.loads or self.kv is None:
            return
        layerwise: list[LoadSpec] = []
        for load in meta.loads:
            if load.asynchronous:
                if self._load_pool is None:
                    self._load_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-load")
                self._loading[load.req_id] = (load, self._load_pool.submit(self._load, load))
                self._count("async_loads_started")
                continue
            if self._layerwise is not None:
                layerwise.append(load)
                continue
            bad = self._load(load)
            if bad:
                self._load_errors |= bad
                self._failed_reqs.add(load.req_id)
        if layerwise:
            assert self._layerwise is not None
            self._finish_layerwise_loads()  # a previous step's, had vLLM not waited for them
            self._lw_loads = (layerwise, self._layerwise.start_loads(self._get_engine(), layerwise))
            self._count("layerwise_loads", len(layerwise))
        self._write_stats()

    def _load(self, load: LoadSpec) -> set[int]:
        """Scatter one planned prefix into its blocks; returns the blocks it could not fill."""
        assert self.kv is not None
        dst = SlotMappedKV(self.kv, load.block_ids, lo=load.start, hi=load.end)
        try:
            if load.transfer is not None:  # waits, bounded, for the prefill's transfer (pd.py)
                loaded = self._pd_worker.load(self._get_engine(), dst, load)
            else:
                loaded = self._get_engine().retrieve(load.tokens, dst, start=load.start)
        except Exception as exc:  # a failed load is recomputed by vLLM, never a failed step
            logger.warning("lmcache load for request %s failed: %s", load.req_id, exc)
            loaded = 0
        return self._loaded(load, loaded)

    def _loaded(self, load: LoadSpec, loaded: int) -> set[int]:
        """Count a load whose chunks reached token ``loaded``; returns the blocks it did not fill."""
        good = max(min(loaded, load.end), load.start)
        self._count("load_requests")
        self._count("loaded_tokens", good - load.start)
        self._count("loaded_bytes", self.geometry.chunk_nbytes(good - load.start))
        if good >= load.end:
            return set()
        bad = blocks_covering(load.block_ids, self.block_size, good, load.end)
        self._count("load_failures")
        self._count("failed_tokens", load.end - good)
        logger.warning(
            "lmcache loaded %d of %d planned tokens for request %s; vLLM recomputes %d block(s)",
            good - load.start,
            load.end - load.start,
            load.req_id,
            len(bad),
        )
        return bad

    def wait_for_layer_load(self, layer_name: str) -> None:
        """With ``layerwise``, wait until this layer of the step's synchronous loads is in place.

        Otherwise there is nothing to wait for: synchronous loads finished in
        :meth:`start_load_kv`, and asynchronous ones hold no forward.
        """
        pending = self._lw_loads
        if pending is None or self._layerwise is None:
            return
        index = self._layerwise.index.get(layer_name)
        if index is None or index == self._layerwise.num_layers - 1:
            self._finish_layerwise_loads()  # an unknown layer waits for all; the last one settles the loads
            return
        pending[1].wait_layer(index)

    def _finish_layerwise_loads(self) -> None:
        """Wait for the step's layer-wise loads and account them (failed blocks, counters)."""
        pending, self._lw_loads = self._lw_loads, None
        if pending is None:
            return
        loads, job = pending
        for load, result in zip(loads, job.results(), strict=True):
            loaded = 0
            if isinstance(result, BaseException):
                logger.warning("lmcache load for request %s failed: %s", load.req_id, result)
            else:
                loaded = result
            bad = self._loaded(load, loaded)
            if bad:
                self._load_errors |= bad
                self._failed_reqs.add(load.req_id)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        """With ``layerwise``, gather this computed layer of the step's stores on the copy thread.

        Otherwise stores copy all layers at once after the forward (:meth:`wait_for_save`).
        """
        if self._layerwise is None:
            return
        index = self._layerwise.index.get(layer_name)
        meta = self._meta()
        if index is None or meta is None or not meta.saves:
            return
        if self._lw_saves is None:
            self._lw_saves = self._layerwise.start_saves(self._get_engine(), meta.saves)
            self._count("layerwise_saves", len(meta.saves))
        self._lw_saves.layer_done(index)

    def wait_for_save(self) -> None:
        """Put this step's new full chunks (asynchronously), copied out of vLLM's blocks by now.

        Whole-chunk mode gathers all layers here; with ``layerwise`` the layers were gathered as
        the forward handed them over, and this waits for the last ones. Either way the KV is out
        of vLLM's blocks when this returns. Layer-wise loads are settled first, so a store of a
        request whose load failed is skipped in both modes.
        """
        self._finish_layerwise_loads()
        meta = self._meta()
        failed, self._failed_reqs = self._failed_reqs, set()
        staged_saves, self._lw_saves = self._lw_saves, None
        if meta is None or not meta.saves or self.kv is None:
            if staged_saves is not None:
                staged_saves.finish()
                staged_saves.release()
            return
        engine = self._get_engine()
        staged = staged_saves.finish() if staged_saves is not None else None
        try:
            for n, save in enumerate(meta.saves):
                if save.req_id in failed:
                    # Its KV in the failed blocks is not what the tokens produce: never store it.
                    self._count("saves_skipped")
                    continue
                try:
                    src: Any = SlotMappedKV(self.kv, save.block_ids)
                    start = save.start
                    if staged is not None:
                        item = staged[n]
                        if isinstance(item, BaseException):
                            raise item
                        start, src = item
                    engine.store(save.tokens, src, start=start)
                    self._count("save_requests")
                    self._count("saved_tokens", len(save.tokens) - save.start)
                    self._count("saved_bytes", self.geometry.chunk_nbytes(len(save.tokens) - save.start))
                except Exception as exc:  # a failed store is a future miss, never a failed step
                    logger.warning("lmcache store for request %s failed: %s", save.req_id, exc)
                    self._count("save_failures")
        finally:
            if staged_saves is not None:
                staged_saves.release()  # store() copied the staged chunks into its pool
        self._write_stats()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose asynchronous load ended (loaded, short or failed) since the last call.

        The blocks a load could not fill go to :meth:`get_block_ids_with_load_errors`, which vLLM
        calls right after this, so they are reported no later than the request itself. On a step
        without a forward pass (nothing else scheduled) it first waits a few ms at most for a load
        in flight (:mod:`lmcache.integrations.vllm.idle`).

        A prefill instance starts this step's transfers here (after :meth:`wait_for_save`; the
        blocks are still the request's) and reports the finished requests whose transfer is
        done as ``finished_sending``.
        """
        meta = self._meta()
        if meta is not None and meta.transfers and self.kv is not None:
            for transfer in meta.transfers:
                self._pd_worker.start_save(self._get_engine(), SlotMappedKV(self.kv, transfer.block_ids), transfer)
        # A step without a forward pass gives the load thread (and a PD send's commit on the
        # engine's loop) the GIL and a core for a moment.
        if self._idle.wait([*(fut for _, fut in self._loading.values()), *self._pd_worker.in_flight()]):
            self._count("idle_waits")
        sending = self._pd_worker.finished_sending(finished_req_ids) or None
        done = {req_id for req_id, (_, fut) in self._loading.items() if fut.done()}
        if sending and not done:
            self._write_stats()
        if not done:
            return sending, None
        for req_id in done:
            load, fut = self._loading.pop(req_id)
            try:
                self._load_errors |= fut.result()
            except Exception as exc:  # _load catches backend errors; anything else fails the load whole
                logger.warning("lmcache load for request %s failed: %s", req_id, exc)
                self._count("load_failures")
                self._load_errors |= blocks_covering(load.block_ids, self.block_size, load.start, load.end)
        self._write_stats()
        return sending, done

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Blocks whose planned load failed since the last call (vLLM recomputes them)."""
        out, self._load_errors = self._load_errors, set()
        return out
