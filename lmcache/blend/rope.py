"""Rotary position embeddings for position-free segment KV: which RoPE schemes, and rotating keys.

A segment's KV is stored as if the segment began at position 0. RoPE turns a key at position
``p`` into ``R(p) k`` with ``R`` a rotation, and ``R(a) R(b) = R(a + b)``: keys stored at
positions ``0..n-1`` become the keys at ``o..o+n-1`` by one rotation ``R(o)``. Values carry no
position. Only schemes whose frequencies are fixed (``default``, ``linear``, ``llama3``) compose
this way; others (dynamic NTK, longrope, YaRN's attention scaling…) are rejected.
"""

from __future__ import annotations

from typing import Any

import torch

from lmcache.errors import UnsupportedOperationError

__all__ = ["SUPPORTED_ROPE_TYPES", "rope_frequencies", "rotate_keys"]

#: RoPE variants whose inverse frequencies are fixed at construction (position shifts compose).
SUPPORTED_ROPE_TYPES = frozenset({"default", "linear", "llama3"})


def rope_frequencies(rotary: Any) -> torch.Tensor:
    """The inverse frequencies (fp32) of a transformers rotary embedding module.

    Args:
        rotary: The model's rotary embedding (``model.model.rotary_emb``), which holds the
            already scaled ``inv_freq`` (Llama-3 scaling included) and its ``rope_type``.

    Raises:
        UnsupportedOperationError: Not a RoPE module, or a scheme whose shifts do not compose.
    """
    inv_freq = getattr(rotary, "inv_freq", None)
    rope_type = getattr(rotary, "rope_type", None)
    if not isinstance(inv_freq, torch.Tensor) or rope_type is None:
        raise UnsupportedOperationError(
            f"blending needs rotary position embeddings; {type(rotary).__name__} is not a RoPE module"
        )
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedOperationError(
            f"blending supports RoPE types {sorted(SUPPORTED_ROPE_TYPES)}, the model uses {rope_type!r}"
        )
    if float(getattr(rotary, "attention_scaling", 1.0)) != 1.0:
        raise UnsupportedOperationError("blending does not support RoPE with attention scaling")
    return inv_freq.detach().float()


def rotate_keys(keys: torch.Tensor, shift: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE'd keys ``shift`` positions on (negative: back), in fp32, returning ``keys.dtype``.

    Args:
        keys: ``[..., seq, head_dim]`` keys (transformers' half-split rotary layout).
        shift: Positions to add to every key's position.
        inv_freq: ``[head_dim / 2]`` inverse frequencies from :func:`rope_frequencies`.
    """
    if shift == 0:
        return keys
    freqs = float(shift) * inv_freq.to(device=keys.device, dtype=torch.float64)
    # The angle in float64: shift * freq reaches 1e5 rad, where fp32 loses ~1e-2 rad.
    emb = torch.cat((freqs, freqs))
    cos = emb.cos().float()
    sin = emb.sin().float()
    k = keys.float()
    half = k.shape[-1] // 2
    rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    return (k * cos + rotated * sin).to(keys.dtype)
