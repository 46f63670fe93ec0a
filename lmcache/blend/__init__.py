"""Non-prefix KV reuse (CacheBlend-style selective recompute).

* :mod:`lmcache.blend.store`: segments' position-free KV under ``lmcache.blend``-tagged keys;
* :mod:`lmcache.blend.rope`: which RoPE schemes are supported, rotating keys to new positions;
* :mod:`lmcache.blend.blender`: the layer-by-layer prefill that reuses segment KV and
  recomputes the tokens whose KV deviates most.

The user-facing entry point is
:meth:`lmcache.integrations.transformers.CachedCausalLM.prefill_segments`; see ``docs/blend.md``.
This package imports torch; :mod:`.blender` imports transformers when a blender is built.
"""

from __future__ import annotations

from lmcache.blend.blender import BlendOutput, SegmentBlender, check_blendable
from lmcache.blend.rope import SUPPORTED_ROPE_TYPES, rope_frequencies, rotate_keys
from lmcache.blend.store import AFTER_TAG, BLEND_TAG, BLEND_TAG_VALUE, SegmentStore, blend_scope, prefix_digest

__all__ = [
    "AFTER_TAG",
    "BLEND_TAG",
    "BLEND_TAG_VALUE",
    "SUPPORTED_ROPE_TYPES",
    "BlendOutput",
    "SegmentBlender",
    "SegmentStore",
    "blend_scope",
    "check_blendable",
    "prefix_digest",
    "rope_frequencies",
    "rotate_keys",
]
