"""``cachegen``: a CacheGen-style codec (Liu et al., SIGCOMM'24): deltas, layer-dependent bins, rANS.

Three steps, after CacheGen:

1. **Deltas against references.** With ``codec_anchor=A`` the chunk's tokens are split into
   groups of ``A``; the first token of each group is an *anchor*, quantized on its own (8 bits,
   scaled per channel), and every other token is coded as its difference from the reconstructed
   anchor. With ``codec_anchor=0`` (the default) the reference of every token is its channel's
   mean over the chunk: on SmolLM2-135M neighbouring tokens are barely correlated, so a delta
   against an anchor 1-15 tokens away spreads wider than the value itself (``lmcache bench
   codec`` measures both), while keys' large per-channel offsets make the mean worth removing.
   Keys are first rotated back by RoPE (body version 2) when that explains them: RoPE turns a
   channel pair's steady offset into a circle the mean cannot remove; the encoder tries the
   common bases (:data:`ROPE_THETAS`, positions relative to the chunk) and keeps the one that
   leaves the least energy after centring, if any beats none by 10%, and records it; decoding
   rotates the keys again (on SmolLM2-135M: 1.7x less energy, 16% less KL at the same size).
2. **Layer-dependent quantization.** Residuals are quantized per channel (one step per layer,
   K/V part, head and channel) with the step set from the channel's spread so that a channel
   is coded at about the planned bits per value (:func:`plan_bits`): a measured plan of bits
   per layer for keys and for values (mean 3 bits per symbol at the default ``codec_bits=4``;
   each bit of ``codec_bits`` shifts the whole plan by one bit), which gives every layer-part
   the same share of the measured loss of quality instead of fixed thirds. Tokens with
   outliers (a value 8 standard deviations from its channel's mean: attention sinks) are
   coded like anchors, at 8 bits, instead of clipped.
3. **Entropy coding.** The symbols are coded with rANS (range asymmetric numeral systems) with
   one frequency table per layer and K/V part for the regular tokens, and one per K/V part for
   the precise tokens of all layers (body version 3; their few symbols do not pay for a table
   per layer). The
   symbols, in chunk order ``[layer, part, token, head, dim]``, are dealt round-robin to
   ``S`` interleaved streams (symbol ``i`` to stream ``i % S``; one per 512 symbols, at most 1024): one decoding
   step decodes ``S`` consecutive symbols and writes ``S`` consecutive output elements, and the
   16-bit words of all streams are interleaved in the order the decoder consumes them.

The coder runs in C (:mod:`lmcache.serde.cachegen_native`: decode, dequantize and write the
chunk's dtype in one pass), or, where no C compiler is available, in numpy (the same
arithmetic: the same words and the same decoded bytes, only slower). On a GPU,
:func:`decode_into_tensor` entropy-decodes on the CPU and dequantizes with a Triton kernel
(:mod:`lmcache.kernels.cachegen_triton`).

Body layout (body version 3 in the codec header, and a format byte 0xC4 first in the body):
format byte, base bits, anchor stride, outlier tokens, streams, RoPE base (float32; 0: keys not
rotated); the outlier token indices (uint16); per-lane scales of the precise tokens (only when
there are any), channel means (float16; without anchors) and steps; the frequency tables
(first used symbol, count, uint16 frequencies): each layer-part's for its regular tokens, then
one per part (keys, values) for the precise tokens of every layer; the streams' initial decoder
states (uint32); the number of words, then the words. Lanes are ``(layer, part, head,
channel)`` in that order. Scales and steps are 8-bit log codes (16 per octave,
:func:`_to_log`): an int16 base code per layer-part, then a byte per lane; the parser expands
them to float32 and the shared tables to one per layer-part, so every decoder reads them as it
read version 2's. Body version 2 (format byte 0xC3) has float16 scales and steps and a table
per layer-part for the precise tokens (before its regular tokens' table), and version 1
(0xC2, written before RoPE) is version 2 without the RoPE base; both are still read. The first
format, body version 0, which began with the bits byte, is refused (a counted miss), as
readers from before body versions refuse the later ones (their format byte is not 1-8).
"""

from __future__ import annotations

import dataclasses
import functools
import struct

import numpy as np
import torch

from lmcache.serde import cachegen_native
from lmcache.serde.codec import ChunkGeometry, Codec
from lmcache.serde.quant import from_float, to_float

__all__ = [
    "CacheGenCodec",
    "ParsedBody",
    "decode_into_tensor",
    "layer_bits",
    "layer_report",
    "parse_body",
    "plan_bits",
    "rans_decode",
    "rans_encode",
]

