"""KV codecs: how one chunk's bytes are encoded for a tier, and the header that names the codec.

A codec turns one chunk of KV (the chunk format ``[layers, 2, tokens, kv_heads, head_dim]`` of
DESIGN.md, in its dtype) into bytes and back. Codecs see the geometry, so lossy ones quantize per
channel, per token or per layer. Encoded values start with a *codec header* that names the
codec and carries the geometry, so a reader decodes whatever wrote a value, whatever its own tier
is configured with; ``raw`` values (today's bytes) have no codec header and are stored unchanged,
so existing stores still read.

Codec header layout (little-endian), the first bytes of an encoded payload::

    0   4s  magic b"LMCC"
    4   B   codec header version (1)
    5   B   codec name length n (1..64)
    6   B   dtype name length m (1..32)
    7   B   body format version of the codec (0 for every codec's first format)
    8   5I  geometry: layers, parts (2, or 1 for MLA), tokens, heads, head dim
    28  Q   decoded size in bytes
    36  n   codec name (ASCII), then m bytes of dtype name
    ..  Q   xxh3-64 of everything before it
    ..      codec body

The value frame around it (:mod:`lmcache.serde.frame`, written by each byte-storing backend)
checksums the whole encoded payload, codec header included; the codec header's own check is
what tells an encoded value from a raw one (and a header damaged in an unchecked tier from data).
A codec that changes its body format bumps :attr:`Codec.body_version` and keeps decoding the
versions it wrote before (:meth:`Codec.decode_body_version`); a version it does not know is a miss.
Readers from before body versions ignore that byte, so a new body format must also differ in
length from the old one (their length check then refuses it: a miss, never garbage).

Codecs are found by name: built-ins (:data:`BUILTIN_CODECS`), then the entry-point group
``lmcache.codecs`` (name = codec name, value = ``package.module:Class``, a :class:`Codec`
subclass built with a :class:`CodecSettings`).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar
from urllib.parse import parse_qsl

import numpy as np
import xxhash

from lmcache.config import parse_bool, resolve_settings, setting
from lmcache.errors import ConfigError, IntegrityError, InvalidArgumentError, PluginConflictError

__all__ = [
    "BUILTIN_CODECS",
    "CODEC_MAGIC",
    "ENTRY_POINT_GROUP",
    "ChunkGeometry",
    "Codec",
    "CodecSettings",
    "EncodedHeader",
    "UnknownCodecError",
    "codec_names",
    "decode_value",
    "encode_value",
    "geometry_for",
    "get_codec",
    "make_codec",
    "parse_codec_header",
    "split_codec_query",
]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "lmcache.codecs"
CODEC_MAGIC = b"LMCC"
CODEC_HEADER_VERSION = 1
_FIXED = struct.Struct("<4sBBBB5IQ")  # 36 bytes
_CHECK = struct.Struct("<Q")
_NAME_RE = re.compile(r"[a-z][a-z0-9_+.-]{0,63}")
#: Element sizes of the dtypes codecs understand (lossless codecs take any bytes).
DTYPE_SIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint8": 1}


class UnknownCodecError(IntegrityError):
    """A value names a codec this process does not have (a counted miss, like corruption)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"value is encoded with codec {name!r}, which is not installed here")
        self.codec_name = name


