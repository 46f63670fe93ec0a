"""The HTTP control API of ``lmcache server`` (aiohttp), and Prometheus ``/metrics``.

Endpoints (JSON in, JSON out). Who may call what:

* ``/health`` and ``/metrics`` are open.
* The mutating endpoints (``/pin``, ``/unpin``, ``/clear``, ``/move``) always need
  ``Authorization: Bearer <token>``: the configured token, else the one the server generated
  at start (same-user clients read it from ``<dir>/<http-port>.token``, see
  :mod:`lmcache.server.auth`), even under ``--no-auth``.
* The read endpoints (``/lookup``, ``/stats``) need the token too unless the server runs with
  ``--no-auth`` (a lookup tells which prompts are cached: that is other tenants' data).
* A ``POST`` must carry a JSON object with ``Content-Type: application/json`` (415 otherwise; an
  empty body is a 400): a web page can send ``text/plain`` cross-origin without a preflight,
  never ``application/json``.
* A request whose ``Origin`` header names a site other than this host or a loopback address is
  refused with 403 (a browser always sends ``Origin`` on a cross-site ``POST``).
* Under ``--no-auth``, a read endpoint asked without the token for a ``Host`` that is neither an
  IP address, a loopback name nor this machine's name is refused with 403: that is how a DNS
  rebinding page (its own name resolved to 127.0.0.1) shows, since it is same-origin to the
  browser and sends no ``Origin`` on a ``GET``.

* ``GET /health``: ``{"status": "ok"|"degraded", "tiers": [...healthy]}`` (503 when no tier answers).
* ``POST /lookup``: which prefix of a request each tier holds. Body: either ``{"keys": [...]}``
  (``CacheKey.to_string()`` strings, in prefix order) or ``{"tokens": [ids], "model": …,
  "world_size": 1, "rank": 0, "dtype": "float16", "tags": {…}}`` (hashed with the server's
  ``chunk_size`` and seed). Reply: ``hit_chunks``/``hit_tokens`` overall and per tier.
* ``POST /pin`` (``ttl`` seconds, required) and ``POST /unpin``: same key selection as lookup.
  Pinned keys are never chosen for eviction until the pin lapses (:meth:`~lmcache.tiered.TierAdmin.pin`).
* ``POST /clear``: ``{}`` clears everything; ``{"model": …}`` and/or ``{"tags": {…}}`` clear the
  keys that match (found with ``list_keys``).
* ``POST /move``: keys or tokens plus ``to_tier`` (and optional ``from_tier``, ``keep_source``).
* ``GET /stats``: the server's and the tiered backend's stats.
* ``GET /metrics``: Prometheus exposition (:mod:`lmcache.server.metrics`).

A bad body or an unknown tier is a 400 with ``{"error": …}``; a wrong token a 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from lmcache.errors import InvalidArgumentError, LMCacheError, UnsupportedOperationError
from lmcache.keys import CacheKey, ChunkHasher, KeyScope
from lmcache.server.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from lmcache.server.daemon import CacheServer

__all__ = ["start_http"]

_OPEN = frozenset({"/health", "/metrics"})
_MUTATING = frozenset({"/pin", "/unpin", "/clear", "/move"})


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _own_hosts(http_host: str) -> frozenset[str]:
    """Names of this host an ``Origin`` may carry besides loopback ones."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    if http_host and http_host not in ("0.0.0.0", "::"):
        names.add(http_host.lower().strip("[]"))
    return frozenset(n for n in names if n)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


