"""Adapter kit: how callers' buffers reach a backend.

The template methods of :class:`~lmcache.backends.base.StorageBackend` turn every source and
destination into a flat byte :class:`memoryview` (:func:`as_readable`, :func:`as_writable`)
before a hook sees it. A backend that declares ``capabilities.device_buffers`` gets device
(CUDA) buffers as flat ``uint8`` tensors instead (:func:`device_bytes`), in its
``_get_into_device``/``_put_device`` hooks; everywhere else a device buffer is an
:class:`~lmcache.errors.InvalidBufferError`.

Also here: the size check every ``_get_into`` makes (:func:`check_dst_size`), and page-aligned
memory for staging arenas and O_DIRECT (:func:`page_aligned`, :func:`is_aligned`).
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any

import numpy as np

from lmcache.errors import InvalidBufferError

if TYPE_CHECKING:
    import torch

    from lmcache.keys import CacheKey

__all__ = [
    "as_readable",
    "as_writable",
    "buffer_address",
    "check_dst_size",
    "device_bytes",
    "is_aligned",
    "is_device_buffer",
    "page_aligned",
]


def _torch_view(obj: Any, writable: bool) -> memoryview:
    if obj.device.type != "cpu":
        raise InvalidBufferError(
            f"a tensor on {obj.device} was given to a backend that takes host buffers; "
            "copy it to a (pinned) CPU buffer first"
        )
    if not obj.is_contiguous():
        raise InvalidBufferError("tensor buffers must be contiguous")
    if writable and obj.requires_grad:
        raise InvalidBufferError("destination tensors must not require grad")
    import torch

    flat = obj.detach().reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def _is_tensor(obj: Any) -> bool:
    return hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous") and hasattr(obj, "device")


def _as_view(obj: Any, writable: bool) -> memoryview:
    if _is_tensor(obj):
        return _torch_view(obj, writable)
    try:
        view = memoryview(obj)
    except TypeError:
        raise InvalidBufferError(
            f"{type(obj).__name__} does not support the buffer protocol; pass bytes, bytearray, "
            "memoryview, a numpy array or a CPU tensor"
        ) from None
    if writable and view.readonly:
        raise InvalidBufferError("destination buffer is read-only")
    if not view.c_contiguous:
        raise InvalidBufferError("buffers must be C-contiguous")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def as_readable(obj: Any) -> memoryview:
    """A flat byte view of a source buffer.

    Raises:
        InvalidBufferError: ``obj`` is not a contiguous host buffer.
    """
    return _as_view(obj, writable=False)


def as_writable(obj: Any) -> memoryview:
    """A flat, writable byte view of a destination buffer.

    Raises:
        InvalidBufferError: ``obj`` is read-only, non-contiguous or not a host buffer.
    """
    return _as_view(obj, writable=True)


def is_device_buffer(obj: Any) -> bool:
    """True for a tensor that lives on a device other than the CPU (a CUDA tensor)."""
    if not _is_tensor(obj):
        return False
    return getattr(obj.device, "type", "cpu") != "cpu"


def device_bytes(obj: Any, *, writable: bool = False) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous device tensor (what ``_*_device`` hooks receive).

    Raises:
        InvalidBufferError: ``obj`` is not contiguous, or is a destination that requires grad.
    """
    if not obj.is_contiguous():
        raise InvalidBufferError("tensor buffers must be contiguous")
    if writable and obj.requires_grad:
        raise InvalidBufferError("destination tensors must not require grad")
    import torch

    flat = obj.detach().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def check_dst_size(key: CacheKey, dst: Any, needed: int) -> None:
    """Raise :class:`InvalidBufferError` when ``dst`` (a view or a device tensor) cannot hold ``needed`` bytes."""
    if dst.nbytes < needed:
        raise InvalidBufferError(f"buffer of {dst.nbytes} bytes is too small for the {needed}-byte value of {key}")


def buffer_address(view: memoryview | np.ndarray | bytes) -> int:
    """The address of a contiguous host buffer's first byte (read-only buffers included)."""
    arr = view if isinstance(view, np.ndarray) else np.frombuffer(view, dtype=np.uint8)
    return int(arr.ctypes.data)


def is_aligned(view: memoryview, align: int = mmap.PAGESIZE) -> bool:
    """True when ``view`` is not empty and starts on an ``align``-byte boundary (for O_DIRECT, DMA)."""
    return view.nbytes > 0 and buffer_address(view) % align == 0


def page_aligned(nbytes: int) -> np.ndarray:
    """A new ``uint8`` array of ``nbytes`` that starts on a page boundary (a staging arena)."""
    page = mmap.PAGESIZE
    raw = np.empty(nbytes + page, dtype=np.uint8)
    offset = (-raw.ctypes.data) % page
    return raw[offset : offset + nbytes]
