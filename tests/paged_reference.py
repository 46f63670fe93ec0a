"""Reference copies for the block-copy tests: a chunk gathered slot by slot through the layout's views."""

from __future__ import annotations

import torch

from lmcache.kernels import PagedKV
from lmcache.layouts import VLLM_CPU, KVLayout

#: An integer dtype of each element size, to compare values bit for bit (NaN payloads included).
RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as integers of the same size."""
    return t.view(RAW[t.element_size()])


def reference_gather(kv: PagedKV, slots: list[int]) -> torch.Tensor:
    """The chunk ``kv.gather(slots, …)`` must produce, one token at a time through the views."""
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=kv.dtype)
    for e, entry in enumerate(kv.entries):
        layer, part = divmod(e, kv.geometry.kv_parts)
        for t, slot in enumerate(slots):
            out[layer, part, t] = entry[slot // kv.block_size, slot % kv.block_size]
    return out


def random_cache(
    layout: KVLayout, layers: int, nb: int, bs: int, h: int, d: int, dtype: torch.dtype, seed: int
) -> list[torch.Tensor]:
    """``layers`` entries of ``nb`` blocks in ``layout``'s shape, small random integers as ``dtype``'s bits."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, nb, h, bs, d) if layout is VLLM_CPU else (nb, h, bs, 2 * d)
    raw = RAW[torch.empty((), dtype=dtype).element_size()]
    return [torch.randint(0, 127, shape, dtype=torch.int64, generator=gen).to(raw).view(dtype) for _ in range(layers)]
