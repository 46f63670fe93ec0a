"""``redis+cluster://``: a Redis (or Valkey) Cluster, values spread over its shards by key slot.

URL form::

    redis+cluster://[user[:password]@]host1:port1,host2:port2[/][?option=value&…]

The hosts are startup nodes: any reachable one is enough to discover the whole cluster (the
client follows ``MOVED``/``ASK`` redirections and refreshes its slot map on its own). Options are
those of :mod:`lmcache.backends.redis` (``prefix``, ``ttl``, timeouts, retries, batch sizes…),
read from the URL query or ``LMCACHE_REDIS_CLUSTER_<NAME>``; ``max_connections`` applies per
node. A cluster has only database 0.

Storage is the same as for a single server (one framed string per value under
``prefix + CacheKey.to_string()``). Key names carry no hash tag, so chunks spread evenly over
the shards. Reads and writes take the zero-copy RESP data path (:mod:`lmcache.backends.resp`)
per node: each key is routed by its slot (CRC16, the slot map redis-py keeps) to the primary that
owns it, each node's share is spread over ``connections`` connections to it, and a ``MOVED``
reply refreshes the slot map and sends the item again (an ``ASK`` sends it once to the named node
after ``ASKING``), up to 5 rounds per call. ``EXISTS`` and deletes use redis-py's cluster
pipelines; listing runs ``SCAN`` on every primary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster

from lmcache.backends.base import parse_backend_url, settings_query
from lmcache.backends.redis import URL_LOCATION_FIELDS, RedisBackend, RedisSettings, map_redis_errors
from lmcache.backends.resp import Endpoint, RespError, error_kind
from lmcache.backends.urls import url_userinfo
from lmcache.config import setting
from lmcache.errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["RedisClusterBackend", "RedisClusterSettings"]


def _parse_nodes(value: object) -> tuple[tuple[str, int], ...]:
    items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
    nodes = []
    for item in items:
        if isinstance(item, tuple):
            host, port = item
        else:
            text = str(item).strip()
            host, sep, port_text = text.rpartition(":")
            if not sep or not host or not port_text.isdigit():
                raise ValueError(f"host:port pairs separated by commas (got {text!r})")
            port = int(port_text)
        host = host.strip("[]")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"ports between 1 and 65535 (got {port})")
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError("at least one host:port")
    return tuple(nodes)


@dataclasses.dataclass(frozen=True)
class RedisClusterSettings(RedisSettings):
    """Options of ``redis+cluster://``: those of :class:`RedisSettings` plus the startup nodes."""

    nodes: tuple[tuple[str, int], ...] = setting(
        (("127.0.0.1", 7000),), doc="Startup nodes, host:port[,host:port…] (from the URL).", parse=_parse_nodes
    )


