"""Adapter kit: backend URLs, parsed into settings and written back.

Every backend is built from a URL (``from_url``) and can say the URL that rebuilds it
(``url``). The helpers here keep that uniform: :func:`split_url` (a malformed URL is a
:class:`~lmcache.errors.ConfigError`), :func:`server_location` (host and port of a one-server
URL), :func:`parse_backend_url` (defaults < ``LMCACHE_<SCHEME>_*`` environment < URL < keyword
overrides, through the settings dataclass's own parsers), :func:`settings_query` (the options
that differ from their defaults) with :func:`url_host` (IPv6 literals in brackets) and :func:`url_userinfo`, and
:func:`redact_url` (what ``repr`` and logs show).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import SplitResult, parse_qsl, quote, urlencode, urlsplit

from lmcache.config import env_layer, env_names, format_size, resolve_settings, unknown_env_error, unknown_env_vars
from lmcache.errors import ConfigError

__all__ = [
    "parse_backend_url",
    "redact_url",
    "server_location",
    "settings_query",
    "split_url",
    "url_host",
    "url_userinfo",
]

S = TypeVar("S")


def parse_backend_url(
    url: str,
    schemes: Sequence[str],
    settings_cls: type[S],
    location: Mapping[str, object],
    overrides: Mapping[str, object],
    *,
    split: SplitResult | None = None,
) -> S:
    """Resolve backend settings: defaults < ``LMCACHE_<SCHEME>_*`` env < URL < ``overrides``.

    Args:
        url: The backend URL (for error messages and its query string).
        schemes: Schemes the backend serves; the URL's must be one of them.
        settings_cls: The backend's settings dataclass.
        location: Settings taken from the URL's host/path/credentials by the caller.
        overrides: Keyword overrides (highest precedence).
        split: The already split URL, if the caller has it.

    Raises:
        ConfigError: Wrong scheme, a repeated or unknown option, or a bad value.
    """
    parts = split or split_url(url)
    if parts.scheme not in schemes:
        raise ConfigError(f"URL scheme {parts.scheme!r} is not served here; expected one of {list(schemes)}")
    query: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in query:
            raise ConfigError(f"{parts.scheme}://: option {k!r} is given twice in the URL")
        query[k] = v
    env_prefix = "LMCACHE_" + parts.scheme.upper().replace("+", "_").replace("-", "_") + "_"
    _check_env(env_prefix, settings_cls, parts.scheme)
    layers: list[tuple[str, Mapping[str, object]]] = [
        ("environment", env_layer(env_prefix, settings_cls)),
        ("URL", location),
        ("URL query", query),
        ("keyword arguments", overrides),
    ]
    return resolve_settings(settings_cls, layers, owner=f"{parts.scheme}://", strict=("URL query", "keyword arguments"))


def _check_env(prefix: str, settings_cls: type[Any], scheme: str) -> None:
    """Refuse an ``LMCACHE_<SCHEME>_…`` variable that names no option (a typo is otherwise ignored)."""
    unknown = unknown_env_vars(prefix, settings_cls)
    if not unknown:
        return
    # LMCACHE_REDIS_CLUSTER_NODES belongs to redis+cluster://, not redis://: skip the variables
    # of schemes whose prefix extends this one. Imported here: the registry imports this module.
    from lmcache.backends.registry import env_prefixes

    longer = tuple(p for p in env_prefixes().values() if p != prefix and p.startswith(prefix))
    for var in unknown:
        if longer and var.startswith(longer):
            continue
        raise unknown_env_error(var, env_names(prefix, settings_cls), f"{scheme}://", prefix)


def split_url(url: str) -> SplitResult:
    """``urlsplit`` with lmcache's errors: a malformed URL is a :class:`ConfigError`."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"not a backend URL: {url!r} (expected scheme://…, e.g. memory://?capacity=1GiB)")
    try:
        parts = urlsplit(url)
        if "," not in parts.netloc:  # multi-host URLs (redis+cluster://h1:p1,h2:p2) check their own ports
            _ = parts.port  # validates the port
    except ValueError as exc:
        raise ConfigError(f"malformed backend URL {redact_url(url)!r}: {exc}") from None
    if not parts.scheme:
        raise ConfigError(f"backend URL {redact_url(url)!r} has no scheme")
    return parts


def server_location(parts: SplitResult, example: str) -> dict[str, object]:
    """``{"host": …, "port": …}`` of a URL naming one server and nothing else (no path, credentials or fragment).

    The port is left out when the URL has none (the settings' default applies).

    Args:
        parts: The split URL.
        example: A good URL of the scheme, for error messages (``mooncake://127.0.0.1:50051``).

    Raises:
        ConfigError: A fragment, credentials, a path, no host or an empty port.
    """
    scheme = parts.scheme
    if parts.fragment:
        raise ConfigError(f"{scheme}:// URLs take no #fragment")
    if parts.username or parts.password:
        raise ConfigError(f"{scheme}:// URLs take no credentials")
    if parts.path not in ("", "/"):
        raise ConfigError(f"{scheme}:// URLs take no path (got {parts.path!r}); use {scheme}://host:port?…")
    if not parts.hostname:
        raise ConfigError(f"{scheme}:// URL has no host, e.g. {example}")
    location: dict[str, object] = {"host": parts.hostname}
    if parts.port is not None:
        location["port"] = parts.port
    elif parts.netloc.endswith(":"):
        raise ConfigError(f"{scheme}:// URL has an empty port")
    return location


def url_host(host: str) -> str:
    """``host`` as it stands in a URL's authority: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host else host


def url_userinfo(username: str | None, password: str | None) -> str:
    """The ``user:password@`` part of a URL's authority (each part quoted), or ``""`` for neither.

    It carries the password: a URL built with it is for rebuilding a backend, never for logs.
    """
    if username is None and password is None:
        return ""
    user = quote(username or "", safe="")
    if password is None:
        return f"{user}@"
    return f"{user}:{quote(password, safe='')}@"


def settings_query(settings: Any, skip: Sequence[str] = (), sizes: Sequence[str] = ()) -> str:
    """URL query of the settings that differ from their defaults (for round-trippable URLs).

    Args:
        settings: A settings dataclass instance.
        skip: Fields the URL carries elsewhere (host, port, path).
        sizes: Fields written as sizes (``64MiB``) rather than byte counts.
    """
    items = []
    for f in dataclasses.fields(settings):
        if not f.init or f.name in skip:
            continue
        value = getattr(settings, f.name)
        if f.default is not dataclasses.MISSING and value == f.default:
            continue
        if f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "none"
        elif f.name in sizes:
            text = format_size(value)
        elif isinstance(value, (list, tuple)):
            text = " ".join(map(str, value))
        else:
            text = str(value)
        items.append((f.name, text))
    return urlencode(items, quote_via=quote)


def redact_url(url: str, secret_options: Sequence[str] = ()) -> str:
    """``url`` with its password and any ``secret_options`` query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<malformed URL>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, host = netloc.rsplit("@", 1)
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{user}@{host}"
    query = parts.query
    if query and secret_options:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k in secret_options else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide; urlsplit/geturl would drop the "//" of "memory://?…"
    out = parts._replace(netloc=netloc, query=query).geturl()
    if "://" in url and "://" not in out:
        out = out.replace(":", "://", 1)
    return out
