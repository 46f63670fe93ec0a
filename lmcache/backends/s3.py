"""``s3://bucket/prefix`` backend: framed values as objects in an S3-compatible bucket.

URL form::

    s3://bucket[/prefix]?endpoint_url=http://127.0.0.1:9000&region=us-east-1
        &aws_access_key_id=…&aws_secret_access_key=…        (secret options, redacted in repr)

Without credentials in the URL (or ``LMCACHE_S3_*`` env, or keyword overrides) the standard AWS
chain is used (``AWS_*`` env, ``~/.aws``, ``profile=``, instance metadata). With an
``endpoint_url`` (MinIO, SeaweedFS, Ceph, moto…) path-style addressing is the default.

Layout and protocol:

* One object per value at ``<prefix>/<CacheKey.to_string()>``; the key string holds no ``/``,
  so listing the prefix gives the keys back. Each object is one :mod:`lmcache.serde.frame`
  frame (header + xxh3 checksum + the key), so a corrupt, truncated or misplaced object reads as
  a counted miss (``record_corrupt``), never as data.
* ``put`` is first-writer-wins through a conditional write (``If-None-Match: *`` on PutObject
  and on CompleteMultipartUpload; AWS, MinIO, SeaweedFS and moto honour it). Servers that
  answer ``501 NotImplemented`` are remembered and served with HEAD-then-PUT, which is
  best-effort under races; that is harmless because values are immutable and content-addressed.
  ``conditional_put=false`` selects HEAD-then-PUT from the start. (A server that silently ignores
  the header degrades the same way: a racing writer may overwrite a value with an equivalent
  one.) ``412 PreconditionFailed`` and AWS's ``409 ConditionalRequestConflict`` (another write of
  the key in progress) both report ``EXISTS``. A repeated put of a held small value re-sends its
  body before the server refuses it; engines check ``contains`` before storing, and values above
  the multipart threshold are HEAD-checked first.
* Frames larger than ``multipart_threshold`` go up as a multipart upload of ``part_size`` parts,
  ``part_concurrency`` at a time, after a HEAD that skips the upload when the key already exists.
* ``get_into`` reads the first ``part_size`` bytes with a ranged GET; a larger object's remaining
  ranges are fetched concurrently (``If-Match`` on the first ETag so a replaced object is never
  stitched together). The frame is checked before a single byte reaches ``dst``.
* ``contains`` is a HEAD per key. Every request, parts included, holds a slot of one semaphore of
  ``max_concurrency``. On AWS grant ``s3:ListBucket`` as well as ``s3:GetObject``: without it S3
  answers 403 instead of 404 for an absent key, which reads as :class:`AuthError`, not a miss.
* Retries are botocore's ``standard`` mode (``max_attempts``): throttling (SlowDown, 503), 5xx,
  timeouts and connection errors only, with exponential backoff and jitter. An unreachable
  endpoint fails after roughly ``max_attempts`` x ``connect_timeout`` plus backoff, never hangs.

Errors are mapped at this boundary: NoSuchBucket → :class:`PermanentBackendError`; AccessDenied,
SignatureDoesNotMatch, InvalidAccessKeyId, missing credentials → :class:`AuthError`; timeouts →
:class:`BackendTimeoutError`; connection failures, throttling and 5xx →
:class:`BackendUnavailableError`.

Cost notes: botocore signs plain-``http://`` request bodies with SHA-256 on the event loop (it
skips that over ``https://``); request checksums are only computed where S3 requires them, since
the frame carries its own.

This module imports only lmcache's core modules and aioboto3/botocore.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar
from urllib.parse import parse_qsl, quote, unquote

from lmcache.backends.base import EXISTS, STORED, Capabilities, PutResult, StorageBackend
from lmcache.backends.buffers import check_dst_size
from lmcache.backends.concurrency import gather_settled
from lmcache.backends.urls import parse_backend_url, redact_url, settings_query, split_url
from lmcache.config import parse_duration, parse_size, redact, setting
from lmcache.errors import (
    AuthError,
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    IntegrityError,
    MissingDependencyError,
    PermanentBackendError,
)
from lmcache.keys import CacheKey
from lmcache.logfilter import SDK_LOGGERS, protect_loggers
from lmcache.serde.frame import decode_frame, encode_header

try:
    import aioboto3
    import aiohttp
    import botocore.exceptions as bce
    from aiobotocore.config import AioConfig
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError(_exc.name or "aioboto3", "s3", "the s3:// backend") from _exc

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["S3Backend", "S3Settings", "s3_client"]

logger = logging.getLogger(__name__)
# botocore's debug log prints signed requests (session token, Authorization): scrub them where
# they are created, whatever handlers the application configured.
protect_loggers(SDK_LOGGERS["botocore"])
T = TypeVar("T")

MiB = 1 << 20
#: S3's smallest part (all but the last) and its largest part count.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "SignatureDoesNotMatch",
        "InvalidAccessKeyId",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "AuthorizationHeaderMalformed",
        "InvalidSecurity",
        "AccountProblem",
        "403",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_EXISTS_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_THROTTLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "ServiceUnavailable"}
)
_TIMEOUT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException"})
_NOT_IMPLEMENTED_CODES = frozenset({"NotImplemented", "501"})


def _parse_addressing(value: object) -> str | None:
    if value is None or str(value).strip().lower() in ("", "none", "null"):
        return None
    text = str(value).strip().lower()
    if text not in ("auto", "path", "virtual"):
        raise ValueError("one of auto, path, virtual")
    return text


def _parse_part_size(value: object) -> int:
    n = parse_size(value)
    if n < MIN_PART_SIZE:
        raise ValueError(f"a size of at least 5MiB (S3's smallest part), got {n}")
    return n


@dataclasses.dataclass(frozen=True)
class S3Settings:
    """Options of ``s3://`` (URL query, ``LMCACHE_S3_<NAME>`` env, or keyword overrides).

    ``bucket`` and ``prefix`` come from the URL's host and path (or keyword overrides).
    """

    bucket: str = setting(doc="Bucket name (the URL's host part).")
    prefix: str = setting("", doc="Object key prefix (the URL's path, without surrounding '/').")
    endpoint_url: str | None = setting(
        None, doc="S3 endpoint for non-AWS servers, e.g. http://127.0.0.1:9000 (default: AWS)."
    )
    region: str | None = setting(None, doc="Region to sign for (default: the AWS chain; us-east-1 with an endpoint).")
    aws_access_key_id: str | None = setting(None, doc="Access key id (default: the AWS credential chain).", secret=True)
    aws_secret_access_key: str | None = setting(None, doc="Secret access key.", secret=True)
    aws_session_token: str | None = setting(None, doc="Session token for temporary credentials.", secret=True)
    profile: str | None = setting(None, doc="Named profile from ~/.aws/config to take credentials from.")
    addressing_style: str | None = setting(
        None,
        doc="auto, path or virtual (default: path with an endpoint_url, else auto).",
        parse=_parse_addressing,
    )
    verify_tls: bool = setting(True, doc="Verify the endpoint's TLS certificate.")
    multipart_threshold: int = setting(
        64 * MiB, doc="Frames larger than this go up as multipart uploads.", parse=_parse_part_size
    )
    part_size: int = setting(
        16 * MiB,
        doc="Multipart part size, also the size of each ranged GET (grows to keep <= 10000 parts).",
        parse=_parse_part_size,
        max=5 << 30,
    )
    max_concurrency: int = setting(32, doc="S3 requests in flight at once, per backend.", min=1, max=4096)
    part_concurrency: int = setting(4, doc="Parts of one value uploaded or read at once.", min=1, max=256)
    connect_timeout: float = setting(
        5.0, doc="Seconds one request attempt may wait for a TCP/TLS connection.", parse=parse_duration
    )
    read_timeout: float = setting(
        30.0,
        doc=(
            "Seconds one request attempt may wait for the next response bytes. Not a deadline for a call: "
            "a call to a dead endpoint ends within about max_attempts x (connect_timeout + read_timeout) plus "
            "backoff; one still sending bytes slowly may take longer (bound it with tiered's tier_timeout)."
        ),
        parse=parse_duration,
    )
    max_attempts: int = setting(
        3, doc="Attempts per request (throttling, 5xx, timeouts and connection errors are retried).", min=1, max=20
    )
    conditional_put: bool = setting(
        True, doc="First-writer-wins via If-None-Match: * (false: HEAD-then-PUT, best effort)."
    )

    def __repr__(self) -> str:
        return redact(self)


_SIZE_FIELDS = frozenset({"multipart_threshold", "part_size"})
_LOCATION_FIELDS = frozenset({"bucket", "prefix"})


class S3Backend(StorageBackend):
    """Framed values in an S3-compatible bucket (AWS S3, MinIO, SeaweedFS, Ceph RGW, moto…).

    Build with :meth:`from_url`; see the module docstring for layout, consistency and errors.

    Args:
        settings: Parsed options.
    """

    schemes: ClassVar[tuple[str, ...]] = ("s3",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, shared=True, listing=True, integrity_checked=True, bounded=False
    )
    secret_options: ClassVar[tuple[str, ...]] = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")

    def __init__(self, settings: S3Settings) -> None:
        super().__init__()
        self.settings = settings
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._sem: asyncio.Semaphore | None = None
        self._conditional = settings.conditional_put
        self._multipart_puts = 0
        self._ranged_reads = 0

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``s3://bucket/prefix?option=…`` (no I/O; the client is made at ``open()``).

        Raises:
            ConfigError: No bucket, credentials in the host part, an unknown option or a bad value.
        """
        parts = split_url(url)
        if "@" in parts.netloc or ":" in parts.netloc:
            raise ConfigError(
                "s3:// takes no user, password or port in the host part; pass credentials as "
                "aws_access_key_id=…&aws_secret_access_key=… options and the server as endpoint_url=…"
            )
        if parts.fragment:
            raise ConfigError("s3:// URLs take no #fragment")
        for name, _ in parse_qsl(parts.query, keep_blank_values=True):
            if name.replace("-", "_").lower() in _LOCATION_FIELDS:
                raise ConfigError(f"s3://: {name!r} is not a query option; write s3://bucket/prefix")
        location: dict[str, object] = {"prefix": unquote(parts.path).strip("/")}
        if parts.netloc:
            location["bucket"] = parts.netloc
        elif "bucket" not in overrides:
            raise ConfigError("s3:// needs a bucket: s3://bucket[/prefix][?endpoint_url=…]")
        settings = parse_backend_url(url, cls.schemes, S3Settings, location, overrides, split=parts)
        if not _BUCKET_RE.match(settings.bucket):
            raise ConfigError(f"s3://: {settings.bucket!r} is not a valid bucket name")
        prefix = settings.prefix.strip("/")
        if prefix != settings.prefix:
            settings = dataclasses.replace(settings, prefix=prefix)
        return cls(settings)

    @property
    def url(self) -> str:
        """``s3://bucket/prefix`` plus every option that differs from its default (may hold secrets)."""
        s = self.settings
        path = "/" + quote(s.prefix, safe="/") if s.prefix else ""
        query = settings_query(s, skip=_LOCATION_FIELDS, sizes=_SIZE_FIELDS)
        return f"s3://{s.bucket}{path}" + (f"?{query}" if query else "")

    def object_key(self, key: CacheKey) -> str:
        """The S3 object key that holds ``key``'s value."""
        name = key.to_string()
        return f"{self.settings.prefix}/{name}" if self.settings.prefix else name

    def make_client(self) -> Any:
        """A new aioboto3 S3 client with this backend's settings (an async context manager; no I/O yet).

        For tools that must reach the same bucket on the same terms (the raw baseline of
        ``lmcache bench backend``): endpoint, credentials, timeouts, retries, pool size and
        addressing style, as :func:`s3_client` builds them for the backend itself.

        Raises:
            ConfigError: The ``profile`` setting names a profile that is not configured.
        """
        return s3_client(self.settings)

    # -- lifecycle ---------------------------------------------------------------------------

    def _where(self) -> str:
        s = self.settings
        return f"s3://{s.bucket}" + (f" at {redact_url(s.endpoint_url)}" if s.endpoint_url else "")

    async def _open(self) -> None:
        s = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            with self._mapped("open"):
                self._client = await stack.enter_async_context(s3_client(s))
                self._sem = asyncio.Semaphore(s.max_concurrency)
                await self._check_bucket()
        except BaseException:
            self._client = None
            await stack.aclose()
            raise
        self._stack = stack

    async def _check_bucket(self) -> None:
        try:
            await self._request(self._client.head_bucket(Bucket=self.settings.bucket))
        except bce.ClientError as exc:
            code, status = _error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise PermanentBackendError(
                    f"bucket {self.settings.bucket!r} does not exist ({self._where()}); create it first"
                ) from exc
            if status in (301, 307, 400) and not self.settings.endpoint_url:
                raise PermanentBackendError(
                    f"bucket {self.settings.bucket!r} answered HTTP {status}: it is probably in another "
                    "region; set region=…"
                ) from exc
            raise

    async def _close(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _ping(self) -> None:
        with self._mapped("ping"):
            await self._check_bucket()

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "multipart_puts": self._multipart_puts,
            "ranged_reads": self._ranged_reads,
            "conditional_put": int(self._conditional),
        }

    # -- errors ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        """Map botocore/aiohttp failures raised in the block into :mod:`lmcache.errors`."""
        try:
            yield
        except (BackendError, ConfigError):
            raise
        except Exception as exc:
            mapped = self._map_error(what, exc)
            if mapped is None:
                raise
            self.record_error(what, exc)
            raise mapped from exc

    def _map_error(self, what: str, exc: Exception) -> BackendError | None:
        where = f"{self._where()}: {what}"
        if isinstance(exc, bce.ClientError):
            code, status = _error_code(exc)
            message = exc.response.get("Error", {}).get("Message") or ""
            text = f"{where} failed: {code or status} {message}".rstrip()
            if code == "NoSuchBucket":
                return PermanentBackendError(f"{where} failed: bucket {self.settings.bucket!r} does not exist")
            if code in _AUTH_CODES or status == 403:
                return AuthError(f"{text} (check the credentials, their permissions and region)")
            if code in _TIMEOUT_CODES or status in (408, 504):
                return BackendTimeoutError(text)
            if code in _THROTTLE_CODES or (status is not None and status >= 500) or status == 429:
                return BackendUnavailableError(text)
            return PermanentBackendError(text)
        if isinstance(exc, (bce.ConnectTimeoutError, bce.ReadTimeoutError, asyncio.TimeoutError, TimeoutError)):
            return BackendTimeoutError(f"{where} timed out ({type(exc).__name__})")
        if isinstance(
            exc,
            (
                bce.ConnectionError,
                bce.HTTPClientError,
                bce.IncompleteReadError,
                aiohttp.ClientError,
                ConnectionError,
                OSError,
            ),
        ):
            return BackendUnavailableError(f"{where} failed: cannot reach the server ({type(exc).__name__}: {exc})")
        if isinstance(exc, (bce.NoCredentialsError, bce.PartialCredentialsError, bce.CredentialRetrievalError)):
            return AuthError(
                f"{where}: no usable AWS credentials ({exc}); set aws_access_key_id/aws_secret_access_key, "
                "profile=…, or the AWS_* environment"
            )
        if isinstance(exc, bce.BotoCoreError):
            return PermanentBackendError(f"{where} failed: {type(exc).__name__}: {exc}")
        return None

    # -- request plumbing --------------------------------------------------------------------

    async def _request(self, call: Awaitable[T]) -> T:
        """Await one S3 request while holding a concurrency slot."""
        assert self._sem is not None
        async with self._sem:
            return await call

    # -- operations --------------------------------------------------------------------------

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        return await gather_settled([self._head(self.object_key(k)) for k in keys])

    async def _head(self, name: str) -> bool:
        with self._mapped("contains"):
            try:
                await self._request(self._client.head_object(Bucket=self.settings.bucket, Key=name))
            except bce.ClientError as exc:
                if _error_code(exc)[0] in _NOT_FOUND_CODES:
                    return False
                raise
        return True

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        return await gather_settled([self._get_one(k, d) for k, d in zip(keys, dsts, strict=True)])

    async def _get_one(self, key: CacheKey, dst: memoryview) -> int | None:
        name = self.object_key(key)
        with self._mapped("get"):
            try:
                frame = await self._read_object(name)
            except _Corrupt as exc:
                self.record_corrupt(key, exc.error)
                return None
        if frame is None:
            return None
        try:
            header, payload = decode_frame(frame, key)
        except IntegrityError as exc:
            self.record_corrupt(key, exc)
            return None
        # Only a checked frame reaches dst: a corrupt value leaves it untouched.
        check_dst_size(key, dst, header.payload_len)
        dst[: header.payload_len] = payload
        return header.payload_len

    async def _read_object(self, name: str) -> memoryview | None:
        """The whole object, or None when it does not exist (or vanished while being read)."""
        s = self.settings
        first = await self._get_range(name, 0, s.part_size, None)
        if first is None:
            return None
        data, total, etag = first
        if total <= len(data):
            return memoryview(data)
        # A large object: fetch the remaining ranges concurrently into one buffer.
        self._ranged_reads += 1
        buf = bytearray(total)
        done = len(data)
        buf[:done] = data
        del data
        view = memoryview(buf)
        step = _part_size_for(total, s.part_size)
        starts = range(done, total, step)
        limit = asyncio.Semaphore(s.part_concurrency)

        async def fetch(start: int) -> bool:
            end = min(start + step, total)
            async with limit:
                got = await self._get_range(name, start, end - start, etag)
            if got is None or len(got[0]) != end - start or got[1] != total:
                return False
            view[start:end] = got[0]
            return True

        if not all(await gather_settled([fetch(st) for st in starts])):
            return None  # deleted or replaced while being read: a miss, not a mix of two objects
        return view

    async def _get_range(self, name: str, start: int, length: int, etag: str | None) -> tuple[bytes, int, str] | None:
        """``(bytes, object size, etag)`` for ``length`` bytes from ``start``, or None if absent."""
        args: dict[str, Any] = {
            "Bucket": self.settings.bucket,
            "Key": name,
            "Range": f"bytes={start}-{start + length - 1}",
        }
        if etag is not None:
            args["IfMatch"] = etag
        assert self._sem is not None
        async with self._sem:
            try:
                resp = await self._client.get_object(**args)
            except bce.ClientError as exc:
                code, status = _error_code(exc)
                if code in _NOT_FOUND_CODES or (etag is not None and code in _EXISTS_CODES):
                    return None
                if code == "InvalidRange" or status == 416:
                    raise _Corrupt(IntegrityError(f"object {name[:80]} is empty: not an lmcache frame")) from None
                raise
            body = resp["Body"]
            async with body:  # releases the connection even if the read fails or is cancelled
                data = await body.read()
        total = len(data)
        match = _CONTENT_RANGE_RE.match(resp.get("ContentRange") or "")
        if match:
            total = int(match.group(3))
        return data, total, resp.get("ETag") or ""

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        return await gather_settled([self._put_one(k, v) for k, v in zip(keys, srcs, strict=True)])

    async def _put_one(self, key: CacheKey, src: memoryview) -> PutResult:
        name = self.object_key(key)
        header = encode_header(key, src)
        total = len(header) + src.nbytes
        with self._mapped("put"):
            if total > self.settings.multipart_threshold:
                return await self._put_multipart(name, header, src, total)
            body = _frame_slice(header, src, 0, total)
            if not self._conditional:
                return await self._put_unconditional(name, body)
            try:
                await self._request(
                    self._client.put_object(
                        Bucket=self.settings.bucket,
                        Key=name,
                        Body=body,
                        IfNoneMatch="*",
                        ContentType="application/octet-stream",
                    )
                )
            except bce.ClientError as exc:
                code = _error_code(exc)[0]
                if code in _EXISTS_CODES:
                    return EXISTS
                if code not in _NOT_IMPLEMENTED_CODES:
                    raise
                self._no_conditional_writes()
                return await self._put_unconditional(name, body)
        return STORED

    def _no_conditional_writes(self) -> None:
        self._conditional = False
        self.log_once(
            "no-conditional-put",
            "%r: the server does not support If-None-Match writes; falling back to HEAD-then-PUT "
            "(best effort under concurrent writers)",
            self,
        )

    async def _put_unconditional(self, name: str, body: bytearray) -> PutResult:
        if await self._head(name):
            return EXISTS
        await self._request(
            self._client.put_object(
                Bucket=self.settings.bucket, Key=name, Body=body, ContentType="application/octet-stream"
            )
        )
        return STORED

    async def _put_multipart(self, name: str, header: bytes, src: memoryview, total: int) -> PutResult:
        s = self.settings
        # A HEAD first saves uploading a large value that is already there.
        if await self._head(name):
            return EXISTS
        created = await self._request(
            self._client.create_multipart_upload(Bucket=s.bucket, Key=name, ContentType="application/octet-stream")
        )
        upload_id = created["UploadId"]
        step = _part_size_for(total, s.part_size)
        limit = asyncio.Semaphore(s.part_concurrency)

        async def upload(number: int, start: int) -> dict[str, Any]:
            async with limit:
                # Built inside the part slot, so at most part_concurrency parts sit in memory.
                body = _frame_slice(header, src, start, min(start + step, total))
                resp = await self._request(
                    self._client.upload_part(
                        Bucket=s.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=body
                    )
                )
            return {"PartNumber": number, "ETag": resp["ETag"]}

        completed = False
        try:
            parts = await gather_settled([upload(i + 1, start) for i, start in enumerate(range(0, total, step))])
            complete: dict[str, Any] = {
                "Bucket": s.bucket,
                "Key": name,
                "UploadId": upload_id,
                "MultipartUpload": {"Parts": parts},
            }
            if self._conditional:
                complete["IfNoneMatch"] = "*"
            try:
                await self._request(self._client.complete_multipart_upload(**complete))
            except bce.ClientError as exc:
                code = _error_code(exc)[0]
                if code in _EXISTS_CODES:
                    return EXISTS
                if "IfNoneMatch" not in complete or code not in _NOT_IMPLEMENTED_CODES:
                    raise
                self._no_conditional_writes()
                del complete["IfNoneMatch"]  # the HEAD above already found the key absent
                await self._request(self._client.complete_multipart_upload(**complete))
            completed = True
            self._multipart_puts += 1
            return STORED
        finally:
            if not completed:
                await self._abort_upload(name, upload_id)

    async def _abort_upload(self, name: str, upload_id: str) -> None:
        # Best effort: a leftover upload costs storage until a lifecycle rule removes it.
        try:
            await self._client.abort_multipart_upload(Bucket=self.settings.bucket, Key=name, UploadId=upload_id)
        except Exception as exc:
            logger.debug("%r: aborting multipart upload of %s failed: %s", self, name, exc)

    async def _delete(self, keys: list[CacheKey]) -> None:
        names = [self.object_key(k) for k in keys]
        batches = [names[i : i + 1000] for i in range(0, len(names), 1000)]  # S3's DeleteObjects limit
        await gather_settled([self._delete_batch(b) for b in batches])

    async def _delete_batch(self, names: list[str]) -> None:
        with self._mapped("delete"):
            resp = await self._request(
                self._client.delete_objects(
                    Bucket=self.settings.bucket,
                    Delete={"Objects": [{"Key": n} for n in names], "Quiet": True},
                )
            )
            errors = [e for e in resp.get("Errors") or () if e.get("Code") not in _NOT_FOUND_CODES]
            if errors:
                first = errors[0]
                raise bce.ClientError(
                    {"Error": {"Code": first.get("Code"), "Message": first.get("Message")}}, "DeleteObjects"
                )

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        prefix = self.settings.prefix + "/" if self.settings.prefix else ""
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix).__aiter__()
        while True:
            with self._mapped("list"):
                try:
                    page = await self._request(pages.__anext__())
                except StopAsyncIteration:
                    return
            for obj in page.get("Contents") or ():
                name = obj["Key"][len(prefix) :]
                try:
                    key = CacheKey.from_string(name)
                except ValueError:
                    key = None
                # Only canonical names are ours (this also skips objects in sub-folders).
                if key is None or key.to_string() != name:
                    logger.debug("%r: skipping foreign object %s", self, obj["Key"])
                    continue
                yield key


