"""Lossy codecs that quantize each element: ``fp8`` (e4m3), ``int8`` and ``int4`` (KIVI-style).

Keys and values have different outliers, so they get different scale layouts (KIVI, Liu et al.
2024): key outliers live in a few *channels* for every token, so keys are scaled per channel
(over the chunk's tokens); values have no channel structure but differ per token, so they are
scaled per token and head. For MLA (one latent per token) the latent is treated like a key.

* ``fp8``: float8 e4m3; keys centred on each channel's mean and scaled so the channel's
  absolute max maps to 448, values scaled per (layer, token, head) by a power of two; the
  chunk's first token is kept exact (body version 1, written by default). Body version 2 (read
  always, written where :attr:`Fp8Codec.body_version` says 2) also rotates keys back by RoPE,
  keeps the key elements coded worst exact and scales values per token (see :class:`Fp8Codec`).
* ``int8``: symmetric int8 (absmax to 127); keys one float16 scale per (layer, head, channel),
  values one per (layer, token, head).
* ``int4``: asymmetric 4-bit (a minimum and a step per group); keys in groups of ``codec_group``
  tokens per channel, values in groups of ``codec_group`` channels per token (body version 1,
  see :class:`Int4Codec`).

Scales are quantized before the elements are (elements are divided by the rounded scales, so
decoding uses exactly the scales encoding used). Each codec's class docstring gives its body
layout, and the earlier layouts it still decodes (the codec header carries the body version).
Quantization runs in float32 torch ops on CPU (torch releases the GIL).

Decoding writes straight into the destination buffer, a block of layers at a time through a
per-thread float32 scratch (codes to float, scale in place, one converting copy into the
chunk's dtype), so every pass but the last stays in cache: several GB/s per core. Where a C
compiler is available the loops of :mod:`lmcache.serde.dequant_native` do the same arithmetic in
one pass (the same bytes), and the torch path is the fallback.
"""

from __future__ import annotations

import functools
import math
import struct
import threading
from typing import Any

import numpy as np
import torch

from lmcache.errors import InvalidBufferError
from lmcache.serde import dequant_native
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
    """Write float32 ``x`` into ``out`` in the chunk's dtype (round to nearest), in place."""
    _out_tensor(out, g).copy_(x.view(g.shape))


def _out_tensor(out: memoryview, g: ChunkGeometry) -> torch.Tensor:
    """``out`` as a writable tensor of ``g.shape`` in the chunk's dtype (no copy: decoders write into it).

    Raises:
        InvalidBufferError: ``out`` is read-only (torch would write into it regardless).
    """
    arr = np.frombuffer(out, dtype={"bfloat16": np.int16, "float16": np.float16}.get(g.dtype, np.float32))
    if not arr.flags.writeable:
        raise InvalidBufferError("the buffer to decode into is read-only")
    t = torch.from_numpy(arr)
    return (t.view(torch.bfloat16) if g.dtype == "bfloat16" else t).view(g.shape)


#: Elements decoded per block: passes over a block (codes to float32, scale, store) stay in cache.
_BLOCK = 1 << 19
_LOCAL = threading.local()


def _scratch(name: str, n: int, dtype: type[np.generic]) -> np.ndarray:
    """A per-thread scratch array of ``n`` elements (reused: decoders run on a pool of threads)."""
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, _BLOCK), dtype=dtype)
        setattr(_LOCAL, name, buf)
    return buf[:n]


def _fp8_bits_to_half(codes: np.ndarray, dst: np.ndarray) -> torch.Tensor:
    """float16 values of e4m3 ``codes`` (int8 view) divided by 256, written into int16 ``dst``.

    An e4m3 code's exponent and mantissa bits, shifted left by 7, are a float16 of the same
    value times 2**-8, subnormals included (both formats' subnormals line up): sign-extend,
    shift, clear bit 14 (the sign's copy). Three integer passes, and float16 -> float32 is a
    hardware conversion, where torch's float8 conversion is scalar code.
    """
    np.copyto(dst, codes)
    t = torch.from_numpy(dst)
    t.bitwise_left_shift_(7).bitwise_and_(-16512)  # 0xBF80: sign, exponent, mantissa
    return t.view(torch.float16)