PROB_BITS = 12
M = 1 << PROB_BITS
_LOW = 1 << 16  # the state lives in [2^16, 2^32); renormalization moves 16-bit words
ANCHOR_BITS = 8
FORMAT = 0xC4  # format 4 (body version 3): format 3's fields, steps and scales as 8-bit log codes
FORMAT_V2 = 0xC3  # format 3 (body version 2): format 2's fields and RoPE's theta
FORMAT_V1 = 0xC2  # format 2 (body version 1); a format-1 body began with its bits (1-8)
_FORMATS = {1: FORMAT_V1, 2: FORMAT_V2, 3: FORMAT}
#: Log codes per octave of the 8-bit steps and scales (body version 3): a code ``c`` is
#: ``2 ** (c / 16)``, with the 16 mantissas rounded to float16 so every decoder builds the same
#: float32 values by an exact ``ldexp``; one int16 base code per layer-part, then a byte per lane.
LOG_STEPS = 16
_MANT = np.array([2.0 ** (i / LOG_STEPS) for i in range(LOG_STEPS)], dtype=np.float16).astype(np.float32)
_LOG_LO, _LOG_HI = -24 * LOG_STEPS, 16 * LOG_STEPS  # float16's range: 2^-24 .. 2^16
#: Interleaved rANS streams per chunk (fewer for tiny chunks): enough independent work per
#: step for the C loop and for numpy, few enough that their states cost under 1% of a body.
STREAMS = 1024
_COUNT = struct.Struct("<Q")
_PARAMS_V1 = struct.Struct("<BBHHH")  # format, base bits, anchor stride, outlier tokens, streams
_PARAMS = struct.Struct("<BBHHHf")  # the same, then RoPE's theta (0: keys are not rotated)
#: RoPE bases tried on a chunk's keys (Llama 2 and most others, SmolLM2, Llama 3, Qwen 2): the
#: one that leaves the least energy after centring is used, if it beats none by ROPE_GAIN.
ROPE_THETAS = (1e4, 1e5, 5e5, 1e6)
ROPE_GAIN = 0.9
_TABLE = struct.Struct("<BH")
DEFAULT_BITS = 4


