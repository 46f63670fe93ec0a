"""Batched copies between an engine's paged KV and lmcache chunk buffers.

Bind the engine's KV once, then gather (engine → chunk buffer, to store) and scatter (chunk buffer
→ engine, after a hit), all layers of a chunk per call::

    kv = PagedKV(kv_caches, block_size=16)                 # layout detected, or layout="flash_attn"
    buf = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=kv.dtype)
    kv.gather(slots, buf).synchronize()
    kv.scatter(slots, buf).wait()                           # CUDA: attention stream waits

See :mod:`lmcache.kernels.paged` for how copies are planned and :mod:`lmcache.layouts` for the
layouts and the chunk format.
"""

from __future__ import annotations

from lmcache.kernels.paged import Backend, CopyHandle, PagedKV, gather, scatter
from lmcache.kernels.triton_kernels import available as triton_available

__all__ = ["Backend", "CopyHandle", "PagedKV", "gather", "scatter", "triton_available"]
