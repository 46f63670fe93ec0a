"""Reference copies for the block-copy tests: a chunk gathered slot by slot through the layout's views."""

from __future__ import annotations

import torch

from lmcache.kernels import PagedKV

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
