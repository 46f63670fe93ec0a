"""The raw baselines of ``lmcache bench backend``, one module per store, and the registry that picks them.

A baseline is what an application would do with the store's own SDK (or the hardware operation)
alone, on the same bytes as the backend under test, in the same rounds. Each module gets its
client from a public factory of the backend it measures, so the two reach the store on the same
terms and no setup is copied between them:

* :mod:`.memory`: ``memory://`` against ``numpy.copyto`` into a preallocated pool;
* :mod:`.file`: ``file://`` against plain open/write/read of one file per value;
* :mod:`.redis`: the standalone Redis/Valkey schemes against raw redis-py
  (:meth:`~lmcache.backends.redis.RedisBackend.make_client`) and a raw-socket RESP client
  (:meth:`~lmcache.backends.redis.RedisBackend.connect_socket`);
* :mod:`.s3`: ``s3://`` against raw aioboto3 (:meth:`~lmcache.backends.s3.S3Backend.make_client`);
* :mod:`.mooncake`: ``mooncake://`` against the raw Mooncake store
  (:meth:`~lmcache.backends.mooncake.MooncakeBackend.make_store`);
* :mod:`.nixl`: ``nixl://`` against raw NIXL transfers, on an agent from
  :meth:`~lmcache.backends.nixl.NixlBackend.make_agent`;
* :mod:`.lm`: ``lm://`` and ``lm+unix://`` against a memcpy through ``/dev/shm`` or a raw socket.

The registry is keyed by backend class, as ``"package.module:Class"`` paths (the form of the
backend registry, :data:`lmcache.backends.registry.BUILTIN_BACKENDS`), so every scheme a class
serves gets its baseline without being listed here (``rediss``, ``unix``, ``valkey`` and
``valkeys`` are :class:`~lmcache.backends.redis.RedisBackend`), and nothing is imported until a
backend of that class is measured. The key is the exact class: a subclass is another store
(``redis+cluster://`` subclasses the Redis backend, ``nixl+posix://`` the file backend) and has
a baseline only where one is registered for it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import sys
from typing import TYPE_CHECKING

from lmcache.backends.registry import BUILTIN_BACKENDS
from lmcache.bench.baselines.base import Baseline, BaselineFactory
from lmcache.errors import ConfigError, UnknownSchemeError

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = [
    "BUILTIN_BASELINES",
    "Baseline",
    "BaselineFactory",
    "baseline_schemes",
    "make_baselines",
    "register_baseline",
]

logger = logging.getLogger(__name__)

#: Backend class → the factory of its baselines, both as lazy ``"package.module:attr"`` paths.
BUILTIN_BASELINES: dict[str, str] = {
    "lmcache.backends.memory:MemoryBackend": "lmcache.bench.baselines.memory:make",
    "lmcache.backends.file:FileBackend": "lmcache.bench.baselines.file:make",
    "lmcache.backends.redis:RedisBackend": "lmcache.bench.baselines.redis:make",
    "lmcache.backends.s3:S3Backend": "lmcache.bench.baselines.s3:make",
    "lmcache.backends.mooncake:MooncakeBackend": "lmcache.bench.baselines.mooncake:make",
    "lmcache.backends.nixl:NixlBackend": "lmcache.bench.baselines.nixl:make",
    "lmcache.server.client:LMServerBackend": "lmcache.bench.baselines.lm:make",
}
# What ``make_baselines`` reads: the built-ins plus what ``register_baseline`` added; a lazy path
# is replaced by the factory it names once loaded.
_BASELINES: dict[str, BaselineFactory | str] = dict(BUILTIN_BASELINES)
_ENTRY_POINT_GROUP = "lmcache.backends"  # the backend registry's plugin group


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _scheme_target(scheme: str) -> str | None:
    """The ``"package.module:Class"`` serving ``scheme`` in the backend registry (nothing imported)."""
    builtin = BUILTIN_BACKENDS.get(scheme)
    if builtin is not None:
        return builtin.target
    for ep in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP):
        if ep.name == scheme:
            return ep.value.replace(" ", "")
    return None


def _loaded(path: str) -> object | None:
    """The object a ``"module:attr"`` path names when its module is already imported, else None."""
    module, _, attr = path.partition(":")
    loaded = sys.modules.get(module)
    return getattr(loaded, attr, None) if loaded is not None else None


def _keys_of(cls: type, scheme: str | None) -> list[str]:
    """The registry keys that mean ``cls``: its own path, and the path the backend registry names it by."""
    keys = [_class_path(cls)]
    target = _scheme_target(scheme) if scheme else None
    # A re-exported class (``lmcache.backends.nixl:NixlBackend``) is registered by that path;
    # a scheme that dispatched to another class (nixl:///dir?backend=posix) does not count.
    if target is not None and target not in keys and _loaded(target) is cls:
        keys.append(target)
    return keys


def register_baseline(
    backend: type[StorageBackend] | str, factory: BaselineFactory | str, *, replace: bool = False
) -> None:
    """Register the raw baseline of a backend class (every scheme it serves gets it).

    Args:
        backend: The backend class, its ``"package.module:Class"`` path, or a URL scheme that
            stands for the class serving it (``"rediss"`` registers for the Redis backend).
        factory: ``factory(backend, workload) -> Baseline | list[Baseline] | None``, or a lazy
            ``"package.module:attr"`` path to one (imported only when that backend is measured).
        replace: Allow replacing an existing registration (otherwise it is an error).

    Raises:
        ConfigError: The class already has a baseline and ``replace`` is false.
        UnknownSchemeError: ``backend`` is a scheme that no built-in backend or plugin serves.
    """
    if isinstance(backend, type):
        key = _class_path(backend)
    elif ":" in backend:
        key = backend
    else:
        target = _scheme_target(backend)
        if target is None:
            raise UnknownSchemeError(f"no backend serves URL scheme {backend!r}, so it can have no baseline")
        key = target
    if key in _BASELINES and not replace:
        raise ConfigError(f"a benchmark baseline for {key} is already registered")
    _BASELINES[key] = factory


def baseline_schemes() -> list[str]:
    """Schemes whose backend class has a registered baseline (built-ins and installed plugins)."""
    targets = {scheme: b.target for scheme, b in BUILTIN_BACKENDS.items()}
    for ep in importlib.metadata.entry_points(group=_ENTRY_POINT_GROUP):
        targets.setdefault(ep.name, ep.value.replace(" ", ""))
    out = []
    for scheme, target in targets.items():
        cls = _loaded(target)
        if target in _BASELINES or (isinstance(cls, type) and _class_path(cls) in _BASELINES):
            out.append(scheme)
    return sorted(out)


def make_baselines(backend: StorageBackend, workload: Workload, scheme: str | None = None) -> list[Baseline]:
    """The baselines of ``backend`` (built, not opened), the reference one first; empty when it has none.

    Args:
        backend: The backend under test.
        workload: The buffers both sides move.
        scheme: The scheme of the URL it was built from (finds a class registered by the path
            the backend registry knows it by).
    """
    for key in _keys_of(type(backend), scheme):
        if key in _BASELINES:
            break
    else:
        return []
    entry = _BASELINES[key]
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        try:
            entry = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            # A baseline is a yardstick, not the thing measured: report the backend alone.
            logger.warning("baseline %s for %s cannot be loaded (%s); running without one", entry, key, exc)
            return []
        _BASELINES[key] = entry
    made = entry(backend, workload)
    if made is None:
        return []
    return [made] if isinstance(made, Baseline) else list(made)
