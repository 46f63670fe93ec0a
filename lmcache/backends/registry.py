"""URL scheme → backend class, resolved lazily.

Built-in backends live in a table of dotted paths plus the extra that installs their SDK, so
importing lmcache imports no SDK. Third-party backends register in the entry-point group
``lmcache.backends`` (name = scheme, value = ``package.module:Class``); the group is read only
when a scheme is asked for, and two distributions claiming one scheme is an error rather than
a silent pick.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
from typing import Any
from urllib.parse import parse_qsl

from lmcache.backends.base import StorageBackend, redact_url, split_url
from lmcache.errors import LMCacheError, MissingDependencyError, PluginConflictError, UnknownSchemeError

__all__ = [
    "BUILTIN_BACKENDS",
    "TIER_URL_HELP",
    "backend_class",
    "check_url",
    "command_line_secrets",
    "env_prefixes",
    "known_schemes",
    "open_backend",
    "warn_command_line_secrets",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmcache.backends"


@dataclasses.dataclass(frozen=True)
class _Builtin:
    target: str
    extra: str | None


BUILTIN_BACKENDS: dict[str, _Builtin] = {
    "memory": _Builtin("lmcache.backends.memory:MemoryBackend", None),
    "file": _Builtin("lmcache.backends.file:FileBackend", None),
    "tiered": _Builtin("lmcache.tiered:TieredBackend", None),
    "redis": _Builtin("lmcache.backends.redis:RedisBackend", "redis"),
    "rediss": _Builtin("lmcache.backends.redis:RedisBackend", "redis"),
    "unix": _Builtin("lmcache.backends.redis:RedisBackend", "redis"),
    "valkey": _Builtin("lmcache.backends.redis:RedisBackend", "redis"),
    "valkeys": _Builtin("lmcache.backends.redis:RedisBackend", "redis"),
    "redis+cluster": _Builtin("lmcache.backends.redis_cluster:RedisClusterBackend", "redis"),
    "s3": _Builtin("lmcache.backends.s3:S3Backend", "s3"),
    "mooncake": _Builtin("lmcache.backends.mooncake:MooncakeBackend", "mooncake"),
    "nixl": _Builtin("lmcache.backends.nixl:NixlBackend", "nixl"),
    "nixl+posix": _Builtin("lmcache.backends.nixl:NixlPosixBackend", "nixl"),
    "gds": _Builtin("lmcache.backends.gds:GdsBackend", "gds"),
    "infinistore": _Builtin("lmcache.backends.infinistore:InfiniStoreBackend", "infinistore"),
    "lm": _Builtin("lmcache.server.client:LMServerBackend", "server"),
    "lm+unix": _Builtin("lmcache.server.client:LMServerBackend", "server"),
}


def _available_builtins() -> list[str]:
    out = []
    for scheme, b in BUILTIN_BACKENDS.items():
        module = b.target.split(":", 1)[0]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is not part of this installation
            found = False
        if found:
            out.append(scheme)
    return out


def _plugin_entry_points(scheme: str | None = None) -> list[importlib.metadata.EntryPoint]:
    eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    if scheme is None:
        return list(eps)
    return [ep for ep in eps if ep.name == scheme]


def known_schemes() -> dict[str, str]:
    """Every scheme that can be opened now: ``{scheme: "built-in" | "plugin <dist>"}``."""
    out = {s: "built-in" for s in _available_builtins()}
    for ep in _plugin_entry_points():
        dist = ep.dist.name if ep.dist is not None else "?"
        out.setdefault(ep.name, f"plugin {dist}")
    return out


def _import_target(target: str, scheme: str, extra: str | None) -> type[StorageBackend]:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or "?"
        if missing in (module_name, "lmcache") or missing.startswith("lmcache."):
            raise UnknownSchemeError(
                f"the {scheme}:// backend ({target}) is not part of this lmcache installation"
            ) from None
        raise MissingDependencyError(missing.split(".")[0], extra, f"the {scheme}:// backend") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, StorageBackend)):
        raise UnknownSchemeError(f"{target} (for {scheme}://) is not a StorageBackend subclass")
    return cls


def backend_class(scheme: str) -> type[StorageBackend]:
    """The backend class serving ``scheme``.

    Raises:
        UnknownSchemeError: No built-in or plugin serves it (lists the known schemes).
        PluginConflictError: Several installed distributions claim it.
        MissingDependencyError: Its SDK is not installed (names the extra).
    """
    plugins = _plugin_entry_points(scheme)
    distinct = {ep.value for ep in plugins}
    builtin = BUILTIN_BACKENDS.get(scheme)
    if plugins and (len(distinct) > 1 or builtin is not None):
        claimants = sorted(
            {f"{ep.dist.name if ep.dist else '?'} ({ep.value})" for ep in plugins}
            | ({f"lmcache built-in ({builtin.target})"} if builtin else set())
        )
        raise PluginConflictError(
            f"URL scheme {scheme!r} is claimed by several backends: {'; '.join(claimants)}. Uninstall all but one."
        )
    if builtin is not None:
        return _import_target(builtin.target, scheme, builtin.extra)
    if plugins:
        ep = plugins[0]
        try:
            cls = ep.load()
        except ImportError as exc:
            dist = ep.dist.name if ep.dist else "?"
            raise MissingDependencyError(exc.name or dist, None, f"the {scheme}:// plugin from {dist}") from exc
        if not (isinstance(cls, type) and issubclass(cls, StorageBackend)):
            raise UnknownSchemeError(f"entry point {ep.value} for {scheme}:// is not a StorageBackend subclass")
        return cls
    known = ", ".join(f"{s}://" for s in sorted(known_schemes()))
    raise UnknownSchemeError(f"no backend serves URL scheme {scheme!r}; known schemes: {known}")


def open_backend(url: str, **overrides: Any) -> StorageBackend:
    """Build the backend for ``url`` (no I/O yet: it opens on first use or with ``async with``).

    Args:
        url: A backend URL such as ``memory://?capacity=8GiB`` or ``file:///var/lib/lmcache``; a
            ``codec=…`` option (with ``codec_*`` options) wraps the backend in a
            :class:`~lmcache.serde.layer.CodecBackend` (see docs/codecs.md).
        **overrides: Settings that win over the URL's query and the environment.

    Raises:
        ConfigError: The URL is malformed, its scheme unknown, or an option invalid.
        MissingDependencyError: The backend's SDK is not installed.
    """
    codec: dict[str, str] = {}
    if "codec" in url.partition("?")[2].lower() and not url.startswith("tiered:"):
        # ?codec=fp8&codec_level=…: any backend's values go through a codec layer (lmcache.serde);
        # tiered:// reads codec as its own setting (the default of its tiers).
        from lmcache.serde.codec import split_codec_query

        url, codec = split_codec_query(url)
    scheme = split_url(url).scheme
    try:
        cls = backend_class(scheme)
    except UnknownSchemeError as exc:
        raise UnknownSchemeError(f"{exc} (URL {redact_url(url)!r})") from None
    backend = cls.from_url(url, **overrides)
    if codec:
        from lmcache.serde.layer import wrap_with_codec

        return wrap_with_codec(backend, codec, explicit=True)
    return backend


def check_url(url: str) -> None:
    """Check ``url`` as :func:`open_backend` would, without opening anything.

    A backend whose SDK is missing is not checked here (building it reports that).

    Raises:
        ConfigError: The URL is malformed, its scheme unknown, or an option invalid.
    """
    try:
        open_backend(url)
    except MissingDependencyError:
        return


def env_prefixes() -> dict[str, str]:
    """``{scheme: "LMCACHE_<SCHEME>_"}`` for every built-in and installed plugin scheme.

    These are the prefixes of the environment variables that set a backend's options
    (``LMCACHE_REDIS_PASSWORD``); ``+`` and ``-`` in a scheme become ``_``.
    """
    schemes = set(BUILTIN_BACKENDS) | {ep.name for ep in _plugin_entry_points()}
    return {s: env_prefix(s) for s in sorted(schemes)}


def env_prefix(scheme: str) -> str:
    """``LMCACHE_<SCHEME>_``: the prefix of ``scheme``'s option variables."""
    return "LMCACHE_" + scheme.upper().replace("+", "_").replace("-", "_") + "_"