def layer_bits(layers: int, base: int) -> list[int]:
    """Bits of the values per layer: ``base`` for the first third, one less, then two less (at least 2).

    The floor is measured: on SmolLM2-135M, 1-bit deep layers cost more quality per byte saved
    than 2 bits everywhere (``lmcache bench codec``; docs/codecs.md).
    """
    return [max(min(2, base), base - (3 * i) // max(1, layers)) for i in range(layers)]


#: Planned bits per layer at ``codec_bits=4``, keys then values, for 30 layers by depth
#: (SmolLM2-135M's 30 layers; other depths are sampled at the same relative depth). Measured,
#: not assumed: starting from a plan, one layer-part at a time was coded with one bit less and
#: the rise of the mean KL of the next-token distribution recorded (``lmcache bench codec``'s
#: quality measure, 4 documents of real text); with a layer-part's KL modelled as
#: ``w * 4**-bits``, the bits that minimize the total KL at a given mean give every
#: layer-part the same share of it (reverse water-filling), rounded to half bits, 1.5 at
#: least. Two rounds (from the first plan's thirds, then from the first round's plan), at a
#: mean of 3 bits per symbol (docs/codecs.md, *the measured bit plan*). They overturned the
#: thirds: values of layers 2-10 matter as much as keys and need more bits than the thirds
#: gave them, keys of layers 17-25 more than those of layers 4-16, and values past layer 11
#: need about 2 bits, the last few 1.5.
_KEY_PLAN = (
    3.0, 3.5, 4.0, 3.5, 3.0, 3.0, 3.0, 3.0, 3.5, 3.5, 3.0, 3.0, 3.0, 3.5, 2.5,
    3.0, 3.5, 4.0, 4.0, 4.0, 3.5, 3.5, 3.5, 4.0, 3.5, 3.5, 3.0, 3.5, 3.0, 3.0,
)  # fmt: skip
_VALUE_PLAN = (
    2.5, 3.0, 3.5, 4.0, 4.0, 4.5, 4.0, 4.0, 4.0, 4.0, 3.0, 2.0, 2.0, 2.5, 2.5,
    2.5, 2.0, 2.5, 2.5, 2.5, 2.5, 2.0, 2.0, 2.5, 2.0, 2.0, 1.5, 1.5, 1.5, 1.5,
)  # fmt: skip
#: The fewest and most bits a layer-part is planned at: under 1.5 bits the step spans over
#: 1.5 standard deviations; past 6, the 8-bit symbols clip values beyond about 8 (``_steps``).
_MIN_BITS, _MAX_BITS = 1.5, 6.0


def plan_bits(layers: int, parts: int, base: int) -> list[tuple[float, ...]]:
    """Planned bits per layer and part (keys, then values; an MLA latent is planned as keys).

    The measured plan (``_KEY_PLAN``, ``_VALUE_PLAN``: mean 3 bits per symbol at ``base``
    4) shifted by ``base - 4`` bits, sampled at each layer's relative depth for other layer
    counts, and kept within 1.5 (1 at ``base`` 1) and 6 bits.
    """
    floor = min(_MIN_BITS, float(base))
    rows = []
    for i in range(layers):
        j = min(len(_KEY_PLAN) - 1, (2 * i + 1) * len(_KEY_PLAN) // (2 * max(1, layers)))
        key = min(_MAX_BITS, max(floor, _KEY_PLAN[j] + base - DEFAULT_BITS))
        value = min(_MAX_BITS, max(floor, _VALUE_PLAN[j] + base - DEFAULT_BITS))
        rows.append((key, value) if parts == 2 else (key,))
    return rows


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


def _cum(freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f_all = freq.astype(np.uint64)
    cum = np.zeros_like(f_all)
    cum[:, 1:] = np.cumsum(f_all, axis=1)[:, :-1]
    return f_all, cum


def rans_encode(sym: np.ndarray, table: np.ndarray, freq: np.ndarray, streams: int) -> tuple[np.ndarray, np.ndarray]:
    """Encode symbols ``sym`` (flat, uint8) with tables ``table`` (flat, per symbol) in numpy.

    Symbol ``i`` goes to stream ``i % streams``; the C coder (:func:`cachegen_native.encode`)
    writes the same states and words.

    Returns:
        The decoder's initial states (uint32 per stream) and the 16-bit words in decoder order.
    """
    f_all, cum = _cum(freq)
    n = sym.size
    x = np.full(streams, _LOW, dtype=np.uint64)
    emitted: list[np.ndarray] = []
    for start in range(((n - 1) // streams) * streams, -1, -streams):
        m = min(streams, n - start)
        tb, s = table[start : start + m], sym[start : start + m]
        f = f_all[tb, s]
        c = cum[tb, s]
        xs = x[:m]
        big = xs >= (f << np.uint64(20))
        emitted.append((xs[big] & np.uint64(0xFFFF)).astype(np.uint16))
        xs[big] >>= np.uint64(16)
        x[:m] = ((xs // f) << np.uint64(PROB_BITS)) + (xs % f) + c
    words = np.concatenate(emitted[::-1]) if emitted else np.zeros(0, np.uint16)
    return x.astype(np.uint32), words


def rans_decode(states: np.ndarray, words: np.ndarray, table: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """Decode what :func:`rans_encode` wrote, in numpy: the symbols (flat, uint8).

    Raises:
        ValueError: The words run out or are left over (a damaged value).
    """
    f_all, cum = _cum(freq)
    slot2sym = np.zeros((freq.shape[0], M), dtype=np.uint8)
    for i in range(freq.shape[0]):
        slot2sym[i] = np.repeat(np.arange(freq.shape[1], dtype=np.uint8), freq[i].astype(np.int64))
    streams, n = states.shape[0], table.size
    x = states.astype(np.uint64)
    out = np.empty(n, dtype=np.uint8)
    w = words.astype(np.uint64)
    ptr = 0
    mask = np.uint64(M - 1)
    for start in range(0, n, streams):
        m = min(streams, n - start)
        tb = table[start : start + m]
        xs = x[:m]
        slot = xs & mask
        s = slot2sym[tb, slot]
        xs = f_all[tb, s] * (xs >> np.uint64(PROB_BITS)) + slot - cum[tb, s]
        low = xs < _LOW
        k = int(low.sum())
        if ptr + k > w.size:
            raise ValueError("rANS stream is truncated")
        xs[low] = (xs[low] << np.uint64(16)) | w[ptr : ptr + k]
        ptr += k
        x[:m] = xs
        out[start : start + m] = s
    if ptr != w.size or not (x == _LOW).all():
        raise ValueError("rANS stream does not end where it should")
    return out


@dataclasses.dataclass
class ParsedBody:
    """A cachegen body, parsed and checked (everything a decoder needs)."""

    base_bits: int
    anchor: int
    outliers: np.ndarray
    #: Per token: 1 when coded against its reference, 0 for precise (anchor or outlier) tokens.
    regular: np.ndarray
    pscale: np.ndarray
    mean: np.ndarray | None
    step: np.ndarray
    freq: np.ndarray
    states: np.ndarray
    words: np.ndarray
    #: ``(layer-parts, tokens, heads * dim)``.
    shape: tuple[int, int, int]
    #: RoPE's base when the keys were rotated back before coding (body version 2), else 0.
    rope_theta: float = 0.0
    parts: int = 2
    dim: int = 1

    def rope(self) -> tuple[np.ndarray, np.ndarray, int, int] | None:
        """RoPE tables: cos, sin ``[tokens, dim / 2]`` (float32), parts, head dim; None if keys are not rotated."""
        if not self.rope_theta:
            return None
        cos, sin = rope_tables(self.shape[1], self.dim, self.rope_theta)
        return cos, sin, self.parts, self.dim

    @property
    def ref(self) -> np.ndarray:
        """Per-lane reference of the regular tokens in mean mode (zeros with anchors)."""
        return self.mean if self.mean is not None else np.zeros_like(self.step)


def parse_body(body: memoryview | bytes, g: ChunkGeometry, version: int | None = None) -> ParsedBody:
    """Parse and check a cachegen body of geometry ``g`` (body version 1-3; ``version``: the header's).

    Raises:
        ValueError: A body of another format (or not of ``version``), or damaged.
    """
    if len(body) < _PARAMS_V1.size:
        raise ValueError("cachegen body is truncated")
    fmt = body[0]
    if fmt not in _FORMATS.values() or (version is not None and fmt != _FORMATS.get(version)):
        raise ValueError(f"cachegen body of format {'1' if 1 <= fmt <= 8 else hex(fmt)} is not read by this lmcache")
    params = _PARAMS_V1 if fmt == FORMAT_V1 else _PARAMS
    if len(body) < params.size:
        raise ValueError("cachegen body is truncated")
    _fmt, base_bits, anchor, n_out, streams, *rest = params.unpack_from(body, 0)
    theta = float(rest[0]) if rest else 0.0
    if theta and not (anchor == 0 and g.parts == 2 and g.dim % 2 == 0 and 1.0 <= theta <= 1e9):
        raise ValueError(f"cachegen RoPE theta {theta} does not fit the body")
    if not (1 <= base_bits <= 8):
        raise ValueError(f"cachegen parameter {base_bits} bits is out of range")
    lp, hd = g.layers * g.parts, g.heads * g.dim
    lanes, n = lp * hd, lp * g.tokens * hd
    if not (1 <= streams <= min(n, cachegen_native.MAX_STREAMS)):
        raise ValueError(f"cachegen body has {streams} streams")
    reader = _Reader(np.frombuffer(body, dtype=np.uint8), params.size)
    outliers = reader.take(n_out, np.uint16).astype(np.int64)
    if outliers.size and outliers.max() >= g.tokens:
        raise ValueError("cachegen outlier token index is out of range")
    precise = _anchor_mask(g.tokens, anchor)
    precise[outliers] = True
    log = fmt == FORMAT  # body version 3: steps and precise scales as 8-bit log codes
    lib = cachegen_native.library()

    def halves() -> np.ndarray:
        h = reader.take(lanes, np.float16)
        # in C where it is built: numpy's float16 loop cost a tenth of a chunk's decode
        return h.astype(np.float32) if lib is None else cachegen_native.half_to_float(lib, h)

    def scales() -> np.ndarray:
        if log:
            base = reader.take(lp, np.int16)
            if base.size and (base.min() < _LOG_LO or base.max() > _LOG_HI - 255):
                raise ValueError("cachegen step code is out of range")
            codes = reader.take(lanes, np.uint8)
            if lib is not None:
                return cachegen_native.log_values(lib, base, codes.reshape(lp, hd), _LOG_VALUES, _LOG_LO)
            return _from_log(base.astype(np.int64)[:, None] + codes.astype(np.int64).reshape(lp, hd)).reshape(-1)
        return halves()

    pscale = scales() if precise.any() else np.zeros(lanes, np.float32)
    mean = None if anchor else halves()
    step = scales()
    if log:  # the regular tokens' tables, then the precise tokens' tables shared by every layer
        freq = np.empty((2 * lp, ALPHABET), dtype=np.uint16)
        freq[1::2] = _take_tables(reader, lib, lp)
        freq[0::2] = _take_tables(reader, lib, g.parts)[np.arange(lp) % g.parts]
    else:
        freq = _take_tables(reader, lib, 2 * lp)
    states = reader.take(streams, np.uint32)
    (n_words,) = _COUNT.unpack(reader.take(8, np.uint8).tobytes())
    if n_words > n:
        raise ValueError("cachegen body has more words than symbols")
    words = reader.take(n_words, np.uint16)
    if reader.off != reader.buf.size:
        raise ValueError("cachegen body has trailing bytes")
    regular = (~precise).astype(np.uint8)
    return ParsedBody(
        base_bits, anchor, outliers, regular, pscale, mean, step, freq, states, words, (lp, g.tokens, hd),
        theta, g.parts, g.dim,
    )  # fmt: skip


def _take_tables(reader: _Reader, lib: object | None, n_tables: int) -> np.ndarray:
    """``n_tables`` packed frequency tables from ``reader`` (in C when ``lib`` is given)."""
    if lib is None:
        return _unpack_tables(reader, n_tables)
    # in C: the Python loop over tables costs as much as decoding them
    freq, used = cachegen_native.unpack_tables(lib, reader.buf[reader.off :], n_tables)  # type: ignore[arg-type]
    reader.off += used
    return freq


def _from_log(code: np.ndarray) -> np.ndarray:
    """float32 values of log codes (``2 ** (code / LOG_STEPS)``, exactly as every decoder has them)."""
    return _LOG_VALUES[code - _LOG_LO]


#: Every code's value, ``_LOG_LO`` first: one lookup per lane when a body is parsed.
_LOG_VALUES = np.ldexp(
    _MANT[np.arange(_LOG_LO, _LOG_HI + 1) % LOG_STEPS], np.arange(_LOG_LO, _LOG_HI + 1) // LOG_STEPS
).astype(np.float32)


def _to_log(x: np.ndarray, *, up: bool) -> tuple[np.ndarray, np.ndarray]:
    """8-bit log codes of positive ``x`` ``[layer-parts, lanes]``: int16 base per row, uint8 per lane.

    ``up`` rounds each code up (a scale that must not clip its codes), else to nearest. A row's
    base is its largest code less 255: a lane more than 16 octaves below its row's largest is
    coded at the smallest code (a coarser step for a lane that is all but constant).
    """
    lg = np.log2(np.clip(x.astype(np.float64), 2.0**-24, 65504.0)) * LOG_STEPS
    code = np.ceil(lg - 1e-9) if up else np.rint(lg)
    code = np.clip(code, _LOG_LO, _LOG_HI).astype(np.int64)
    base = np.maximum(code.max(axis=1), _LOG_LO + 255) - 255
    return base.astype(np.int16), np.clip(code - base[:, None], 0, 255).astype(np.uint8)


def _symbol_tables(p: ParsedBody | tuple[int, int, int], regular: np.ndarray) -> np.ndarray:
    """Table index of every symbol (flat, chunk order): ``2 * layer-part + regular[token]``."""
    lp, t, hd = p.shape if isinstance(p, ParsedBody) else p
    idx = 2 * np.arange(lp, dtype=np.int64)[:, None] + regular[None, :].astype(np.int64)
    return np.broadcast_to(idx[:, :, None], (lp, t, hd)).reshape(-1)


def _dequantize(p: ParsedBody, sym: np.ndarray) -> np.ndarray:
    """float32 values ``[layer-parts, tokens, heads * dim]`` of the symbols (the numpy path)."""
    lp, t, hd = p.shape
    q = sym.reshape(lp, t, hd).astype(np.float32) - _HALF
    pscale, step = p.pscale.reshape(lp, 1, hd), p.step.reshape(lp, 1, hd)
    precise = p.regular == 0
    recon_p = q[:, precise] * pscale
    if p.anchor:
        recon = np.zeros_like(q)
        recon[:, precise] = recon_p
        base = np.repeat(recon[:, :: p.anchor], p.anchor, axis=1)[:, :t]
        x = base + q * step
    else:
        x = p.ref.reshape(lp, 1, hd) + q * step
    x[:, precise] = recon_p
    rope = p.rope()
    if rope is not None:
        x[:: p.parts] = _rotate(x[:: p.parts], rope[0], rope[1], p.dim)
    return x


@functools.lru_cache(maxsize=64)
def rope_tables(tokens: int, dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """RoPE's cos and sin ``[tokens, dim / 2]`` (float32, read-only) at positions ``0..tokens-1``.

    Positions are relative to the chunk: a chunk that starts at position ``p`` has keys rotated
    by ``p`` more, a constant rotation per channel pair that the channel means absorb. Cached:
    every chunk of a model has the same few (tokens, dim, base), and building the tables cost
    a tenth of a chunk's decode (and the encoder's base search builds them for every candidate).
    """
    inv = float(theta) ** (-np.arange(dim // 2, dtype=np.float64) * 2.0 / dim)
    ang = np.arange(tokens, dtype=np.float64)[:, None] * inv[None, :]
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, dim: int) -> np.ndarray:
    """Rows ``[n, tokens, heads * dim]`` (float32) rotated by RoPE's angles (rotate-half pairs).

    ``lo = a * cos - b * sin``, ``hi = b * cos + a * sin``, each product rounded to float32:
    the C decoder and the Triton kernel compute exactly this. With ``-sin``, the inverse.
    """
    n, t, hd = x.shape
    y = x.reshape(n, t, hd // dim, dim)
    h = dim // 2
    a, b = y[..., :h], y[..., h:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return np.concatenate([a * c - b * s, b * c + a * s], axis=-1).reshape(n, t, hd)


def _pick_rope(keys: np.ndarray, dim: int) -> float:
    """The RoPE base that best explains keys ``[layers, tokens, heads * dim]`` (float32), or 0.

    Keys are RoPE-rotated by their position, so a channel pair with a steady direction before
    RoPE circles around after it, and its channel means cannot remove it; rotated back by the
    right base, the pairs' offsets return and centring removes them (on SmolLM2-135M the keys'
    energy after centring falls by about 1.7x, docs/codecs.md). Tried on a few layers; the
    base is kept only if it leaves under ``ROPE_GAIN`` of plain centring's energy.
    """
    t = keys.shape[1]
    if t < 8 or dim % 2:
        return 0.0
    sample = keys[:: max(1, keys.shape[0] // 4)]

    def energy(y: np.ndarray) -> float:
        return float(((y - y.mean(axis=1, keepdims=True)) ** 2).mean())

    best, best_e = 0.0, energy(sample) * ROPE_GAIN
    for theta in ROPE_THETAS:
        cos, sin = rope_tables(t, dim, theta)
        e = energy(_rotate(sample, cos, -sin, dim))
        if e < best_e:
            best, best_e = theta, e
    return best


class CacheGenCodec(Codec):
    """Anchored deltas, layer-dependent quantization and rANS coding (see the module docstring)."""

    name = "cachegen"
    lossless = False
    #: 3: steps and precise scales as 8-bit log codes (format 0xC4); 2 (0xC3: float16 ones, keys
    #: rotated back by RoPE when that helps) and 1 (0xC2, the same without RoPE) are still read;
    #: 0, the first (per-lane streams), is refused.
    body_version = 3

    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """Parameters, precise tokens, per-lane scales, tables, states and words (module docstring)."""
        g = geometry
        if not g.is_kv or g.tokens < 1:
            return None
        enc = _encode(to_float(data, g), g, self.settings.codec_bits or DEFAULT_BITS, self.settings.codec_anchor)
        return enc.body

    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Decode a body of the current version (see :meth:`decode_body_version`)."""
        self.decode_body_version(body, geometry, out, self.body_version)

    def decode_body_version(self, body: memoryview, geometry: ChunkGeometry, out: memoryview, version: int) -> None:
        """Entropy-decode, then references plus dequantized residuals (keys rotated by RoPE in version 2)."""
        if version not in (1, 2, 3):
            raise ValueError(f"cachegen body version {version} is not one this lmcache reads")
        p = parse_body(body, geometry, version)
        lib = cachegen_native.library()
        if lib is None:
            x = _dequantize(p, _decode_symbols(p, None))
            from_float(torch.from_numpy(x), geometry, out)
            return
        if geometry.dtype == "bfloat16":
            dst = np.frombuffer(out, dtype=np.uint16)
            _c_decode(lib, p, cachegen_native.OUT_BF16, dst)
        elif geometry.dtype == "float32":
            dst = np.frombuffer(out, dtype=np.float32)
            _c_decode(lib, p, cachegen_native.OUT_F32, dst)
        else:  # float16: float32 first, rounded by torch exactly as the numpy path rounds
            tmp = np.empty(geometry.numel, dtype=np.float32)
            _c_decode(lib, p, cachegen_native.OUT_F32, tmp)
            from_float(torch.from_numpy(tmp), geometry, out)


def _c_decode(lib: object, p: ParsedBody, kind: int, out: np.ndarray, *, simd: int = cachegen_native.SIMD_AUTO) -> None:
    """Run the C decoder on a parsed body: symbols (``OUT_SYMBOLS``) or values into ``out``.

    ``simd``: the loop (``cachegen_native.SIMD_*``; every one writes the same bytes, tests run each).
    """
    cachegen_native.decode(
        lib,  # type: ignore[arg-type]
        p.states,
        p.words,
        p.freq,
        shape=p.shape,
        regular=p.regular,
        anchor=p.anchor,
        lane_params=None if kind == cachegen_native.OUT_SYMBOLS else (p.pscale, p.ref, p.step),
        out_kind=kind,
        out=out,
        simd=simd,
        rope=None if kind == cachegen_native.OUT_SYMBOLS else p.rope(),
    )


def _decode_symbols(p: ParsedBody, lib: object | None) -> np.ndarray:
    """The symbols of a parsed body (flat, chunk order, uint8), in C when ``lib`` is given."""
    if lib is None:
        return rans_decode(p.states, p.words, _symbol_tables(p, p.regular), p.freq)
    out = np.empty(int(np.prod(p.shape)), dtype=np.uint8)
    _c_decode(lib, p, cachegen_native.OUT_SYMBOLS, out)
    return out


@dataclasses.dataclass
class _Encoded:
    body: bytes
    sym: np.ndarray
    freq: np.ndarray
    regular: np.ndarray
    side_bytes: int


def _encode(
    t: torch.Tensor,
    g: ChunkGeometry,
    base_bits: int,
    anchor: int,
    native: bool | None = None,
    *,
    rope: bool = True,
    version: int = 3,
) -> _Encoded:
    """Quantize and entropy-code a float32 chunk (``g.shape``); ``native=False`` forces numpy.

    ``rope=False`` never rotates the keys (the body then decodes like a version 1 body's).
    ``version=2`` writes a body version 2 body (float16 steps and scales), for tests.
    """
    log = version >= 3
    lp, hd = g.layers * g.parts, g.heads * g.dim
    x = t.reshape(lp, g.tokens, hd).numpy()
    theta = _pick_rope(x[:: g.parts], g.dim) if rope and anchor == 0 and g.parts == 2 else 0.0
    if theta:  # code the keys as they were before RoPE rotated them (decoding rotates them again)
        cos, sin = rope_tables(g.tokens, g.dim, theta)
        x = x.copy()
        x[:: g.parts] = _rotate(x[:: g.parts], cos, -sin, g.dim)
    outliers = _outlier_tokens(x)
    precise = _anchor_mask(g.tokens, anchor)
    precise[outliers] = True
    pscale, qp, pscale_code = _quantize_precise(x, precise, log=log)
    if anchor:
        recon = np.zeros_like(x)
        recon[:, precise] = qp * pscale[:, None, :]
        base = np.repeat(recon[:, ::anchor], anchor, axis=1)[:, : g.tokens]
        mean = None
    else:
        rest = x[:, ~precise]
        mean = _f16s(rest.mean(axis=1) if rest.size else np.zeros((lp, hd), np.float32))
        base = mean[:, None, :]
    resid = x - base
    rest = resid[:, ~precise]
    std = np.sqrt((rest * rest).mean(axis=1)) if rest.size else np.zeros((lp, hd), np.float32)
    step = _steps(std, g, base_bits)
    step_code = None
    if log:  # quantize with the step the decoder will see
        step_code = _to_log(step, up=False)
        step = _from_log(step_code[0].astype(np.int64)[:, None] + step_code[1])
    q = np.clip(np.rint(resid / step[:, None, :]), -_HALF, _HALF)
    q[:, precise] = qp
    sym = (q + _HALF).astype(np.uint8).reshape(-1)
    regular = (~precise).astype(np.uint8)
    lib = cachegen_native.library() if native is not False else None
    if lib is not None:
        counts = cachegen_native.count(lib, sym, shape=(lp, g.tokens, hd), regular=regular)
    else:
        counts = _counts(sym.reshape(lp, g.tokens, hd), precise)
    if log:  # one table per part for the precise tokens of every layer (their few symbols
        # would not pay for a table each: up to 255 entries for a few hundred symbols)
        by_lp = counts.reshape(lp, 2, ALPHABET).copy()
        shared = by_lp[:, 0].reshape(g.layers, g.parts, ALPHABET).sum(axis=0)
        by_lp[:, 0] = shared[np.arange(lp) % g.parts]
        counts = by_lp.reshape(2 * lp, ALPHABET)
    freq = normalize_freqs(counts)
    streams = _streams(sym.size)
    if lib is not None:
        states, words = cachegen_native.encode(lib, sym, streams, freq, shape=(lp, g.tokens, hd), regular=regular)
    else:
        states, words = rans_encode(sym, _symbol_tables((lp, g.tokens, hd), regular), freq, streams)
    head = b"".join(
        [
            _PARAMS.pack(_FORMATS[version], base_bits, anchor, outliers.size, streams, theta),
            outliers.astype(np.uint16).tobytes(),
            (_pack_scales(pscale, pscale_code) if precise.any() else b""),
            b"" if mean is None else mean.astype(np.float16).tobytes(),
            _pack_scales(step, step_code),
            _pack_body_tables(freq, g.parts, shared_precise=log),
            states.tobytes(),
            _COUNT.pack(words.size),
        ]
    )
    return _Encoded(head + words.tobytes(), sym, freq, regular, len(head))


#: Whether keys take one step per head (from the head's RMS spread) rather than per channel.
KEY_STEP_PER_HEAD = True


def _steps(std: np.ndarray, g: ChunkGeometry, base_bits: int) -> np.ndarray:
    """Quantization step per lane (``std``: ``[layer-parts, heads * dim]``), rounded to float16.

    A step of ``spread * 4.13 / 2**bits`` codes a Gaussian of that spread at about ``bits``
    bits. Values use their channel's own spread. Keys (and MLA latents) use the RMS spread of
    the channel's head, so all channels of a head share one step: for the same bits, the mean
    squared error over the head is lowest when it is even over the channels (wide channels get
    more bits, narrow ones fewer), which is what a query's dot product sees; but never a step
    finer than 6 bits of the channel's own spread would give (its symbols would clip).
    """
    bits = _layer_part_bits(g, base_bits)[:, None]
    spread = std
    if KEY_STEP_PER_HEAD:
        spread = std.copy()
        k = std.reshape(g.layers, g.parts, g.heads, g.dim)[:, 0]
        rms = np.sqrt((k * k).mean(axis=2, keepdims=True))
        kbits = bits.reshape(g.layers, g.parts, 1, 1)[:, 0]
        pooled = np.maximum(rms, k * np.exp2(kbits - 6))
        spread.reshape(g.layers, g.parts, g.heads, g.dim)[:, 0] = pooled
    return _f16(spread * _GAUSS_SPAN / np.exp2(bits))


def _pack_scales(x: np.ndarray, code: tuple[np.ndarray, np.ndarray] | None) -> bytes:
    """Per-lane steps or scales: float16 (body versions 1-2) or log codes (``code``, version 3)."""
    if code is None:
        return x.astype(np.float16).tobytes()
    return code[0].tobytes() + code[1].tobytes()


def _streams(n: int) -> int:
    """Streams for ``n`` symbols: one per 512 (a multiple of 16, the C loop's vector), at most 1024."""
    return min(n, STREAMS, max(16, (n // 512) // 16 * 16))


def _counts(sym: np.ndarray, precise: np.ndarray) -> np.ndarray:
    """Symbol counts ``[2 * layer-parts, 256]``: per layer-part, precise tokens then the rest."""
    lp = sym.shape[0]
    counts = np.zeros((lp, 2, ALPHABET), dtype=np.int64)
    offsets = (np.arange(lp, dtype=np.int32) * ALPHABET)[:, None, None]
    for kind, sel in ((0, precise), (1, ~precise)):
        if sel.any():
            keys = (sym[:, sel].astype(np.int32) + offsets).reshape(-1)
            counts[:, kind] = np.bincount(keys, minlength=lp * ALPHABET).reshape(lp, ALPHABET)
    return counts.reshape(2 * lp, ALPHABET)


def layer_report(
    data: memoryview | bytes, g: ChunkGeometry, base_bits: int = DEFAULT_BITS, anchor: int = 0
) -> list[dict]:
    """Where the bits of one encoded chunk go, per layer (``lmcache bench codec``'s table).

    Per layer: the planned bits, the coded bits per value of keys and values (from the
    frequency tables: ``log2(4096 / f)`` per symbol, what rANS spends to within a fraction of
    a percent) and the side information (per-lane scales, means, steps and tables; the
    streams' states and the outlier list are shared and spread evenly) per value.
    """
    enc = _encode(to_float(memoryview(data), g), g, base_bits, anchor)
    cost = np.log2(M / np.maximum(enc.freq.astype(np.float64), 1))
    table = _symbol_tables((g.layers * g.parts, g.tokens, g.heads * g.dim), enc.regular)
    sym_bits = cost[table, enc.sym].reshape(g.layers, g.parts, -1).sum(axis=2)
    per_part = g.tokens * g.heads * g.dim
    lanes_per_layer = g.parts * g.heads * g.dim
    total_lanes = g.layers * lanes_per_layer
    v3 = enc.body[0] == FORMAT  # the precise tokens' tables are shared by the layers
    fixed = _PARAMS.size + 2 * _outlier_count(enc) + 4 * _streams(enc.sym.size) + _COUNT.size
    all_tables = len(_pack_body_tables(enc.freq, g.parts, shared_precise=v3))
    lane_bytes = (enc.side_bytes - fixed - all_tables) / total_lanes
    shared = fixed + (len(_pack_tables(enc.freq[0 : 2 * g.parts : 2])) if v3 else 0)
    plan = plan_bits(g.layers, g.parts, base_bits)
    rows = []
    for layer in range(g.layers):
        rows_of_layer = enc.freq[2 * g.parts * layer : 2 * g.parts * (layer + 1)]
        tables = _pack_tables(rows_of_layer[1::2] if v3 else rows_of_layer)
        side = lane_bytes * lanes_per_layer + len(tables) + shared / g.layers
        rows.append(
            {
                "layer": layer,
                "planned_key_bits": plan[layer][0],
                "planned_value_bits": plan[layer][-1],
                "key_bits": float(sym_bits[layer, 0] / per_part),
                "value_bits": float(sym_bits[layer, -1] / per_part),
                "side_bits": float(8 * side / (g.parts * per_part)),
            }
        )
    return rows


def _outlier_count(enc: _Encoded) -> int:
    return int(_PARAMS.unpack_from(enc.body, 0)[3])


def decode_into_tensor(encoded: memoryview | bytes, out: torch.Tensor) -> None:
    """Decode an encoded cachegen value (codec header first) into tensor ``out``, CPU or GPU.

    On a CUDA tensor (or on the CPU under ``TRITON_INTERPRET=1`` when ``out`` is a CPU tensor and
    Triton is installed, which is how the tests run it) the entropy decoding runs on the CPU and
    the dequantization in :func:`lmcache.kernels.cachegen_triton.dequantize`: the symbols (one
    byte a value) travel to the device instead of the chunk. The result equals the CPU path's
    bit for bit.

    Raises:
        IntegrityError: Not a cachegen value, or damaged.
        InvalidArgumentError: ``out`` has the wrong size or dtype.
    """
    from lmcache.errors import IntegrityError, InvalidArgumentError
    from lmcache.kernels import cachegen_triton
    from lmcache.serde.codec import parse_codec_header

    view = memoryview(encoded)
    header = parse_codec_header(view)
    if header is None or header.codec != CacheGenCodec.name:
        raise IntegrityError("value is not a cachegen value")
    if header.body_version not in (1, 2, 3):
        raise IntegrityError(f"cachegen body version {header.body_version} is not one this lmcache reads")
    g = header.geometry
    if out.numel() != g.numel or str(out.dtype).removeprefix("torch.") != g.dtype or not out.is_contiguous():
        raise InvalidArgumentError(f"tensor {tuple(out.shape)} {out.dtype} does not hold a {g.shape} {g.dtype} chunk")
    try:
        if out.device.type == "cpu" and not cachegen_triton.interpreted():
            decode_out = out.view(torch.uint8).numpy().reshape(-1)
            body = view[header.body_offset :]
            CacheGenCodec().decode_body_version(body, g, memoryview(decode_out), header.body_version)
            return
        p = parse_body(view[header.body_offset :], g, header.body_version)
        sym = _decode_symbols(p, cachegen_native.library())
    except ValueError as exc:
        raise IntegrityError(f"value does not decode with codec 'cachegen': {exc}") from exc
    cachegen_triton.dequantize(sym, p, out)


#: A token whose value in some channel lies this many standard deviations from the channel's
#: mean is coded precisely (8 bits, like an anchor): attention-sink tokens carry huge, rare
#: values that the model attends to most, and clipping them costs far more quality than the
#: bits they take. At most one token in 8 is treated so.
OUTLIER_Z = 8.0


def _outlier_tokens(x: np.ndarray) -> np.ndarray:
    """Indices (sorted) of the tokens to code precisely for their outliers (``x``: ``[lp, T, hd]``)."""
    if x.shape[1] < 2:
        return np.zeros(0, dtype=np.int64)
    m = x.mean(axis=1, keepdims=True)
    s = x.std(axis=1, keepdims=True) + 1e-12
    score = (np.abs(x - m) / s).max(axis=(0, 2))
    idx = np.flatnonzero(score > OUTLIER_Z)
    cap = max(1, x.shape[1] // 8)
    if idx.size > cap:
        idx = idx[np.argsort(score[idx])[::-1][:cap]]
    return np.sort(idx)


def _quantize_precise(
    x: np.ndarray, precise: np.ndarray, *, log: bool = True
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """8-bit codes of the precise tokens with one scale per lane (absmax over those tokens).

    With ``log`` (body version 3) the scales are log codes rounded up, so no code clips.
    Returns the scales (as decoded), the codes and the scales' log codes (None without ``log``).
    """
    lp, _t, hd = x.shape
    if not precise.any():
        return np.full((lp, hd), 2.0**-24, np.float32), np.zeros((lp, 0, hd), np.float32), None
    p = x[:, precise]
    code = None
    if log:
        code = _to_log(np.abs(p).max(axis=1) / _HALF, up=True)
        scale = _from_log(code[0].astype(np.int64)[:, None] + code[1])
    else:
        scale = _f16(np.abs(p).max(axis=1) / _HALF)
    return scale, np.clip(np.rint(p / scale[:, None, :]), -_HALF, _HALF), code


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


def _layer_part_bits(g: ChunkGeometry, base_bits: int) -> np.ndarray:
    """Planned bits per (layer, part), in that order (:func:`plan_bits`)."""
    return np.array(plan_bits(g.layers, g.parts, base_bits), dtype=np.float32).reshape(-1)


def _pack_tables(freq: np.ndarray) -> bytes:
    """Each table as its first used symbol, how many follow (uint8, uint16) and their frequencies."""
    out = []
    for row in freq:
        used = np.flatnonzero(row)
        lo, hi = int(used[0]), int(used[-1])
        out.append(_TABLE.pack(lo, hi - lo + 1) + row[lo : hi + 1].tobytes())
    return b"".join(out)


def _pack_body_tables(freq: np.ndarray, parts: int, *, shared_precise: bool) -> bytes:
    """A body's tables: every row of ``freq`` (versions 1-2), or the regular tokens' then the shared.

    Version 3 writes each layer-part's table for its regular tokens, then the precise tokens'
    ``parts`` tables, which every layer shares.
    """
    if not shared_precise:
        return _pack_tables(freq)
    return _pack_tables(freq[1::2]) + _pack_tables(freq[0 : 2 * parts : 2])


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