def _f16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (and clamped to where a scale is usable), back as float32."""
    return x.clamp(_TINY, 65504.0).to(torch.float16).float()


class _Scaled(Codec):
    """Symmetric per-channel (part 0) / per-token (part 1) scaling shared by fp8 and int8."""

    lossless = False
    qmax = 1.0

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
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
        """Codes times their scales, in the chunk's dtype, written straight into ``out``."""
        L, P, T, H, D = geometry.shape
        nk, nv = L * H * D * 2, (L * T * H * 2 if P > 1 else 0)
        if body.nbytes != nk + nv + geometry.numel:
            raise ValueError(f"{self.name} body has {body.nbytes} bytes, expected {nk + nv + geometry.numel}")
        sk = _half_scales(body[:nk], self._code_factor).view(L, H, D)
        sv = _half_scales(body[nk : nk + nv], self._code_factor).view(L, T, H, 1) if P > 1 else None
        codes = np.frombuffer(body[nk + nv :], dtype=np.int8)
        _decode_blocks(codes, _out_tensor(out, geometry), self._codes_to_float, sk=sk, sv=sv, native=self._native)

    #: What decoded codes are multiplied by besides their scale (fp8 decodes codes / 256).
    _code_factor = 1.0
    #: The codes' kind for the C decode loop (:mod:`lmcache.serde.dequant_native`).
    _native = dequant_native.CODE_INT8

    def _codes_to_float(self, codes: np.ndarray, tmp: torch.Tensor) -> None:
        raise NotImplementedError


def _half_scales(raw: memoryview, factor: float) -> torch.Tensor:
    """float16 scales as float32 (times ``factor``, a power of two: exact)."""
    s = torch.from_numpy(np.frombuffer(raw, dtype=np.float16).astype(np.float32))
    return s.mul_(factor) if factor != 1.0 else s


def _decode_blocks(
    codes: np.ndarray,
    dst: torch.Tensor,
    to_float: Any,
    *,
    sk: torch.Tensor,
    sv: torch.Tensor | None,
    ck: torch.Tensor | None = None,
    native: int | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    exact: tuple[np.ndarray, memoryview] | None = None,
) -> bool:
    """``dst`` (``[L, P, T, H, D]``, any view) = codes times key scales ``sk`` (+ centres ``ck``), value scales ``sv``.

    Works a block of layers at a time through a per-thread float32 scratch (codes to float,
    scale in place, one converting copy into ``dst``): every pass but the last stays in cache.
    With ``native`` (the codes' kind), the C loop of :mod:`lmcache.serde.dequant_native` does it
    in one pass where it is available (the same bytes). With ``rope`` (cos and sin ``[T, D / 2]``),
    the keys are rotated by RoPE after centre and scale (:func:`_rotate_keys`, in float32): the C
    loop does that in the same pass too (in registers, the same arithmetic); where it cannot, the
    block's float32 values go through the scratch and are rotated there, so every path gives
    the same bytes. ``exact`` (fp8 version 2's exact key elements, see
    :func:`lmcache.serde.dequant_native.scaled`) is written by that one C pass too.

    Returns:
        Whether the ``exact`` elements were written (else the caller writes them).
    """
    if native is not None and dequant_native.scaled(native, codes, dst, sk=sk, sv=sv, ck=ck, rope=rope, exact=exact):
        return exact is not None
    L, P, T, H, D = dst.shape
    per_layer = P * T * H * D
    step = max(1, _BLOCK // per_layer)
    scratch = torch.from_numpy(_scratch("f32", min(L, step) * per_layer, np.float32))
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        tmp = scratch[: (l1 - l0) * per_layer]
        y = tmp.view(l1 - l0, P, T, H, D)
        block = codes[l0 * per_layer : l1 * per_layer]
        svb = None if sv is None else sv[l0:l1]
        ckb = None if ck is None else ck[l0:l1]
        if native is None or not dequant_native.scaled(native, block, y, sk=sk[l0:l1], sv=svb, ck=ckb):
            to_float(block, tmp)
            k = y[:, 0]
            k.mul_(sk[l0:l1, None])
            if ckb is not None:
                k.add_(ckb[:, None])
            if svb is not None:
                y[:, 1].mul_(svb)
        if rope is not None:
            _rotate_keys(y[:, 0], rope[0], rope[1], native=native is not None)
        dst[l0:l1].copy_(y)
    return False


def _rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, native: bool = False) -> None:
    """Rotate keys ``[n, T, H, D]`` (float32) by RoPE in place: rotate-half pairs, ``cos``/``sin`` ``[T, D / 2]``.

    ``lo = a * cos - b * sin``, ``hi = b * cos + a * sin``, every product rounded to float32 (no
    fused multiply-add), as :func:`lmcache.serde.cachegen.rope_tables`' angles are used there.
    With ``-sin``, the inverse rotation (up to rounding). With ``native``, the C loop of
    :mod:`lmcache.serde.dequant_native` does it where it is available (the same bytes).
    """
    if native and dequant_native.rope(k, cos, sin):
        return
    h = k.shape[-1] // 2
    a, b = k[..., :h], k[..., h:]
    c, s = cos[:, None, :], sin[:, None, :]
    lo = torch.mul(a, c).sub_(torch.mul(b, s))
    b.mul_(c).add_(a.mul_(s))
    a.copy_(lo)


