"""``gds://``: framed files read straight into GPU buffers with GPUDirect Storage (kvikio/cuFile).

URL form: ``gds:///mnt/nvme/kv?capacity=200GiB&gpu=auto`` plus every ``file://`` option
(``fsync``, ``o_direct``, ``workers``; also ``LMCACHE_GDS_<NAME>`` environment variables or keyword
overrides). A ``gds://`` directory *is* a ``file://`` directory opened with ``o_direct=true``: same
layout, same :mod:`lmcache.serde.frame` frames with the payload at a 4096-byte offset, same index,
atomic publication (hard link, first writer wins) and capacity rules, because
:class:`GdsBackend` subclasses :class:`~lmcache.backends.file.FileBackend` and only changes how
bytes reach device buffers. A directory written by one can be read by the other.

Data paths
----------
* Host buffers (bytes, numpy, CPU tensors, :class:`~lmcache.chunk_buffers.ChunkBufferPool` leases): the
  ``file://`` O_DIRECT path, a DMA between the device and the page-aligned buffer when it is
  aligned, else through an aligned staging buffer. This is the whole story on a host without a
  GPU, and what the conformance suite checks here.
* CUDA tensors, when kvikio and a CUDA driver are usable (``capabilities.device_buffers``):

  - ``get_into``: the header is read and checked on the host first (key, lengths, the size of
    ``dst``), then ``kvikio.CuFile.pread`` moves the payload from the file straight into the
    device buffer (cuFile DMA, no host bounce when GDS is available; kvikio's compatibility mode
    otherwise). The payload checksum is then verified on a pinned host copy of the device bytes:
    the frame's checksum is xxh3 computed on the CPU, and rule 8 (a corrupt value is never handed
    to an engine) is not optional. A corrupt value is a counted miss and its ``dst`` unspecified,
    as for large ``file://`` values.
  - ``put``: the value is copied once into pinned host memory (the checksum is computed there),
    then written through the ``file://`` O_DIRECT path from that page-aligned copy. Writing the
    payload a second time from the device with cuFile would move the same bytes again for no
    gain once they are on the host.

  Without kvikio or CUDA, a CUDA tensor is an :class:`~lmcache.errors.InvalidBufferError` (as in
  every host-only backend); ``gpu=require`` makes ``open()`` fail instead.

``gpu`` option: ``auto`` (default; device buffers when kvikio and CUDA are usable), ``off`` (host
buffers only, kvikio is never imported) or ``require`` (``open()`` raises
:class:`~lmcache.errors.MissingDependencyError` or :class:`~lmcache.errors.BackendUnavailableError`
when the GPU path is not usable). kvikio is imported lazily, on the first device buffer, so a
CPU-only host never loads it. Install it with ``pip install 'lmcache[gds]'`` (``kvikio-cu12``);
its I/O needs the driver's ``libcuda.so.1``.

Every kvikio call runs on the backend's own bounded executor (``workers`` threads), like every
file operation.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import importlib.util
import logging
import threading
from typing import TYPE_CHECKING, Any, ClassVar

from lmcache.backends.base import PutResult
from lmcache.backends.buffers import as_readable, check_dst_size, is_device_buffer
from lmcache.backends.concurrency import run_blocking
from lmcache.backends.file import FileBackend, FileSettings
from lmcache.config import setting
from lmcache.errors import BackendUnavailableError, IntegrityError, MissingDependencyError
from lmcache.keys import CacheKey

if TYPE_CHECKING:
    import torch

__all__ = ["GdsBackend", "GdsSettings", "gpu_direct_usable"]

logger = logging.getLogger(__name__)

_GPU_CHOICES = ("auto", "off", "require")


@dataclasses.dataclass(frozen=True)
class GdsSettings(FileSettings):
    """Options of ``gds://``: those of ``file://`` with ``o_direct`` on, plus ``gpu``."""

    o_direct: bool = setting(
        True, doc="Bypass the page cache with O_DIRECT (downgraded with a warning where unsupported)."
    )
    gpu: str = setting(
        "auto",
        doc="auto: CUDA buffers through kvikio/cuFile when usable; off: host buffers only; require: fail without it.",
        choices=_GPU_CHOICES,
    )


@functools.lru_cache(maxsize=1)
def gpu_direct_usable() -> str | None:
    """Why the kvikio device path cannot be used here, or None when it can.

    Cheap probes only (no kvikio import): the CUDA driver library, torch's CUDA, kvikio installed.
    """
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "the CUDA driver (libcuda.so.1) is not loadable"
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if importlib.util.find_spec("kvikio") is None:
        return "kvikio is not installed (pip install 'lmcache[gds]')"
    return None


