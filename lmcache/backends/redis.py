"""``redis://``, ``rediss://``, ``unix://``, ``valkey://``, ``valkeys://``: a Redis or Valkey server.

URL forms (options below; the password may also come from ``LMCACHE_REDIS_PASSWORD``)::

    redis://[user[:password]@]host[:port][/db][?option=value&…]
    rediss://…?ssl_ca_certs=/etc/ssl/redis-ca.pem           TLS (verifies the server by default)
    unix:///run/redis/redis.sock?db=0                       a Unix socket
    valkey://…, valkeys://…                                 the same, for a Valkey server

Storage layout
--------------
*One key per value.* A value is stored as a single Redis string: the shared
:mod:`lmcache.serde.frame` header (format version, length, xxh3 checksum, the key itself)
followed by the payload, under the key ``prefix + CacheKey.to_string()`` (default prefix
``lmcache:``). There is no separate metadata key, so a value can never be half there, and the
readable key name makes ``redis-cli --scan --pattern 'lmcache:*'`` and :meth:`list_keys` work.
Values are immutable: a put is ``SET key value NX [PX ttl]``, so the first writer wins and a
second put reports ``EXISTS``.

*Integrity.* ``get_into`` checks the header, the key binding and the payload checksum on the reply
before copying a byte into ``dst``: a truncated, corrupted or foreign value is a counted miss and
leaves ``dst`` untouched.

*Capacity is the server's business.* The backend declares ``bounded=False``: how much a server
holds and what it drops when full is its ``maxmemory`` and ``maxmemory-policy``. Use
``allkeys-lru`` (or ``volatile-lru`` with ``ttl=``) for a cache; with ``noeviction`` a full server
refuses writes with ``OOM``, which a put reports as ``REJECTED`` (reason ``capacity``).

The data path
-------------
Values move over :mod:`lmcache.backends.resp`, a RESP client on raw sockets that never copies a
value in Python: a ``SET`` sends the command and frame headers and then the caller's buffer
itself (``sendmsg`` of the pieces; ``sendall`` of each piece over TLS), and a ``GET`` parses the
reply and frame headers from a small buffer, checks them, then receives the payload straight into
``dst`` and hashes it as it lands. A value whose header is wrong (truncated, foreign, not a frame)
never touches ``dst``; one whose payload fails its checksum was already streamed into ``dst``,
so that ``dst`` is unspecified while the call reports a miss. A damaged value is then deleted
(best effort): it can never become good, and under ``SET NX`` it would block every later put.
A cancelled ``get_into`` may likewise leave part of a value in a ``dst`` (never reported as a hit;
nothing is written after the call returned). redis-py still serves ``PING``, ``EXISTS``,
``UNLINK``, ``SCAN``/``STRLEN`` and, for a cluster, the slot map.

Batching and flow control
-------------------------
A batch is cut into ``connections`` sub-batches of about equal bytes (smaller when a share exceeds
``max_batch_bytes`` or ``max_batch_keys``), each one pipeline on one connection run by a worker
thread, at most ``connections`` of them in flight per call. All calls share ``max_connections``
connections and threads per server and a budget of ``max_inflight_bytes`` (payload bytes; a lone
value larger than the budget runs alone). Nothing of a value is buffered by the client, so memory
is the caller's buffers plus a 64 KiB read buffer per connection. Read sizes are planned from the
destination buffers.

``lmcache bench backend --url redis://…`` runs two baselines in the same rounds: raw redis-py
(pipelined ``SET``/``GET`` of the same bytes on the same pool, the ratio column) and a minimal
raw-socket RESP client with no frame or checksum (``wire``, the ceiling the server and socket
allow); see ``docs/benchmarks.md`` for figures and how they move with ``connections``.

Failures
--------
``timeout`` is the deadline of a whole call (``contains``, ``get_into``, ``put``, ``delete``,
``ping``, ``open``, one page of a listing): the longest it can take, retries, backoff and
reconnects included. Past it the call is cancelled and raises
:class:`~lmcache.errors.BackendTimeoutError`, so a server that accepts connections and never
answers costs ``timeout``, not ``(retries + 1) x timeout``. Within it, transient errors
(connection loss, a connection attempt past ``connect_timeout``) are retried with exponential
backoff (``retries``, ``retry_backoff``, ``retry_backoff_max``) on a fresh connection, resuming
after the last reply received; nothing else is retried. A connection that failed mid-command is
closed, never reused: a ``SET`` cut in the middle of its value is never executed by the server,
so a broken put never leaves a partial value readable. A retried ``SET NX`` whose first reply was
lost reports ``EXISTS``, which is still correct: the value is held.
Errors are mapped at the boundary: authentication → :class:`~lmcache.errors.AuthError`, connection
failures → :class:`~lmcache.errors.BackendUnavailableError`, timeouts →
:class:`~lmcache.errors.BackendTimeoutError`, other server errors →
:class:`~lmcache.errors.PermanentBackendError`. An unreachable server fails after about
``(retries + 1) x connect_timeout`` plus backoff, and never later than ``timeout``. A restarted
server is picked up by itself: the pool drops broken connections and the retry opens new ones.

The same code serves Valkey (it speaks the same protocol) and, through
:mod:`lmcache.backends.redis_cluster`, a Redis Cluster. This module may not touch policy
(eviction, promotion): that is :class:`~lmcache.tiered.TieredBackend`'s job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import socket
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import quote, unquote

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from lmcache.backends.base import (
    EXISTS,
    STORED,
    Capabilities,
    PutResult,
    StorageBackend,
    check_dst_size,
    gather_all,
    parse_backend_url,
    rejected,
    run_blocking,
    settings_query,
    split_by_size,
    split_url,
)
from lmcache.backends.resp import Corrupt, Endpoint, RespConnection, RespError, RespJob, TooSmall, error_kind
from lmcache.backends.urls import url_host, url_userinfo
from lmcache.config import parse_duration, parse_size, setting
from lmcache.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
    IntegrityError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.serde.frame import header_size

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["URL_LOCATION_FIELDS", "RedisBackend", "RedisSettings", "map_redis_errors"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PORT = 6379
#: MOVED/ASK rounds one call follows before it gives up (a cluster mid-resharding).
_MAX_REDIRECTS = 5
_TLS_SCHEMES = frozenset({"rediss", "valkeys"})
_SSL_FIELDS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")
#: Settings that live in the URL's netloc/path rather than its query (``url`` skips them there).
URL_LOCATION_FIELDS = ("host", "port", "path", "db", "username", "password")


def _optional_duration(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    return parse_duration(value)


@dataclasses.dataclass(frozen=True)
class RedisSettings:
    """Options of the Redis/Valkey backends (URL query, ``LMCACHE_<SCHEME>_<NAME>`` env, overrides).

    ``host``, ``port``, ``db``, ``username`` and ``password`` normally come from the URL itself.
    """

    host: str = setting("127.0.0.1", doc="Server host (from the URL).")
    port: int = setting(DEFAULT_PORT, doc="Server port (from the URL).", min=1, max=65535)
    path: str | None = setting(None, doc="Unix socket path (unix:// URLs).")
    db: int = setting(0, doc="Database number (the URL path, e.g. redis://host/2).", min=0)
    username: str | None = setting(None, doc="ACL user name (from the URL).")
    password: str | None = setting(None, doc="Password (from the URL or the environment).", secret=True)
    prefix: str = setting("lmcache:", doc="Prepended to every key name; namespaces caches sharing a server.")
    ttl: float | None = setting(
        None, doc="Expire values this long after they are stored (e.g. 1h); none = never.", parse=_optional_duration
    )
    connect_timeout: float = setting(
        2.0,
        doc="Seconds one connection attempt (and its authentication) may take, within timeout.",
        parse=parse_duration,
        min=0.001,
    )
    timeout: float = setting(
        10.0,
        doc=(
            "The longest one call (contains, get_into, put, delete, ping, open; a SCAN page) may take, "
            "retries, backoff and reconnects included; past it the call raises BackendTimeoutError. "
            "Size it for the largest batch."
        ),
        parse=parse_duration,
        min=0.001,
    )
    retries: int = setting(
        2,
        doc="Retries of a command after a connection error or timeout, while the call's timeout lasts.",
        min=0,
        max=100,
    )
    retry_backoff: float = setting(
        0.05, doc="First retry backoff in seconds (doubles each time).", parse=parse_duration
    )
    retry_backoff_max: float = setting(1.0, doc="Longest retry backoff in seconds.", parse=parse_duration)
    max_connections: int = setting(
        16, doc="Connections per server (the pool and the data path's); also the sub-batches run at once.", min=1
    )
    connections: int = setting(
        4,
        doc="Connections one batch's values are spread over (sub-batches sent in parallel), at most max_connections.",
        min=1,
    )
    max_batch_bytes: int = setting(64 << 20, doc="Largest sub-batch (one pipeline) in bytes.", parse=parse_size, min=1)
    max_batch_keys: int = setting(512, doc="Most keys in one sub-batch.", min=1)
    max_inflight_bytes: int = setting(
        256 << 20, doc="Bytes of values in flight at once over all operations.", parse=parse_size, min=1
    )
    health_check_interval: float = setting(
        0.0, doc="PING a pooled connection idle this long before using it (0 = off).", parse=parse_duration
    )
    ssl_ca_certs: str | None = setting(None, doc="CA bundle that verifies the server (rediss:// only).")
    ssl_certfile: str | None = setting(None, doc="Client certificate for mutual TLS (rediss:// only).")
    ssl_keyfile: str | None = setting(None, doc="Client key for mutual TLS (rediss:// only).")
    ssl_cert_reqs: str = setting(
        "required", doc="Server certificate check (rediss:// only).", choices=("required", "optional", "none")
    )
    ssl_check_hostname: bool = setting(True, doc="Check the server certificate names the host (rediss:// only).")


# ---------------------------------------------------------------------------------------------
# Error mapping

_OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(rexc, "OutOfMemoryError", None),) if t is not None
)
_AUTH_ERRORS: tuple[type[BaseException], ...] = tuple(
    t
    for t in (
        rexc.AuthenticationError,
        getattr(rexc, "AuthenticationWrongNumberOfArgsError", None),
        getattr(rexc, "AuthorizationError", None),
        getattr(rexc, "NoPermissionError", None),
    )
    if t is not None
)
# Server states that pass: loading a dataset, a failover in progress, a cluster reconfiguring.
_UNAVAILABLE_RESPONSES: tuple[type[BaseException], ...] = (
    rexc.ReadOnlyError,
    rexc.ClusterDownError,
    rexc.TryAgainError,
)

# redis-py >= 6 only; a caller's mistake rather than an unreachable cluster.
_CROSS_SLOT: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(rexc, "CrossSlotTransactionError", None),) if t is not None
)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, _OOM_ERRORS) or (isinstance(exc, rexc.ResponseError) and str(exc).startswith("OOM"))


def _cert_failure(exc: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def translate_error(exc: BaseException, what: str) -> BaseException:
    """The :mod:`lmcache.errors` exception for a redis-py (or socket) exception.

    Returns ``exc`` itself when it is already an lmcache error or not a lower-layer failure.
    """
    if isinstance(exc, BackendError):
        return exc
    msg = f"{what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, _AUTH_ERRORS):
        return AuthError(msg)
    if _cert_failure(exc):
        return AuthError(f"{what}: the server's TLS certificate was not accepted: {exc}")
    if _is_oom(exc):
        return CapacityError(msg)
    if isinstance(exc, rexc.TimeoutError) and "connect" in str(exc).lower():
        # A connect that times out means the host cannot be reached, not a slow command.
        return BackendUnavailableError(msg)
    if isinstance(exc, (rexc.TimeoutError, asyncio.TimeoutError, TimeoutError)):
        return BackendTimeoutError(msg)
    if isinstance(exc, (rexc.ConnectionError, ConnectionError, *_UNAVAILABLE_RESPONSES)):
        return BackendUnavailableError(msg)
    if isinstance(exc, rexc.RedisClusterException) and not isinstance(exc, _CROSS_SLOT):
        # "Redis Cluster cannot be connected", slots not covered: the cluster is not reachable/ready.
        return BackendUnavailableError(msg)
    if isinstance(exc, OSError):
        return BackendUnavailableError(msg)
    if isinstance(exc, rexc.RedisError):
        return PermanentBackendError(msg)
    return exc


@contextlib.contextmanager
def map_redis_errors(what: str) -> Iterator[None]:
    """Map redis-py exceptions raised in the block into :mod:`lmcache.errors` (``from`` the original).

    Args:
        what: The operation and target, used in the message (must not contain secrets).
    """
    try:
        yield
    except (rexc.RedisError, rexc.RedisClusterException, OSError) as exc:
        mapped = translate_error(exc, what)
        if mapped is exc:
            raise
        raise mapped from exc


# ---------------------------------------------------------------------------------------------
# The deadline of a whole call


class _DeadlinePassed(Exception):
    """Our own deadline expired (told apart from a timeout the call itself raised)."""


if sys.version_info >= (3, 11):

    async def _within(call: Awaitable[T], seconds: float) -> T:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await call
        except TimeoutError:
            if deadline.expired():
                raise _DeadlinePassed from None
            raise

else:  # pragma: no cover - Python 3.10

    async def _within(call: Awaitable[T], seconds: float) -> T:
        try:
            return await asyncio.wait_for(call, seconds)
        except asyncio.TimeoutError as exc:  # not the builtin TimeoutError before 3.11
            if isinstance(exc, TimeoutError):
                raise
            raise _DeadlinePassed from None


# ---------------------------------------------------------------------------------------------
# Flow control


class _ByteBudget:
    """A FIFO async semaphore counted in bytes; a request larger than the whole budget runs alone."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def _fits(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.used += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(n)  # granted just as we were cancelled: hand it on
            else:
                self._waiters.remove(entry)
                self._wake()
            raise

    def release(self, n: int) -> None:
        self.used -= n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.used += n
            fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)