class RedisClusterBackend(RedisBackend):
    """Values in a Redis Cluster, one framed string key per value (see the module docstring)."""

    schemes: ClassVar[tuple[str, ...]] = ("redis+cluster",)
    settings: RedisClusterSettings

    def __init__(self, settings: RedisClusterSettings, scheme: str = "redis+cluster") -> None:
        super().__init__(settings, scheme)
        self._nodes: dict[tuple[str, int], Endpoint] = {}

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``redis+cluster://h1:p1,h2:p2?…``; no I/O.

        Raises:
            ConfigError: No or malformed nodes, a database other than 0, or a bad option.
        """
        if not isinstance(url, str) or "://" not in url:
            raise ConfigError(f"not a backend URL: {url!r} (expected redis+cluster://host:port,host:port)")
        try:
            # urlsplit alone: its .port cannot parse a comma-separated node list.
            parts = urlsplit(url)
        except ValueError as exc:
            raise ConfigError(f"malformed redis+cluster:// URL: {exc}") from None
        if parts.fragment:
            raise ConfigError("redis+cluster:// URLs take no #fragment")
        creds, at, hosts = parts.netloc.rpartition("@")
        location: dict[str, object] = {}
        if hosts:
            location["nodes"] = hosts
        elif "nodes" not in overrides and "nodes=" not in parts.query:
            raise ConfigError("redis+cluster:// URL names no nodes, e.g. redis+cluster://h1:7000,h2:7001")
        if at:
            user, colon, password = creds.partition(":")
            if user:
                location["username"] = unquote(user)
            if colon:
                location["password"] = unquote(password)
        db = parts.path.strip("/")
        if db not in ("", "0"):
            raise ConfigError(f"a Redis Cluster has only database 0; the URL path says {db!r}")
        for name in ("host", "port", "path", "db"):
            if name in overrides or f"{name}=" in parts.query:
                raise ConfigError(f"redis+cluster:// takes no {name!r}; name nodes as host:port,host:port")
        settings = parse_backend_url(url, cls.schemes, RedisClusterSettings, location, overrides, split=parts)
        cls._check_tls(parts.scheme, settings)
        return cls(settings, parts.scheme)

    @property
    def url(self) -> str:
        """A URL that rebuilds this backend (includes the password, if any: do not log it)."""
        s = self.settings
        query = settings_query(s, skip=(*URL_LOCATION_FIELDS, "nodes"))
        auth = url_userinfo(s.username, s.password)
        return f"redis+cluster://{auth}{self._nodes_text()}" + (f"/?{query}" if query else "")

    def _nodes_text(self) -> str:
        return ",".join(f"[{h}]:{p}" if ":" in h else f"{quote(h, safe='')}:{p}" for h, p in self.settings.nodes)

    def _target(self) -> str:
        return f"redis+cluster://{self._nodes_text()}"

    def _make_client(self) -> Any:
        s = self.settings
        kw = self._connection_kwargs()
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in s.nodes],
            # Per node. Unlike the standalone pool, a cluster node's pool raises when exhausted, so
            # batches and pings take one of max_connections slots first; the headroom covers
            # SCAN pages of list_keys, which cannot hold a slot while the caller iterates.
            max_connections=s.max_connections + 4,
            require_full_coverage=True,
            **kw,
        )

    # -- the data path: RESP per node, routed by key slot -----------------------------------

    def _route(
        self, names: list[bytes], todo: list[int], asks: dict[int, Endpoint]
    ) -> list[tuple[Endpoint, list[int], list[bool] | None]]:
        """Group items by the primary that owns their key's slot (CRC16, redis-py's slot map)."""
        client = self._client
        by_node: dict[tuple[str, int], list[int]] = {}
        asked: dict[Endpoint, list[int]] = {}
        for i in todo:
            if i in asks:
                asked.setdefault(asks[i], []).append(i)
                continue
            node = client.nodes_manager.get_node_from_slot(client.keyslot(names[i]))
            by_node.setdefault((node.host, node.port), []).append(i)
        routes: list[tuple[Endpoint, list[int], list[bool] | None]] = [
            (self._node_endpoint(host, port), idx, None) for (host, port), idx in by_node.items()
        ]
        routes.extend((endpoint, idx, [True] * len(idx)) for endpoint, idx in asked.items())
        return routes

    def _node_endpoint(self, host: str, port: int) -> Endpoint:
        # Cached: the idle connections are kept per endpoint, so one node must map to one key.
        key = (host, port)
        endpoint = self._nodes.get(key)
        if endpoint is None:
            endpoint = self._nodes[key] = dataclasses.replace(self._endpoint(host, port), db=0)
        return endpoint

    async def _redirected(self, moved: list[tuple[int, RespError]]) -> dict[int, Endpoint]:
        """``MOVED``: refresh the slot map from the cluster; ``ASK``: send that item to the named node once."""
        asks: dict[int, Endpoint] = {}
        refresh = False
        for i, reply in moved:
            # "MOVED <slot> <host>:<port>" / "ASK <slot> <host>:<port>"
            parts = str(reply).split()
            host, _, port = parts[-1].rpartition(":") if len(parts) >= 3 else ("", "", "")
            if error_kind(reply) == "ask" and host and port.isdigit():
                asks[i] = self._node_endpoint(host.strip("[]"), int(port))
            else:
                refresh = True
        if refresh:
            with map_redis_errors(f"refreshing the slot map of {self._target()}"):
                await self._client.nodes_manager.initialize()
        return asks

    # -- commands: one pipeline per call, which the client splits by node --------------------

    async def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        async with self._client.pipeline() as pipe:
            build(pipe)
            return await pipe.execute(raise_on_error=False)

    async def _unlink(self, names: list[bytes]) -> None:
        # A queued raw command: ClusterPipeline.unlink is a slot-splitting coroutine, not a queued one.
        replies = await self._pipeline(lambda p: [p.execute_command("UNLINK", n) for n in names])
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply

    def _scan(self, match: bytes) -> AsyncIterator[bytes]:
        return self._client.scan_iter(match=match, count=1000)