class Fp8Codec(_Scaled):
    """float8 e4m3; keys centred and scaled per channel, values per token, the first token exact (~1.95x).

    Body version 2 (written where :attr:`body_version` is 2; read always), in this order:

    * a version byte (2);
    * the RoPE base (float32; 0 = keys not rotated) the encoder found for the chunk's keys;
    * key centres ``[L, H, D]`` (float16: each channel's mean over the chunk's tokens but the
      first, after the keys were rotated back) and key scales ``[L, H, D]`` (float16, the
      centred channel's absolute max / 448);
    * value scale exponents ``[L, T - 1]`` (int8: one power of two per layer and token, the
      smallest at least the token's absolute max / 448: float8 keeps its relative precision
      under any power of two, so one scale serves every head);
    * the chunk's first token, ``[L, P, H, D]`` in the chunk's own dtype (exact: a sequence's
      first token is the attention sink of most models, read by every later query);
    * the number ``n`` of exact key elements (uint32), their indices into the keys of tokens
      ``1..T-1`` (``[L, T - 1, H, D]`` flattened; uint32, strictly increasing) and their values
      in the chunk's dtype: the key elements the codes reproduce worst, as many as keep the body
      within 16-bit size / :data:`FP8_RATIO` (about 0.35% of the keys at SmolLM2's geometry);
    * the e4m3 codes of every other token, ``[L, P, T - 1, H, D]``.

    Keys carry most of fp8's error (a floating-point code's error scales with the magnitude it
    codes), so the body spends on them: centring removes the channels' offsets; RoPE turns a
    channel pair's steady offset into a circle over the chunk's tokens, which a channel mean
    cannot remove, so the keys are first rotated back by the base found per chunk (as the
    ``cachegen`` codec finds it, positions relative to the chunk) and decoding rotates them again
    (:func:`_rotate_keys`, float32); the few elements still coded worst are stored exact.
    docs/codecs.md has the measurements.

    Version 1 (written by default, read always): no RoPE base, value scale exponents
    ``[L, T - 1, H]``, no exact elements. Version 0 (read): float16 key scales ``[L, H, D]``, float16 value scales
    ``[L, T, H]``, then the codes of every token, no centres.
    """

    name = "fp8"
    qmax = 448.0
    #: The body version written: 2 (half version 1's KL for 0.5% more bytes, docs/codecs.md);
    #: versions 0-2 are read whatever this says.
    body_version = 2
    _code_factor = 256.0  # _fp8_bits_to_half gives code values / 256
    _native = dequant_native.CODE_FP8

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
        return y.to(torch.float8_e4m3fn).view(torch.uint8).numpy()

    def _codes_to_float(self, codes: np.ndarray, tmp: torch.Tensor) -> None:
        tmp.copy_(_fp8_bits_to_half(codes, _scratch("i16", codes.size, np.int16)))

    @staticmethod
    def _body_size(g: ChunkGeometry, version: int, exact: int = 0) -> int:
        """Bytes of a body of ``version`` (with ``exact`` exact key elements in version 2)."""
        L, P, T, H, D = g.shape
        vs = (L * (T - 1) * (H if version < 2 else 1)) if P > 1 else 0
        size = 1 + 4 * L * H * D + vs + L * P * H * D * g.itemsize + L * P * (T - 1) * H * D
        if version >= 2:
            size += 4 + 4 + exact * (4 + g.itemsize)
        # Never the length of a version 0 body, so a reader from before body versions (which
        # ignores the header's version byte) refuses it instead of misreading it.
        return size + (size == 2 * L * H * D + (2 * L * T * H if P > 1 else 0) + g.numel)

    def _exact_budget(self, g: ChunkGeometry) -> int:
        """How many key elements version 2 stores exact: what keeps the body within 16-bit size / FP8_RATIO."""
        L, _P, T, H, D = g.shape
        room = int(2 * g.numel / FP8_RATIO) - _HEADER_ROOM - self._body_size(g, 2) - 1
        return max(0, min(L * (T - 1) * H * D // 50, room // (4 + g.itemsize)))

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """The body of :attr:`body_version`; version 2: RoPE base, key centres and scales, value scales, exact keys."""
        L, P, T, H, D = geometry.shape
        if not geometry.is_kv or T < 2:
            return None  # one token: nothing to gain over storing it raw
        x = to_float(data, geometry)
        if self.body_version == 1:
            return self._encode_v1(data, x, geometry)
        k0 = x[:, 0, 1:].contiguous()
        k = k0.clone()
        theta = _find_rope(k)
        rope = _rope(T, D, theta) if theta else None
        if rope is not None:
            # back to the keys before RoPE (positions relative to the chunk)
            _rotate_keys(k, rope[0], -rope[1], native=True)
        ck = k.mean(dim=1, keepdim=True).clamp_(-65504.0, 65504.0).to(torch.float16).float()  # [L, 1, H, D]
        k = k.sub_(ck)
        sk = _f16(k.abs().amax(dim=1, keepdim=True) / self.qmax)
        k = k.div_(sk).clamp_(-self.qmax, self.qmax)
        kq = k.to(torch.float8_e4m3fn)
        side = [
            struct.pack("<f", theta),
            ck.to(torch.float16).numpy().tobytes(),
            sk.to(torch.float16).numpy().tobytes(),
        ]
        parts = [kq]
        if P > 1:
            v = x[:, 1, 1:]
            ev = _pow2_exponent(v.abs().amax(dim=(2, 3), keepdim=True) / self.qmax)  # [L, T - 1, 1, 1]
            parts.append((v / torch.exp2(ev.float())).clamp_(-self.qmax, self.qmax).to(torch.float8_e4m3fn))
            side.append(ev.to(torch.int8).numpy().tobytes())
        # The key elements the codes reproduce worst (as decoding computes them) are stored exact.
        n = self._exact_budget(geometry)
        rec = kq.float().mul_(sk).add_(ck)
        if rope is not None:
            _rotate_keys(rec, rope[0], rope[1], native=True)
        idx_np = _largest(rec.sub_(k0).abs_().view(-1), n).numpy().astype(np.uint32)
        item = {2: np.uint16, 4: np.uint32}[geometry.itemsize]
        keys_raw = np.frombuffer(data, dtype=item).reshape(L, P, T, H * D)[:, 0, 1:].reshape(-1)
        first = np.frombuffer(data, dtype=np.uint8).reshape(L, P, T, -1)[:, :, 0]
        codes = torch.stack(parts, dim=1).view(torch.uint8).numpy()
        body = b"".join(
            [
                bytes([2]),
                *side,
                first.tobytes(),
                struct.pack("<I", n),
                idx_np.tobytes(),
                keys_raw[idx_np].tobytes(),
                codes.tobytes(),
            ]
        )
        return body + bytes(self._body_size(geometry, 2, n) - len(body))

    def _encode_v1(self, data: memoryview, x: torch.Tensor, geometry: ChunkGeometry) -> bytes:
        """Version 1: key centres and scales, value scale exponents per (token, head), the first token, the codes."""
        L, P, T = geometry.shape[:3]
        k = x[:, 0, 1:]
        ck = k.mean(dim=1, keepdim=True).clamp_(-65504.0, 65504.0).to(torch.float16).float()  # [L, 1, H, D]
        k = k - ck
        sk = _f16(k.abs().amax(dim=1, keepdim=True) / self.qmax)
        parts = [k.div_(sk)]
        side = [ck.to(torch.float16).numpy().tobytes(), sk.to(torch.float16).numpy().tobytes()]
        if P > 1:
            v = x[:, 1, 1:]
            ev = _pow2_exponent(v.abs().amax(dim=3, keepdim=True) / self.qmax)  # [L, T - 1, H, 1]
            parts.append(v / torch.exp2(ev.float()))
            side.append(ev.to(torch.int8).numpy().tobytes())
        first = np.frombuffer(data, dtype=np.uint8).reshape(L, P, T, -1)[:, :, 0]
        codes = self._quantize(torch.stack(parts, dim=1).clamp_(-self.qmax, self.qmax))
        body = b"".join([bytes([1]), *side, first.tobytes(), codes.tobytes()])
        return body + bytes(self._body_size(geometry, 1) - len(body))

    def decode_body_version(self, body: memoryview, geometry: ChunkGeometry, out: memoryview, version: int) -> None:
        """Decode a version 2 or 1 body, or a version 0 one (written before keys were centred)."""
        if version == 0:
            super().decode_body(body, geometry, out)
            return
        L, P, T, H, D = geometry.shape
        if version not in (1, 2) or T < 2 or body.nbytes < 9 or body[0] != version:
            raise ValueError(f"fp8 body (version {version}, {body.nbytes} bytes) does not fit {geometry.shape}")
        pos, rope = 1, None
        if version >= 2:
            (theta,) = struct.unpack_from("<f", body, 1)
            pos = 5
            if theta:
                if not (math.isfinite(theta) and theta > 1.0) or D % 2:
                    raise ValueError(f"fp8 body has a RoPE base of {theta} for a head dim of {D}")
                rope = _rope(T, D, theta)
        n = L * H * D * 2
        ck = _half_scales(body[pos : pos + n], 1.0).view(L, H, D)
        sk = _half_scales(body[pos + n : pos + 2 * n], self._code_factor).view(L, H, D)
        pos += 2 * n
        sv = None
        if P > 1:
            heads = H if version < 2 else 1
            nv = L * (T - 1) * heads
            ev = torch.from_numpy(np.frombuffer(body[pos : pos + nv], dtype=np.int8).astype(np.float32))
            # 2**8: the code factor, exact. One scale per token (version 2) broadcasts over the heads.
            sv = torch.exp2(ev.add_(8.0)).view(L, T - 1, heads, 1)
            pos += nv
        first = L * P * H * D * geometry.itemsize
        first_at = pos
        pos += first
        exact, idx = 0, None
        if version >= 2:
            if body.nbytes < pos + 4:
                raise ValueError(f"fp8 body of {body.nbytes} bytes is too short for {geometry.shape}")
            (exact,) = struct.unpack_from("<I", body, pos)
            pos += 4
        if exact > L * (T - 1) * H * D or body.nbytes != self._body_size(geometry, version, exact):
            raise ValueError(f"fp8 body (version {version}, {body.nbytes} bytes) does not fit {geometry.shape}")
        if exact:
            idx = np.frombuffer(body[pos : pos + 4 * exact], dtype=np.uint32)
            if idx[-1] >= L * (T - 1) * H * D or (exact > 1 and not (np.diff(idx.astype(np.int64)) > 0).all()):
                raise ValueError("fp8 body's exact key elements are out of order or out of range")
            pos += 4 * exact
            vals = body[pos : pos + exact * geometry.itemsize]
            pos += exact * geometry.itemsize
        np.frombuffer(out, dtype=np.uint8).reshape(L, P, T, -1)[:, :, 0] = np.frombuffer(
            body[first_at : first_at + first], dtype=np.uint8
        ).reshape(L, P, -1)
        codes = np.frombuffer(body[pos : pos + L * P * (T - 1) * H * D], dtype=np.int8)
        dst = _out_tensor(out, geometry)[:, :, 1:]
        put = None if idx is None else (idx, vals)
        done = _decode_blocks(
            codes, dst, self._codes_to_float, sk=sk, sv=sv, ck=ck, native=self._native, rope=rope, exact=put
        )
        if idx is not None and not done:
            item = {2: np.uint16, 4: np.uint32}[geometry.itemsize]
            whole = np.frombuffer(out, dtype=item).reshape(L, P, T, H * D)
            per, row = (T - 1) * H * D, H * D
            layer, rest = np.divmod(idx, per)
            whole[layer, 0, rest // row + 1, rest % row] = np.frombuffer(vals, dtype=item)

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Decode a body of the current version."""
        self.decode_body_version(body, geometry, out, self.body_version)


#: fp8 version 2 stores exact key elements while its body stays within 16-bit size / this.
FP8_RATIO = 1.952
#: Bytes left for the codec header when sizing that budget.
_HEADER_ROOM = 64


def _largest(err: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (ascending) of the ``n`` largest of ``err`` (1-D): a sample sets a bound, top-k of what passes."""
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64)
    sample = err[::16]
    cand = None
    if 2 * n // 16 + 1 < sample.numel():
        bound = sample.topk(2 * n // 16 + 1, sorted=False).values.min()
        cand = (err >= bound).nonzero().squeeze(1)
    if cand is None or cand.numel() < n:
        cand = torch.arange(err.numel())
    return cand[err[cand].topk(n, sorted=False).indices].sort().values


def _find_rope(k: torch.Tensor) -> float:
    """The RoPE base that best explains keys ``[L, T, H, D]`` (float32), or 0 (``cachegen``'s search)."""
    from lmcache.serde.cachegen import _pick_rope  # here: cachegen imports this module

    L, T, H, D = k.shape
    return float(np.float32(_pick_rope(k.reshape(L, T, H * D).numpy(), D)))


@functools.lru_cache(maxsize=16)
def _rope(tokens: int, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's cos and sin ``[tokens - 1, dim / 2]`` of a chunk's tokens 1..tokens-1 (its first is stored exact)."""
    from lmcache.serde.cachegen import rope_tables  # here: cachegen imports this module

    cos, sin = rope_tables(tokens, dim, theta)
    return torch.from_numpy(cos[1:].copy()), torch.from_numpy(sin[1:].copy())


def _pow2_exponent(m: torch.Tensor) -> torch.Tensor:
    """The smallest ``e`` with ``2**e >= m`` (int32), clamped to -126..119 (float32 normal scales, room for 2**8)."""
    mant, exp = torch.frexp(m)
    return (exp - (mant == 0.5).to(torch.int32)).clamp_(-126, 119)


class Int8Codec(_Scaled):
    """Symmetric int8 with per-channel key scales and per-token-per-head value scales (~2x).

    Body (version 0): float16 key scales ``[L, H, D]``, float16 value scales ``[L, T, H]``, then
    the int8 codes in chunk order ``[L, P, T, H, D]``.
    """

    name = "int8"
    qmax = 127.0

    def _quantize(self, y: torch.Tensor) -> np.ndarray:
        return y.round().to(torch.int8).view(torch.uint8).numpy()

    def _codes_to_float(self, codes: np.ndarray, tmp: torch.Tensor) -> None:
        np.copyto(tmp.numpy(), codes)


def _groups(x: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """``x`` (grouped along its last axis) as ``[..., n_groups, size]``, padded with its last element."""
    n = x.shape[-1]
    pad = -n % size
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
    return x.reshape(*x.shape[:-1], -1, size), n


class Int4Codec(Codec):
    """KIVI-style 4-bit: keys per channel in groups of tokens, values per token in groups of channels (~3.5x).

    Body (version 1): a version byte (1), the two group sizes (uint16); for keys then values the
    float16 minimums and then steps of every group (keys ``[L, token groups, H, D]``, values
    ``[L, T, H, channel groups]``); then the 4-bit codes of keys (``[L, T padded to whole groups,
    H, D]``, chunk order) then values (``[L, T, H, D padded]``), as two planes: code ``i`` of the
    first half in the low nibble of byte ``i``, code ``i`` of the second half in its high nibble.
    Decoding is then contiguous passes only (no transpose, no interleaved unpacking).

    Version 0 (read, no longer written): keys in ``[L, H, D, T]`` order, codes paired low nibble
    first; the body started with the group sizes.
    """

    name = "int4"
    lossless = False
    body_version = 1

    def _sizes(self, g: ChunkGeometry) -> tuple[int, int]:
        return max(1, min(self.settings.codec_group, g.tokens)), min(self.settings.codec_group, g.dim)

    @staticmethod
    def _quant(grouped: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes of ``grouped`` (groups along ``dim``) and the ``[2, ...]`` float16 minimums and steps."""
        lo = grouped.amin(dim=dim, keepdim=True).to(torch.float16).float()
        step = _f16((grouped.amax(dim=dim, keepdim=True) - lo) / 15.0)
        q = ((grouped - lo) / step).round_().clamp_(0, 15).to(torch.uint8)
        return q, torch.stack([lo, step]).to(torch.float16)

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Group minimums and steps, then the 4-bit codes in two nibble planes."""
        if not geometry.is_kv:
            return None
        L, P, T, H, D = geometry.shape
        gk, gv = self._sizes(geometry)
        x = to_float(data, geometry)
        k = x[:, 0]
        if T % gk:  # pad tokens to whole groups with the last token (decoding drops them)
            k = torch.cat([k, k[:, -1:].expand(L, -T % gk, H, D)], dim=1)
        qk, mk = self._quant(k.reshape(L, -1, gk, H, D), dim=2)  # keys: groups of tokens per channel
        metas, codes = [mk], [qk.reshape(-1)]
        if P > 1:
            grouped, _ = _groups(x[:, 1], gv)  # values: groups of channels per token
            qv, mv = self._quant(grouped, dim=-1)
            metas.append(mv)
            codes.append(qv.reshape(-1))
        q = torch.cat(codes)
        half = (q.numel() + 1) // 2
        packed = q[:half].clone()
        packed[: q.numel() - half] |= q[half:] << 4
        # The group sizes lead the body: a reader decodes with the writer's, whatever its own options.
        return (
            struct.pack("<BHH", self.body_version, gk, gv)
            + b"".join(m.numpy().tobytes() for m in metas)
            + packed.numpy().tobytes()
        )

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Unpack the codes and scale them back (the current body version)."""
        self.decode_body_version(body, geometry, out, self.body_version)

    def decode_body_version(self, body: memoryview, geometry: ChunkGeometry, out: memoryview, version: int) -> None:
        """Decode a version 1 body, or a version 0 one (written before the format changed)."""
        if version == 0:
            self._decode_v0(body, geometry, out)
            return
        if version != 1 or body.nbytes < 5 or body[0] != 1:
            raise ValueError(f"int4 body version {version} is not one this lmcache reads")
        L, P, T, H, D = geometry.shape
        _v, gk, gv = struct.unpack_from("<BHH", body, 0)
        if not (0 < gk <= max(T, 1) and 0 < gv <= D):
            raise ValueError(f"int4 group sizes {gk}, {gv} do not fit the geometry")
        ngk, ngv = math.ceil(T / gk), math.ceil(D / gv)
        nk_codes = L * ngk * gk * H * D
        nv_codes = L * T * H * ngv * gv if P > 1 else 0
        meta_bytes = 4 * (L * ngk * H * D + (L * T * H * ngv if P > 1 else 0))
        n_codes = nk_codes + nv_codes
        half = (n_codes + 1) // 2
        if body.nbytes != 5 + meta_bytes + half:
            raise ValueError(f"int4 body has {body.nbytes} bytes, expected {5 + meta_bytes + half}")
        meta = torch.from_numpy(np.frombuffer(body[5 : 5 + meta_bytes], dtype=np.float16).astype(np.float32))
        packed = np.frombuffer(body[5 + meta_bytes :], dtype=np.uint8)
        if dequant_native.int4(packed, half, _out_tensor(out, geometry), gk=gk, gv=gv, meta=meta):
            return  # the C loop (same bytes as below)
        q = _scratch("u8", 2 * half, np.uint8)
        np.bitwise_and(packed, 15, out=q[:half])
        np.right_shift(packed, 4, out=q[half:])
        codes = torch.from_numpy(q)
        dst = _out_tensor(out, geometry)
        mk = meta[: 2 * L * ngk * H * D].view(2, L, ngk, 1, H, D)
        _affine_blocks(
            codes[:nk_codes].view(L, ngk, gk, H, D),
            mk,
            lambda y, l0, l1: dst[l0:l1, 0].copy_(y.view(l1 - l0, ngk * gk, H, D)[:, :T]),
        )
        if P > 1:
            mv = meta[2 * L * ngk * H * D :].view(2, L, T, H, ngv, 1)
            _affine_blocks(
                codes[nk_codes:n_codes].view(L, T, H, ngv, gv),
                mv,
                lambda y, l0, l1: dst[l0:l1, 1].copy_(y.view(l1 - l0, T, H, ngv * gv)[..., :D]),
            )

    @staticmethod
    def _decode_v0(body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """The first int4 format: keys ``[L, H, D, T]``, codes paired low nibble first."""
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
        meta = torch.from_numpy(np.frombuffer(body[:meta_bytes], dtype=np.float16).astype(np.float32))
        packed = np.frombuffer(body[meta_bytes:], dtype=np.uint8)
        q = _scratch("u8", packed.size * 2, np.uint8)
        np.bitwise_and(packed, 15, out=q[0::2])
        np.right_shift(packed, 4, out=q[1::2])
        codes = torch.from_numpy(q)
        dst = _out_tensor(out, geometry)
        ngk, ngv = math.ceil(T / gk), math.ceil(D / gv)
        mk = meta[: 2 * nk_groups].view(2, L, H, D, ngk, 1)
        # Keys: codes are [L, H, D, tokens (padded to whole groups)]; the copy into dst transposes.
        _affine_blocks(
            codes[:nk_codes].view(L, H, D, ngk, gk),
            mk,
            lambda y, l0, l1: dst[l0:l1, 0].copy_(y.view(l1 - l0, H, D, ngk * gk)[..., :T].permute(0, 3, 1, 2)),
        )
        if P > 1:
            mv = meta[2 * nk_groups :].view(2, L, T, H, ngv, 1)
            _affine_blocks(
                codes[nk_codes:n_codes].view(L, T, H, ngv, gv),
                mv,
                lambda y, l0, l1: dst[l0:l1, 1].copy_(y.view(l1 - l0, T, H, ngv * gv)[..., :D]),
            )


def _affine_blocks(codes: torch.Tensor, meta: torch.Tensor, store: Any) -> None:
    """``codes * step + minimum`` a block of layers at a time (float32 scratch), handed to ``store``.

    ``codes`` is ``[L, ..., groups, size]`` (uint8), ``meta`` ``[2, L, ..., groups, 1]`` (minimums,
    steps); ``store(y, l0, l1)`` writes the block of layers ``l0:l1`` where it belongs.
    """
    L = codes.shape[0]
    per_layer = codes[0].numel()
    step = max(1, _BLOCK // per_layer)
    scratch = torch.from_numpy(_scratch("f32", min(L, step) * per_layer, np.float32))
    for l0 in range(0, L, step):
        l1 = min(L, l0 + step)
        y = scratch[: (l1 - l0) * per_layer].view(l1 - l0, *codes.shape[1:])
        y.copy_(codes[l0:l1])
        y.mul_(meta[1, l0:l1]).add_(meta[0, l0:l1])
        store(y, l0, l1)
