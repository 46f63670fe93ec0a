"""``--hicache-storage-backend-extra-config`` for lmcache as SGLang's HiCache storage (no SGLang import).

SGLang hands a storage backend one JSON object. Some of its keys are SGLang's own (how it finds
and drives the backend: ``backend_name``, ``module_path``, ``class_name``, ``interface_v1``…);
the rest are lmcache's and are parsed exactly like the vLLM connector's extra config, by
:meth:`lmcache.integrations.vllm.slots.ConnectorSettings.from_extra_config`: lmcache settings
come from defaults < ``config_file`` (or ``$LMCACHE_CONFIG_FILE``) < ``LMCACHE_*`` env < the
:class:`~lmcache.config.LMCacheConfig` fields given inline (``tiers``, ``chunk_size``, ``tags``…,
also as ``lmcache.<field>``), and an unknown key or a bad value is a :class:`~lmcache.errors.ConfigError`
naming the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lmcache.config import LMCacheConfig
from lmcache.errors import ConfigError
from lmcache.integrations.vllm.slots import ConnectorSettings

__all__ = ["SGLANG_KEYS", "SGLangSettings"]

#: Extra-config keys that SGLang itself reads (to load and drive a backend); lmcache ignores them.
SGLANG_KEYS = (
    "backend_name",
    "module_path",
    "class_name",
    "interface_v1",
    "tp_lcm_size",
    "prefetch_threshold",
    "prefetch_timeout_base",
    "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys",
)
#: The vLLM connector's own keys that mean nothing to SGLang's storage (rejected, not ignored).
_VLLM_ONLY = ("stats_dir", "shared_dir", "save_decode_tokens", "async_loading")


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


@dataclasses.dataclass(frozen=True)
class SGLangSettings:
    """What the extra config says to lmcache.

    Attributes:
        config: lmcache settings (precedence as in the module docstring).
        model_id: Model identity in cache keys; ``None`` means SGLang's ``model_name``.
        zero_copy: SGLang drives the v1 zero-copy calls (``interface_v1`` is set): pages move
            straight between SGLang's host pool and the tiers. Otherwise it uses the legacy
            ``batch_get``/``batch_set`` of flat page tensors, stored under other keys.
    """

    config: LMCacheConfig
    model_id: str | None = None
    zero_copy: bool = False

    @classmethod
    def from_extra_config(
        cls, extra: Mapping[str, Any] | None, environ: Mapping[str, str] | None = None
    ) -> SGLangSettings:
        """Parse SGLang's extra config.

        Raises:
            ConfigError: Not a mapping, an unknown key, a vLLM-only key, or a bad value.
        """
        if extra is None:
            extra = {}
        if not isinstance(extra, Mapping):
            raise ConfigError(f"hicache storage extra config must be a JSON object, got {type(extra).__name__}")
        lmcache_part = {k: v for k, v in extra.items() if k not in SGLANG_KEYS}
        misplaced = sorted(k for k in lmcache_part if k in _VLLM_ONLY)
        if misplaced:
            raise ConfigError(
                f"extra config key(s) {', '.join(misplaced)} belong to the vLLM connector; "
                "SGLang's storage backend does not use them"
            )
        # One parser for both engines: same precedence, same typed errors.
        parsed = ConnectorSettings.from_extra_config(lmcache_part, environ=environ)
        return cls(parsed.config, parsed.model_id, _truthy(extra.get("interface_v1", False)))
