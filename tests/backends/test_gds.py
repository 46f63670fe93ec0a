"""Tests of gds://: the file:// format and index through the O_DIRECT host path, and (on GPU hosts) cuFile reads."""

from __future__ import annotations

import ctypes
import hashlib
from pathlib import Path

import numpy as np
import pytest
from lmcache_conformance import BackendTests

from lmcache.backends.base import PutStatus, StorageBackend
from lmcache.backends.file import FileBackend
from lmcache.backends.gds import GdsBackend, gpu_direct_usable
from lmcache.backends.registry import open_backend
from lmcache.errors import BackendUnavailableError, ConfigError, MissingDependencyError
from lmcache.keys import CacheKey
from lmcache.serde import frame


def make_key(i: int) -> CacheKey:
    return CacheKey("gds-test", 1, 0, hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest(), "float16")


def make_value(i: int, nbytes: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, nbytes, dtype=np.uint8).tobytes()


def file_of(root: Path, key: CacheKey) -> Path:
    digest = key.digest()
    return root / digest[:2] / f"{digest}.kv"


def _cuda_driver_missing() -> str | None:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no CUDA driver here (ctypes.CDLL('libcuda.so.1') failed): the cuFile path runs on GPU hosts"
    reason = gpu_direct_usable()
    if reason is not None:
        return f"the gds:// device path is unavailable: {reason}"
    return None


gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(_cuda_driver_missing() is not None, reason=str(_cuda_driver_missing()))


# -- URLs and settings -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "gds:///mnt/nvme/kv",
        "gds:///mnt/nvme/kv?capacity=1GiB&gpu=off",
        "gds:///mnt/nvme/kv?o_direct=false&workers=8",
        "gds:///mnt/nvme/kv?fsync=data&gpu=require",
    ],
)
def test_url_round_trip(url: str) -> None:
    b = GdsBackend.from_url(url)
    assert b.url == url
    assert type(open_backend(url)) is GdsBackend


def test_o_direct_is_the_default_and_file_options_apply() -> None:
    b = GdsBackend.from_url("gds:///mnt/kv?capacity=2MiB")
    assert b.settings.o_direct is True
    assert b.settings.capacity == 2 << 20
    assert b.capabilities.bounded


