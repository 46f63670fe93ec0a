"""``cachegen``: a CacheGen-style codec (Liu et al., SIGCOMM'24), in numpy on the CPU.

Three steps, after CacheGen:

1. **Deltas against references.** With ``codec_anchor=A`` the chunk's tokens are split into
   groups of ``A``; the first token of each group is an *anchor*, quantized on its own (8 bits,
   scaled per channel), and every other token is coded as its difference from the reconstructed
   anchor. With ``codec_anchor=0`` (the default) the reference of every token is its channel's
   mean over the chunk: on SmolLM2-135M neighbouring tokens are barely correlated, so a delta
   against an anchor 1-15 tokens away spreads wider than the value itself (``lmcache bench
   codec`` measures both), while keys' large per-channel offsets make the mean worth removing.
2. **Layer-dependent quantization.** Residuals are quantized per channel (one step per layer,
   K/V part, head and channel) with the step set from the channel's spread so that a layer is
   coded at about ``codec_bits`` bits per value (default 4) for the first third of the layers,
   one bit less for the second third and two less for the rest (never under 2): deeper layers
   matter less to the output. Tokens with outliers (a value 8 standard deviations from its
   channel's mean: attention sinks) are coded like anchors, at 8 bits, instead of clipped.
3. **Entropy coding.** The symbols are coded with rANS (range asymmetric numeral systems) with
   one frequency table per layer and K/V part (one for anchors, one for the rest). Every
   channel of the chunk is an independent rANS stream; the streams advance in lockstep over the
   tokens, so each coding step is one vectorized numpy operation over all channels, and the
   16-bit words of all streams are interleaved in the order the decoder consumes them.

Body layout: base bits, anchor stride and the outlier tokens (so a reader needs no options), per-lane
scales of the 8-bit tokens, channel means (without anchors) and steps (float16 each), the frequency tables (first used
symbol, count, uint16 frequencies), the final rANS states (uint32 per lane), the number of words,
then the words. Lanes are ``(layer, part, head, channel)`` in that order.

No Triton/GPU kernel: encode and decode run on CPU worker threads (see docs/codecs.md).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from lmcache.serde.codec import ChunkGeometry, Codec
from lmcache.serde.quant import from_float, to_float

__all__ = ["CacheGenCodec", "layer_bits", "rans_decode", "rans_encode"]

PROB_BITS = 12
M = 1 << PROB_BITS
_LOW = 1 << 16  # the state lives in [2^16, 2^32); renormalization moves 16-bit words
ANCHOR_BITS = 8
_COUNT = struct.Struct("<Q")
_PARAMS = struct.Struct("<BHH")  # base bits, anchor stride, outlier tokens: a reader needs no options
_TABLE = struct.Struct("<BH")
DEFAULT_BITS = 4


def layer_bits(layers: int, base: int) -> list[int]:
    """Bits per layer: ``base`` for the first third, one less, then two less (at least 2).

    The floor is measured: on SmolLM2-135M, 1-bit deep layers cost more quality per byte saved
    than 2 bits everywhere (``lmcache bench codec``; docs/codecs.md).
    """
    return [max(min(2, base), base - (3 * i) // max(1, layers)) for i in range(layers)]


def normalize_freqs(counts: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to ``M`` per row, at least 1 for every symbol that occurs."""
    counts = counts.astype(np.float64)
    total = counts.sum(axis=1, keepdims=True)
    total[total == 0] = 1
    f = np.floor(counts * M / total).astype(np.int64)
    f[(counts > 0) & (f == 0)] = 1
    for row in range(f.shape[0]):
        if not f[row].any():
            f[row, 0] = M  # an unused table still decodes
            continue
        diff = M - int(f[row].sum())
        while diff != 0:
            i = int(np.argmax(f[row]))
            step = diff if diff > 0 else max(diff, 1 - int(f[row, i]))
            f[row, i] += step
            diff -= step
    return f.astype(np.uint16)


