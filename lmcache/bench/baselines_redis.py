"""Raw redis-py baseline for ``lmcache bench backend --url redis://…`` (and rediss, unix, valkey, valkeys).

The baseline is what an application would do with redis-py alone: pipelined ``SET name value``
of the source bytes and pipelined ``GET name`` copied into the destination buffer. It skips what
lmcache adds on top: the frame header and its xxh3 checksum, the ``NX`` first-writer-wins
condition, key binding and verification, and the in-flight byte budget.

It runs on the same terms as the backend under test, read from its settings:

* the same client: a ``BlockingConnectionPool`` of ``max_connections`` built by
  :meth:`lmcache.backends.redis.RedisBackend.make_client` (same server, database, credentials,
  TLS, timeouts, retries, RESP2);
* the same pipelining: each batch is cut into pipelines of at most ``max_batch_bytes`` and
  ``max_batch_keys`` (the backend's sub-batch rule), and at most ``max_connections`` pipelines
  are in flight over all batches, one connection each.

Values are sent as memoryviews of the source rows (redis-py writes those without a copy of its
own). Its keys live under ``<prefix>bench-baseline:<run>:`` and are unlinked at the end of each
round.

Register with ``register_baseline("redis", "lmcache.bench.baselines_redis:make")`` (importing
this module registers nothing, so it stays free of side effects).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcache.backends.base import StorageBackend
from lmcache.bench.backend import Baseline, Workload

__all__ = ["RawRedisBaseline", "make"]


def _pipelines(nbytes: int, count: int, max_bytes: int, max_keys: int) -> list[range]:
    """Index ranges of ``count`` equal values of ``nbytes``, each within the byte and key limits.

    A lone value larger than ``max_bytes`` gets a pipeline of its own, as in the backend.
    """
    per = max(1, min(max_keys, max_bytes // max(1, nbytes)))
    return [range(i, min(i + per, count)) for i in range(0, count, per)]


class RawRedisBaseline(Baseline):
    """redis-py pipelined SET/GET of the raw bytes, same pool, sub-batch size and connection count."""

    name = "raw-redis-py"

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        s = backend.settings
        self._max_connections: int = s.max_connections
        self._max_batch_bytes: int = s.max_batch_bytes
        self._max_batch_keys: int = s.max_batch_keys
        self._dir = s.prefix.encode() + f"bench-baseline:{uuid.uuid4().hex[:12]}:".encode()
        self._client: Any = None
        self._slots = asyncio.Semaphore(s.max_connections)
        self._round = 0
        self._written: list[bytes] = []

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "commands": "pipelined SET / GET (no NX, no frame, no checksum)",
            "max_connections": self._max_connections,
            "max_batch_bytes": self._max_batch_bytes,
            "max_batch_keys": self._max_batch_keys,
        }

    async def open(self) -> None:
        client = self._backend.make_client()
        try:
            await client.ping()
        except BaseException:
            await _close_client(client)
            raise
        self._client = client

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await self.end_round()
        client, self._client = self._client, None
        if client is not None:
            await _close_client(client)

    def _name(self, slot: int) -> bytes:
        return self._dir + f"r{self._round}:{slot}".encode()

    async def _run(self, slots: range, bufs: Sequence[np.ndarray], op: Any) -> None:
        """Run ``op(names, bufs)`` per pipeline-sized piece of the batch, concurrently."""
        names = [self._name(s) for s in slots]
        nbytes = bufs[0].nbytes if bufs else 0
        pieces = _pipelines(nbytes, len(names), self._max_batch_bytes, self._max_batch_keys)

        async def one(r: range) -> None:
            async with self._slots:
                await op([names[i] for i in r], [bufs[i] for i in r], r)

        await asyncio.gather(*(one(r) for r in pieces))

    async def put_batch(self, slots: range, srcs: Sequence[np.ndarray]) -> None:
        async def put(names: list[bytes], bufs: list[np.ndarray], _r: range) -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for name, buf in zip(names, bufs, strict=True):
                    pipe.set(name, memoryview(buf).cast("B"))
                await pipe.execute()

        await self._run(slots, srcs, put)
        self._written.extend(self._name(s) for s in slots)

    async def get_batch(self, slots: range, dsts: Sequence[np.ndarray]) -> list[int | None]:
        out: list[int | None] = [None] * len(slots)

        async def get(names: list[bytes], bufs: list[np.ndarray], r: range) -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.get(name)
                replies = await pipe.execute()
            for i, dst, reply in zip(r, bufs, replies, strict=True):
                if reply is None:
                    continue
                n = min(len(reply), dst.nbytes)
                np.copyto(dst[:n], np.frombuffer(reply, dtype=np.uint8, count=n))
                out[i] = len(reply)

        await self._run(slots, dsts, get)
        return out

    async def end_round(self) -> None:
        names, self._written = self._written, []
        for i in range(0, len(names), 1000):
            await self._client.unlink(*names[i : i + 1000])
        self._round += 1


async def _close_client(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.aclose()
    with contextlib.suppress(Exception):
        await client.connection_pool.disconnect()


def make(backend: StorageBackend, workload: Workload) -> Baseline | None:
    """The raw baseline for a standalone Redis/Valkey backend (None for any other backend)."""
    from lmcache.backends.redis import RedisBackend
    from lmcache.backends.redis_cluster import RedisClusterBackend

    if not isinstance(backend, RedisBackend) or isinstance(backend, RedisClusterBackend):
        return None
    return RawRedisBaseline(backend)
