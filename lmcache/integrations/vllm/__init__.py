"""lmcache's vLLM v1 KV connector.

Load it with ``--kv-transfer-config '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
"kv_connector_module_path": "lmcache.integrations.vllm"}'`` (see docs/vllm.md). The connector class
imports vLLM, so it is loaded on first access; :mod:`lmcache.integrations.vllm.slots` does not.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LMCacheConnectorV1"]


def __getattr__(name: str) -> Any:
    if name in ("LMCacheConnectorV1", "LMCacheConnectorMetadata"):
        from lmcache.integrations.vllm import connector

        return getattr(connector, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