# ---------------------------------------------------------------------------------------------
# The backend


class RedisBackend(StorageBackend):
    """Values in a Redis or Valkey server, one string key per value (see the module docstring).

    Args:
        settings: Parsed options; build with :meth:`from_url`.
        scheme: The URL scheme it was built from (kept so :attr:`url` round trips).
    """

    schemes: ClassVar[tuple[str, ...]] = ("redis", "rediss", "unix", "valkey", "valkeys")
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True,
        shared=True,
        device_buffers=False,
        listing=True,
        integrity_checked=True,
        bounded=False,
        # Redis's default proto-max-bulk-len is 512 MiB per value, frame header included.
        max_value_bytes=(512 << 20) - (64 << 10),
    )
    secret_options: ClassVar[tuple[str, ...]] = ("password",)

    def __init__(self, settings: RedisSettings, scheme: str = "redis") -> None:
        super().__init__()
        self.settings = settings
        self.scheme = scheme
        self._prefix = settings.prefix.encode()
        self._client: Any = None
        self._budget: _ByteBudget | None = None
        self._slots: asyncio.Semaphore | None = None
        # The RESP data path (lmcache.backends.resp): worker threads and idle connections per node.
        self._executor: ThreadPoolExecutor | None = None
        self._idle: dict[Endpoint, list[RespConnection]] = {}
        self._ssl_context: ssl.SSLContext | None = None

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from a ``redis://``/``rediss://``/``unix://``/``valkey://``/``valkeys://`` URL; no I/O.

        Raises:
            ConfigError: An unknown option, a bad value or port, or TLS options on a plain scheme.
        """
        parts = split_url(url)
        if parts.fragment:
            raise ConfigError(f"{parts.scheme}:// URLs take no #fragment")
        location: dict[str, object] = {}
        if parts.scheme == "unix":
            if parts.hostname or parts.port:
                raise ConfigError("unix:// URLs name a socket path, e.g. unix:///run/redis/redis.sock?db=0")
            if not parts.path or parts.path == "/":
                raise ConfigError("unix:// URL has no socket path, e.g. unix:///run/redis/redis.sock")
            location["path"] = unquote(parts.path)
        elif parts.scheme in cls.schemes:
            if "path" in overrides or "path=" in parts.query:
                raise ConfigError(f"{parts.scheme}:// takes no socket path; use unix:///path/to/redis.sock")
            if parts.hostname:
                location["host"] = parts.hostname
            if parts.port is not None:
                location["port"] = parts.port
            elif parts.netloc.rsplit("@", 1)[-1].endswith(":"):
                raise ConfigError(f"{parts.scheme}:// URL has an empty port")
            db = parts.path.strip("/")
            if db:
                if not db.isdigit():
                    raise ConfigError(f"{parts.scheme}:// URL path must be a database number, got {db!r}")
                location["db"] = int(db)
        if parts.username:
            location["username"] = unquote(parts.username)
        if parts.password is not None:
            location["password"] = unquote(parts.password)
        settings = parse_backend_url(url, cls.schemes, RedisSettings, location, overrides, split=parts)
        cls._check_tls(parts.scheme, settings)
        return cls(settings, parts.scheme)

    @staticmethod
    def _check_tls(scheme: str, settings: RedisSettings) -> None:
        if scheme in _TLS_SCHEMES:
            return
        defaults = RedisSettings()
        given = [f for f in _SSL_FIELDS if getattr(settings, f) != getattr(defaults, f)]
        if given:
            tls = "valkeys" if scheme.startswith("valkey") else "rediss"
            raise ConfigError(f"{scheme}:// does not use TLS; {', '.join(given)} need a {tls}:// URL")

    @property
    def url(self) -> str:
        """A URL that rebuilds this backend (includes the password, if any: do not log it)."""
        s = self.settings
        query = settings_query(s, skip=URL_LOCATION_FIELDS)
        auth = url_userinfo(s.username, s.password)
        if self.scheme == "unix":
            extra = f"db={s.db}" if s.db else ""
            q = "&".join(p for p in (extra, query) if p)
            base = f"unix://{auth}{quote(s.path or '')}"
            return base + (f"?{q}" if q else "")
        return f"{self.scheme}://{auth}{url_host(s.host)}:{s.port}/{s.db}" + (f"?{query}" if query else "")

    def _target(self) -> str:
        """Where the server is, for messages (never includes credentials)."""
        s = self.settings
        if self.scheme == "unix":
            return f"unix://{s.path}"
        return f"{self.scheme}://{url_host(s.host)}:{s.port}/{s.db}"

    # -- lifecycle ---------------------------------------------------------------------------

    def _retry(self) -> Retry:
        s = self.settings
        return Retry(
            ExponentialBackoff(cap=s.retry_backoff_max, base=s.retry_backoff),
            s.retries,
            supported_errors=(rexc.ConnectionError, rexc.TimeoutError),
        )

    def _connection_kwargs(self) -> dict[str, Any]:
        """Arguments every connection (standalone or per cluster node) is made with."""
        s = self.settings
        kw: dict[str, Any] = {
            "username": s.username,
            "password": s.password,
            "socket_timeout": s.timeout,
            "socket_connect_timeout": s.connect_timeout,
            "retry": self._retry(),
            "health_check_interval": s.health_check_interval,
            "protocol": 2,  # RESP2: understood by every Redis/Valkey version
        }
        if self.scheme in _TLS_SCHEMES:
            kw.update(
                ssl_ca_certs=s.ssl_ca_certs,
                ssl_certfile=s.ssl_certfile,
                ssl_keyfile=s.ssl_keyfile,
                ssl_cert_reqs=s.ssl_cert_reqs,
                ssl_check_hostname=s.ssl_check_hostname and s.ssl_cert_reqs != "none",
            )
        return kw

    def _make_client(self) -> Any:
        s = self.settings
        kw = self._connection_kwargs()
        if self.scheme == "unix":
            kw.update(connection_class=aioredis.UnixDomainSocketConnection, path=s.path)
        else:
            kw.update(host=s.host, port=s.port)
            kw["connection_class"] = aioredis.SSLConnection if self.scheme in _TLS_SCHEMES else aioredis.Connection
        kw["db"] = s.db
        # Waits for a free connection instead of raising MaxConnectionsError; our own semaphore
        # keeps concurrent sub-batches at max_connections, so the wait is short.
        pool = aioredis.BlockingConnectionPool(max_connections=s.max_connections, timeout=None, **kw)
        return aioredis.Redis(connection_pool=pool)

    def make_client(self) -> Any:
        """A new, unconnected redis-py client with this backend's connection settings.

        For tools that must reach the same server on the same terms (the raw redis-py baseline of
        ``lmcache bench backend``); the caller closes it. Does no I/O.
        """
        return self._make_client()

    def connect_socket(self) -> socket.socket:
        """A new blocking socket to the server, set up as the data path's own (buffers, TLS, AUTH, SELECT).

        For tools that speak RESP themselves to the same server on the same terms (the wire
        baseline of ``lmcache bench backend``); the caller owns and closes it. Its timeout is
        the backend's ``timeout``. Blocks: call it off the event loop.

        Raises:
            AuthError: Rejected credentials or an untrusted server certificate.
            BackendUnavailableError: The server cannot be reached within ``connect_timeout``.
            BackendTimeoutError: The handshake took longer than ``timeout``.
        """
        s = self.settings
        sock = RespConnection.connect(self._endpoint(), time.monotonic() + s.connect_timeout + s.timeout).detach()
        sock.settimeout(s.timeout)
        return sock

    async def _open(self) -> None:
        s = self.settings
        self._budget = _ByteBudget(s.max_inflight_bytes)
        self._slots = asyncio.Semaphore(s.max_connections)
        client = self._make_client()
        try:
            with map_redis_errors(f"connecting to {self._target()}"):
                await self._bounded(client.ping(), "connecting")
        except BaseException:
            await self._close_client(client)
            raise
        self._client = client
        self._executor = ThreadPoolExecutor(max_workers=s.max_connections, thread_name_prefix="lmcache-resp")
        logger.debug("%r: connected", self)

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await self._close_client(client)
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    @staticmethod
    async def _close_client(client: Any) -> None:
        with contextlib.suppress(Exception):
            await client.aclose()
        pool = getattr(client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()

    async def _ping(self) -> None:
        slots = self._slots
        assert slots is not None

        async def ping() -> None:
            async with slots:
                with map_redis_errors(f"PING {self._target()}"):
                    await self._client.ping()

        await self._bounded(ping(), "PING")

    async def _bounded(self, call: Awaitable[T], what: str) -> T:
        """Await ``call`` within ``timeout``: the deadline of a whole call, retries included.

        redis-py bounds each socket read by ``timeout`` and then retries, so on its own a call to
        a server that accepts and never answers would block ``(retries + 1) x timeout`` plus
        backoff. Past the deadline the call is cancelled (it unwinds before this raises, so no
        ``dst`` is written afterwards) and :class:`~lmcache.errors.BackendTimeoutError` is raised.
        """
        limit = self.settings.timeout
        try:
            return await _within(call, limit)
        except _DeadlinePassed:
            raise BackendTimeoutError(
                f"{what} on {self._target()}: no answer within timeout={limit:g}s (retries included)"
            ) from None

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "target": self._target(),
            "prefix": self.settings.prefix,
            "inflight_bytes": self._budget.used if self._budget is not None else 0,
        }

    # -- key names ---------------------------------------------------------------------------

    def key_name(self, key: CacheKey) -> bytes:
        """The Redis key a value is stored under (``prefix + key.to_string()``)."""
        return self._prefix + key.to_string().encode()

    # -- batching ----------------------------------------------------------------------------

    async def _run_batches(
        self,
        sizes: Sequence[int],
        step: Callable[[range], Awaitable[None]],
        what: str,
    ) -> None:
        """Run ``step`` over byte-bounded sub-batches, concurrently within the budget.

        On the first failure the other sub-batches are cancelled (and awaited) before it is
        raised, so nothing of this call still runs when it returns.
        """
        s = self.settings
        batches = split_by_size(sizes, s.max_batch_bytes, s.max_batch_keys)
        assert self._budget is not None and self._slots is not None
        budget, slots = self._budget, self._slots

        async def run(r: range) -> None:
            nbytes = sum(sizes[i] for i in r)
            async with budget.hold(nbytes), slots:
                with map_redis_errors(f"{what} on {self._target()}"):
                    await step(r)

        await gather_all([run(r) for r in batches])

    # -- commands a cluster subclass overrides ----------------------------------------------

    async def _mget(self, names: list[bytes]) -> list[Any]:
        """``GET`` each name on one pipeline; a failed ``GET`` comes back as an exception item.

        Not ``MGET``: redis-py's parser keeps every chunk of a reply until the whole reply is
        parsed, so one ``MGET`` of 16 x 4 MiB holds twice its size at once, while pipelined
        ``GET`` replies are parsed and released one by one. Measured here, reading 4 MiB values
        took about a third more client CPU per byte through ``MGET`` than through plain redis-py.
        """
        return await self._pipeline(lambda p: [p.get(n) for n in names])

    async def _pipeline(self, build: Callable[[Any], None]) -> list[Any]:
        """Run the commands ``build`` queues on a non-transactional pipeline; errors come back as items."""
        async with self._client.pipeline(transaction=False) as pipe:
            build(pipe)
            return await pipe.execute(raise_on_error=False)

    async def _unlink(self, names: list[bytes]) -> None:
        await self._client.unlink(*names)

    def _scan(self, match: bytes) -> AsyncIterator[bytes]:
        return self._client.scan_iter(match=match, count=1000)

    # -- the RESP data path (lmcache.backends.resp) -------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        """The TLS context of the data path's sockets (rediss://, valkeys://), as redis-py builds its own."""
        if self.scheme not in _TLS_SCHEMES:
            return None
        if self._ssl_context is None:
            s = self.settings
            ctx = ssl.create_default_context(cafile=s.ssl_ca_certs)
            reqs = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
            ctx.check_hostname = bool(s.ssl_check_hostname and s.ssl_cert_reqs != "none")
            ctx.verify_mode = reqs[s.ssl_cert_reqs]
            if s.ssl_certfile:
                ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile)
            self._ssl_context = ctx
        return self._ssl_context

    def _endpoint(self, host: str | None = None, port: int | None = None) -> Endpoint:
        """The data path's address of the server (or of a cluster node), with credentials and db."""
        s = self.settings
        return Endpoint(
            host=host or s.host,
            port=port or s.port,
            path=s.path if self.scheme == "unix" else None,
            ssl_context=self._tls_context(),
            username=s.username,
            password=s.password,
            db=s.db,
            connect_timeout=s.connect_timeout,
        )

    def _route(
        self, names: list[bytes], todo: list[int], asks: dict[int, Endpoint]
    ) -> list[tuple[Endpoint, list[int], list[bool] | None]]:
        """Which server each item goes to: ``(endpoint, indices, asking)`` per server.

        ``asks`` names items an ``ASK`` redirected (sent there once, after ``ASKING``); a cluster
        overrides this to route by key slot.
        """
        return [(self._endpoint(), todo, None)]

    async def _redirected(self, moved: list[tuple[int, RespError]]) -> dict[int, Endpoint]:
        """Learn from ``MOVED``/``ASK`` replies before the items are routed again; the ``ASK`` targets.

        A single server never redirects; a cluster overrides this.
        """
        raise PermanentBackendError(
            f"{self._target()} answered {moved[0][1]} (a cluster node?): use a redis+cluster:// URL"
        )

    def _spread(self, idx: list[int], sizes: Sequence[int]) -> list[list[int]]:
        """Cut one server's share of a batch into sub-batches, one connection each.

        ``connections`` of about equal bytes, each within ``max_batch_bytes`` and
        ``max_batch_keys`` (so more, smaller ones for a big batch; at most ``connections`` of a
        call run at once).
        """
        s = self.settings
        total = sum(sizes[i] for i in idx)
        per = max(1, min(s.max_batch_bytes, -(-total // max(1, min(s.connections, s.max_connections)))))
        return [[idx[j] for j in r] for r in split_by_size([sizes[i] for i in idx], per, s.max_batch_keys)]

    async def _data_path(
        self,
        names: list[bytes],
        sizes: Sequence[int],
        op: Callable[[RespConnection, list[int], list[Any], list[bool] | None, float], None],
        settle: Callable[[int, Any], int | None],
        what: str,
    ) -> None:
        """Run ``op`` over every item, spread over connections (and nodes), following redirections.

        ``op(conn, indices, got, asking, deadline)`` runs one pipeline on a worker thread and
        appends one reply per item to ``got`` as it arrives (a retry resumes after them);
        ``settle(i, reply)`` records a reply, returning ``i`` when the item must be sent again
        after a ``MOVED``/``ASK``.
        """
        deadline = time.monotonic() + self.settings.timeout
        # At most `connections` sub-batches of this call in flight at once (per call, over all nodes).
        lanes = asyncio.Semaphore(min(self.settings.connections, self.settings.max_connections))
        todo = list(range(len(names)))
        asks: dict[int, Endpoint] = {}
        for _ in range(_MAX_REDIRECTS + 1):
            moved: list[tuple[int, RespError]] = []

            async def sub(
                endpoint: Endpoint, idx: list[int], asking: list[bool] | None, moved: list[tuple[int, RespError]]
            ) -> None:
                got: list[Any] = []
                async with lanes:
                    await self._run_job(
                        endpoint,
                        sum(sizes[i] for i in idx),
                        lambda conn: op(conn, idx, got, asking, deadline),
                        what,
                        deadline,
                    )
                for i, reply in zip(idx, got, strict=True):
                    if settle(i, reply) is not None:
                        moved.append((i, reply))

            runs = []
            with map_redis_errors(f"{what} on {self._target()}"):  # a cluster's slot map comes from redis-py
                routes = self._route(names, todo, asks)
            for endpoint, idx, asking in routes:
                if asking is None:
                    runs.extend(sub(endpoint, part, None, moved) for part in self._spread(idx, sizes))
                else:  # ASK redirections: few, one pipeline
                    runs.append(sub(endpoint, idx, asking, moved))
            await gather_all(runs)
            if not moved:
                return
            asks = await self._redirected(moved)
            todo = sorted(i for i, _ in moved)
        raise BackendUnavailableError(f"{what} on {self._target()}: still redirected after {_MAX_REDIRECTS} tries")

    async def _run_job(
        self,
        endpoint: Endpoint,
        nbytes: int,
        op: Callable[[RespConnection], None],
        what: str,
        deadline: float,
    ) -> None:
        """Run ``op`` on a worker thread with an idle (or new) connection to ``endpoint``.

        Within the byte budget and a connection slot. If the awaiting task is cancelled (the
        call's deadline, or the caller), the job's socket is shut down and the worker awaited
        before this returns, so nothing touches a caller's buffer afterwards.
        """
        s = self.settings
        assert self._budget is not None and self._slots is not None and self._executor is not None
        async with self._budget.hold(nbytes), self._slots:
            idle = self._idle.get(endpoint)
            job = RespJob(
                endpoint,
                idle.pop() if idle else None,
                deadline,
                retries=s.retries,
                backoff=s.retry_backoff,
                backoff_max=s.retry_backoff_max,
                health_check_interval=s.health_check_interval,
            )
            try:
                await run_blocking(self._executor, job.run, op, what, on_cancel=job.cancel)
            finally:
                conn = job.conn
                if conn is not None:
                    if conn.broken or self._executor is None:
                        conn.close()
                    else:
                        self._idle.setdefault(endpoint, []).append(conn)

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        out = [False] * len(keys)
        names = [self.key_name(k) for k in keys]

        async def step(r: range) -> None:
            replies = await self._pipeline(lambda p: [p.exists(names[i]) for i in r])
            for i, reply in zip(r, replies, strict=True):
                if isinstance(reply, BaseException):
                    raise reply
                out[i] = bool(reply)

        await self._bounded(self._run_batches([64] * len(keys), step, "EXISTS"), "EXISTS")
        return out

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        out: list[int | None] = [None] * len(keys)
        names = [self.key_name(k) for k in keys]
        # Planned from the destinations (a value larger than its dst cannot fit it anyway).
        sizes = [d.nbytes for d in dsts]
        too_small: list[tuple[int, int]] = []
        damaged: list[bytes] = []

        def settle(i: int, reply: Any) -> int | None:
            """Record one GET result; the index to retry at another node (a redirection), else None."""
            if isinstance(reply, RespError):
                kind = error_kind(reply)
                if kind == "wrongtype":
                    # Not a string: nothing this backend stored.
                    self.record_corrupt(keys[i], IntegrityError(f"{names[i]!r} holds a non-string value"))
                    return None
                if kind in ("moved", "ask"):
                    return i
                raise _reply_error(reply, f"GET on {self._target()}")
            if isinstance(reply, Corrupt):
                self.record_corrupt(keys[i], IntegrityError(reply.reason))
                damaged.append(names[i])
            elif isinstance(reply, TooSmall):
                too_small.append((i, reply.needed))
            else:
                out[i] = reply
            return None

        def op(
            conn: RespConnection, idx: list[int], got: list[Any], asking: list[bool] | None, deadline: float
        ) -> None:
            rest = idx[len(got) :]
            conn.get_frames(
                [names[i] for i in rest],
                [keys[i] for i in rest],
                [dsts[i] for i in rest],
                deadline,
                got,
                asking=None if asking is None else asking[len(got) :],
            )

        await self._bounded(self._data_path(names, sizes, op, settle, "GET"), "GET")
        if damaged:
            await self._drop_damaged(damaged)
        for i, needed in too_small:
            check_dst_size(keys[i], dsts[i], needed)
        return out

    async def _drop_damaged(self, names: list[bytes]) -> None:
        """Delete values that failed their check (best effort), so a good value can be put again.

        Keys are content hashes and values immutable, so a damaged value can never become good;
        left in place it would answer every later ``SET NX`` with ``EXISTS`` and stay a miss.
        The payload may have been streamed into its ``dst`` before the checksum failed, so that
        ``dst`` is unspecified (the call still reports a miss); after the delete, later reads are
        plain misses that leave ``dst`` untouched.
        """
        try:
            with map_redis_errors(f"UNLINK on {self._target()}"):
                await self._bounded(self._unlink(names), "UNLINK")
        except BackendError as exc:
            self.log_once("drop_damaged", "%r: deleting damaged values failed: %s", self, exc)

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        out: list[PutResult] = [rejected("error")] * len(keys)
        names = [self.key_name(k) for k in keys]
        # Sub-batches and the budget count payload bytes (a frame header is a few hundred bytes).
        sizes = [s.nbytes for s in srcs]
        px = None if self.settings.ttl is None else max(1, round(self.settings.ttl * 1000))

        def settle(i: int, reply: Any) -> int | None:
            if isinstance(reply, RespError):
                kind = error_kind(reply)
                if kind == "oom":
                    self.log_once("oom", "%r: the server is full (OOM); puts are rejected", self)
                    out[i] = rejected("capacity")
                    return None
                if kind in ("moved", "ask"):
                    return i
                raise _reply_error(reply, f"SET on {self._target()}")
            out[i] = STORED if reply else EXISTS
            return None

        def op(
            conn: RespConnection, idx: list[int], got: list[Any], asking: list[bool] | None, deadline: float
        ) -> None:
            rest = idx[len(got) :]
            conn.set_frames(
                [names[i] for i in rest],
                [keys[i] for i in rest],
                [srcs[i] for i in rest],
                deadline,
                got,
                px=px,
                asking=None if asking is None else asking[len(got) :],
            )

        await self._bounded(self._data_path(names, sizes, op, settle, "SET"), "SET")
        return out

    async def _delete(self, keys: list[CacheKey]) -> None:
        names = [self.key_name(k) for k in keys]

        async def step(r: range) -> None:
            # UNLINK frees big values on a server thread instead of blocking the server.
            await self._unlink([names[i] for i in r])

        await self._bounded(self._run_batches([64] * len(keys), step, "UNLINK"), "UNLINK")

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        async for key, _name in self._scan_keys():
            yield key

    async def _list_entries(self) -> AsyncIterator[tuple[CacheKey, int | None]]:
        # Sizes from STRLEN, one pipeline per page of SCAN results: the frame header's length is
        # fixed by the key (no metadata is stored), so payload = STRLEN - header, without a read.
        page: list[tuple[CacheKey, bytes]] = []

        async def sizes() -> list[tuple[CacheKey, int | None]]:
            assert self._slots is not None
            async with self._slots:  # released before the caller sees an entry: no self-deadlock
                with map_redis_errors(f"STRLEN on {self._target()}"):
                    replies = await self._bounded(
                        self._pipeline(lambda p: [p.strlen(name) for _, name in page]), "STRLEN"
                    )
            out: list[tuple[CacheKey, int | None]] = []
            for (key, _), n in zip(page, replies, strict=True):
                if isinstance(n, BaseException) or not n:
                    continue  # deleted since the scan (or not a string): not held
                head = header_size(len(key.to_string().encode()), 0)
                out.append((key, n - head if n >= head else None))
            return out

        async for entry in self._scan_keys():
            page.append(entry)
            if len(page) >= 500:
                for item in await sizes():
                    yield item
                page = []
        if page:
            for item in await sizes():
                yield item

    async def _scan_keys(self) -> AsyncIterator[tuple[CacheKey, bytes]]:
        match = _glob_escape(self._prefix) + b"*"
        n = len(self._prefix)
        with map_redis_errors(f"SCAN on {self._target()}"):
            names = self._scan(match).__aiter__()
            while True:
                # Each step (at most one SCAN page fetched) within the deadline.
                try:
                    name = await self._bounded(names.__anext__(), "SCAN")
                except StopAsyncIteration:
                    break
                try:
                    key = CacheKey.from_string(bytes(name[n:]).decode())
                except (UnicodeDecodeError, ValueError):
                    continue  # not one of ours: a foreign key that shares the prefix
                yield key, bytes(name)


def _reply_error(reply: RespError, what: str) -> BackendError:
    """The :mod:`lmcache.errors` exception for an error reply of the data path."""
    kind = error_kind(reply)
    msg = f"{what}: {reply}"
    if kind == "auth":
        return AuthError(msg)
    if kind == "oom":
        return CapacityError(msg)
    if kind in ("unavailable", "moved", "ask"):
        return BackendUnavailableError(msg)
    return PermanentBackendError(msg)


def _glob_escape(text: bytes) -> bytes:
    out = bytearray()
    for b in text:
        if b in b"*?[]\\":
            out.append(ord("\\"))
        out.append(b)
    return bytes(out)
