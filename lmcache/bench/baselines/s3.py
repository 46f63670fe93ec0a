"""Raw aioboto3 baseline for ``lmcache bench backend --url s3://…``.

The baseline is what an application would do without lmcache: one plain ``PutObject`` per value
and one ``GetObject`` per value read into the destination buffer, with the same client settings
as the backend under test (endpoint, credentials, timeouts, retries, pool size, addressing style:
its client comes from :meth:`lmcache.backends.s3.S3Backend.make_client`) and the same number of
requests in flight (``max_concurrency``). It skips what lmcache adds on top: the frame header and
its xxh3 checksum, the conditional ``If-None-Match`` write, ranged and multipart transfers. Its
objects live under ``<prefix>/.bench-baseline/<run>/`` and are deleted at the end of each round.

Registered for :class:`~lmcache.backends.s3.S3Backend` (every scheme it serves) in
:data:`lmcache.bench.baselines.BUILTIN_BASELINES`; importing this module registers nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.bench.baselines.base import Baseline

if TYPE_CHECKING:
    from lmcache.backends.base import StorageBackend
    from lmcache.bench.backend import Workload

__all__ = ["RawS3Baseline", "make"]


class RawS3Baseline(Baseline):
    """Plain aioboto3 PutObject/GetObject per value, same client settings and concurrency."""

    name = "raw-aioboto3"

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._settings = settings = backend.settings
        self._client: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._sem = asyncio.Semaphore(settings.max_concurrency)
        base = f"{settings.prefix}/" if settings.prefix else ""
        self._dir = f"{base}.bench-baseline/{uuid.uuid4().hex[:12]}"
        self._round = 0
        self._written: list[str] = []

    def describe(self) -> dict[str, Any]:
        s = self._settings
        return {
            **super().describe(),
            "bucket": s.bucket,
            "endpoint_url": s.endpoint_url,
            "max_concurrency": s.max_concurrency,
        }

    async def open(self) -> None:
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(self._backend.make_client())
        self._stack = stack

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.end_round()
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    def _name(self, slot: int) -> str:
        return f"{self._dir}/r{self._round}-{slot}"

    async def _put_one(self, name: str, src: np.ndarray) -> None:
        body = src.tobytes()  # botocore takes bytes or a file; the backend makes one copy too
        async with self._sem:
            await self._client.put_object(Bucket=self._settings.bucket, Key=name, Body=body)

    async def _get_one(self, name: str, dst: np.ndarray) -> int:
        async with self._sem:
            resp = await self._client.get_object(Bucket=self._settings.bucket, Key=name)
            body = resp["Body"]
            async with body:
                data = await body.read()
        np.copyto(dst[: len(data)], np.frombuffer(data, dtype=np.uint8))
        return len(data)

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        names = [self._name(s) for s in slots]
        await asyncio.gather(*(self._put_one(n, src) for n, src in zip(names, srcs, strict=True)))
        self._written.extend(names)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        jobs = [self._get_one(self._name(s), dst) for s, dst in zip(slots, dsts, strict=True)]
        return list(await asyncio.gather(*jobs))

    async def end_round(self) -> None:
        names, self._written = self._written, []
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = names[i : i + 1000]
            async with self._sem:
                await self._client.delete_objects(
                    Bucket=self._settings.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True}
                )
        self._round += 1


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The raw baseline for an ``s3://`` backend (None for any other backend)."""
    from lmcache.backends.s3 import S3Backend

    if not isinstance(backend, S3Backend):
        return None
    return RawS3Baseline(backend)
