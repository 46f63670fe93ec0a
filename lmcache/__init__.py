"""lmcache: a KV-cache layer for LLM inference engines.

Importing this package imports no backend SDK (backends load lazily by URL scheme) and no
torch model code.
"""

from lmcache.backends.base import Capabilities, PutResult, PutStatus, StorageBackend
from lmcache.backends.registry import backend_class, known_schemes, open_backend
from lmcache.config import LMCacheConfig
from lmcache.errors import LMCacheError
from lmcache.keys import CacheKey, ChunkHasher, KeyScope
from lmcache.tiered import TieredBackend

__version__ = "0.1.0"

__all__ = [
    "CacheKey",
    "Capabilities",
    "ChunkHasher",
    "KeyScope",
    "LMCacheConfig",
    "LMCacheError",
    "PutResult",
    "PutStatus",
    "StorageBackend",
    "TieredBackend",
    "__version__",
    "backend_class",
    "known_schemes",
    "open_backend",
]
