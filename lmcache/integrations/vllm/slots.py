"""The vLLM connector's parts that do not import vLLM: slot-mapped KV, settings, engine sharing.

* :class:`SlotMappedKV` is a :class:`~lmcache.engine.KVSource` and
  :class:`~lmcache.engine.KVDestination` over vLLM's paged KV for one request: token ``t`` lives in
  slot ``block_ids[t // block_size] * block_size + t % block_size``, and every chunk moves with one
  :meth:`lmcache.kernels.PagedKV.gather`/:meth:`~lmcache.kernels.PagedKV.scatter` (all layers).
* :class:`ConnectorSettings` parses ``kv_connector_extra_config``.
* :func:`acquire_engine`/:func:`release_engine` let the scheduler-side and worker-side connectors of
  one process share one :class:`~lmcache.engine.CacheEngine` (and so a ``memory://`` tier).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import ConfigError, InvalidArgumentError
from lmcache.kernels import PagedKV
from lmcache.layouts import KVGeometry, KVLayout

__all__ = [
    "ConnectorSettings",
    "SlotMappedKV",
    "acquire_engine",
    "bind_paged_kv",
    "blocks_covering",
    "release_engine",
    "write_stats",
]

logger = logging.getLogger(__name__)


def bind_paged_kv(
    tensors: Sequence[torch.Tensor], geometry: KVGeometry, block_size: int, layout: KVLayout | str
) -> PagedKV:
    """Bind vLLM's per-layer KV tensors (in layer order) for chunk copies, in the named layout.

    The layout comes from the attention backend vLLM picked (see
    :func:`lmcache.integrations.vllm.connector.vllm_kv_layout`), never from the tensors' shape:
    vLLM 0.32 gives every backend the same ``[blocks, heads, block_size, content]`` shape and each
    reads the content its own way.

    Raises:
        LayoutMismatchError: The tensors do not have ``layout``'s form for ``geometry`` and ``block_size``.
    """
    return PagedKV(list(tensors), layout=layout, block_size=block_size, geometry=geometry)


class SlotMappedKV:
    """One request's tokens in vLLM's paged KV, addressed through its block table.

    Args:
        kv: The worker's bound paged KV.
        block_ids: The request's block table (KV cache group 0), in token order.
        lo: Scatters skip tokens before ``lo`` (vLLM computed them itself; its blocks may be
            shared with other requests through vLLM's prefix cache).
        hi: Scatters skip tokens from ``hi`` on (not part of the planned load), if given.
    """

    def __init__(self, kv: PagedKV, block_ids: Sequence[int], *, lo: int = 0, hi: int | None = None) -> None:
        self.kv = kv
        self.geometry = kv.geometry
        self.block_size = kv.block_size
        self.block_ids = torch.as_tensor(list(block_ids), dtype=torch.int64)
        self.lo = lo
        self.hi = hi

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Slot numbers of tokens ``[start, end)``.

        Raises:
            InvalidArgumentError: The block table does not reach token ``end - 1``.
        """
        if end > self.block_ids.numel() * self.block_size:
            raise InvalidArgumentError(
                f"tokens up to {end} need {-(-end // self.block_size)} blocks; the request has {self.block_ids.numel()}"
            )
        pos = torch.arange(start, end, dtype=torch.int64)
        return self.block_ids[pos // self.block_size] * self.block_size + pos % self.block_size

    def gather(self, start: int, end: int, out: torch.Tensor) -> None:
        """Copy tokens ``[start, end)`` (all layers) into the chunk buffer ``out``."""
        self.kv.gather(self.slots(start, end), out).synchronize()

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        """Copy the chunk buffer ``src`` into tokens ``[start, end)``, clipped to ``[lo, hi)``."""
        a = max(start, self.lo)
        b = end if self.hi is None else min(end, self.hi)
        if a >= b:
            return
        if (a, b) != (start, end):
            src = src[:, :, a - start : b - start].contiguous()
        # Synchronous: the chunk buffer goes back to the pool as soon as this returns.
        self.kv.scatter(self.slots(a, b), src).synchronize()


def blocks_covering(block_ids: Sequence[int], block_size: int, start: int, end: int) -> set[int]:
    """Block ids holding any of tokens ``[start, end)``."""
    if end <= start:
        return set()
    first, last = start // block_size, (end - 1) // block_size
    return {int(b) for b in block_ids[first : last + 1]}


#: ``kv_connector_extra_config`` keys the connector reads itself; every other key must be an
#: :class:`~lmcache.config.LMCacheConfig` field.
_OWN_KEYS = (
    "config_file",
    "model_id",
    "stats_dir",
    "shared_dir",
    "save_decode_tokens",
    "async_loading",
    "layerwise",
    "server",
    "server_capacity",
    "server_tiers",
    "eviction_check_interval",
    "eviction_check_keys",
    "pd_transfer_timeout",
)
#: Connector switches among :data:`_OWN_KEYS` (booleans) and their defaults.
_SWITCHES = {"save_decode_tokens": True, "async_loading": True, "layerwise": False}
#: Defaults of the per-host server's options (``server: auto``) and of the eviction check.
DEFAULT_SERVER_CAPACITY = "4GiB"
DEFAULT_EVICTION_CHECK_INTERVAL = 2.0
DEFAULT_EVICTION_CHECK_KEYS = 2048
#: Default of ``pd_transfer_timeout`` (seconds; prefill/decode transfers, see ``pd.py``).
DEFAULT_PD_TRANSFER_TIMEOUT = 30.0


def _pd_transfer_timeout(own: Mapping[str, Any]) -> float:
    """Parse ``pd_transfer_timeout``: positive seconds.

    Raises:
        ConfigError: A bad value (names the key).
    """
    value = own.get("pd_transfer_timeout", DEFAULT_PD_TRANSFER_TIMEOUT)
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise ConfigError(f"kv_connector_extra_config pd_transfer_timeout must be positive seconds, got {value!r}")
    return seconds


def _server_options(own: Mapping[str, Any]) -> dict[str, Any]:
    """Parse ``server``, ``server_capacity``, ``server_tiers`` and the eviction check keys.

    Raises:
        ConfigError: A bad value (names the key).
    """
    from lmcache.backends.registry import check_url
    from lmcache.config import parse_size

    out: dict[str, Any] = {}
    server = own.get("server")
    if server is not None:
        if not isinstance(server, str) or not (server == "auto" or server.startswith(("lm+unix://", "lm://"))):
            raise ConfigError(
                "kv_connector_extra_config server must be 'auto', an lm+unix:///path or an lm://host:port URL, "
                f"got {server!r}"
            )
        out["server"] = server
    capacity = own.get("server_capacity", DEFAULT_SERVER_CAPACITY)
    try:
        if parse_size(capacity) <= 0:
            raise ValueError("must be positive")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"kv_connector_extra_config server_capacity {capacity!r} is invalid: {exc}") from None
    out["server_capacity"] = str(capacity)
    tiers = own.get("server_tiers", [])
    if isinstance(tiers, str):
        tiers = [tiers]
    if not isinstance(tiers, (list, tuple)) or not all(isinstance(t, str) and t for t in tiers):
        raise ConfigError(f"kv_connector_extra_config server_tiers must be a list of tier URLs, got {tiers!r}")
    for url in tiers:
        try:
            check_url(url)
        except ConfigError as exc:
            raise ConfigError(f"kv_connector_extra_config server_tiers: {exc}") from None
    out["server_tiers"] = tuple(tiers)
    interval = own.get("eviction_check_interval", DEFAULT_EVICTION_CHECK_INTERVAL)
    if isinstance(interval, bool) or not isinstance(interval, (int, float, str)):
        raise ConfigError(f"kv_connector_extra_config eviction_check_interval must be seconds, got {interval!r}")
    try:
        interval = float(interval)
    except ValueError:
        raise ConfigError(
            f"kv_connector_extra_config eviction_check_interval must be seconds, got {interval!r}"
        ) from None
    if not interval >= 0:
        raise ConfigError(f"kv_connector_extra_config eviction_check_interval must be >= 0, got {interval!r}")
    out["eviction_check_interval"] = interval
    keys = own.get("eviction_check_keys", DEFAULT_EVICTION_CHECK_KEYS)
    if isinstance(keys, str) and keys.isdigit():
        keys = int(keys)
    if isinstance(keys, bool) or not isinstance(keys, int) or keys < 1:
        raise ConfigError(f"kv_connector_extra_config eviction_check_keys must be a positive integer, got {keys!r}")
    out["eviction_check_keys"] = keys
    return out


@dataclasses.dataclass(frozen=True)
class ConnectorSettings:
    """What ``kv_connector_extra_config`` says.

    Attributes:
        config: lmcache settings: defaults < ``config_file`` (or ``$LMCACHE_CONFIG_FILE``) <
            ``LMCACHE_*`` env < the :class:`~lmcache.config.LMCacheConfig` fields given inline.
        model_id: Model identity in cache keys; ``None`` means vLLM's model name or path.
        stats_dir: Where each connector writes its counters as JSON, or ``None``.
        shared_dir: The ``file://`` directory added when only ``memory://`` tiers are configured
            and the scheduler and workers run in different processes.
        save_decode_tokens: Store the whole chunks of generated tokens too (prompt + answer), so
            a conversation's next turn hits on the previous answer.
        async_loading: Load off the forward path: vLLM parks a request while its prefix loads
            and schedules the others meanwhile.
        layerwise: Move KV layer by layer during the forward pass (synchronous loads and all
            stores; see :mod:`lmcache.integrations.vllm.layerwise`). Off by default.
        server: ``"auto"`` (this user's per-host ``lmcache server``, started if none runs), an
            ``lm+unix://``/``lm://`` URL of a running one, or ``None`` (no server: the tiers as
            configured, plus a ``file://`` tier when needed; see :meth:`shared_config`).
        server_capacity: Memory tier size of a server that ``auto`` starts.
        server_tiers: Tiers behind that memory tier (e.g. ``file://``), fastest first.
        eviction_check_interval: Seconds between the scheduler's checks of the chunks behind its
            ``BlockStored`` events (``BlockRemoved`` for those gone); 0 turns the checks off.
        eviction_check_keys: Most chunk keys one check asks the tiers about.
        pd_transfer_timeout: Prefill/decode (``kv_producer``/``kv_consumer``): the most seconds a
            decoder waits for a transfer to land, and a prefill instance keeps a request's
            blocks for its send (see :mod:`lmcache.integrations.vllm.pd`).
    """

    config: LMCacheConfig
    model_id: str | None = None
    stats_dir: str | None = None
    shared_dir: str | None = None
    save_decode_tokens: bool = True
    async_loading: bool = True
    layerwise: bool = False
    server: str | None = None
    server_capacity: str = DEFAULT_SERVER_CAPACITY
    server_tiers: tuple[str, ...] = ()
    eviction_check_interval: float = DEFAULT_EVICTION_CHECK_INTERVAL
    eviction_check_keys: int = DEFAULT_EVICTION_CHECK_KEYS
    pd_transfer_timeout: float = DEFAULT_PD_TRANSFER_TIMEOUT

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> ConnectorSettings:
        """Parse ``kv_connector_extra_config``.

        Raises:
            ConfigError: An unknown key or a bad value (names the key).
        """
        extra = dict(extra or {})
        own = {k: extra.pop(k) for k in _OWN_KEYS if k in extra}
        # Accept "lmcache.chunk_size" too, as some deployments namespace their extra config.
        overrides = {k.removeprefix("lmcache."): v for k, v in extra.items()}
        known = {f.name for f in dataclasses.fields(LMCacheConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown kv_connector_extra_config key(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted((*_OWN_KEYS, *known)))}"
            )
        config = LMCacheConfig.load(own.get("config_file"), environ=environ, **overrides)
        for key in ("model_id", "stats_dir", "shared_dir"):
            if key in own and (not isinstance(own[key], str) or not own[key]):
                raise ConfigError(f"kv_connector_extra_config {key} must be a non-empty string, got {own[key]!r}")
        switches = {}
        for key, default in _SWITCHES.items():
            value = own.get(key, default)
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                value = value.lower() in ("true", "1", "yes", "on")
            if not isinstance(value, bool):
                raise ConfigError(f"kv_connector_extra_config {key} must be a boolean, got {value!r}")
            switches[key] = value
        return cls(
            config,
            own.get("model_id"),
            own.get("stats_dir"),
            own.get("shared_dir"),
            **switches,
            **_server_options(own),
            pd_transfer_timeout=_pd_transfer_timeout(own),
        )

    def server_tiers_to_start(self) -> list[str]:
        """The tiers of a server that ``server: auto`` starts: memory (in shared memory), then :attr:`server_tiers`."""
        return [f"memory://?capacity={self.server_capacity}", *self.server_tiers]

    def shared_config(self, model_id: str, cross_process: bool) -> LMCacheConfig:
        """The config to run with: the cache server, or a ``file://`` tier when no tier is shared.

        With :attr:`server`, the server is the first tier (``auto`` finds this user's per-host
        server or starts it, see :mod:`lmcache.integrations.vllm.server_auto`) and the
        configured ``memory://`` tiers are dropped: a process-local copy in front of the server
        would hide what the server holds and evicts. Other configured tiers stay behind it.

        Without it: a ``memory://`` tier lives in one process. When the scheduler (which looks
        up) and the workers (which store) are different processes, lookups would never see what
        workers stored, so a ``file://`` tier under :attr:`shared_dir` is appended (and logged).

        Raises:
            BackendUnavailableError: ``server: auto`` found no server and could not start one.
        """
        tiers = list(self.config.tiers)
        if self.server is not None:
            url = self.server
            if url == "auto":
                from lmcache.integrations.vllm.server_auto import ensure_server

                url = ensure_server(self.server_tiers_to_start(), chunk_size=self.config.chunk_size).url
            elif url.startswith("lm+unix://"):
                from lmcache.integrations.vllm.server_auto import socket_alive

                path = url.removeprefix("lm+unix://").partition("?")[0]
                if not socket_alive(path):  # a miss per lookup until it comes up: say why once
                    logger.warning("lmcache: no cache server answers on %s yet; lookups miss until one does", path)
            kept = [t for t in tiers if not t.startswith("memory:")]
            logger.info("lmcache: using the cache server %s (tiers behind it: %s)", url, kept)
            return self.config.replace(tiers=[url, *kept])
        if not cross_process or any(not t.startswith("memory:") for t in tiers):
            return self.config
        base = self.shared_dir or os.path.join(tempfile.gettempdir(), "lmcache-vllm")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_id)[-80:]
        url = f"file://{os.path.abspath(base)}/{safe}"
        logger.warning(
            "lmcache: memory:// tiers are not visible across processes and vLLM's scheduler and workers "
            "run apart; adding the shared tier %s",
            url,
        )
        return self.config.replace(tiers=[*tiers, url])


