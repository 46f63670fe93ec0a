"""Storage backends: the contract (``base``), the URL registry and one module per adapter."""

from lmcache.backends.base import Capabilities, PutResult, PutStatus, StorageBackend
from lmcache.backends.registry import backend_class, known_schemes, open_backend

__all__ = ["Capabilities", "PutResult", "PutStatus", "StorageBackend", "backend_class", "known_schemes", "open_backend"]
