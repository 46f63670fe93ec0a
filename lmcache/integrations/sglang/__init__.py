"""lmcache as SGLang's HiCache storage backend.

Load it with ``--enable-hierarchical-cache --hicache-storage-backend dynamic
--hicache-storage-backend-extra-config '{"backend_name": "lmcache", "module_path":
"lmcache.integrations.sglang", "class_name": "LMCacheHiCacheStorage", "interface_v1": 1, "tiers":
["memory://?capacity=8GiB"]}'`` (see docs/sglang.md). Importing this package imports SGLang;
:mod:`lmcache.integrations.sglang.settings` does not.
"""

from __future__ import annotations

from lmcache.integrations.sglang.settings import SGLangSettings
from lmcache.integrations.sglang.storage import LMCacheHiCacheStorage

__all__ = ["LMCacheHiCacheStorage", "SGLangSettings"]