def rans_encode(sym: np.ndarray, table: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Encode ``sym`` (``[lanes, steps]``) with per-step tables ``table[lanes, steps]``.

    Returns:
        The final states (uint32 per lane) and the 16-bit words in decoder order.
    """
    f_all = freq.astype(np.uint64)
    cum = np.zeros_like(f_all)
    cum[:, 1:] = np.cumsum(f_all, axis=1)[:, :-1]
    lanes, steps = sym.shape
    x = np.full(lanes, _LOW, dtype=np.uint64)
    emitted: list[np.ndarray] = []
    for t in range(steps - 1, -1, -1):
        tb, s = table[:, t], sym[:, t]
        f = f_all[tb, s]
        c = cum[tb, s]
        m = x >= (f << np.uint64(20))
        emitted.append((x[m] & np.uint64(0xFFFF)).astype(np.uint16))
        x[m] >>= np.uint64(16)
        x = ((x // f) << np.uint64(PROB_BITS)) + (x % f) + c
    words = np.concatenate(emitted[::-1]) if emitted else np.zeros(0, np.uint16)
    return x.astype(np.uint32), words


def rans_decode(states: np.ndarray, words: np.ndarray, table: np.ndarray, freq: np.ndarray, steps: int) -> np.ndarray:
    """Decode what :func:`rans_encode` wrote: symbols ``[lanes, steps]`` (uint8).

    Raises:
        ValueError: The words run out or are left over (a damaged value).
    """
    f_all = freq.astype(np.uint64)
    cum = np.zeros_like(f_all)
    cum[:, 1:] = np.cumsum(f_all, axis=1)[:, :-1]
    # slot -> symbol per table
    slot2sym = np.zeros((freq.shape[0], M), dtype=np.uint8)
    for i in range(freq.shape[0]):
        slot2sym[i] = np.repeat(np.arange(freq.shape[1], dtype=np.uint8), freq[i].astype(np.int64))
    lanes = states.shape[0]
    x = states.astype(np.uint64)
    out = np.empty((lanes, steps), dtype=np.uint8)
    w = words.astype(np.uint64)
    ptr = 0
    mask = np.uint64(M - 1)
    for t in range(steps):
        tb = table[:, t]
        slot = x & mask
        s = slot2sym[tb, slot]
        x = f_all[tb, s] * (x >> np.uint64(PROB_BITS)) + slot - cum[tb, s]
        m = x < _LOW
        k = int(m.sum())
        if ptr + k > w.size:
            raise ValueError("rANS stream is truncated")
        x[m] = (x[m] << np.uint64(16)) | w[ptr : ptr + k]
        ptr += k
        out[:, t] = s
    if ptr != w.size or not (x == _LOW).all():
        raise ValueError("rANS stream does not end where it should")
    return out


class CacheGenCodec(Codec):
    """Anchored deltas, layer-dependent quantization and rANS coding (see the module docstring)."""

    name = "cachegen"
    lossless = False

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Parameters, precise tokens, per-lane scales, tables, states and words (module docstring)."""
        g = geometry
        if not g.is_kv or g.tokens < 1:
            return None
        base_bits = self.settings.codec_bits or DEFAULT_BITS
        anchor = self.settings.codec_anchor
        x = to_float(data, g).permute(0, 1, 3, 4, 2).reshape(-1, g.tokens).numpy()  # [lanes, T]
        outliers = _outlier_tokens(x)
        regular = _anchor_mask(g.tokens, anchor)
        precise = regular.copy()
        precise[outliers] = True
        pscale, qp = _quantize_precise(x, precise)
        if anchor:
            recon = np.zeros_like(x)
            recon[:, precise] = qp * pscale[:, None]
            base = np.repeat(recon[:, regular], anchor, axis=1)[:, : g.tokens]
            mean = None
        else:
            rest = x[:, ~precise]
            mean = _f16s(rest.mean(axis=1) if rest.size else np.zeros(x.shape[0], np.float32))
            base = np.broadcast_to(mean[:, None], x.shape)
        resid = x - base
        rest = resid[:, ~precise]
        std = np.sqrt((rest * rest).mean(axis=1)) if rest.size else np.zeros(x.shape[0], np.float32)
        step = _f16(std * _GAUSS_SPAN / np.exp2(_lane_bits(g, base_bits)))
        q = np.clip(np.rint(resid / step[:, None]), -_HALF, _HALF)
        q[:, precise] = qp
        sym = (q + _HALF).astype(np.uint8)
        table = _tables(g, precise)
        n_tables = 2 * g.layers * g.parts
        counts = np.zeros((n_tables, ALPHABET), dtype=np.int64)
        np.add.at(counts, (table.reshape(-1), sym.reshape(-1)), 1)
        freq = normalize_freqs(counts)
        states, words = rans_encode(sym, table, freq)
        return b"".join(
            [
                _PARAMS.pack(base_bits, anchor, outliers.size),
                outliers.astype(np.uint16).tobytes(),
                pscale.astype(np.float16).tobytes(),
                b"" if mean is None else mean.astype(np.float16).tobytes(),
                step.astype(np.float16).tobytes(),
                _pack_tables(freq),
                states.tobytes(),
                _COUNT.pack(words.size),
                words.tobytes(),
            ]
        )

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Entropy-decode, then references plus dequantized residuals."""
        g = geometry
        base_bits, anchor, n_out = _PARAMS.unpack_from(body, 0)
        if not (1 <= base_bits <= 8):
            raise ValueError(f"cachegen parameter {base_bits} bits is out of range")
        lanes = g.layers * g.parts * g.heads * g.dim
        n_tables = 2 * g.layers * g.parts
        reader = _Reader(np.frombuffer(body, dtype=np.uint8), _PARAMS.size)
        outliers = reader.take(n_out, np.uint16).astype(np.int64)
        if outliers.size and outliers.max() >= g.tokens:
            raise ValueError("cachegen outlier token index is out of range")
        regular = _anchor_mask(g.tokens, anchor)
        precise = regular.copy()
        precise[outliers] = True
        pscale = reader.take(lanes, np.float16).astype(np.float32)
        mean = None if anchor else reader.take(lanes, np.float16).astype(np.float32)
        step = reader.take(lanes, np.float16).astype(np.float32)
        freq = _unpack_tables(reader, n_tables)
        states = reader.take(lanes, np.uint32)
        (n_words,) = _COUNT.unpack(reader.take(8, np.uint8).tobytes())
        words = reader.take(n_words, np.uint16)
        if reader.off != reader.buf.size:
            raise ValueError("cachegen body has trailing bytes")
        q = rans_decode(states, words, _tables(g, precise), freq, g.tokens).astype(np.float32) - _HALF
        recon_p = q[:, precise] * pscale[:, None]
        if anchor:
            recon = np.zeros_like(q)
            recon[:, precise] = recon_p
            base = np.repeat(recon[:, regular], anchor, axis=1)[:, : g.tokens]
            x = base + q * step[:, None]
        else:
            x = mean[:, None] + q * step[:, None]
        x[:, precise] = recon_p
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        from_float(t.view(g.layers, g.parts, g.heads, g.dim, g.tokens).permute(0, 1, 4, 2, 3), g, out)


#: A token whose value in some channel lies this many standard deviations from the channel's
#: mean is coded precisely (8 bits, like an anchor): attention-sink tokens carry huge, rare
#: values that the model attends to most, and clipping them costs far more quality than the
#: bits they take. At most one token in 8 is treated so.
OUTLIER_Z = 8.0


def _outlier_tokens(x: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the tokens to code precisely for their outliers."""
    if x.shape[1] < 2:
        return np.zeros(0, dtype=np.int64)
    m = x.mean(axis=1, keepdims=True)
    s = x.std(axis=1, keepdims=True) + 1e-12
    score = (np.abs(x - m) / s).max(axis=0)
    idx = np.flatnonzero(score > OUTLIER_Z)
    cap = max(1, x.shape[1] // 8)
    if idx.size > cap:
        idx = idx[np.argsort(score[idx])[::-1][:cap]]
    return np.sort(idx)


def _quantize_precise(x: np.ndarray, precise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-bit codes of the precise tokens with one scale per lane (absmax over those tokens)."""
    if not precise.any():
        return np.full(x.shape[0], 2.0**-24, np.float32), np.zeros((x.shape[0], 0), np.float32)
    p = x[:, precise]
    scale = _f16(np.abs(p).max(axis=1) / _HALF)
    return scale, np.clip(np.rint(p / scale[:, None]), -_HALF, _HALF)


def _f16s(x: np.ndarray) -> np.ndarray:
    """Signed values rounded to float16, as float32."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(np.float32)


ALPHABET = 256
_HALF = 127  # symbols are quantized values + 127 (0..254)
# A Gaussian quantized with step = std * 4.13 / 2^b carries about b bits of entropy (b >= 1):
# 4.13 = sqrt(2 pi e). So ``bits`` sets the rate a layer is coded at, whatever its spread.
_GAUSS_SPAN = float(np.sqrt(2 * np.pi * np.e))


def _anchor_mask(tokens: int, anchor: int) -> np.ndarray:
    """True at anchor tokens (none when ``anchor`` is 0: references are channel means)."""
    if not anchor:
        return np.zeros(tokens, dtype=bool)
    return (np.arange(tokens) % anchor) == 0


def _lane_bits(g: ChunkGeometry, base_bits: int) -> np.ndarray:
    per_layer = np.array(layer_bits(g.layers, base_bits), dtype=np.float32)
    return np.repeat(per_layer, g.parts * g.heads * g.dim)


def _tables(g: ChunkGeometry, is_anchor: np.ndarray) -> np.ndarray:
    """Table index per lane and token: 2 * (layer * parts + part) + (0 for precise tokens, 1 for the rest)."""
    lp = np.repeat(np.arange(g.layers * g.parts), g.heads * g.dim)
    return (2 * lp)[:, None] + (~is_anchor)[None, :].astype(np.int64)


def _pack_tables(freq: np.ndarray) -> bytes:
    """Each table as its first used symbol, how many follow (uint8, uint16) and their frequencies."""
    out = []
    for row in freq:
        used = np.flatnonzero(row)
        lo, hi = int(used[0]), int(used[-1])
        out.append(_TABLE.pack(lo, hi - lo + 1) + row[lo : hi + 1].tobytes())
    return b"".join(out)


def _unpack_tables(reader: _Reader, n_tables: int) -> np.ndarray:
    freq = np.zeros((n_tables, ALPHABET), dtype=np.uint16)
    for i in range(n_tables):
        lo, n = _TABLE.unpack(reader.take(_TABLE.size, np.uint8).tobytes())
        if lo + n > ALPHABET:
            raise ValueError("cachegen frequency table is damaged")
        freq[i, lo : lo + n] = reader.take(n, np.uint16)
    if (freq.astype(np.int64).sum(axis=1) != M).any():
        raise ValueError("cachegen frequency tables are damaged")
    return freq


class _Reader:
    """Sequential typed reads from a body, with bounds checks."""

    def __init__(self, buf: np.ndarray, off: int) -> None:
        self.buf = buf
        self.off = off

    def take(self, n: int, dtype: type) -> np.ndarray:
        size = n * np.dtype(dtype).itemsize
        if self.off + size > self.buf.size:
            raise ValueError("cachegen body is truncated")
        arr = self.buf[self.off : self.off + size].view(dtype)
        self.off += size
        return arr


def _f16(x: np.ndarray) -> np.ndarray:
    """Scales rounded to float16 (positive, so a zero range still divides), as float32."""
    return np.clip(x, 2.0**-24, 65504.0).astype(np.float16).astype(np.float32)
