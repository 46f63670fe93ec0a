"""One typed configuration system for lmcache and every backend.

Settings are plain dataclasses whose fields carry a :func:`setting` spec (parser, bounds,
choices, whether the value is a secret). The same machinery serves two places:

* :class:`LMCacheConfig`, the engine-level config: defaults < YAML file named by
  ``LMCACHE_CONFIG_FILE`` < ``LMCACHE_<FIELD>`` environment variables < keyword arguments.
* Backend configs built from URLs (:func:`resolve_settings`): defaults <
  ``LMCACHE_<SCHEME>_<FIELD>`` environment < URL query options < keyword overrides.

An unknown key or a value that does not parse is a :class:`~lmcache.errors.ConfigError` that
names the key and what is valid. At import time this module imports nothing from the rest of
lmcache except ``errors`` (eviction policy names are looked up in ``lmcache.policies`` when parsed).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from lmcache.errors import ConfigError

__all__ = [
    "LMCacheConfig",
    "TieredSettings",
    "format_size",
    "parse_bool",
    "parse_duration",
    "parse_size",
    "parse_tags",
    "redact",
    "resolve_settings",
    "setting",
]

T = TypeVar("T")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_DURATION_UNITS = {"": 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "m": 60.0, "min": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")


def parse_size(value: object) -> int:
    """Parse a byte size such as ``8GiB``, ``512MB``, ``4096`` or an int.

    Raises:
        ValueError: The value is not a non-negative size.
    """
    if isinstance(value, bool):
        raise ValueError("a size, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a non-negative size")
        return value
    if isinstance(value, float) and value >= 0 and value.is_integer():
        return int(value)
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError("a size such as 4096, 512MiB or 8GiB")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """Format a byte count with a binary unit, exact where possible (``8GiB``)."""
    for unit, mult in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_duration(value: object) -> float:
    """Parse seconds: ``5``, ``2.5``, ``250ms``, ``1m``.

    Raises:
        ValueError: The value is not a non-negative duration.
    """
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a non-negative duration")
        return float(value)
    m = _DURATION_RE.match(str(value).lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError("a duration such as 5, 2.5s or 250ms")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_bool(value: object) -> bool:
    """Parse ``true/false/1/0/yes/no/on/off`` (any case) or a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("true or false")