_ENGINES: dict[tuple[Any, ...], tuple[CacheEngine, int]] = {}
_ENGINES_LOCK = threading.Lock()


def _engine_key(
    geometry: KVGeometry, model_id: str, config: LMCacheConfig, world_size: int, rank: int
) -> tuple[Any, ...]:
    return (geometry, model_id, repr(config), world_size, rank)


def acquire_engine(
    geometry: KVGeometry,
    model_id: str,
    config: LMCacheConfig,
    *,
    world_size: int = 1,
    rank: int = 0,
    create: bool = True,
) -> CacheEngine | None:
    """The process's cache engine for these settings, shared and reference counted.

    Returns:
        The engine, or ``None`` when there is none and ``create`` is false.
    """
    key = _engine_key(geometry, model_id, config, world_size, rank)
    with _ENGINES_LOCK:
        if key in _ENGINES:
            engine, refs = _ENGINES[key]
            _ENGINES[key] = (engine, refs + 1)
            return engine
        if not create:
            return None
        engine = CacheEngine(geometry, model_id, config=config, world_size=world_size, rank=rank)
        _ENGINES[key] = (engine, 1)
        return engine


def release_engine(engine: CacheEngine) -> None:
    """Drop one reference to a shared engine; the last one closes it."""
    with _ENGINES_LOCK:
        for key, (eng, refs) in list(_ENGINES.items()):
            if eng is engine:
                if refs > 1:
                    _ENGINES[key] = (eng, refs - 1)
                    return
                del _ENGINES[key]
                break
    engine.close()


