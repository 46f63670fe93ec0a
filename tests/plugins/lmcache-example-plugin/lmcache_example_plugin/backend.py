"""``example://NAME``: an in-process, dict-backed lmcache backend, written as a plugin author would.

Every backend opened with the same NAME shares one store (a plain dict in this process), the way
clients of one server share its data. Values are framed with :mod:`lmcache.serde.frame` (header,
key, checksum), so a damaged value is detected, counted and read as a miss.

URL form: ``example://NAME?token=…&yield_every=8MiB`` (options below; NAME defaults to
``default``). Options also come from ``LMCACHE_EXAMPLE_<OPTION>`` environment variables and from
keyword overrides of ``lmcache.open_backend``.

It is deliberately small; it is the worked example of ``docs/plugins.md``, not a product.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

from lmcache.backends.base import (
    EXISTS,
    STORED,
    Capabilities,
    PutResult,
    StorageBackend,
    check_dst_size,
    parse_backend_url,
    settings_query,
    split_url,
)
from lmcache.config import parse_size, setting
from lmcache.errors import ConfigError, IntegrityError
from lmcache.keys import CacheKey
from lmcache.serde.frame import decode_frame, encode_header

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["ExampleBackend", "ExampleSettings", "raw_store"]

_DEFAULT_NAME = "default"
# NAME -> {key string -> framed value}. Module state on purpose: it is what makes two backends
# with one NAME see the same data, like two clients of one server.
_STORES: dict[str, dict[str, bytes]] = {}


def raw_store(name: str) -> dict[str, bytes]:
    """The framed values of store ``name`` keyed by ``CacheKey.to_string()``.

    For tests only (the conformance suite's bypass hooks): it reads and writes the storage
    without going through a backend.
    """
    return _STORES.setdefault(name, {})


@dataclasses.dataclass(frozen=True)
class ExampleSettings:
    """Options of ``example://`` (URL query, ``LMCACHE_EXAMPLE_<NAME>`` env, keyword overrides)."""

    name: str = setting(_DEFAULT_NAME, doc="Store name; backends with one name share their values.")
    token: str | None = setting(
        None, doc="A pretend access token (shows how secret options stay out of repr).", secret=True
    )
    yield_every: int = setting(
        8 << 20, doc="Yield to the event loop after this many bytes copied in one call.", parse=parse_size, min=1
    )


class ExampleBackend(StorageBackend):
    """A dict-backed store shared by name within this process.

    Args:
        settings: Parsed options (defaults when None).
    """

    schemes: ClassVar[tuple[str, ...]] = ("example",)
    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=False, shared=False, listing=True, integrity_checked=True, bounded=False
    )
    secret_options: ClassVar[tuple[str, ...]] = ("token",)

    def __init__(self, settings: ExampleSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or ExampleSettings()
        self._store: dict[str, bytes] | None = None

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Build from ``example://NAME?…`` (no I/O).

        Raises:
            ConfigError: Credentials, a path, an unknown option or a bad value in the URL.
        """
        parts = split_url(url)
        if "@" in parts.netloc or parts.path not in ("", "/") or parts.fragment:
            raise ConfigError(f"example:// takes only a store name and options, e.g. example://demo (got {url!r})")
        location = {"name": parts.netloc} if parts.netloc else {}
        return cls(parse_backend_url(url, cls.schemes, ExampleSettings, location, overrides, split=parts))

    @property
    def url(self) -> str:
        """``example://NAME`` plus every option that differs from its default."""
        query = settings_query(self.settings, skip=("name",))
        return f"example://{self.settings.name}" + (f"?{query}" if query else "")

    async def _open(self) -> None:
        self._store = raw_store(self.settings.name)

    async def _close(self) -> None:
        self._store = None  # the data stays with the name, as on a server

    def _data(self) -> dict[str, bytes]:
        assert self._store is not None, "the base class opens the backend before any operation"
        return self._store

    async def _contains(self, keys: list[CacheKey]) -> list[bool]:
        data = self._data()
        return [k.to_string() in data for k in keys]

    async def _get_into(self, keys: list[CacheKey], dsts: list[memoryview]) -> list[int | None]:
        data = self._data()
        payloads: list[memoryview | None] = []
        for key in keys:
            frame = data.get(key.to_string())
            if frame is None:
                payloads.append(None)
                continue
            try:
                _, payload = decode_frame(frame, key)
            except IntegrityError as exc:
                self.record_corrupt(key, exc)
                payloads.append(None)
                continue
            payloads.append(payload)
        # Check every size before writing anything: a too-small buffer fails the whole call.
        for key, dst, payload in zip(keys, dsts, payloads, strict=True):
            if payload is not None:
                check_dst_size(key, dst, payload.nbytes)
        out: list[int | None] = []
        copied = 0
        for dst, payload in zip(dsts, payloads, strict=True):
            if payload is None:
                out.append(None)
                continue
            # One slice assignment per value: a cancellation between values never leaves a
            # buffer half written, and nothing runs after the call returns.
            dst[: payload.nbytes] = payload
            out.append(payload.nbytes)
            copied += payload.nbytes
            if copied >= self.settings.yield_every:
                copied = 0
                await asyncio.sleep(0)
        return out

    async def _put(self, keys: list[CacheKey], srcs: list[memoryview]) -> list[PutResult]:
        data = self._data()
        out: list[PutResult] = []
        copied = 0
        for key, src in zip(keys, srcs, strict=True):
            name = key.to_string()
            if name in data:
                out.append(EXISTS)  # first writer wins
                continue
            # bytes() copies the caller's buffer, so it may be reused once put returns.
            data[name] = encode_header(key, src) + bytes(src)
            out.append(STORED)
            copied += src.nbytes
            if copied >= self.settings.yield_every:
                copied = 0
                await asyncio.sleep(0)
        return out

    async def _delete(self, keys: list[CacheKey]) -> None:
        data = self._data()
        for key in keys:
            data.pop(key.to_string(), None)

    async def _list_keys(self) -> AsyncIterator[CacheKey]:
        for name in list(self._data()):
            yield CacheKey.from_string(name)

    def _extra_stats(self) -> dict[str, Any]:
        data = self._store or {}
        return {"entries": len(data), "stored_bytes": sum(len(v) for v in data.values())}
