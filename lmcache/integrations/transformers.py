"""Hugging Face transformers integration: reuse cached prefix KV for any causal LM.

:class:`CachedCausalLM` wraps a ``PreTrainedModel``. For each prompt it loads the longest cached
prefix (whole chunks, always leaving at least one token to compute), seeds a ``DynamicCache``
with it, runs only the new tokens, and stores the new chunks. With
``torch.set_num_threads(1)`` the logits equal a full prefill bit for bit; with more threads they
are allclose with the same argmax (floating-point reduction order differs).

Batch size 1 per call; models whose cache is not a plain per-layer K/V cache (sliding-window
or recurrent layers) are rejected with :class:`~lmcache.errors.UnsupportedOperationError`.
This module imports ``engine`` and transformers; nothing in lmcache imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import time
from typing import Any

import torch

from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import InvalidArgumentError, MissingDependencyError, UnsupportedOperationError
from lmcache.layouts import HF_CONTIGUOUS, KVGeometry, chunk_to_hf, dtype_name, hf_to_chunk

try:
    from transformers import DynamicCache, PreTrainedModel
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingDependencyError("transformers", "hf", "lmcache.integrations.transformers") from exc

__all__ = [
    "CachedCausalLM",
    "ContiguousKV",
    "PrefillResult",
    "SegmentPrefillResult",
    "cache_keyword",
    "geometry_of",
    "model_fingerprint",
]

#: Default share of reused tokens recomputed by :meth:`CachedCausalLM.prefill_segments`.
DEFAULT_RECOMPUTE_RATIO = 0.15


class ContiguousKV:
    """Per-layer K and V tensors shaped ``[1, kv_heads, seq, head_dim]`` (transformers' layout).

    Serves as both a KV source (gather into chunk buffers) and destination (scatter).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        if len(keys) != len(values) or not keys:
            raise InvalidArgumentError("ContiguousKV needs one K and one V tensor per layer")
        self.keys = keys
        self.values = values
        self.geometry, _, self.seq_len = HF_CONTIGUOUS.geometry(list(zip(keys, values, strict=True)))

    @classmethod
    def empty(cls, geometry: KVGeometry, seq: int, device: torch.device | str = "cpu") -> ContiguousKV:
        """Fresh tensors for ``seq`` tokens."""
        shape = (1, geometry.num_kv_heads, seq, geometry.head_dim)
        dtype = geometry.torch_dtype
        keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(geometry.num_layers)]
        return cls(keys, values)

    def gather(self, start: int, end: int, out: torch.Tensor) -> None:
        """Copy tokens ``[start, end)`` into ``out`` shaped ``[layers, 2, tokens, heads, dim]``."""
        hf_to_chunk(list(zip(self.keys, self.values, strict=True)), start, end, out)

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        """Copy ``src`` shaped ``[layers, 2, tokens, heads, dim]`` into tokens ``[start, end)``."""
        for k, v, (src_k, src_v) in zip(self.keys, self.values, chunk_to_hf(src), strict=True):
            k[:, :, start:end].copy_(src_k)
            v[:, :, start:end].copy_(src_v)

    def prefix(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(K, V)`` per layer for the first ``n`` tokens (views)."""
        return [(k[:, :, :n], v[:, :, :n]) for k, v in zip(self.keys, self.values, strict=True)]


def geometry_of(model: PreTrainedModel) -> KVGeometry:
    """The KV geometry of a transformers causal LM."""
    cfg = model.config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    dtype = next(model.parameters()).dtype
    return KVGeometry(cfg.num_hidden_layers, kv_heads, head_dim, dtype_name(dtype))


def model_fingerprint(model: PreTrainedModel) -> str:
    """A model identity for cache keys: its name plus a hash of its config and some weights.

    Hashing a slice of the weights keeps two randomly initialised models (or two fine-tunes
    with one config) from sharing chunks by accident.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(model.config.to_json_string(use_diff=False).encode())
    for _, p in list(model.named_parameters())[:4]:
        h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return f"{name}#{h.hexdigest()}"


def cache_keyword(fn: Any) -> str:
    """The keyword through which ``fn`` (a model's ``forward``, ``generate``…) takes a KV cache.

    transformers renamed ``past_key_values`` to ``cache`` after 5.19 (5.25 warns on the old name
    and announces its removal for 5.40); earlier 5.x releases know only ``past_key_values``. The
    signature tells which one this installation's ``fn`` declares.

    Args:
        fn: A callable, usually a bound method of a model.

    Returns:
        ``"cache"`` or ``"past_key_values"``.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no introspectable signature: the name every 5.x release accepts
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclasses.dataclass
class PrefillResult:
    """What :meth:`CachedCausalLM.prefill` returns.

    Attributes:
        logits: Logits of the last prompt token, shaped ``[1, vocab]``.
        past_key_values: The model's cache after the prompt (for decoding on); also
            :attr:`cache`, transformers' newer name for it.
        cached_tokens: Prompt tokens loaded from lmcache instead of computed.
        prompt_tokens: Tokens in the prompt.
        ttft_s: Seconds from the call to the last token's logits (before storing new chunks).
    """

    logits: torch.Tensor
    past_key_values: Any
    cached_tokens: int
    prompt_tokens: int
    ttft_s: float

    @property
    def cache(self) -> Any:
        """The model's cache after the prompt (the same object as :attr:`past_key_values`)."""
        return self.past_key_values


@dataclasses.dataclass
class SegmentPrefillResult:
    """What :meth:`CachedCausalLM.prefill_segments` returns.

    Attributes:
        logits: Logits of the last prompt token, ``[1, vocab]``.
        past_key_values: A ``DynamicCache`` holding the blended KV of the whole prompt (for
            decoding on); also :attr:`cache`.
        reused_tokens: Prompt tokens whose KV came from cached segments (a cached prefix included).
        recomputed_tokens: Tokens computed in the layers after selection (the question and
            uncached segments included).
        prompt_tokens: Tokens in the prompt.
        segments_hit: Segments (question excluded, a cached prefix included) loaded from the cache.
        ttft_s: Seconds from the call to the last token's logits (before new segments are stored).
    """

    logits: torch.Tensor
    past_key_values: Any
    reused_tokens: int
    recomputed_tokens: int
    prompt_tokens: int
    segments_hit: int
    ttft_s: float

    @property
    def cache(self) -> Any:
        """The blended cache (the same object as :attr:`past_key_values`)."""
        return self.past_key_values

    @property
    def recomputed_share(self) -> float:
        """``recomputed_tokens / prompt_tokens``."""
        return self.recomputed_tokens / self.prompt_tokens


class CachedCausalLM:
    """A causal LM whose prompt prefill reuses lmcache's cached KV.

    Args:
        model: A transformers causal LM (eval mode is set).
        engine: The cache engine; built from ``config`` when omitted (then owned and closed
            by :meth:`close`).
        config: lmcache settings for a new engine.
        model_id: Key identity of the model; default ``config.model_name``, else
            :func:`model_fingerprint`.
        blend: Check now that the model supports :meth:`prefill_segments` (else that is
            checked on its first call).

    Raises:
        UnsupportedOperationError: ``blend`` is set and the model is not a Llama-architecture
            model with a supported RoPE.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        engine: CacheEngine | None = None,
        *,
        config: LMCacheConfig | None = None,
        model_id: str | None = None,
        blend: bool = False,
    ) -> None:
        self.model = model.eval()
        self.geometry = geometry_of(model)
        self._owns_engine = engine is None
        if engine is None:
            config = config if config is not None else LMCacheConfig.load()
            model_id = model_id or config.model_name or model_fingerprint(model)
            engine = CacheEngine(self.geometry, model_id, config=config)
        elif engine.geometry != self.geometry:
            raise InvalidArgumentError(
                f"the engine's KV geometry {engine.geometry.identity} does not match the model's "
                f"{self.geometry.identity}"
            )
        self.engine = engine
        # transformers' name for the cache argument, read once from this installation's signatures:
        # ``generate`` forwards it to ``prepare_inputs_for_generation``, which declares it by name.
        self._forward_cache_kw = cache_keyword(model.forward)
        self._generate_cache_kw = cache_keyword(getattr(model, "prepare_inputs_for_generation", model.forward))
        self._blender: Any = None
        self._segment_store: Any = None
        if blend:
            self._blend_parts()

    def _new_cache(self, data: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
        cache = DynamicCache(ddp_cache_data=data, config=self.model.config)
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise UnsupportedOperationError(
                    f"{type(self.model).__name__} uses {type(layer).__name__} cache layers; "
                    "lmcache's transformers integration supports full-attention KV caches only"
                )
        return cache

    def _load_prefix(self, tokens: torch.Tensor) -> tuple[Any, int]:
        n = tokens.shape[0]
        hit = self.engine.lookup(tokens[: n - 1]) if n > 1 else 0
        loaded = 0
        data = None
        if hit:
            kv = ContiguousKV.empty(self.geometry, hit, device=self.model.device)
            loaded = self.engine.retrieve(tokens, kv, max_tokens=hit)
            if loaded:
                data = kv.prefix(loaded)
        return self._new_cache(data), loaded

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise InvalidArgumentError("input_ids must be a [1, seq] tensor (batch size 1)")
        if input_ids.shape[1] == 0:
            raise InvalidArgumentError("input_ids must hold at least one token")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InvalidArgumentError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        return input_ids[0]

    def _store(self, tokens: torch.Tensor, cache: Any, start: int) -> None:
        kv = ContiguousKV([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
        self.engine.store(tokens, kv, start=start)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, *, logits_to_keep: int = 0) -> PrefillResult:
        """Run the prompt, loading its cached prefix and storing its new chunks.

        Args:
            input_ids: ``[1, seq]`` token ids.
            logits_to_keep: Passed to the model: ``1`` computes only the last token's logits
                (what an engine needs for the first token); ``0``, the default, computes all.
        """
        t0 = time.perf_counter()
        tokens = self._check_ids(input_ids)
        cache, loaded = self._load_prefix(tokens)
        kw = self._forward_cache_kw
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        out = self.model(input_ids[:, loaded:], use_cache=True, **{kw: cache}, **extra)
        logits = out.logits[:, -1]
        ttft = time.perf_counter() - t0
        returned = getattr(out, kw, None)  # the same object, updated in place, in every 5.x release
        cache = cache if returned is None else returned
        self._store(tokens, cache, loaded)
        return PrefillResult(logits, cache, loaded, tokens.shape[0], ttft)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """``model.generate`` with the prompt's cached prefix loaded first.

        Args:
            input_ids: ``[1, seq]`` prompt token ids.
            **kwargs: Passed to ``model.generate`` (``max_new_tokens``, ``do_sample``…).

        Returns:
            The generated sequences, prompt included, as ``model.generate`` returns them.
        """
        tokens = self._check_ids(input_ids)
        cache, loaded = self._load_prefix(tokens)
        out = self.model.generate(input_ids, use_cache=True, **{self._generate_cache_kw: cache}, **kwargs)
        self._store(tokens, cache, loaded)
        return out

    # -- non-prefix reuse (lmcache.blend) ------------------------------------------------

    def _blend_parts(self, prefix: torch.Tensor | None = None) -> tuple[Any, Any]:
        """The blender, and the segment store of segments computed after ``prefix`` (or alone)."""
        from lmcache.blend import SegmentBlender, SegmentStore, prefix_digest

        if self._blender is None:
            self._blender = SegmentBlender(self.model)
            self._segment_store = {None: SegmentStore(self.engine)}
        ident = None if prefix is None else prefix_digest(prefix)
        if ident not in self._segment_store:
            if len(self._segment_store) > 64:  # one view per system prompt; keep a bounded few
                del self._segment_store[next(k for k in self._segment_store if k is not None)]
            self._segment_store[ident] = SegmentStore(self.engine, prefix)
        return self._blender, self._segment_store[ident]

    def _check_segments(self, segments: Any) -> list[torch.Tensor]:
        if isinstance(segments, torch.Tensor) or not isinstance(segments, (list, tuple)) or not segments:
            raise InvalidArgumentError("segments must be a non-empty list of token id sequences")
        out = []
        for seg in segments:
            t = seg if isinstance(seg, torch.Tensor) else torch.tensor(list(seg), dtype=torch.int64)
            if t.dim() == 2 and t.shape[0] == 1:
                t = t[0]
            if t.dim() != 1 or t.shape[0] == 0 or t.dtype not in (torch.int64, torch.int32):
                raise InvalidArgumentError("each segment must be a non-empty 1-D sequence of integer token ids")
            out.append(t.to(torch.int64))
        return out

    def _segment_kv_alone(self, seg: torch.Tensor, prefix: torch.Tensor | None = None) -> ContiguousKV:
        """The segment's position-free KV, keys as if it began at position 0.

        Computed alone at positions ``0..n-1``, or right after ``prefix`` and rotated back (then
        it saw the prefix's attention sink instead of becoming one itself).
        """
        ids = seg if prefix is None else torch.cat((prefix, seg))
        cache = self._new_cache(None)
        out = self.model(
            ids.to(self.model.device)[None], use_cache=True, logits_to_keep=1, **{self._forward_cache_kw: cache}
        )
        returned = getattr(out, self._forward_cache_kw, None)
        cache = cache if returned is None else returned
        if prefix is None:
            return ContiguousKV([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers])
        from lmcache.blend import rotate_keys

        p = prefix.shape[0]
        inv_freq = self._blend_parts()[0].inv_freq
        keys = [rotate_keys(layer.keys[:, :, p:].contiguous(), -p, inv_freq) for layer in cache.layers]
        return ContiguousKV(keys, [layer.values[:, :, p:].contiguous() for layer in cache.layers])

    @torch.no_grad()
    def cache_segments(self, segments: Any, *, prefix: Any = None) -> int:
        """Compute and store the KV of segments not cached yet (e.g. a RAG corpus, ahead of queries).

        Args:
            segments: Token id sequences (lists or 1-D tensors), each cached on its own.
            prefix: The shared prompt start (system prompt) the segments will follow: each is
                computed right after it, and found by :meth:`prefill_segments` with the same
                ``prefix``. None: each is computed alone, from position 0.

        Returns:
            How many segments were computed and stored (the others were cached already).
        """
        pre = None if prefix is None else self._check_segments([prefix])[0]
        _, store = self._blend_parts(pre)
        done = 0
        for seg in self._check_segments(segments):
            if not store.contains(seg):
                store.store(seg, self._segment_kv_alone(seg, pre))
                done += 1
        return done

    @torch.no_grad()
    def prefill_segments(
        self, segments: Any, *, recompute_ratio: float = DEFAULT_RECOMPUTE_RATIO, prefix: Any = None
    ) -> SegmentPrefillResult:
        """Prefill a prompt made of segments, reusing each cached segment's KV wherever it stands.

        Every segment but the last (the question) is looked up on its own; a cached one is
        loaded, its keys rotated to its position, and blended by selective recompute
        (:class:`lmcache.blend.SegmentBlender`). An uncached segment is computed in full in the
        prompt and, after the first token's logits, computed on its own (after ``prefix``, if
        given) and stored. A backend failure is a miss: the segment is computed.

        Args:
            segments: Token id sequences (lists or 1-D tensors); their concatenation is the prompt
                (after ``prefix``).
            recompute_ratio: Share of reused tokens recomputed in the deeper layers, in [0, 1]:
                1.0 equals :meth:`prefill` of the concatenation (bit for bit on one thread),
                0.0 is plain concatenation of the cached KV.
            prefix: The prompt's shared start (system prompt): its KV is exact when reused (it
                stands at position 0), and the segments are looked up, and stored, as computed
                after it (see :meth:`cache_segments`). Use one whenever prompts share a start:
                a segment computed alone carries its own attention sink at its first token.

        Raises:
            InvalidArgumentError: Bad segments or ratio.
            UnsupportedOperationError: The model is not supported (see
                :func:`lmcache.blend.check_blendable`).
        """
        t0 = time.perf_counter()
        if isinstance(recompute_ratio, bool) or not isinstance(recompute_ratio, (int, float)):
            raise InvalidArgumentError(f"recompute_ratio must be a number in [0, 1], got {recompute_ratio!r}")
        segs = self._check_segments(segments)
        pre = None if prefix is None else self._check_segments([prefix])[0]
        blender, store = self._blend_parts(pre)
        # The prefix is a segment computed alone at position 0: exactly its KV in this prompt.
        stores = ([] if pre is None else [self._blend_parts()[1]]) + [store] * (len(segs) - 1)
        segs = ([] if pre is None else [pre]) + segs
        cached: list[tuple[list[torch.Tensor], list[torch.Tensor]] | None] = []
        reused = 0
        for seg, seg_store in zip(segs[:-1], stores, strict=True):
            kv = ContiguousKV.empty(self.geometry, seg.shape[0], device=self.model.device)
            if seg_store.load(seg, kv):
                cached.append((kv.keys, kv.values))
                reused += seg.shape[0]
            else:
                cached.append(None)
        cached.append(None)  # the question is always computed
        out = blender.run(segs, cached, float(recompute_ratio), exact_first=pre is not None)
        ttft = time.perf_counter() - t0
        cache = self._new_cache(list(zip(out.keys, out.values, strict=True)))
        stored: set[tuple[int, bytes]] = set()
        for i, (seg, kv, seg_store) in enumerate(zip(segs[:-1], cached[:-1], stores, strict=True)):
            after = None if pre is None or i == 0 else pre  # the prefix itself: alone
            ident = (id(seg_store), seg.cpu().numpy().tobytes())
            if kv is None and ident not in stored:
                stored.add(ident)
                seg_store.store(seg, self._segment_kv_alone(seg, after))
        hits = sum(kv is not None for kv in cached)
        return SegmentPrefillResult(out.logits, cache, reused, out.recomputed, out.total, hits, ttft)

    def close(self) -> None:
        """Close the engine if this wrapper built it."""
        if self._owns_engine:
            self.engine.close()

    def __enter__(self) -> CachedCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
