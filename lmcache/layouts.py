"""KV layout descriptors: how engines lay out attention KV, and the one chunk format lmcache stores.

Engines keep KV in several layouts. Each per-layer layout here is a permutation of five logical
axes, written as a string of axis letters:

========================  ==============================================  ==========================
layout                    per-layer shape                                 used by
========================  ==============================================  ==========================
``FLASH_ATTN`` (KBSHD)    ``[2, num_blocks, block_size, kv_heads, head]`` vLLM flash-attn, flex
``FLASHINFER`` (BKSHD)    ``[num_blocks, 2, block_size, kv_heads, head]`` vLLM flashinfer, triton
``VLLM_CPU`` (KBHSD)      ``[2, num_blocks, kv_heads, block_size, head]`` vLLM CPU / MPS backends
``MLA`` (BSD)             ``[num_blocks, block_size, latent_dim]``        vLLM MLA (DeepSeek)
``HF_CONTIGUOUS`` (BHSD)  K and V apart, each ``[batch, kv_heads, seq,    transformers' caches
                          head]``
========================  ==============================================  ==========================

The first four are the per-layer tensors of vLLM before its 0.2x KV-cache rework. vLLM 0.32 hands
every attention backend a logical ``[num_blocks, kv_heads, block_size, content]`` view per layer
(physical order from its resolved ``KVCacheLayout``, visible as strides) and each backend reads the
content its own way. These layouts cannot be told apart by shape, so they are never detected: the
vLLM connector names one from the attention backend vLLM picked.

=========================  ==================================================  ======================
layout                     per block and head                                  used by (vLLM 0.32)
=========================  ==================================================  ======================
``VLLM_PAGED`` (BHSX)      per token: K (head dim) then V (head dim)           FLASH_ATTN, TRITON_ATTN,
                                                                               FLASHINFER (not nvfp4)
``VLLM_MLA`` (BHSX)        per token: the latent (``kv_heads`` = 1)            MLA backends
``VLLM_CPU_VEC`` (BHSX)    K as ``[head_dim, block_size]`` (transposed), then  CPU_ATTN, ISA ``vec``
                           V as ``[block_size, head_dim]``                     and ``vec16``
=========================  ==================================================  ======================

``VLLM_CPU_VEC`` is the block format of vLLM-CPU's ``cpu_attn_reshape_and_cache`` for the ``vec``
and ``vec16`` ISAs (checked against that kernel in tests/vllm); other CPU ISAs (``amx``, ``neon``…)
pack K differently and are refused by the connector.

Letters: ``K`` the K/V pair axis (size 2), ``B`` blocks, ``S`` token offset within a block, ``H``
KV heads, ``D`` head dim (MLA: the latent). Only the *logical* order matters for copying: vLLM's
``get_kv_cache_stride_order`` may store an NHD-shaped tensor in HND order, which shows up as
strides, and the copy kernels honour any strides.

For the contiguous transformers cache, a "block" is a batch row and ``block_size`` is the cache's
sequence capacity, so the same slot arithmetic (``slot = block * block_size + offset``) addresses
``(batch row, position)``.

**The chunk format** every layout maps to (DESIGN §5)::

    [num_layers, kv_parts, chunk_tokens, num_kv_heads, head_dim]   contiguous, row-major

with ``kv_parts = 2`` (K then V) for multi-head/grouped attention and, for MLA,
``[num_layers, 1, chunk_tokens, 1, latent_dim]``: one latent per token instead of K and V, with a
head axis of 1 so both kinds share one 5-D shape. A partial chunk has the same shape with fewer
tokens (not a padded full chunk), so the stored bytes are exactly the tokens held.

:class:`KVGeometry` names what a chunk holds; its :attr:`KVGeometry.identity` goes into the
model part of cache keys so two models (or one model at two dtypes) never share chunks.

This module imports only :mod:`lmcache.errors` and torch; it copies nothing (see
:mod:`lmcache.kernels`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

try:
    import torch
except ImportError as exc:  # pragma: no cover - torch is an extra
    from lmcache.errors import MissingDependencyError

    raise MissingDependencyError("torch", "torch", "lmcache.layouts") from exc

from lmcache.errors import InvalidArgumentError, LayoutMismatchError

__all__ = [
    "FLASHINFER",
    "FLASH_ATTN",
    "HF_CONTIGUOUS",
    "LAYOUTS",
    "MLA",
    "VLLM_CPU",
    "VLLM_CPU_VEC",
    "VLLM_MLA",
    "VLLM_PAGED",
    "KVGeometry",
    "KVLayout",
    "LayerKV",
    "chunk_to_hf",
    "detect_layout",
    "dtype_from_name",
    "dtype_name",
    "get_layout",
    "hf_to_chunk",
]

#: One layer's engine KV: a single tensor (paged layouts, MLA) or a ``(key, value)`` pair (HF).
LayerKV = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a KV dtype (``torch.bfloat16`` → ``"bfloat16"``).

    Raises:
        InvalidArgumentError: The dtype is not one lmcache stores.
    """
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
        name = aliases.get(name, name)
    else:
        name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise InvalidArgumentError(f"unsupported KV dtype {dtype!r}; known: {', '.join(sorted(_DTYPES))}")
    return name


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype for a canonical (or aliased) dtype name."""
    return _DTYPES[dtype_name(name)]


@dataclasses.dataclass(frozen=True, slots=True)
class KVGeometry:
    """The shape of a model's KV per token, as far as the cache is concerned.

    Attributes:
        num_layers: Attention layers whose KV is cached (this worker's, under pipeline parallelism).
        num_kv_heads: KV heads held by this worker (after tensor-parallel sharding); 1 for MLA.
        head_dim: Head dimension; for MLA the latent width (``kv_lora_rank + rope_dim``).
        dtype: Canonical dtype name of the KV (``"bfloat16"``…); see :func:`dtype_name`.
        is_mla: One latent per token instead of K and V.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"
    is_mla: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidArgumentError(f"KVGeometry.{name} must be a positive int, got {value!r}")
        if self.is_mla and self.num_kv_heads != 1:
            raise InvalidArgumentError(f"an MLA geometry has one latent per token, not {self.num_kv_heads} heads")
        # Normalise aliases (torch.float16, "half") so equal geometries compare and hash equal.
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    @classmethod
    def mla(cls, num_layers: int, latent_dim: int, dtype: str | torch.dtype = "float16") -> KVGeometry:
        """An MLA geometry: one ``latent_dim``-wide latent per token per layer."""
        return cls(num_layers, 1, latent_dim, dtype_name(dtype), is_mla=True)

    @property
    def kv_parts(self) -> int:
        """2 (K and V) for ordinary attention, 1 for MLA."""
        return 1 if self.is_mla else 2

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the KV."""
        return _DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        """Bytes per KV element."""
        return self.torch_dtype.itemsize

    @property
    def identity(self) -> str:
        """A stable, printable identity of this geometry, e.g. ``kv:L32-H8-D128-bfloat16``.

        It is part of the model field of cache keys (see :meth:`key_model`): equal geometries give
        equal identities in every process, and any difference (layers, heads, head dim, dtype,
        MLA or not) gives a different one.
        """
        if self.is_mla:
            return f"mla:L{self.num_layers}-D{self.head_dim}-{self.dtype}"
        return f"kv:L{self.num_layers}-H{self.num_kv_heads}-D{self.head_dim}-{self.dtype}"

    @classmethod
    def from_identity(cls, text: str) -> KVGeometry:
        """Parse :attr:`identity` back into a geometry.

        Raises:
            InvalidArgumentError: ``text`` is not a geometry identity.
        """
        m = re.fullmatch(r"kv:L(\d+)-H(\d+)-D(\d+)-(\w+)", text)
        if m:
            return cls(int(m[1]), int(m[2]), int(m[3]), m[4])
        m = re.fullmatch(r"mla:L(\d+)-D(\d+)-(\w+)", text)
        if m:
            return cls(int(m[1]), 1, int(m[2]), m[3], is_mla=True)
        raise InvalidArgumentError(f"not a KV geometry identity: {text!r}")

    def key_model(self, model_name: str) -> str:
        """The ``CacheKey.model`` value for ``model_name`` with this geometry (``name|identity``)."""
        if not model_name:
            raise InvalidArgumentError("model_name must not be empty")
        return f"{model_name}|{self.identity}"

    def chunk_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of the chunk buffer holding ``num_tokens`` tokens."""
        if not isinstance(num_tokens, int) or num_tokens < 0:
            raise InvalidArgumentError(f"num_tokens must be a non-negative int, got {num_tokens!r}")
        return (self.num_layers, self.kv_parts, num_tokens, self.num_kv_heads, self.head_dim)

    def chunk_numel(self, num_tokens: int) -> int:
        """Elements in a chunk buffer of ``num_tokens`` tokens."""
        return self.num_layers * self.kv_parts * num_tokens * self.num_kv_heads * self.head_dim

    def chunk_nbytes(self, num_tokens: int) -> int:
        """Bytes in a chunk buffer of ``num_tokens`` tokens."""
        return self.chunk_numel(num_tokens) * self.element_size

    def tokens_in(self, nbytes: int) -> int:
        """How many tokens a chunk of ``nbytes`` bytes holds.

        Raises:
            LayoutMismatchError: ``nbytes`` is not a whole number of tokens of this geometry.
        """
        per_token = self.chunk_nbytes(1)
        if nbytes < 0 or nbytes % per_token:
            raise LayoutMismatchError(f"{nbytes} bytes is not a whole number of {per_token}-byte tokens of {self}")
        return nbytes // per_token

    def check_chunk(self, buf: torch.Tensor, num_tokens: int | None = None) -> None:
        """Check that ``buf`` is a chunk buffer of this geometry.

        Raises:
            InvalidBufferError: ``buf`` is not a contiguous tensor.
            LayoutMismatchError: Its shape or dtype does not match (or holds other than ``num_tokens``).
        """
        from lmcache.errors import InvalidBufferError

        if not isinstance(buf, torch.Tensor):
            raise InvalidBufferError(f"a chunk buffer must be a torch.Tensor, got {type(buf).__name__}")
        if buf.dtype != self.torch_dtype:
            raise LayoutMismatchError(f"chunk buffer dtype {dtype_name(buf.dtype)} != geometry dtype {self.dtype}")
        tokens = buf.shape[2] if buf.dim() == 5 else -1
        expected = self.chunk_shape(num_tokens if num_tokens is not None else max(tokens, 0))
        if tuple(buf.shape) != expected:
            raise LayoutMismatchError(f"chunk buffer shape {tuple(buf.shape)} != {expected} for {self.identity}")
        if not buf.is_contiguous():
            raise InvalidBufferError("a chunk buffer must be contiguous")


@dataclasses.dataclass(frozen=True, slots=True)
class KVLayout:
    """How one engine lays out one layer's KV.

    Attributes:
        name: Short name (``"flash_attn"``…), accepted by :func:`get_layout`.
        axes: Logical axis order of the per-layer tensor (letters ``K B S H D``, see module doc).
        separate_kv: K and V are two tensors per layer (transformers) rather than one.
        packing: For vLLM 0.32's ``[blocks, heads, block_size, content]`` views (axes ``BHSX``),
            how the content axis holds the parts: ``"kv"`` (per token, K then V, each half the
            content), ``"latent"`` (MLA: the content is the latent) or ``"cpu_vec"`` (per block
            and head, K as ``[head_dim, block_size]`` then V as ``[block_size, head_dim]``).
    """

    name: str
    axes: str
    separate_kv: bool = False
    packing: str = ""

    @property
    def is_mla(self) -> bool:
        """One latent per token (no K/V pair axis, no head axis)."""
        if self.packing:
            return self.packing == "latent"
        return "K" not in self.axes and "H" not in self.axes and not self.separate_kv

    @property
    def detectable(self) -> bool:
        """Whether :func:`detect_layout` may pick it (packed layouts share shapes: they must be named)."""
        return not self.packing

    @property
    def ndim(self) -> int:
        """Dimensions of each per-layer tensor."""
        return len(self.axes)

    def dims(self, tensor_shape: Sequence[int]) -> dict[str, int]:
        """Map axis letters to sizes for a per-layer tensor of ``tensor_shape``."""
        if len(tensor_shape) != self.ndim:
            raise LayoutMismatchError(
                f"layout {self.name} expects {self.ndim}-D per-layer tensors ({self.axes}), got shape "
                f"{tuple(tensor_shape)}"
            )
        return dict(zip(self.axes, (int(s) for s in tensor_shape), strict=True))

    def part_views(self, layer: LayerKV) -> list[torch.Tensor]:
        """Views of one layer's KV parts, each ``[num_blocks, block_size, num_kv_heads, head_dim]``.

        K then V (one view for MLA). They alias the engine's memory: no copy is made.

        Raises:
            LayoutMismatchError: ``layer`` does not have this layout's form.
        """
        if self.separate_kv:
            if not isinstance(layer, (tuple, list)) or len(layer) != 2:
                raise LayoutMismatchError(f"layout {self.name} expects a (key, value) pair per layer")
            k, v = layer
            if not isinstance(k, torch.Tensor) or not isinstance(v, torch.Tensor):
                raise LayoutMismatchError(f"layout {self.name}: key and value must be tensors")
            if k.shape != v.shape or k.dtype != v.dtype or k.device != v.device:
                raise LayoutMismatchError(
                    f"layout {self.name}: key {tuple(k.shape)}/{k.dtype}/{k.device} and value "
                    f"{tuple(v.shape)}/{v.dtype}/{v.device} differ"
                )
            return [self._canonical(k), self._canonical(v)]
        if not isinstance(layer, torch.Tensor):
            raise LayoutMismatchError(f"layout {self.name} expects one tensor per layer, got {type(layer).__name__}")
        if self.packing:
            return self._packed_views(layer)
        if "K" in self.axes:
            kv_axis = self.axes.index("K")
            if layer.dim() == self.ndim and layer.shape[kv_axis] != 2:
                raise LayoutMismatchError(
                    f"layout {self.name}: axis {kv_axis} must hold K and V (size 2), got shape {tuple(layer.shape)}"
                )
            self.dims(layer.shape)
            rest = self.axes.replace("K", "")
            return [self._canonical(layer.select(kv_axis, p), rest) for p in range(2)]
        return [self._canonical(layer)]

    def _packed_views(self, layer: torch.Tensor) -> list[torch.Tensor]:
        """Canonical part views of a ``[blocks, heads, block_size, content]`` layer (see ``packing``)."""
        nb, heads, bs, width = self.dims(layer.shape).values()
        if self.packing == "latent":
            if heads != 1:
                raise LayoutMismatchError(f"layout {self.name}: an MLA cache has one head, got {heads}")
            return [layer.permute(0, 2, 1, 3)]
        if width % 2:
            raise LayoutMismatchError(f"layout {self.name}: content {width} is not K and V of one head dim")
        d = width // 2
        if self.packing == "kv":
            return [layer[..., :d].permute(0, 2, 1, 3), layer[..., d:].permute(0, 2, 1, 3)]
        if self.packing != "cpu_vec":
            raise LayoutMismatchError(f"layout {self.name}: unknown packing {self.packing!r}")
        s_block, s_head, s_token, s_dim = layer.stride()
        if (s_dim, s_token, s_head) != (1, width, bs * width):
            # The kernel reinterprets each block and head as 2 * block_size * head_dim elements in a row.
            raise LayoutMismatchError(
                f"layout {self.name} needs each block's [heads, block_size, content] to be contiguous, "
                f"got strides {tuple(layer.stride())}"
            )
        base = layer.storage_offset()
        size = (nb, bs, heads, d)
        k = layer.as_strided(size, (s_block, 1, s_head, bs), base)
        v = layer.as_strided(size, (s_block, d, s_head, 1), base + bs * d)
        return [k, v]

    def _canonical(self, t: torch.Tensor, axes: str | None = None) -> torch.Tensor:
        axes = axes if axes is not None else self.axes
        if t.dim() != len(axes):
            raise LayoutMismatchError(f"layout {self.name} expects {len(axes)}-D tensors ({axes}), got {t.dim()}-D")
        if "H" not in axes:  # MLA: add a head axis of 1 so every layout reads as B S H D
            t = t.unsqueeze(axes.index("D"))
            axes = axes.replace("D", "HD")
        return t.permute([axes.index(a) for a in "BSHD"])

    def geometry(self, layers: Sequence[LayerKV]) -> tuple[KVGeometry, int, int]:
        """Infer ``(geometry, num_blocks, block_size)`` from the engine's per-layer KV.

        Raises:
            LayoutMismatchError: The layers do not share one shape, dtype and device in this layout.
        """
        if not layers:
            raise LayoutMismatchError("no KV layers given")
        first = self.part_views(layers[0])[0]
        for i, layer in enumerate(layers):
            for part in self.part_views(layer):
                if part.shape != first.shape or part.dtype != first.dtype or part.device != first.device:
                    raise LayoutMismatchError(
                        f"layer {i} has KV {tuple(part.shape)}/{part.dtype}/{part.device}, layer 0 has "
                        f"{tuple(first.shape)}/{first.dtype}/{first.device} (layout {self.name})"
                    )
        num_blocks, block_size, heads, head_dim = (int(s) for s in first.shape)
        geo = KVGeometry(len(layers), heads, head_dim, dtype_name(first.dtype), is_mla=self.is_mla)
        return geo, num_blocks, block_size


FLASH_ATTN = KVLayout("flash_attn", "KBSHD")
FLASHINFER = KVLayout("flashinfer", "BKSHD")
VLLM_CPU = KVLayout("vllm_cpu", "KBHSD")
MLA = KVLayout("mla", "BSD")
HF_CONTIGUOUS = KVLayout("hf", "BHSD", separate_kv=True)
VLLM_PAGED = KVLayout("vllm_paged", "BHSX", packing="kv")
VLLM_MLA = KVLayout("vllm_mla", "BHSX", packing="latent")
VLLM_CPU_VEC = KVLayout("vllm_cpu_vec", "BHSX", packing="cpu_vec")

#: Every known layout by name.
LAYOUTS: dict[str, KVLayout] = {
    lay.name: lay for lay in (FLASH_ATTN, FLASHINFER, VLLM_CPU, MLA, HF_CONTIGUOUS, VLLM_PAGED, VLLM_MLA, VLLM_CPU_VEC)
}
_ALIASES = {
    "flash": "flash_attn",
    "flex": "flash_attn",
    "flex_attention": "flash_attn",
    "triton_attn": "flashinfer",
    "cpu": "vllm_cpu",
    "torch_sdpa": "vllm_cpu",
    "transformers": "hf",
    "hf_contiguous": "hf",
}


def get_layout(name: str | KVLayout) -> KVLayout:
    """The layout called ``name`` (or ``name`` itself if it already is a layout).

    Raises:
        InvalidArgumentError: No layout has that name.
    """
    if isinstance(name, KVLayout):
        return name
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in LAYOUTS:
        raise InvalidArgumentError(f"unknown KV layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[key]


def _as_layers(tensors: Any) -> list[LayerKV]:
    """Normalise engine KV into a list of per-layer items (tensor or (K, V) pair)."""
    if isinstance(tensors, torch.Tensor):
        # A stacked tensor with a leading layer axis: its layers are views sharing one storage.
        return list(tensors.unbind(0))
    if isinstance(tensors, dict):
        tensors = list(tensors.values())
    if not isinstance(tensors, Sequence) or isinstance(tensors, (str, bytes)):
        raise LayoutMismatchError(f"engine KV must be a sequence of per-layer tensors, got {type(tensors).__name__}")
    return [tuple(t) if isinstance(t, list) else t for t in tensors]


def detect_layout(
    tensors: Any,
    *,
    block_size: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    is_mla: bool | None = None,
) -> KVLayout:
    """Infer the layout of an engine's KV tensors from their shapes and what the caller knows.

    Args:
        tensors: Per-layer KV: a list of tensors (paged layouts, MLA), a list of ``(key, value)``
            pairs (transformers), a dict ``layer name -> tensor`` (vLLM's ``kv_caches``), or one
            tensor with a leading layer axis.
        block_size: The engine's tokens per block, when known (vLLM: ``cache_config.block_size``).
        num_kv_heads: KV heads per worker, when known.
        head_dim: Head dim (MLA: latent width), when known.
        is_mla: Whether the model uses MLA, when known.

    Returns:
        The only layout consistent with every given fact.

    Raises:
        LayoutMismatchError: No layout fits (inconsistent), or several fit (ambiguous: pass more
            facts or name the layout).
    """
    layers = _as_layers(tensors)
    if not layers:
        raise LayoutMismatchError("no KV layers given")
    sample = layers[0]
    if isinstance(sample, tuple):
        candidates = [HF_CONTIGUOUS]
    elif isinstance(sample, torch.Tensor):
        candidates = [
            lay for lay in LAYOUTS.values() if lay.detectable and not lay.separate_kv and lay.ndim == sample.dim()
        ]
    else:
        raise LayoutMismatchError(f"a KV layer must be a tensor or a (key, value) pair, got {type(sample).__name__}")

    facts = {"S": block_size, "H": num_kv_heads, "D": head_dim}
    fitting: list[KVLayout] = []
    reasons: list[str] = []
    for lay in candidates:
        try:
            views = lay.part_views(sample)
            lay.geometry(layers)
        except LayoutMismatchError as exc:
            reasons.append(f"{lay.name}: {exc}")
            continue
        _, s, h, d = (int(x) for x in views[0].shape)
        sizes = {"S": s, "H": h, "D": d}
        if is_mla is not None and is_mla != lay.is_mla:
            reasons.append(f"{lay.name}: is_mla={lay.is_mla}")
            continue
        # MLA's canonical view has a head axis of 1, so num_kv_heads=1 fits it and anything else does not.
        wrong = [f"{a}={sizes[a]}≠{v}" for a, v in facts.items() if v is not None and sizes[a] != v]
        if wrong:
            reasons.append(f"{lay.name}: {', '.join(wrong)}")
            continue
        fitting.append(lay)
    shape = (
        f"({tuple(sample[0].shape)}, {tuple(sample[1].shape)})" if isinstance(sample, tuple) else tuple(sample.shape)
    )
    if not fitting:
        raise LayoutMismatchError(f"no KV layout fits per-layer shape {shape}: " + "; ".join(reasons))
    if len(fitting) > 1:
        names = ", ".join(lay.name for lay in fitting)
        raise LayoutMismatchError(
            f"per-layer shape {shape} is ambiguous between {names}: pass block_size / num_kv_heads, or the layout"
        )
    return fitting[0]


def chunk_to_hf(buf: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of a (non-MLA) chunk buffer as transformers' per-layer ``(key, value)``.

    Each is ``[1, num_kv_heads, tokens, head_dim]``, a strided view of ``buf`` (no copy); call
    ``.contiguous()`` or ``torch.cat`` them before handing them to a model that needs contiguity.
    """
    if buf.dim() != 5 or buf.shape[1] != 2:
        raise LayoutMismatchError(f"not a K/V chunk buffer: shape {tuple(buf.shape)}")
    return [(layer[0].transpose(0, 1).unsqueeze(0), layer[1].transpose(0, 1).unsqueeze(0)) for layer in buf.unbind(0)]


def hf_to_chunk(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    start: int,
    end: int,
    out: torch.Tensor,
    *,
    batch_index: int = 0,
) -> torch.Tensor:
    """Copy tokens ``[start, end)`` of one batch row of transformers' KV into the chunk buffer ``out``.

    Raises:
        LayoutMismatchError: ``out`` does not have shape ``[layers, 2, end - start, heads, head_dim]``.
    """
    geo, _, _ = HF_CONTIGUOUS.geometry(list(layers))
    geo.check_chunk(out, end - start)
    for dst, (k, v) in zip(out.unbind(0), layers, strict=True):
        dst[0].copy_(k[batch_index, :, start:end].transpose(0, 1))
        dst[1].copy_(v[batch_index, :, start:end].transpose(0, 1))
    return out