def _parse_str_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [part for part in re.split(r"[\s;]+", value.strip()) if part]
    if isinstance(value, Iterable):
        items = list(value)
        if not all(isinstance(v, str) for v in items):
            raise ValueError("a list of strings")
        return items
    raise ValueError("a list of strings (YAML list, or separated by spaces or ';')")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    doc: str,
    parse: Callable[[object], Any] | None = None,
    choices: Iterable[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    secret: bool = False,
    default_factory: Callable[[], Any] | None = None,
    show: Callable[[object], str] | None = None,
) -> Any:
    """Declare a config field with its parser, bounds and documentation.

    Args:
        default: The default value.
        doc: One line saying what the setting does.
        parse: Converts a raw value (str from env/URL, or a YAML/kwarg value); raises
            ``ValueError`` whose message says what is valid. Defaults to the field's type.
        choices: The only valid values.
        min: Lower bound (inclusive).
        max: Upper bound (inclusive).
        secret: Redact in ``repr``, logs and error messages.
        default_factory: For mutable defaults.
        show: How error messages show a raw value (default ``repr``); for values that may
            hold secrets in part, such as URLs with passwords.
    """
    meta = {
        "doc": doc,
        "parse": parse,
        "choices": tuple(choices) if choices is not None else None,
        "min": min,
        "max": max,
        "secret": secret,
        "show": show,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_parser(tp: Any) -> Callable[[object], Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _type_parser(args[0])

        def parse_optional(v: object) -> Any:
            if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
                return None
            return inner(v)

        return parse_optional
    if tp is bool:
        return parse_bool
    if tp is int:
        return _parse_int
    if tp is float:
        return _parse_float
    if tp is str:
        return _parse_str
    if origin is list:
        return _parse_str_list
    if origin is dict or tp is dict:
        return _parse_dict
    raise TypeError(f"no parser for config type {tp!r}")


def _parse_int(v: object) -> int:
    if isinstance(v, bool):
        raise ValueError("an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return int(str(v).strip())
    except ValueError:
        raise ValueError("an integer") from None


def _parse_float(v: object) -> float:
    if isinstance(v, bool):
        raise ValueError("a number")
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError("a number") from None


def _parse_str(v: object) -> str:
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError("a string")


def _parse_dict(v: object) -> dict[str, Any]:
    if isinstance(v, Mapping):
        return dict(v)
    raise ValueError("a mapping")


def parse_tags(value: object) -> dict[str, str]:
    """Parse key tags: a mapping of strings to strings, ``name=value,name=value`` or a JSON object.

    Tags are part of every cache key and are quoted into its text form, so anything but text
    (``tenant: 5`` in YAML) is refused here rather than failing later in one backend only.

    Raises:
        ValueError: Not a mapping of non-empty names to string values.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                raise ValueError("a JSON object of strings, or name=value,name=value") from None
        else:
            pairs: dict[str, str] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                name, sep, val = part.partition("=")
                if not sep:
                    raise ValueError(f"name=value pairs separated by ',' (got {part!r})")
                if name.strip() in pairs:
                    raise ValueError(f"each tag once (got {name.strip()!r} twice)")
                pairs[name.strip()] = val.strip()
            value = pairs
    if not isinstance(value, Mapping):
        raise ValueError("a mapping of tag names to string values (or name=value,name=value)")
    out: dict[str, str] = {}
    for name, val in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tag names that are non-empty strings (got {name!r})")
        if not isinstance(val, str):
            raise ValueError(f"tag values that are strings (tag {name!r} is {type(val).__name__} {val!r}; quote it)")
        out[name] = val
    return out


def _coerce(owner: str, f: dataclasses.Field[Any], raw: object, source: str, hints: dict[str, Any]) -> Any:
    meta = f.metadata
    parser = meta.get("parse") or _type_parser(hints[f.name])
    show = meta.get("show") or repr
    shown = "<redacted>" if meta.get("secret") else show(raw)
    try:
        value = parser(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{owner}: {f.name}={shown} (from {source}) is invalid: expected {exc}") from None
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{owner}: {f.name}={shown} (from {source}) is invalid: expected one of {valid}")
    lo, hi = meta.get("min"), meta.get("max")
    if value is not None and lo is not None and value < lo:
        raise ConfigError(f"{owner}: {f.name}={shown} (from {source}) is invalid: must be >= {lo}")
    if value is not None and hi is not None and value > hi:
        raise ConfigError(f"{owner}: {f.name}={shown} (from {source}) is invalid: must be <= {hi}")
    return value


def resolve_settings(
    cls: type[T],
    layers: Iterable[tuple[str, Mapping[str, object]]],
    *,
    owner: str,
    strict: Iterable[str] = (),
) -> T:
    """Build a settings dataclass from layered sources, later layers winning.

    Only the winning value of each field is parsed, so a bad value in a lower layer (an
    environment variable) does not break a source that overrides it (the URL). A secret field
    ``<name>`` may also be given as ``<name>_file``: the path of a file holding the value (one
    trailing newline is dropped), so the secret need not appear on a command line.

    Args:
        cls: A dataclass whose fields are declared with :func:`setting`.
        layers: ``(source_name, mapping)`` pairs from lowest to highest precedence. Keys may
            use ``-`` or ``_`` and any case.
        owner: Names the thing being configured in error messages (e.g. ``"redis://"``).
        strict: Source names in which an unknown key is an error (environment layers are
            checked separately, see :func:`unknown_env_vars`).

    Raises:
        ConfigError: An unknown key in a strict layer, one field set twice in one layer
            (``chunk-size`` and ``CHUNK_SIZE``), an unreadable secret file, a value that does
            not parse, or a required field that no layer sets.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    strict_sources = set(strict)
    secret_files = {f"{n}_file": n for n, f in fields.items() if f.metadata.get("secret")}
    chosen: dict[str, tuple[object, str]] = {}
    for source, mapping in layers:
        seen: dict[str, object] = {}  # field -> the key that set it in this layer
        for raw_key, raw in mapping.items():
            if not isinstance(raw_key, str):
                raise ConfigError(f"{owner}: option names must be strings, got {raw_key!r} (from {source})")
            key = raw_key.replace("-", "_").lower()
            from_file = key in secret_files and key not in fields
            name = secret_files[key] if from_file else key
            if name not in fields:
                if source in strict_sources:
                    raise ConfigError(_unknown_option(owner, raw_key, source, [*fields, *secret_files]))
                continue
            if name in seen:
                raise ConfigError(
                    f"{owner}: {seen[name]!r} and {raw_key!r} (from {source}) both set {name}; give it once"
                )
            seen[name] = raw_key
            if from_file:
                chosen[name] = (_read_secret_file(owner, raw_key, raw, source), f"{source}, {raw_key}")
            else:
                chosen[name] = (raw, source)
    values = {name: _coerce(owner, fields[name], raw, source, hints) for name, (raw, source) in chosen.items()}
    missing = [
        n
        for n, f in fields.items()
        if n not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{owner}: required option {', '.join(repr(m) for m in missing)} is missing")
    return cls(**values)


def _unknown_option(owner: str, raw_key: str, source: str, valid: Iterable[str]) -> str:
    names = sorted(valid)
    close = difflib.get_close_matches(raw_key.replace("-", "_").lower(), names, n=1)
    hint = f"; did you mean {close[0]!r}" if close else ""
    return f"{owner}: unknown option {raw_key!r} (from {source}){hint}; valid options: {', '.join(names)}"


def _read_secret_file(owner: str, raw_key: str, path: object, source: str) -> str:
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ConfigError(f"{owner}: {raw_key} (from {source}) must name a file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{owner}: cannot read {raw_key}={os.fspath(path)!r} (from {source}): {why}") from None
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise ConfigError(f"{owner}: {raw_key}={os.fspath(path)!r} (from {source}) is empty")
    return text


def env_names(prefix: str, cls: type[Any]) -> list[str]:
    """Every environment variable that sets a field of ``cls``.

    That is ``<PREFIX><FIELD>``, plus ``<PREFIX><FIELD>_FILE`` for secret fields (a file holding the value).
    """
    out = []
    for f in dataclasses.fields(cls):
        if f.init:
            out.append(f"{prefix}{f.name.upper()}")
            if f.metadata.get("secret"):
                out.append(f"{prefix}{f.name.upper()}_FILE")
    return out


def env_layer(prefix: str, cls: type[Any], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Collect ``<PREFIX><FIELD>`` (and ``<PREFIX><SECRET>_FILE``) environment variables of ``cls``."""
    env = os.environ if environ is None else environ
    return {var[len(prefix) :].lower(): env[var] for var in env_names(prefix, cls) if var in env}


def unknown_env_vars(prefix: str, cls: type[Any], environ: Mapping[str, str] | None = None) -> list[str]:
    """``<PREFIX>…`` environment variables that name no field of ``cls`` (sorted)."""
    env = os.environ if environ is None else environ
    known = set(env_names(prefix, cls))
    return sorted(var for var in env if var.startswith(prefix) and var not in known)


def unknown_env_error(var: str, known: Iterable[str], owner: str, prefix: str = "LMCACHE_") -> ConfigError:
    """The error for an unknown ``LMCACHE_…`` variable, naming the closest known one.

    Names are compared after ``prefix``, which they all share (it would make any two look alike).
    """
    names = sorted(known)
    tails = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
    close = difflib.get_close_matches(var[len(prefix) :], list(tails), n=1, cutoff=0.7)
    if close:
        return ConfigError(f"{owner}: unknown environment variable {var}; did you mean {tails[close[0]]}?")
    return ConfigError(f"{owner}: unknown environment variable {var}; valid ones: {', '.join(names)}")


def redact(cls_instance: Any) -> str:
    """``repr`` of a settings dataclass with secret fields replaced by ``'***'``."""
    parts = []
    for f in dataclasses.fields(cls_instance):
        if not f.repr:
            continue
        value = getattr(cls_instance, f.name)
        shown = "'***'" if f.metadata.get("secret") and value else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(cls_instance).__name__}({', '.join(parts)})"


def _check_tiers(value: object) -> list[str]:
    tiers = _parse_str_list(value)
    if not tiers:
        raise ValueError("at least one backend URL")
    for url in tiers:
        if "://" not in url and not url.startswith(("memory:", "file:")):
            raise ValueError(f"backend URLs such as memory://?capacity=2GiB (got {_redact_urls(url)!r})")
    return tiers


def _check_tier_urls(tiers: Iterable[str]) -> None:
    """Have each tier's backend parse its URL now (no I/O), so a bad option fails at load."""
    # Imported here: the backends themselves import this module.
    from lmcache.backends.registry import check_url

    for url in tiers:
        try:
            check_url(url)
        except ConfigError as exc:
            raise ConfigError(f"lmcache config: tier {_redact_urls(url)!r} is invalid: {exc}") from None


# user:password@ in a URL, and query options whose names say they hold a secret.
_URL_PASSWORD_RE = re.compile(r"(://[^/@:\s]*):[^/\s]*@")
_URL_SECRET_OPTION_RE = re.compile(r"([?&][^=&\s]*(?:password|secret|token|credential)[^=&\s]*=)[^&\s]*", re.IGNORECASE)


def _redact_urls(value: object) -> str:
    """``value`` shown with the passwords and secret options of any URLs in it replaced by ``***``."""
    text = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    text = _URL_PASSWORD_RE.sub(r"\1:***@", text)
    return _URL_SECRET_OPTION_RE.sub(_redact_option, text)


def _redact_option(m: re.Match[str]) -> str:
    name = m.group(1)
    return m.group(0) if name.lower().endswith("_file=") else name + "***"  # a path is no secret


#: ``LMCACHE_*`` variables that are not engine settings but are read elsewhere (the server, the
#: tests, vLLM's own LMCache glue), and prefixes of such families. ``LMCACHE_<SCHEME>_<OPTION>``
#: variables of a known URL scheme are checked by that backend when it is built.
ENV_ALLOWED: tuple[str, ...] = (
    "LMCACHE_CONFIG_FILE",
    "LMCACHE_NATIVE_DIR",
    "LMCACHE_MODEL_CACHE",
    "LMCACHE_USE_UPSTREAM_MP",
    "LMCACHE_FORCE_SKIP_SAVE",
)
ENV_ALLOWED_PREFIXES: tuple[str, ...] = ("LMCACHE_TEST_", "LMCACHE_LOG", "LMCACHE_SERVER_", "LMCACHE_TIERED_")


def _parse_policy_name(value: object) -> str:
    # The registry may hold third-party policies, so names are checked against it when parsed.
    from lmcache.policies import policy_names

    name = str(value).strip().lower()
    if name not in policy_names():
        raise ValueError("one of " + ", ".join(repr(n) for n in policy_names()))
    return name


def _parse_codec_name(value: object) -> str:
    # Codecs may be plugins, so names are checked against the registry when parsed.
    from lmcache.serde.codec import codec_names

    name = str(value).strip().lower()
    if name not in codec_names():
        raise ValueError("one of " + ", ".join(repr(n) for n in codec_names()))
    return name


@dataclasses.dataclass(frozen=True)
class TieredSettings:
    """Settings of a :class:`~lmcache.tiered.TieredBackend`, declared once.

    ``tiered://`` URLs read them from the query, and :class:`LMCacheConfig` extends this class, so
    the engine config (YAML, ``LMCACHE_<FIELD>``) carries the same fields with the same rules.
    """

    eviction_policy: str = setting(
        "lru", doc="Eviction policy for capacity-bounded tiers (a registered name).", parse=_parse_policy_name
    )
    promote_on_hit: bool = setting(True, doc="Copy a hit from a slower tier into the faster tiers.")
    write_back_queue: int = setting(
        256, doc="Write-backs waiting per slower tier; when full new ones are dropped and counted.", min=1
    )
    write_back_batch: int = setting(
        16, doc="Values a writer copies per batch (also its number of staging buffers).", min=1, max=4096
    )
    tier_timeout: float = setting(
        5.0,
        doc="The longest one tier call may take; past it the call is cancelled and counts as a miss.",
        parse=parse_duration,
        min=0.001,
    )
    tier_retry_after: float = setting(
        1.0,
        doc=(
            "A tier that timed out or refused a connection is skipped (a miss at once) until it answers "
            "again, probed in the background this often (seconds); 0: never skip."
        ),
        parse=parse_duration,
        min=0,
    )
    close_timeout: float = setting(
        30.0, doc="Seconds aclose() waits for pending write-backs before dropping them.", parse=parse_duration, min=0
    )
    evict_retries: int = setting(3, doc="Evict-and-retry rounds after a tier rejects a put as full.", min=0, max=64)
    codec: str = setting(
        "raw",
        doc=(
            "Codec of the values written to tiers that keep them outside this process (raw, zstd, lz4, fp8, "
            "int8, int4, cachegen or a plugin's; see docs/codecs.md); a tier URL's ?codec= wins."
        ),
        parse=_parse_codec_name,
    )


@dataclasses.dataclass(frozen=True)
class LMCacheConfig(TieredSettings):
    """Engine-level lmcache settings (and, inherited, the tiering settings of :class:`TieredSettings`).

    Build with :meth:`load` to get the documented precedence: defaults < YAML file
    (``LMCACHE_CONFIG_FILE`` or ``path``) < ``LMCACHE_<FIELD>`` env < keyword arguments.
    """

    chunk_size: int = setting(256, doc="Tokens per KV chunk (the unit of storage and hashing).", min=1, max=1 << 20)
    save_partial_chunks: bool = setting(
        False, doc="Also key and store the trailing chunk of fewer than chunk_size tokens."
    )
    hash_seed: str = setting(
        "lmcache-v1", doc="Seed mixed into every chunk hash; instances sharing a cache must agree."
    )
    tiers: list[str] = setting(
        default_factory=lambda: ["memory://?capacity=2GiB"],
        doc="Backend URLs, fastest first (e.g. memory://?capacity=8GiB file:///var/lib/lmcache).",
        parse=_check_tiers,
        show=lambda v: repr(_redact_urls(v)),
    )
    lookup_budget: float = setting(
        0.05,
        doc=(
            "Seconds a lookup (and the check before a store) may wait for the tiers; a tier that has not "
            "answered by then counts as a miss for that call. Raise it to tier_timeout to wait for slow tiers."
        ),
        parse=parse_duration,
        min=0.001,
    )
    model_name: str | None = setting(
        None, doc="Model identity used in cache keys (default: the integration's name+weights fingerprint)."
    )
    tags: dict[str, str] = setting(
        default_factory=dict,
        doc="Key tags that isolate caches (tenant, LoRA adapter): string values; in the environment "
        "name=value,name=value or a JSON object.",
        parse=parse_tags,
    )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> LMCacheConfig:
        """Load settings with precedence defaults < YAML < env < ``overrides``.

        Args:
            path: A YAML file; defaults to ``$LMCACHE_CONFIG_FILE`` when set.
            environ: The environment to read (defaults to ``os.environ``).
            **overrides: Field values that win over every other source.

        Raises:
            ConfigError: An unknown key or ``LMCACHE_*`` variable, a bad value, a tier URL its
                backend refuses, or an unreadable YAML file.
        """
        env = os.environ if environ is None else environ
        _check_engine_env(env)
        layers: list[tuple[str, Mapping[str, object]]] = []
        file = path if path is not None else env.get("LMCACHE_CONFIG_FILE")
        strict = ["keyword arguments"]
        if file:
            source = f"config file {os.fspath(file)}"
            layers.append((source, _read_yaml(Path(file))))
            strict.append(source)
        layers.append(("environment", env_layer("LMCACHE_", cls, env)))
        layers.append(("keyword arguments", overrides))
        config = resolve_settings(cls, layers, owner="lmcache config", strict=strict)
        _check_tier_urls(config.tiers)
        return config

    def replace(self, **changes: Any) -> LMCacheConfig:
        """A copy with ``changes`` applied and validated like keyword arguments."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config = resolve_settings(
            LMCacheConfig,
            [("current", current), ("keyword arguments", changes)],
            owner="lmcache config",
            strict=["keyword arguments"],
        )
        if "tiers" in changes:
            _check_tier_urls(config.tiers)
        return config


def _check_engine_env(env: Mapping[str, str]) -> None:
    """Refuse ``LMCACHE_*`` variables that nothing reads (a typo would otherwise be ignored)."""
    fields = env_names("LMCACHE_", LMCacheConfig)
    suspects = [
        var
        for var in unknown_env_vars("LMCACHE_", LMCacheConfig, env)
        if var not in ENV_ALLOWED and not var.startswith(ENV_ALLOWED_PREFIXES)
    ]
    if not suspects:
        return
    from lmcache.backends.registry import env_prefixes  # imported late: backends import this module

    schemes = tuple(env_prefixes().values())
    for var in suspects:
        if not var.startswith(schemes):
            raise unknown_env_error(var, [*fields, *ENV_ALLOWED], "lmcache config")


def _read_yaml(path: Path) -> Mapping[str, object]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text (a binary file?)") from None
    try:
        data = yaml.load(text, Loader=_unique_key_loader())  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    return data


def _unique_key_loader() -> type[Any]:
    """A ``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, (str, int, float, bool)):
                    continue  # unhashable keys fail in PyYAML itself
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice", key_node.start_mark
                    )
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader
