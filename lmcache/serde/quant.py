"""Lossy codecs that quantize each element: ``fp8`` (e4m3), ``int8`` and ``int4`` (KIVI-style).

Keys and values have different outliers, so they get different scale layouts (KIVI, Liu et al.
2024): key outliers live in a few *channels* for every token, so keys are scaled per channel
(over the chunk's tokens); values have no channel structure but differ per token, so they are
scaled per token and head. For MLA (one latent per token) the latent is treated like a key.

* ``fp8``: float8 e4m3 with the scale mapping each group's absolute max to 448; keys one scale
  per (layer, head, channel), values one per (layer, token, head).
* ``int8``: symmetric int8 (absmax to 127), the same scale layout.
* ``int4``: asymmetric 4-bit (a minimum and a step per group); keys in groups of ``codec_group``
  tokens per channel, values in groups of ``codec_group`` channels per token; two codes a byte.

Scales are stored as float16 (elements are quantized with the rounded scales, so decoding uses
exactly the scales encoding used). Body layout: key-part scales, value-part scales, then the
codes in chunk order ``[layers, parts, tokens, heads, dim]``. Quantization runs in float32 torch
ops on CPU (torch releases the GIL).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch

from lmcache.serde.codec import ChunkGeometry, Codec

__all__ = ["Fp8Codec", "Int4Codec", "Int8Codec", "from_float", "to_float"]

_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_TINY = 2.0**-24  # the smallest positive float16: a zero scale would divide by zero


def to_float(data: memoryview, g: ChunkGeometry) -> torch.Tensor:
    """The chunk as a float32 tensor of ``g.shape`` (a copy)."""
    if g.dtype == "bfloat16":
        bits = np.frombuffer(data, dtype=np.uint16).astype(np.uint32) << 16
        arr = bits.view(np.float32)
    elif g.dtype == "float16":
        arr = np.frombuffer(data, dtype=np.float16).astype(np.float32)
    else:
        arr = np.frombuffer(data, dtype=np.float32).copy()
    return torch.from_numpy(arr).view(g.shape)


def from_float(x: torch.Tensor, g: ChunkGeometry, out: memoryview) -> None:
    """Write float32 ``x`` into ``out`` in the chunk's dtype (round to nearest)."""
    t = x.to(_TORCH[g.dtype]).contiguous().view(-1)
    raw = t.view(torch.int16 if g.itemsize == 2 else torch.int32).numpy()
    np.frombuffer(out, dtype=raw.dtype)[:] = raw


#: float32 value of every float8 e4m3 code.
_FP8_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()


def _f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (and clamped to where a scale is usable), back as float32."""
    return x.clamp(_TINY, 65504.0).to(torch.float16).float()


class _Scaled(Codec):
    """Symmetric per-channel (part 0) / per-token (part 1) scaling shared by fp8 and int8."""

    lossless = False
    qmax = 1.0

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def _dequantize(self, codes: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """float16 scales of part 0 (``[L, H, D]``) and part 1 (``[L, T, H]``), then one byte per element."""
        if not geometry.is_kv:
            return None
        x = to_float(data, geometry)
        k = x[:, 0]
        sk = _f16(k.abs().amax(dim=1, keepdim=True) / self.qmax)  # [L, 1, H, D]
        parts = [k / sk]
        scales = [sk.to(torch.float16).numpy().tobytes()]
        if geometry.parts > 1:
            v = x[:, 1]
            sv = _f16(v.abs().amax(dim=3, keepdim=True) / self.qmax)  # [L, T, H, 1]
            parts.append(v / sv)
            scales.append(sv.to(torch.float16).numpy().tobytes())
        y = torch.stack(parts, dim=1).clamp(-self.qmax, self.qmax)
        return b"".join(scales) + self._quantize(y).tobytes()

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Codes times their scales, in the chunk's dtype."""
        L, P, T, H, D = geometry.shape
        nk, nv = L * H * D * 2, (L * T * H * 2 if P > 1 else 0)
        if body.nbytes != nk + nv + geometry.numel:
            raise ValueError(f"{self.name} body has {body.nbytes} bytes, expected {nk + nv + geometry.numel}")
        sk = torch.from_numpy(np.frombuffer(body[:nk], dtype=np.float16).astype(np.float32)).view(L, 1, H, D)
        y = self._dequantize(np.frombuffer(body[nk + nv :], dtype=np.uint8), geometry.shape)
        y[:, 0] *= sk
        if P > 1:
            sv = torch.from_numpy(np.frombuffer(body[nk : nk + nv], dtype=np.float16).astype(np.float32))
            y[:, 1] *= sv.view(L, T, H, 1)
        from_float(y, geometry, out)


