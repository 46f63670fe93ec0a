"""Selective-recompute prefill over reused segment KV (CacheBlend) for Llama-architecture models.

Given a prompt made of segments, some with cached position-free KV, :class:`SegmentBlender`
runs the model layer by layer with the model's own modules:

1. Cached segments' keys are rotated to where the segments now stand (:mod:`.rope`); their
   values are used as they are. Tokens of uncached segments (and of the question, the last
   segment) have no old KV and are always computed.
2. The first ``full_layers`` layers run every token, as a plain prefill would.
3. At the next layer the real K and V of every token are computed and compared with the
   reused ones; the ``recompute_ratio`` share of cached tokens whose value vectors deviate most
   (squared difference summed over heads) is selected, plus every always-computed token.
   Values, not keys, as in CacheBlend: on SmolLM2 a K+V score picks tokens whose keys move
   (largely the same few high-norm tokens in every segment) and restores less (docs/blend.md).
4. That layer and all deeper ones compute only the selected tokens (queries, K, V, MLP), with
   attention over all tokens; the selected tokens' K and V overwrite the reused ones.

Layer-0 KV depends only on a token's embedding, so the first layer where segments see each
other is layer 1: the default ``full_layers=1`` selects there. ``recompute_ratio=1.0`` runs
every token at every layer with the same operations as the model's forward (bit-identical
logits on one thread); ``0.0`` computes only the always-computed tokens (naive concatenation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch

from lmcache.blend.rope import rope_frequencies, rotate_keys
from lmcache.errors import InvalidArgumentError, UnsupportedOperationError

__all__ = ["BlendOutput", "SegmentBlender", "check_blendable"]


def _llama_classes() -> tuple[type, type]:
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer

    return LlamaDecoderLayer, LlamaAttention


def check_blendable(model: Any) -> None:
    """Raise unless ``model`` is a Llama-architecture causal LM that blending supports.

    Supported: a causal LM whose decoder layers are transformers' ``LlamaDecoderLayer`` with
    ``LlamaAttention`` (LlamaForCausalLM and checkpoints that reuse it, e.g. SmolLM2), full
    attention in every layer, and RoPE with fixed frequencies (default, linear, Llama-3).

    Raises:
        UnsupportedOperationError: Anything else.
    """
    name = type(model).__name__
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if base is None or layers is None or getattr(model, "lm_head", None) is None:
        raise UnsupportedOperationError(f"blending supports Llama-architecture causal LMs, not {name}")
    decoder_cls, attn_cls = _llama_classes()
    for layer in layers:
        if not isinstance(layer, decoder_cls) or not isinstance(getattr(layer, "self_attn", None), attn_cls):
            raise UnsupportedOperationError(
                f"blending supports Llama decoder layers; {name} has {type(layer).__name__}"
            )
    cfg = model.config.get_text_config(decoder=True)
    if getattr(cfg, "sliding_window", None) or any(
        t != "full_attention" for t in getattr(cfg, "layer_types", ()) or ()
    ):
        raise UnsupportedOperationError(f"blending needs full attention in every layer; {name} uses sliding windows")
    rope_frequencies(getattr(base, "rotary_emb", None))


@dataclasses.dataclass
class BlendOutput:
    """What :meth:`SegmentBlender.run` returns.

    Attributes:
        logits: Logits of the last token, ``[1, vocab]``.
        keys: Per layer ``[1, kv_heads, seq, head_dim]`` keys of the whole prompt.
        values: Per layer values, the same shape.
        recomputed: Tokens computed in the layers after selection (always-computed included).
        total: Tokens in the prompt.
    """

    logits: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    recomputed: int
    total: int


class SegmentBlender:
    """Selective recompute over a model's own modules.

    Args:
        model: A Llama-architecture transformers causal LM (see :func:`check_blendable`).
        full_layers: Leading layers that compute every token; selection happens at the next
            layer (at least 1: layer-0 KV shows no deviation).

    Raises:
        UnsupportedOperationError: The model is not supported.
    """

    def __init__(self, model: Any, *, full_layers: int = 1) -> None:
        check_blendable(model)
        if not isinstance(full_layers, int) or full_layers < 1:
            raise InvalidArgumentError(f"full_layers must be an int >= 1, got {full_layers!r}")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

        self.model = model
        self.base = model.model
        self.layers = list(self.base.layers)
        self.full_layers = min(full_layers, len(self.layers) - 1)
        self.inv_freq = rope_frequencies(self.base.rotary_emb)
        self._apply_rope = apply_rotary_pos_emb
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        # The model's own kernel when every token runs (identical to its forward); SDPA with an
        # explicit mask when only some queries run (flash kernels take no arbitrary mask).
        self._full_attn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)
        self._part_attn = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)

    def _causal_mask(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        from transformers.masking_utils import create_causal_mask

        # Positional arguments: the cache parameter's name changed across 5.x releases.
        return create_causal_mask(self.model.config, hidden, None, None, position_ids)

    @torch.no_grad()
    def run(
        self,
        segments: Sequence[torch.Tensor],
        cached: Sequence[tuple[list[torch.Tensor], list[torch.Tensor]] | None],
        recompute_ratio: float,
        *,
        exact_first: bool = False,
    ) -> BlendOutput:
        """Prefill ``segments`` (1-D token tensors, in prompt order) reusing ``cached`` KV.

        Args:
            segments: The prompt's segments; their concatenation is the prompt.
            cached: Per segment, its position-0 ``(keys, values)`` per layer (each
                ``[1, kv_heads, len, head_dim]``), or None to compute it.
            recompute_ratio: Share of cached tokens recomputed in the deeper layers, in [0, 1].
            exact_first: The first segment's cached KV is exact (it starts the prompt and was
                computed alone, as in any prompt beginning with it): it is never recomputed
                below ratio 1.0, and the ratio applies to the other reused tokens.
        """
        if len(segments) != len(cached) or not segments:
            raise InvalidArgumentError("one cached entry (or None) per segment is needed")
        if cached[-1] is not None:
            raise InvalidArgumentError("the last segment (the question) is always computed: pass None for it")
        if not 0.0 <= recompute_ratio <= 1.0:
            raise InvalidArgumentError(f"recompute_ratio must be within [0, 1], got {recompute_ratio!r}")
        device = self.model.device
        ids = torch.cat([s.to(device) for s in segments]).unsqueeze(0)
        total = ids.shape[1]
        position_ids = torch.arange(total, device=device).unsqueeze(0)
        hidden = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(hidden, position_ids)

        # The reused KV, rotated into place; tokens without it are marked always-computed.
        reused = torch.zeros(total, dtype=torch.bool, device=device)
        old_k: list[torch.Tensor | None] = [None] * len(self.layers)
        old_v: list[torch.Tensor | None] = [None] * len(self.layers)
        offset = 0
        for seg, kv in zip(segments, cached, strict=True):
            n = seg.shape[0]
            if kv is not None:
                for i, (k, v) in enumerate(zip(*kv, strict=True)):
                    if old_k[i] is None:
                        shape = (1, k.shape[1], total, k.shape[3])
                        old_k[i] = torch.zeros(shape, dtype=hidden.dtype, device=device)
                        old_v[i] = torch.zeros(shape, dtype=hidden.dtype, device=device)
                    old_k[i][:, :, offset : offset + n] = rotate_keys(k.to(device), offset, self.inv_freq)
                    old_v[i][:, :, offset : offset + n] = v.to(device)
                reused[offset : offset + n] = True
            offset += n
        # An exact prefix is reused as it is (nothing to restore): neither selectable nor computed.
        exact = torch.zeros_like(reused)
        if exact_first and cached[0] is not None:
            exact[: segments[0].shape[0]] = True
            reused &= ~exact
        n_reused = int(reused.sum())

        always = torch.nonzero(~reused & ~exact).flatten()
        rows: torch.Tensor | None = None  # None: every token
        select_at = -1
        if (n_reused or bool(exact.any())) and recompute_ratio < 1.0:
            if recompute_ratio == 0.0 or not n_reused:
                rows = always  # naive concatenation: nothing reused is recomputed
            else:
                select_at = self.full_layers
        model_mask = rows is None  # the model's own causal mask, for its own attention kernel
        mask = self._causal_mask(hidden, position_ids) if rows is None else self._subset_mask(rows, total)
        if rows is not None:
            hidden = hidden[:, rows]

        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            shape = (*x.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(x).view(shape).transpose(1, 2)
            k = attn.k_proj(x).view(shape).transpose(1, 2)
            v = attn.v_proj(x).view(shape).transpose(1, 2)
            if rows is None:
                q, k = self._apply_rope(q, k, cos, sin)
                if i == select_at:
                    rows = self._select(
                        v,
                        old_v=old_v[i],
                        reused=reused,
                        always=always,
                        ratio=recompute_ratio,
                        n_reused=n_reused,
                    )
                    q = q[:, :, rows]
                    hidden = hidden[:, rows]
                    mask = self._subset_mask(rows, total)
                    model_mask = False
                layer_k, layer_v = k, v
            else:
                q, k = self._apply_rope(q, k, cos[:, rows], sin[:, rows])
                layer_k, layer_v = old_k[i], old_v[i]
                layer_k[:, :, rows] = k
                layer_v[:, :, rows] = v
            keys.append(layer_k)
            values.append(layer_v)
            attn_fn = self._full_attn if model_mask else self._part_attn
            out, _ = attn_fn(attn, q, layer_k, layer_v, mask, dropout=0.0, scaling=attn.scaling)
            out = attn.o_proj(out.reshape(*hidden.shape[:-1], -1).contiguous())
            hidden = hidden + out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        # Every row still present: the head over all of them, as the model's forward does (a
        # one-row matmul rounds differently); else only the last row is needed.
        last = self.base.norm(hidden if rows is None else hidden[:, -1:])
        logits = self.model.lm_head(last)[:, -1]
        recomputed = total if rows is None else int(rows.shape[0])
        return BlendOutput(logits, keys, values, recomputed, total)

    @staticmethod
    def _subset_mask(rows: torch.Tensor, total: int) -> torch.Tensor:
        """Boolean ``[1, 1, rows, total]``: query ``rows[i]`` sees keys at positions ``<= rows[i]``."""
        cols = torch.arange(total, device=rows.device)
        return (cols[None, :] <= rows[:, None])[None, None]

    @staticmethod
    def _select(
        v: torch.Tensor,
        *,
        old_v: torch.Tensor | None,
        reused: torch.Tensor,
        always: torch.Tensor,
        ratio: float,
        n_reused: int,
    ) -> torch.Tensor:
        """The sorted token rows to compute from here on: always-computed plus the top deviations."""
        assert old_v is not None  # n_reused > 0
        dev = (v.float() - old_v.float()).pow(2).sum(dim=(0, 1, 3))
        dev = dev.masked_fill(~reused, -1.0)
        pick = min(n_reused, math.ceil(ratio * n_reused))
        top = torch.topk(dev, pick).indices if pick else always[:0]
        return torch.sort(torch.cat((always, top))).values