def write_stats(stats_dir: str | None, name: str, stats: Mapping[str, Any]) -> None:
    """Write ``stats`` as JSON to ``stats_dir/name.json`` atomically (a no-op without a dir)."""
    if not stats_dir:
        return
    try:
        path = Path(stats_dir)
        path.mkdir(parents=True, exist_ok=True)
        tmp = path / f".{name}.json.tmp"
        tmp.write_text(json.dumps(stats, sort_keys=True, default=str))
        os.replace(tmp, path / f"{name}.json")
    except OSError as exc:  # stats are a diagnostic: never fail a request over them
        logger.debug("cannot write lmcache stats to %s: %s", stats_dir, exc)


def clear_scope(engine: CacheEngine, timeout: float = 30.0) -> bool:
    """Delete every chunk of ``engine``'s model (all ranks, this tag set) from its tiers.

    Backs vLLM's ``reset_prefix_cache(reset_external=True)``. Pending stores are flushed first so
    none lands after the clear.

    Returns:
        False when a tier cannot list its keys (nothing is deleted then) or a call failed.
    """
    import asyncio

    from lmcache.errors import LMCacheError

    scope = engine.scope

    async def clear() -> int:
        doomed = [k async for k in engine.backend.list_keys() if k.model == scope.model and k.tags == scope.tags]
        for i in range(0, len(doomed), 256):
            await engine.backend.delete(doomed[i : i + 256])
        return len(doomed)

    if not engine.backend.capabilities.listing:
        logger.warning("lmcache: cannot reset the cache: a tier of %r does not list its keys", engine.backend)
        return False
    try:
        engine.flush(timeout=timeout)
        n = engine._run(asyncio.wait_for(clear(), timeout))
    except (LMCacheError, TimeoutError) as exc:
        logger.warning("lmcache: cache reset failed: %s", exc)
        return False
    logger.info("lmcache: cache reset deleted %d chunk(s) of %s", n, scope.model)
    return True