@pytest.mark.parametrize(
    "url", ["gds://host/mnt/kv", "gds://", "gds:///mnt/kv?gpu=maybe", "gds:///mnt/kv?nope=1", "gds://relative"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError):
        GdsBackend.from_url(url)


def test_keyword_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_GDS_WORKERS", "3")
    b = GdsBackend.from_url("gds:///mnt/kv", gpu="off")
    assert b.settings.workers == 3 and b.settings.gpu == "off"


# -- the shared format ---------------------------------------------------------------------------


async def test_gds_files_are_file_backend_files(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    keys = [make_key(i) for i in range(4)]
    values = [make_value(i, n) for i, n in enumerate((0, 5, 8192, 1_000_003))]
    async with GdsBackend.from_url(f"gds://{root}?workers=2") as g:
        assert [r.status for r in await g.put(keys, values)] == [PutStatus.STORED] * 4
        o_direct = g.stats()["o_direct"]
    if o_direct:
        # O_DIRECT frames put the payload on a 4096-byte boundary, where a DMA can land it.
        head = file_of(root, keys[3]).read_bytes()[:4096]
        assert frame.parse_header(head, expected_key=keys[3]).payload_offset == 4096
    async with FileBackend.from_url(f"file://{root}?o_direct=true") as f:
        assert sorted(k.digest() for k in [k async for k in f.list_keys()]) == sorted(k.digest() for k in keys)
        dsts = [bytearray(len(v) + 3) for v in values]
        assert await f.get_into(keys, dsts) == [len(v) for v in values]
        assert [bytes(d[: len(v)]) for d, v in zip(dsts, values, strict=True)] == values
        extra, extra_value = make_key(99), make_value(99, 70_000)
        assert (await f.put([extra], [extra_value]))[0].status is PutStatus.STORED
    async with GdsBackend.from_url(f"gds://{root}") as g:
        assert g.stats()["entries"] == 5  # the index is rebuilt from the shared directory
        dst = np.zeros(70_000, dtype=np.uint8)
        assert await g.get_into([extra], [dst]) == [70_000]
        assert dst.tobytes() == extra_value


async def test_stats_say_why_there_is_no_device_path(tmp_path: Path) -> None:
    async with GdsBackend.from_url(f"gds://{tmp_path}/kv?gpu=off") as g:
        s = g.stats()
        assert s["gpu_direct"] is False
        assert s["gpu_direct_unavailable"] == "gpu=off"
        assert not g.capabilities.device_buffers


@pytest.mark.skipif(gpu_direct_usable() is None, reason="this host has a usable GPU path")
async def test_gpu_require_fails_to_open_without_the_device_path(tmp_path: Path) -> None:
    b = GdsBackend.from_url(f"gds://{tmp_path}/kv?gpu=require")
    with pytest.raises((MissingDependencyError, BackendUnavailableError)) as info:
        await b.open()
    assert "pip install" in str(info.value) or "gpu=require" in str(info.value)
    await b.aclose()
    assert not (tmp_path / "kv").exists(), "a refused open must not create the directory"


async def test_auto_on_a_cpu_host_uses_the_host_path(tmp_path: Path) -> None:
    async with GdsBackend.from_url(f"gds://{tmp_path}/kv") as g:
        assert g.capabilities.device_buffers is (gpu_direct_usable() is None)
        key, value = make_key(1), make_value(1, 3 << 20)
        src = np.frombuffer(value, dtype=np.uint8)
        assert (await g.put([key], [src]))[0].ok
        dst = np.zeros(3 << 20, dtype=np.uint8)
        assert await g.get_into([key], [dst]) == [3 << 20]
        assert dst.tobytes() == value


# -- the conformance suite -----------------------------------------------------------------------


class TestGdsConformance(BackendTests):
    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return f"gds://{tmp_path}/kv?workers=2"

    async def corrupt_value(self, backend: StorageBackend, key: CacheKey) -> None:
        assert isinstance(backend, GdsBackend)
        path = file_of(Path(backend.settings.path), key)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))


# -- GPU hosts only ------------------------------------------------------------------------------


@gpu
@needs_gpu
async def test_device_round_trip_through_cufile(tmp_path: Path) -> None:
    import torch

    root = tmp_path / "kv"
    keys = [make_key(i) for i in range(3)]
    values = [make_value(i, n) for i, n in enumerate((4096, 1 << 20, 1_000_003))]
    srcs = [torch.frombuffer(bytearray(v), dtype=torch.uint8).cuda() for v in values]
    async with GdsBackend.from_url(f"gds://{root}?gpu=require") as g:
        assert g.capabilities.device_buffers
        assert [r.status for r in await g.put(keys, srcs)] == [PutStatus.STORED] * 3
        dsts = [torch.full((len(v) + 5,), 0xA5, dtype=torch.uint8, device="cuda") for v in values]
        assert await g.get_into(keys, dsts) == [len(v) for v in values]
        for d, v in zip(dsts, values, strict=True):
            host = d.cpu().numpy().tobytes()
            assert host[: len(v)] == v and set(host[len(v) :]) == {0xA5}
    async with FileBackend.from_url(f"file://{root}?o_direct=true") as f:  # the same format on disk
        dst = bytearray(1 << 20)
        assert await f.get_into([keys[1]], [dst]) == [1 << 20]
        assert bytes(dst) == values[1]


@gpu
@needs_gpu
async def test_device_read_of_a_corrupt_value_is_a_counted_miss(tmp_path: Path) -> None:
    import torch

    key, value = make_key(7), make_value(7, 1 << 20)
    async with GdsBackend.from_url(f"gds://{tmp_path}/kv?gpu=require") as g:
        assert (await g.put([key], [value]))[0].ok
        path = file_of(tmp_path / "kv", key)
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01
        path.write_bytes(bytes(data))
        dst = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
        assert await g.get_into([key], [dst]) == [None]
        assert g.stats()["corrupt"] == 1
        assert await g.contains([key]) == [False]
