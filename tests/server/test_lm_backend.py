"""lm:// and lm+unix:// pass the backend conformance suite against a real server process.

Variants: TCP over the socket, a Unix socket over the socket, and the shared-memory fast path
over a Unix socket and over loopback TCP. The corrupt-value hook damages the stored frame
through a raw protocol connection, not through the backend under test.
"""

from __future__ import annotations

import pytest
from conftest import LMServer
from lmcache_conformance import BackendTests

from lmcache.backends.base import StorageBackend
from lmcache.keys import CacheKey
from lmcache.server.client import LMServerBackend


class _LMTests(BackendTests):
    scheme = "lm"
    query: dict[str, object] = {}  # noqa: RUF012 - per-class constant
    expect_shm = False

    @pytest.fixture
    def backend_url(self, lm_server: LMServer) -> str:
        self._server = lm_server
        return lm_server.url(self.scheme, **self.query)

    @pytest.fixture
    def secret_url(self, lm_server: LMServer) -> str:
        return lm_server.url(self.scheme, **self.query, token="not-a-real-s3cret")

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        with self._server.raw() as raw:
            frame = raw.get_frame(key.to_string(), 1 << 24)
            assert frame is not None
            damaged = bytearray(frame)
            damaged[-1] ^= 0xFF  # a payload byte: the checksum must catch it
            raw.delete([key.to_string()])
            assert raw.put_frame(key.to_string(), bytes(damaged)) == "stored"

    async def test_data_path(self, backend: StorageBackend) -> None:
        """The variant really uses the data path it claims to test."""
        assert isinstance(backend, LMServerBackend)
        await backend.ping()
        assert backend.shm_active is self.expect_shm
        assert backend.stats()["shm"] is self.expect_shm
        # The shared server's tier 0 is memory://, so shm clients read its hits from its pool.
        assert backend.pool_active is self.expect_shm


class TestLMTcp(_LMTests):
    query = {"shm": "false"}  # noqa: RUF012


class TestLMUnix(_LMTests):
    scheme = "lm+unix"
    query = {"shm": "false"}  # noqa: RUF012


class TestLMUnixShm(_LMTests):
    scheme = "lm+unix"
    expect_shm = True


class TestLMTcpShm(_LMTests):
    expect_shm = True
    query = {"shm_size": "64MiB"}  # noqa: RUF012


def _pool_rss_bytes() -> int:
    """Resident bytes of this process's mappings of server pools (from /proc/self/smaps)."""
    total, in_pool = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                in_pool = "lmcache-pool-" in line
            elif in_pool and first == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.parametrize("prefault", [True, False])
async def test_a_resident_pool_is_mapped_up_front(tmp_path, prefault: bool) -> None:
    """A prefaulted pool is mapped whole at connect (no page faults inside copies); a lazy one
    is not (mapping it would allocate memory the server chose not to commit)."""
    from conftest import start_lm_server

    size = 64 << 20
    server = start_lm_server(tmp_path / "srv", [f"memory://?capacity={size}&prefault={str(prefault).lower()}"])
    try:
        backend = LMServerBackend.from_url(server.url("lm+unix"))
        async with backend:
            await backend.ping()
            assert backend.pool_active
            rss = _pool_rss_bytes()
            if prefault:
                assert rss >= size * 0.95, f"only {rss} of {size} pool bytes mapped"
            else:
                assert rss < size // 4, f"{rss} pool bytes mapped for a lazy pool"
    finally:
        server.proc.stop()