def s3_client(settings: S3Settings) -> Any:
    """An aioboto3 S3 client configured from ``settings`` (an async context manager).

    The backend and the raw benchmark baseline (through :meth:`S3Backend.make_client`) both use
    this, so they talk to S3 the same way: timeouts, retries (botocore ``standard`` mode), pool
    size, addressing style and checksums.

    Raises:
        ConfigError: ``settings.profile`` names a profile that is not configured.
    """
    s = settings
    region = s.region or ("us-east-1" if s.endpoint_url else None)
    addressing = s.addressing_style or ("path" if s.endpoint_url else "auto")
    config = AioConfig(
        region_name=region,
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        retries={"total_max_attempts": s.max_attempts, "mode": "standard"},  # first try included
        # Parts run under the same semaphore, so this many connections is always enough.
        max_pool_connections=s.max_concurrency,
        s3={"addressing_style": addressing},
        # The frame carries an xxh3 checksum; skip botocore's extra CRC pass (and the
        # aws-chunked uploads that some S3-compatible servers reject) where S3 allows it.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="lmcache",
    )
    try:
        session = aioboto3.Session(
            aws_access_key_id=s.aws_access_key_id,
            aws_secret_access_key=s.aws_secret_access_key,
            aws_session_token=s.aws_session_token,
            profile_name=s.profile,
            region_name=region,
        )
    except bce.ProfileNotFound as exc:
        raise ConfigError(f"s3://: AWS profile {s.profile!r} is not configured") from exc
    return session.client("s3", endpoint_url=s.endpoint_url, config=config, verify=s.verify_tls)


class _Corrupt(Exception):
    """Carries an IntegrityError out of the read path (where the key is not known)."""

    def __init__(self, error: IntegrityError) -> None:
        super().__init__(str(error))
        self.error = error


def _error_code(exc: bce.ClientError) -> tuple[str, int | None]:
    code = str(exc.response.get("Error", {}).get("Code") or "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code, status


def _part_size_for(total: int, part_size: int) -> int:
    """``part_size``, grown so that ``total`` bytes need at most 10000 parts."""
    needed = -(-total // MAX_PARTS)
    return max(part_size, needed)


def _frame_slice(header: bytes, payload: memoryview, start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of the frame ``header + payload``, built without the whole frame."""
    out = bytearray(end - start)
    hlen = len(header)
    pos = 0
    if start < hlen:
        chunk = header[start : min(end, hlen)]
        out[: len(chunk)] = chunk
        pos = len(chunk)
    p0 = max(start, hlen) - hlen
    p1 = end - hlen
    if p1 > p0:
        out[pos : pos + (p1 - p0)] = payload[p0:p1]
    return out