class GdsBackend(FileBackend):
    """``file://``'s store and format, with cuFile reads into CUDA buffers; see the module docstring."""

    schemes: ClassVar[tuple[str, ...]] = ("gds",)
    settings_cls: ClassVar[type[FileSettings]] = GdsSettings
    settings: GdsSettings

    def __init__(self, settings: FileSettings) -> None:
        super().__init__(settings)  # plain FileSettings become GdsSettings there (settings_cls)
        self._gpu_reason = "gpu=off" if self.settings.gpu == "off" else gpu_direct_usable()
        if self._gpu_reason is None:
            self.capabilities = dataclasses.replace(self.capabilities, device_buffers=True)  # type: ignore[misc]
        self._kvikio: Any = None
        self._kvikio_lock = threading.Lock()

    def _url_items(self) -> list[tuple[str, str]]:
        items = super()._url_items()
        if self.settings.gpu != GdsSettings.gpu:
            items.append(("gpu", self.settings.gpu))
        return items

    # -- lifecycle ---------------------------------------------------------------------------

    async def _open(self) -> None:
        if self.settings.gpu == "require" and self._gpu_reason is not None:
            if "not installed" in self._gpu_reason:
                raise MissingDependencyError("kvikio", "gds", "gds:// with gpu=require")
            raise BackendUnavailableError(f"gds://{self._root}: gpu=require, but {self._gpu_reason}")
        await super()._open()
        if self.settings.gpu == "require":
            await self._run(self._load_kvikio)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await run_blocking(self._executor, fn, *args)

    def _load_kvikio(self) -> Any:
        """Import kvikio once (lazily: a host that never sees a CUDA buffer never loads it)."""
        with self._kvikio_lock:
            if self._kvikio is None:
                try:
                    import kvikio
                except ImportError as exc:
                    raise MissingDependencyError("kvikio", "gds", "gds:// device buffers") from exc
                self._kvikio = kvikio
            return self._kvikio

    def _extra_stats(self) -> dict[str, Any]:
        out = super()._extra_stats()
        out["gpu_direct"] = self._gpu_reason is None
        if self._gpu_reason is not None:
            out["gpu_direct_unavailable"] = self._gpu_reason
        return out

    # -- device buffers (hooks of the template methods and of FileBackend) --------------------

    async def _put_device(self, keys: list[CacheKey], srcs: list[torch.Tensor]) -> list[PutResult]:
        """Store device values: one copy into pinned host memory, then the O_DIRECT file path.

        The checksum is computed on that host copy; see the module docstring.
        """
        # Device-to-host copies block until done: they run on the executor, not the event loop.
        host = await self._run(lambda: [self._pinned_copy(s) for s in srcs])
        return await self._put(keys, [as_readable(h) for h in host])

    @staticmethod
    def _pinned_copy(flat: torch.Tensor) -> torch.Tensor:
        import torch

        out = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        out.copy_(flat)  # synchronous: put() copies its sources before returning
        return out

    def _pinned_staging(self, nbytes: int) -> torch.Tensor:
        """A pinned host buffer of at least ``nbytes``, reused per worker thread (pinning is a driver call)."""
        import torch

        buf = getattr(self._local, "pinned", None)
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=True)
            if nbytes <= 64 << 20:
                self._local.pinned = buf
        return buf[:nbytes]

    async def _get_into_device(self, keys: list[CacheKey], dsts: list[torch.Tensor]) -> list[int | None]:
        """Read values into device tensors.

        :meth:`FileBackend._get_into` does it, and its per-value step (:meth:`_read_payload`)
        moves device payloads by cuFile.
        """
        await self._run(self._load_kvikio)
        return await self._get_into(keys, dsts)

    def _read_payload(self, fd: int, key: CacheKey, size: int, dst: Any, cancel: threading.Event) -> int | None:
        """Fill ``dst``: a host buffer by the ``file://`` path, a device tensor by cuFile.

        For a device tensor the header is read and checked on the host, the payload moves by
        cuFile into ``dst``, and its checksum is verified on a pinned host copy.
        """
        if not is_device_buffer(dst):
            return super()._read_payload(fd, key, size, dst, cancel)
        head = self._read_head(fd, key, size)
        if head is None:
            return None  # another lmcache version's value: a plain miss, left in place
        header = head[0]
        n, offset = header.payload_len, header.payload_offset
        check_dst_size(key, dst, n)
        if cancel.is_set():
            return None
        if n:
            path = self._path(key)[2]
            with self._kvikio.CuFile(path, "r") as f:
                done = f.pread(dst[:n], n, offset).get()
            if done != n:
                raise IntegrityError(f"value file {path} shrank while it was read")
            check = self._pinned_staging(n)
            check.copy_(dst[:n])
            header.verify_payload(memoryview(check.numpy()))
        self._add_entry(key, n, size)
        return n