class Fp8Codec(_Scaled):
    """float8 e4m3 with per-channel key scales and per-token-per-head value scales (~2x)."""

    name = "fp8"
    qmax = 448.0

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
        return y.to(torch.float8_e4m3fn).view(torch.uint8).numpy()

    def _dequantize(self, codes: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        # A 256-entry table lookup: several times faster on CPU than torch's float8 conversion.
        return torch.from_numpy(np.take(_FP8_TABLE, codes)).view(shape)


class Int8Codec(_Scaled):
    """Symmetric int8 with per-channel key scales and per-token-per-head value scales (~2x)."""

    name = "int8"
    qmax = 127.0

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
        return y.round().to(torch.int8).view(torch.uint8).numpy()

    def _dequantize(self, codes: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.from_numpy(codes.view(np.int8).astype(np.float32)).view(shape)


def _groups(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """``x`` (grouped along its last axis) as ``[..., n_groups, size]``, padded with its last element."""
    n = x.shape[-1]
    pad = -n % size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, size), n


class Int4Codec(Codec):
    """KIVI-style 4-bit: keys per channel in groups of tokens, values per token in groups of channels (~3.5x).

    Body: the two group sizes (uint16), then for keys then values the float16 minimums and steps
    of every group, then the 4-bit codes of keys then values (two a byte, low nibble first).
    """

    name = "int4"
    lossless = False

    def _sizes(self, g: ChunkGeometry) -> tuple[int, int]:
        return max(1, min(self.settings.codec_group, g.tokens)), min(self.settings.codec_group, g.dim)

    @staticmethod
    def _quant(x: torch.Tensor, size: int) -> tuple[bytes, torch.Tensor]:
        grouped, _ = _groups(x, size)
        lo = grouped.amin(dim=-1, keepdim=True).to(torch.float16).float()
        step = _f16((grouped.amax(dim=-1, keepdim=True) - lo) / 15.0)
        q = ((grouped - lo) / step).round_().clamp_(0, 15).to(torch.uint8)
        meta = torch.stack([lo, step]).to(torch.float16).numpy().tobytes()
        return meta, q

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Group minimums and steps, then packed 4-bit codes."""
        if not geometry.is_kv:
            return None
        gk, gv = self._sizes(geometry)
        x = to_float(data, geometry)
        # Keys grouped over tokens: move tokens last ([L, H, D, T]).
        meta_k, qk = self._quant(x[:, 0].permute(0, 2, 3, 1), gk)
        metas, codes = [meta_k], [qk.reshape(-1)]
        if geometry.parts > 1:
            meta_v, qv = self._quant(x[:, 1], gv)  # values grouped over channels ([L, T, H, D])
            metas.append(meta_v)
            codes.append(qv.reshape(-1))
        q = torch.cat(codes)
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        packed = (q[0::2] | (q[1::2] << 4)).numpy()
        # The group sizes lead the body: a reader decodes with the writer's, whatever its own options.
        return struct.pack("<HH", gk, gv) + b"".join(metas) + packed.tobytes()

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Unpack the codes and scale them back."""
        L, P, T, H, D = geometry.shape
        gk, gv = struct.unpack_from("<HH", body, 0)
        if not (0 < gk <= max(T, 1) and 0 < gv <= D):
            raise ValueError(f"int4 group sizes {gk}, {gv} do not fit the geometry")
        body = body[4:]
        nk_groups = L * H * D * math.ceil(T / gk)
        nv_groups = L * T * H * math.ceil(D / gv) if P > 1 else 0
        nk_codes = nk_groups * gk
        nv_codes = nv_groups * gv
        meta_bytes = (nk_groups + nv_groups) * 4
        n_codes = nk_codes + nv_codes
        if body.nbytes != meta_bytes + (n_codes + 1) // 2:
            raise ValueError(f"int4 body has {body.nbytes} bytes, expected {meta_bytes + (n_codes + 1) // 2}")
        meta = np.frombuffer(body[:meta_bytes], dtype=np.float16).astype(np.float32)
        packed = np.frombuffer(body[meta_bytes:], dtype=np.uint8)
        q = np.empty(packed.size * 2, dtype=np.uint8)
        q[0::2] = packed & 15
        q[1::2] = packed >> 4
        q_t = torch.from_numpy(q[:n_codes].astype(np.float32))
        mk = torch.from_numpy(meta[: 2 * nk_groups]).view(2, L, H, D, -1, 1)
        k = (q_t[:nk_codes].view(L, H, D, -1, gk) * mk[1] + mk[0]).reshape(L, H, D, -1)[..., :T].permute(0, 3, 1, 2)
        parts = [k]
        if P > 1:
            mv = torch.from_numpy(meta[2 * nk_groups :]).view(2, L, T, H, -1, 1)
            v = (q_t[nk_codes:].view(L, T, H, -1, gv) * mv[1] + mv[0]).reshape(L, T, H, -1)[..., :D]
            parts.append(v)
        from_float(torch.stack(parts, dim=1), geometry, out)