#: Help text for a command-line flag that takes a backend URL (``lmcache server --tier``).
TIER_URL_HELP = (
    "tier URL, fastest first (repeat). Command lines are visible to other users (ps): give a "
    "password or other secret option as <option>_file=/path (e.g. redis://host?password_file=/run/secrets/redis) "
    "or in LMCACHE_<SCHEME>_<OPTION> / LMCACHE_<SCHEME>_<OPTION>_FILE, not in the URL"
)

# Query options that look like secrets, for schemes whose backend cannot be loaded to ask it.
_SECRET_WORDS = ("password", "passwd", "secret", "token", "credential")


def command_line_secrets(url: str) -> list[str]:
    """Names of the secrets written into ``url`` itself.

    That is ``"password"`` for ``user:pw@``, and each query option that the backend declares
    secret or that looks like one (``*_file`` options name files and are fine).
    """
    try:
        parts = split_url(url)
    except LMCacheError:
        return []
    found = ["password"] if parts.password else []
    try:
        declared = set(backend_class(parts.scheme).secret_options)
    except LMCacheError:
        declared = set()
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        key = name.replace("-", "_").lower()
        if not value or key.endswith("_file"):
            continue
        if key in declared or any(word in key for word in _SECRET_WORDS):
            found.append(name)
    return found


def warn_command_line_secrets(url: str, flag: str) -> bool:
    """Log a warning when ``url``, given on the command line as ``flag``, holds a secret.

    Returns:
        Whether it did.
    """
    secrets = command_line_secrets(url)
    if not secrets:
        return False
    scheme = split_url(url).scheme
    logger.warning(
        "%s %s: %s given on the command line, where any local user can read it (ps, /proc); "
        "use %s_file=/path in the URL or the %s<OPTION> / %s<OPTION>_FILE environment variables instead",
        flag,
        redact_url(url, secrets),
        ", ".join(secrets),
        secrets[0],
        env_prefix(scheme),
        env_prefix(scheme),
    )
    return True