@dataclasses.dataclass(frozen=True, slots=True)
class ChunkGeometry:
    """The shape and dtype of one chunk: ``[layers, parts, tokens, heads, dim]`` of ``dtype``."""

    layers: int
    parts: int
    tokens: int
    heads: int
    dim: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """The chunk's shape."""
        return (self.layers, self.parts, self.tokens, self.heads, self.dim)

    @property
    def numel(self) -> int:
        """Elements in the chunk."""
        return self.layers * self.parts * self.tokens * self.heads * self.dim

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return DTYPE_SIZES.get(self.dtype, 1)

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded chunk."""
        return self.numel * self.itemsize

    @classmethod
    def flat(cls, nbytes: int) -> ChunkGeometry:
        """Plain bytes (no KV geometry known): what lossless codecs encode when nothing else is."""
        return cls(1, 1, 1, 1, nbytes, "uint8")

    @property
    def is_kv(self) -> bool:
        """A floating-point KV geometry (what lossy codecs need)."""
        return self.dtype in ("float16", "bfloat16", "float32")


def geometry_for(model: str, nbytes: int) -> ChunkGeometry:
    """The geometry of a chunk of ``nbytes`` under a key whose model is ``name|<geometry identity>``.

    Keys made by :class:`~lmcache.engine.CacheEngine` carry the geometry identity in their model
    field (:meth:`~lmcache.layouts.KVGeometry.key_model`); the token count follows from the size.
    Anything else is :meth:`ChunkGeometry.flat` bytes.
    """
    from lmcache.layouts import KVGeometry  # torch-backed: only when a key names a geometry

    _, sep, ident = model.rpartition("|")
    if not sep:
        return ChunkGeometry.flat(nbytes)
    try:
        g = KVGeometry.from_identity(ident)
    except (InvalidArgumentError, KeyError):
        return ChunkGeometry.flat(nbytes)
    per_token = g.num_layers * g.kv_parts * g.num_kv_heads * g.head_dim * DTYPE_SIZES.get(g.dtype, 0)
    if g.dtype not in DTYPE_SIZES or per_token == 0 or nbytes % per_token:
        return ChunkGeometry.flat(nbytes)
    return ChunkGeometry(g.num_layers, g.kv_parts, nbytes // per_token, g.num_kv_heads, g.head_dim, g.dtype)


@dataclasses.dataclass(frozen=True)
class CodecSettings:
    """Options of the codecs, given as ``codec_*`` URL options or config keys.

    Each codec reads the options that concern it and ignores the rest.
    """

    codec: str = setting("raw", doc="Codec of values written to the tier (raw, zstd, lz4, fp8, int8, int4, cachegen…).")
    codec_level: int = setting(3, doc="Compression level of zstd (1-22) and lz4 (0-16).", min=0, max=22)
    codec_shuffle: bool = setting(
        True, doc="zstd/lz4: split 16-bit words into byte planes before compressing.", parse=parse_bool
    )
    codec_group: int = setting(
        64, doc="int4: elements per scale group (tokens for keys, channels for values).", min=8, max=4096
    )
    codec_bits: int = setting(
        0,
        doc="cachegen: quantization bits of the first layers (deeper layers get fewer); 0 = the codec's default.",
        min=0,
        max=8,
    )
    codec_anchor: int = setting(
        0, doc="cachegen: tokens per anchor (delta-encoding group); 0: deltas against channel means.", min=0, max=4096
    )

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.codec):
            raise ConfigError(f"codec name {self.codec!r} is not valid (lowercase letters, digits, _+.-)")


#: Option names (besides ``codec``) a tier URL may carry for its codec.
CODEC_OPTIONS = tuple(f.name for f in dataclasses.fields(CodecSettings))


class Codec(ABC):
    """Encodes one chunk into bytes and back.

    Subclasses set :attr:`name` and implement :meth:`encode_body`/:meth:`decode_body`. Both run
    on worker threads, never on the event loop, and must be thread-safe (no per-call state on
    ``self``). A lossy codec may refuse a geometry (return ``None`` from :meth:`encode_body`):
    the value is then stored ``raw``.

    Args:
        settings: The codec options.
    """

    name: ClassVar[str] = ""
    #: Whether decode(encode(x)) == x bit for bit.
    lossless: ClassVar[bool] = True
    #: Format version of the bodies :meth:`encode_body` writes (recorded in the codec header).
    body_version: ClassVar[int] = 0

    def __init__(self, settings: CodecSettings | None = None) -> None:
        self.settings = settings if settings is not None else CodecSettings(codec=self.name or "raw")

    @abstractmethod
    def encode_body(self, data: memoryview, geometry: ChunkGeometry) -> bytes | None:
        """The codec body for ``data`` (``geometry.nbytes`` bytes), or None to store it raw."""

    @abstractmethod
    def decode_body(self, body: memoryview, geometry: ChunkGeometry, out: memoryview) -> None:
        """Write the decoded chunk (``geometry.nbytes`` bytes) into ``out``.

        Raises:
            Exception: Any error means the value is unusable (a counted miss).
        """

    def decode_body_version(self, body: memoryview, geometry: ChunkGeometry, out: memoryview, version: int) -> None:
        """Decode a body of format ``version`` (from the codec header) into ``out``.

        The default reads :attr:`body_version` only; a codec that changed its format overrides
        this to keep reading the bodies its earlier versions wrote.

        Raises:
            Exception: Any error means the value is unusable (a counted miss).
        """
        if version != self.body_version:
            raise IntegrityError(f"codec {self.name!r} body version {version} is not one this lmcache reads")
        self.decode_body(body, geometry, out)

    def __repr__(self) -> str:
        return f"<codec {self.name}>"


# ---------------------------------------------------------------------------------------------
# The codec header


@dataclasses.dataclass(frozen=True, slots=True)
class EncodedHeader:
    """A parsed codec header."""

    codec: str
    geometry: ChunkGeometry
    decoded_len: int
    body_offset: int
    body_version: int = 0


def _pack_header(codec: str, g: ChunkGeometry, decoded_len: int, body_version: int = 0) -> bytes:
    name, dt = codec.encode(), g.dtype.encode()
    fixed = _FIXED.pack(CODEC_MAGIC, CODEC_HEADER_VERSION, len(name), len(dt), body_version, *g.shape, decoded_len)
    head = fixed + name + dt
    return head + _CHECK.pack(xxhash.xxh3_64_intdigest(head))


def parse_codec_header(buf: memoryview | bytes) -> EncodedHeader | None:
    """The codec header at the start of ``buf``, or None when ``buf`` is a raw value.

    Raises:
        IntegrityError: It is a codec header of a version this lmcache does not read.
    """
    if len(buf) < _FIXED.size + _CHECK.size or bytes(buf[:4]) != CODEC_MAGIC:
        return None
    _m, version, nlen, dlen, body_version, la, pa, to, he, di, dec = _FIXED.unpack_from(buf, 0)
    end = _FIXED.size + nlen + dlen
    if len(buf) < end + _CHECK.size:
        return None
    (check,) = _CHECK.unpack_from(buf, end)
    if xxhash.xxh3_64_intdigest(bytes(buf[:end])) != check:
        return None  # raw bytes that happen to start with the magic (or a damaged header)
    if version != CODEC_HEADER_VERSION:
        raise IntegrityError(f"value has codec header version {version}; this lmcache reads {CODEC_HEADER_VERSION}")
    name = bytes(buf[_FIXED.size : _FIXED.size + nlen]).decode("ascii", errors="replace")
    dtype = bytes(buf[_FIXED.size + nlen : end]).decode("ascii", errors="replace")
    g = ChunkGeometry(la, pa, to, he, di, dtype)
    return EncodedHeader(name, g, dec, end + _CHECK.size, body_version)


def encode_value(codec: Codec, data: memoryview, geometry: ChunkGeometry) -> memoryview | bytes:
    """``data`` as the tier should store it: the codec header and body, or ``data`` itself (raw).

    A codec that declines the geometry, or whose output would not be smaller than ``data``,
    stores it raw: a stored value is never larger than the chunk, so it always fits the
    reader's buffer.
    """
    if codec.name == "raw" or data.nbytes != geometry.nbytes:
        return data
    body = codec.encode_body(data, geometry)
    if body is None:
        return data
    head = _pack_header(codec.name, geometry, data.nbytes, codec.body_version)
    if len(head) + len(body) >= data.nbytes:
        return data
    return head + body


def decode_value(
    encoded: memoryview, out: memoryview, header: EncodedHeader | None = None, codec: Codec | None = None
) -> int:
    """Decode an encoded value (starting with its codec header) into ``out``; returns its size.

    ``codec`` decodes values of its name (e.g. the writer's own instance, registered or not);
    any other name is looked up in the registry.

    Raises:
        UnknownCodecError: The codec is not installed here.
        IntegrityError: The value does not decode (a miss).
        InvalidArgumentError: ``out`` is smaller than the decoded value.
    """
    header = header if header is not None else parse_codec_header(encoded)
    if header is None:
        raise IntegrityError("value has no codec header")
    if codec is None or codec.name != header.codec:
        codec = get_codec(header.codec)
    g = header.geometry
    if header.decoded_len != g.nbytes:
        raise IntegrityError(f"codec header says {header.decoded_len} bytes for geometry {g.shape} {g.dtype}")
    if out.nbytes < g.nbytes:
        raise InvalidArgumentError(f"buffer of {out.nbytes} bytes is smaller than the {g.nbytes}-byte value")
    try:
        codec.decode_body_version(encoded[header.body_offset :], g, out[: g.nbytes], header.body_version)
    except IntegrityError:
        raise
    except Exception as exc:  # any failure inside a codec is a damaged value, not a crash
        raise IntegrityError(f"value does not decode with codec {header.codec!r}: {type(exc).__name__}: {exc}") from exc
    return g.nbytes


# ---------------------------------------------------------------------------------------------
# Registry


#: Built-in codecs: name -> ``module:Class``; modules are imported on first use.
BUILTIN_CODECS: dict[str, str] = {
    "raw": "lmcache.serde.lossless:RawCodec",
    "zstd": "lmcache.serde.lossless:ZstdCodec",
    "lz4": "lmcache.serde.lossless:Lz4Codec",
    "fp8": "lmcache.serde.quant:Fp8Codec",
    "int8": "lmcache.serde.quant:Int8Codec",
    "int4": "lmcache.serde.quant:Int4Codec",
    "cachegen": "lmcache.serde.cachegen:CacheGenCodec",
}

_CLASSES: dict[str, type[Codec]] = {}
_DEFAULTS: dict[str, Codec] = {}


def _load(target: str) -> type[Codec]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise ConfigError(f"{target} is not a lmcache.serde.codec.Codec subclass")
    return cls


def codec_class(name: str) -> type[Codec]:
    """The class of codec ``name`` (built-in first, then the ``lmcache.codecs`` entry points).

    Raises:
        UnknownCodecError: No codec has that name.
        PluginConflictError: Two installed distributions register it.
    """
    cls = _CLASSES.get(name)
    if cls is not None:
        return cls
    if name in BUILTIN_CODECS:
        cls = _load(BUILTIN_CODECS[name])
    else:
        eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not eps:
            raise UnknownCodecError(name)
        if len({ep.value for ep in eps}) > 1:
            raise PluginConflictError(f"codec {name!r} is registered by several plugins: {[ep.value for ep in eps]}")
        loaded = eps[0].load()
        if not (isinstance(loaded, type) and issubclass(loaded, Codec)):
            raise ConfigError(f"entry point {eps[0].value} for codec {name!r} is not a Codec subclass")
        cls = loaded
    _CLASSES[name] = cls
    return cls


def codec_names() -> list[str]:
    """Built-in and installed plugin codec names."""
    names = set(BUILTIN_CODECS)
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def get_codec(name: str) -> Codec:
    """The codec ``name`` with default options (what a reader decodes with: bodies are self-describing)."""
    codec = _DEFAULTS.get(name)
    if codec is None:
        codec = codec_class(name)(CodecSettings(codec=name))
        _DEFAULTS[name] = codec
    return codec


def make_codec(options: Mapping[str, object] | CodecSettings, *, owner: str = "codec") -> Codec:
    """Build the codec named by ``options["codec"]`` with its options checked.

    Raises:
        ConfigError: An unknown codec, option or a bad value.
    """
    if isinstance(options, CodecSettings):
        settings = options
    else:
        settings = resolve_settings(CodecSettings, [("codec options", options)], owner=owner, strict=("codec options",))
    try:
        cls = codec_class(settings.codec)
    except UnknownCodecError:
        raise ConfigError(f"{owner}: unknown codec {settings.codec!r}; known: {', '.join(codec_names())}") from None
    return cls(settings)


def split_codec_query(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its ``codec``/``codec_*`` query options, and those options.

    Any backend's URL may name a codec this way; the backend itself never sees these options.
    """
    base, sep, rest = url.partition("?")
    if not sep:
        return url, {}
    frag = ""
    if "#" in rest:
        rest, frag = rest.split("#", 1)
        frag = "#" + frag
    codec: dict[str, str] = {}
    keep: list[str] = []
    for part in rest.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        if name.replace("-", "_").lower().startswith("codec"):
            codec.update(parse_qsl(part, keep_blank_values=True) or [(name, value)])
        else:
            keep.append(part)  # left as written: the backend parses its own options
    if not codec:
        return url, {}
    return base + ("?" + "&".join(keep) if keep else "") + frag, codec


def as_array(data: memoryview | bytes, dtype: Any = np.uint8) -> np.ndarray:
    """A read-only numpy view of ``data``."""
    return np.frombuffer(data, dtype=dtype)
