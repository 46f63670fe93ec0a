"""``lmcache server-ctl``: the HTTP control API of ``lmcache server`` from the command line.

Actions: ``health``, ``stats``, ``lookup``, ``pin``, ``unpin``, ``clear``, ``move``, ``metrics``.
Keys are selected with ``--key KEY`` (repeat) or ``--tokens 1,2,3 --model NAME`` (plus
``--tag k=v``). The token comes from ``--token-file`` or ``LMCACHE_SERVER_TOKEN`` (never a flag,
so it stays out of ``ps``); without either, for a server on a loopback address, from the token
file a server of this user wrote for that HTTP port (:mod:`lmcache.server.auth`). Uses only the
standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lmcache.errors import AuthError, BackendUnavailableError, ConfigError, InvalidArgumentError
from lmcache.server.auth import discover_tcp_token

__all__ = ["ACTIONS", "add_ctl_arguments", "call", "local_token", "run_ctl_cli"]

ACTIONS = ("health", "stats", "metrics", "lookup", "pin", "unpin", "clear", "move")


def add_ctl_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``lmcache server-ctl``."""
    p.add_argument("action", choices=ACTIONS, help="what to do")
    p.add_argument("--url", default="http://127.0.0.1:8199", help="the server's control API (--http-port)")
    p.add_argument(
        "--token-file",
        default=None,
        help="file with the server token (or LMCACHE_SERVER_TOKEN; default: the token file a local server "
        "of this user wrote for the --url port)",
    )
    p.add_argument("--key", action="append", default=None, help="a key string (repeat)")
    p.add_argument("--tokens", default=None, help="token ids, comma-separated")
    p.add_argument("--model", default=None, help="model of the token scope (or of keys to clear)")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--tag", action="append", default=None, metavar="K=V", help="a key tag (repeat)")
    p.add_argument("--ttl", type=float, default=None, help="pin lifetime in seconds")
    p.add_argument("--to-tier", type=int, default=None, help="move: target tier index")
    p.add_argument("--from-tier", type=int, default=None, help="move: source tier index")
    p.add_argument("--keep-source", action="store_true", help="move: copy instead of move")
    p.add_argument("--timeout", type=float, default=30.0)


def call(
    url: str, path: str, body: dict[str, Any] | None = None, *, token: str | None = None, timeout: float = 30.0
) -> Any:
    """One request to the control API; returns the decoded JSON (or text for /metrics).

    Raises:
        AuthError: 401 (no or a wrong token) or 403 (a refused ``Origin``).
        InvalidArgumentError: 400 or 415 (the server's message).
        BackendUnavailableError: Not reachable, or a 5xx.
    """
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")
        try:
            message = json.loads(text).get("error", text)
        except (ValueError, AttributeError):
            message = text
        if exc.code in (401, 403):
            raise AuthError(f"{url}{path}: {message}") from None
        if exc.code in (400, 415):
            raise InvalidArgumentError(f"{url}{path}: {message}") from None
        raise BackendUnavailableError(f"{url}{path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise BackendUnavailableError(f"{url}{path}: {getattr(exc, 'reason', exc)}") from None
    if "json" in ctype:
        return json.loads(raw)
    return raw.decode()


def local_token(url: str) -> str | None:
    """The token a server of this user on this host wrote for the port of ``url``, if any."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if host not in ("localhost", "::1") and not host.startswith("127."):
        return None  # a remote server: its token file is not here
    return discover_tcp_token(port)


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.key:
        body["keys"] = list(args.key)
    elif args.tokens is not None:
        try:
            body["tokens"] = [int(t) for t in args.tokens.replace(" ", "").split(",") if t]
        except ValueError:
            raise ConfigError("--tokens must be comma-separated integers") from None
        body.update(model=args.model, world_size=args.world_size, rank=args.rank, dtype=args.dtype)
        if args.tag:
            body["tags"] = _tags(args.tag)
    else:
        raise ConfigError(f"server-ctl {args.action} needs --key or --tokens with --model")
    return body


def _tags(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ConfigError(f"--tag {item!r}: expected K=V")
        out[k] = v
    return out


def run_ctl_cli(args: argparse.Namespace) -> int:
    """``lmcache server-ctl ACTION``: print the reply as JSON (or the metrics text)."""
    token = os.environ.get("LMCACHE_SERVER_TOKEN")
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read --token-file {args.token_file}: {exc.strerror}") from None
    if not token:
        token = local_token(args.url)
    action = args.action
    body: dict[str, Any] | None = None
    if action in ("lookup", "pin", "unpin", "move"):
        body = _selection(args)
        if action == "pin":
            if args.ttl is None:
                raise ConfigError("server-ctl pin needs --ttl SECONDS")
            body["ttl"] = args.ttl
        if action == "move":
            if args.to_tier is None:
                raise ConfigError("server-ctl move needs --to-tier N")
            body["to_tier"] = args.to_tier
            if args.from_tier is not None:
                body["from_tier"] = args.from_tier
            body["keep_source"] = args.keep_source
    elif action == "clear":
        body = {}
        if args.model:
            body["model"] = args.model
        if args.tag:
            body["tags"] = _tags(args.tag)
    out = call(args.url, "/" + action, body, token=token, timeout=args.timeout)
    print(out if isinstance(out, str) else json.dumps(out, indent=2))
    return 0