class _Api:
    def __init__(self, server: CacheServer) -> None:
        self.server = server
        self.own_hosts = _own_hosts(server.settings.http_host)

    def _foreign_origin(self, origin: str) -> bool:
        try:
            host = (urlsplit(origin).hostname or "").lower()
        except ValueError:
            return True
        return not host or not (_loopback(host) or host in self.own_hosts)  # "null" has no host

    def _foreign_host(self, host: str) -> bool:
        """Whether a ``Host`` header names something other than this machine or an IP literal."""
        try:
            name = (urlsplit(f"//{host}").hostname or "").lower()
        except ValueError:
            return True
        if not name:
            return True
        try:
            ipaddress.ip_address(name)
            return False  # a literal address is never a rebound DNS name
        except ValueError:
            return not (_loopback(name) or name in self.own_hosts)

    @web.middleware
    async def guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        metrics = self.server.metrics
        origin = request.headers.get("Origin")
        if origin is not None and self._foreign_origin(origin):
            metrics.error("http", "origin")
            return _error(403, f"requests from origin {origin[:100]!r} are not allowed")
        path = request.path
        got = request.headers.get("Authorization", "")
        sent = got[7:] if got.startswith("Bearer ") else ""
        authorized = hmac.compare_digest(sent.encode(), self.server.token.encode())
        if not authorized and (path in _MUTATING or (self.server.settings.auth and path not in _OPEN)):
            metrics.error("http", "auth")
            return _error(401, "missing or wrong bearer token (same-user clients find it in the server's token file)")
        host = request.headers.get("Host")
        if not authorized and path not in _OPEN and host is not None and self._foreign_host(host):
            # Under --no-auth a page on a rebound DNS name (evil.example -> 127.0.0.1) is
            # same-origin and sends no Origin on a GET: only its Host header gives it away.
            metrics.error("http", "host")
            return _error(
                403, f"requests for host {host[:100]!r} need the bearer token (or an IP address or this host's name)"
            )
        if request.method == "POST":
            if request.content_type != "application/json":
                metrics.error("http", "bad_request")
                return _error(415, f"the body must be application/json, not {request.content_type}")
            if not request.can_read_body or request.content_length == 0:
                metrics.error("http", "bad_request")
                return _error(400, "the request needs a JSON object body")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (InvalidArgumentError, UnsupportedOperationError) as exc:
            self.server.metrics.error("http", "bad_request")
            return _error(400, str(exc))
        except LMCacheError as exc:
            self.server.metrics.error("http", type(exc).__name__)
            return _error(503, f"{type(exc).__name__}: {exc}")

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise InvalidArgumentError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidArgumentError("the request body must be a JSON object")
        return body

    def _select(self, body: dict[str, Any]) -> tuple[list[CacheKey], list[int]]:
        """Keys named by ``keys`` or ``tokens``+scope, and each key's end in tokens."""
        size = self.server.chunk_size
        if "keys" in body:
            raw = body["keys"]
            if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
                raise InvalidArgumentError("keys must be a list of key strings")
            try:
                keys = [CacheKey.from_string(k) for k in raw]
            except (ValueError, LMCacheError) as exc:
                raise InvalidArgumentError(f"bad key: {exc}") from None
            return keys, [(i + 1) * size for i in range(len(keys))]
        if "tokens" in body:
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise InvalidArgumentError("a token lookup needs a model name")
            tags = body.get("tags") or {}
            if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                raise InvalidArgumentError("tags must be an object of strings")
            try:
                scope = KeyScope.create(
                    model,
                    world_size=int(body.get("world_size", 1)),
                    rank=int(body.get("rank", 0)),
                    dtype=str(body.get("dtype", "float16")),
                    tags=tags,
                )
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(f"bad key scope: {exc}") from None
            hasher = ChunkHasher(size, seed=self.server.hash_seed)
            chunks = hasher.chunks(body["tokens"])
            return [scope.key(c.hash) for c in chunks], [c.end for c in chunks]
        raise InvalidArgumentError("give either keys or tokens (with model and scope fields)")

    async def health(self, request: web.Request) -> web.Response:
        tiered = self.server.tiered
        try:
            await tiered.ping()
        except LMCacheError as exc:
            return _json({"status": "down", "error": str(exc)}, 503)
        tiers = [{"tier": i, "url": t["url"], "healthy": t["healthy"]} for i, t in enumerate(tiered.stats()["tiers"])]
        status = "ok" if all(t["healthy"] for t in tiers) else "degraded"
        return _json({"status": status, "tiers": tiers, "sessions": len(self.server.sessions)})

    async def lookup(self, request: web.Request) -> web.Response:
        keys, ends = self._select(await self._body(request))
        tiered = self.server.tiered
        per_tier = []
        for i, backend in enumerate(tiered.tiers):
            n = await backend.lookup_prefix(keys) if keys else 0
            per_tier.append(
                {
                    "tier": i,
                    "url": tiered.stats()["tiers"][i]["url"],
                    "hit_chunks": n,
                    "hit_tokens": ends[n - 1] if n else 0,
                }
            )
        n = await tiered.lookup_prefix(keys) if keys else 0
        self.server.metrics.lookup(n, len(keys), self.server.chunk_size)
        return _json(
            {
                "chunks": len(keys),
                "chunk_size": self.server.chunk_size,
                "hit_chunks": n,
                "hit_tokens": ends[n - 1] if n else 0,
                "tiers": per_tier,
            }
        )

    async def pin(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        keys, _ = self._select(body)
        ttl = body.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0:
            raise InvalidArgumentError("pin needs ttl, a positive number of seconds")
        total = self.server.tiered.admin().pin(keys, float(ttl))
        return _json({"pinned": len(keys), "total_pinned": total, "ttl": ttl})

    async def unpin(self, request: web.Request) -> web.Response:
        keys, _ = self._select(await self._body(request))
        return _json({"unpinned": self.server.tiered.admin().unpin(keys)})

    async def clear(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        model = body.get("model")
        tags = body.get("tags")
        if model is not None and not isinstance(model, str):
            raise InvalidArgumentError("model must be a string")
        if tags is not None and (not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values())):
            raise InvalidArgumentError("tags must be an object of strings")
        unknown = set(body) - {"model", "tags"}
        if unknown:
            raise InvalidArgumentError(f"unknown fields {sorted(unknown)}; clear takes model and tags")
        tiered = self.server.tiered
        doomed: list[CacheKey] = []
        async for key in tiered.list_keys():
            if model is not None and key.model != model:
                continue
            if tags and any(dict(key.tags).get(k) != v for k, v in tags.items()):
                continue
            doomed.append(key)
        for i in range(0, len(doomed), 1024):
            await tiered.delete(doomed[i : i + 1024])
        tiered.admin().unpin(doomed)
        return _json({"cleared": len(doomed)})

    async def move(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        keys, _ = self._select(body)
        tiered = self.server.tiered
        to_tier, from_tier = body.get("to_tier"), body.get("from_tier")
        n = len(tiered.tiers)
        for name, idx in (("to_tier", to_tier), ("from_tier", from_tier)):
            if (idx is not None or name == "to_tier") and (
                isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < n
            ):
                raise InvalidArgumentError(f"{name}={idx!r}: no such tier; this server has tiers 0..{n - 1}")
        wanted = set(keys)
        sizes: dict[CacheKey, int] = {}
        async for key, size in tiered.list_entries():
            if key in wanted and size is not None:
                sizes[key] = size
        known = [k for k in keys if k in sizes]
        moved = await tiered.admin().move(
            known,
            [sizes[k] for k in known],
            to_tier,
            from_tier=from_tier,
            keep_source=bool(body.get("keep_source", False)),
        )
        return _json({"requested": len(keys), "moved": sum(moved), "missing": len(keys) - len(known)})

    async def stats(self, request: web.Request) -> web.Response:
        return _json(self.server.stats())

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.server.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def start_http(server: CacheServer, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the control API on ``host:port``; returns the runner and the bound port."""
    api = _Api(server)
    app = web.Application(middlewares=[api.guard], client_max_size=64 << 20)
    app.router.add_get("/health", api.health)
    app.router.add_post("/lookup", api.lookup)
    app.router.add_post("/pin", api.pin)
    app.router.add_post("/unpin", api.unpin)
    app.router.add_post("/clear", api.clear)
    app.router.add_post("/move", api.move)
    app.router.add_get("/stats", api.stats)
    app.router.add_get("/metrics", api.metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    for sock in getattr(site._server, "sockets", None) or []:  # the port actually bound when port=0
        bound = sock.getsockname()[1]
        break
    return runner, bound
