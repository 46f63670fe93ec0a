"""The lmcache exception tree: every error lmcache raises on purpose is one of these.

Lower-layer exceptions (redis-py, botocore, OSError, SDK codes) are mapped at the backend
boundary into the most specific type here and raised ``from`` the original, so callers never
have to catch a dependency's exception types. Each class also subclasses the matching builtin,
so generic handlers (``except ValueError``) keep working::

    LMCacheError
    ├── ConfigError (ValueError)                 bad URL, unknown option, bad value
    │   ├── UnknownSchemeError                   no backend serves this URL scheme
    │   └── PluginConflictError                  two plugins claim one scheme
    ├── MissingDependencyError (ImportError)     an optional SDK is absent; names the extra
    ├── InvalidArgumentError (ValueError)        bad input to an API call
    │   ├── InvalidBufferError                   wrong size, read-only or non-contiguous buffer
    │   └── LayoutMismatchError                  KV geometry/dtype does not match the cache
    ├── StateError (RuntimeError)                operation not valid in the object's state
    │   └── BackendClosedError                   a closed backend is final
    ├── UnsupportedOperationError (NotImplementedError)
    └── BackendError (RuntimeError)              a backend failed at run time
        ├── TransientBackendError                retrying may help
        │   ├── BackendUnavailableError (ConnectionError)
        │   └── BackendTimeoutError (TimeoutError)
        ├── PermanentBackendError                retrying will not help
        │   └── AuthError (PermissionError)
        ├── IntegrityError                       a stored value failed its checksum/header check
        └── CapacityError                        the store is full and cannot make room

Misses are never exceptions: a backend returns ``None``/``False`` for a key it does not hold.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

__all__ = [
    "AuthError",
    "BackendClosedError",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "CapacityError",
    "ConfigError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidBufferError",
    "LMCacheError",
    "LayoutMismatchError",
    "MissingDependencyError",
    "PermanentBackendError",
    "PluginConflictError",
    "StateError",
    "TransientBackendError",
    "UnknownSchemeError",
    "UnsupportedOperationError",
    "map_os_errors",
]


class LMCacheError(Exception):
    """Root of every exception lmcache raises on purpose."""


class ConfigError(LMCacheError, ValueError):
    """A configuration value, URL or option is invalid; the message names the key."""


class UnknownSchemeError(ConfigError):
    """No built-in backend or installed plugin serves the URL scheme."""


class PluginConflictError(ConfigError):
    """Two installed distributions register the same backend scheme."""


class MissingDependencyError(LMCacheError, ImportError):
    """An optional dependency is not installed.

    Args:
        package: The import name that failed.
        extra: The lmcache extra that installs it (``pip install 'lmcache[extra]'``).
        purpose: What needed it, e.g. ``"the redis:// backend"``.
    """

    def __init__(self, package: str, extra: str | None, purpose: str) -> None:
        hint = f"pip install 'lmcache[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{purpose} needs the package {package!r}, which is not installed: {hint}")
        self.package = package
        self.extra = extra


class InvalidArgumentError(LMCacheError, ValueError):
    """An argument to an lmcache API is invalid (wrong type, range or length)."""


class InvalidBufferError(InvalidArgumentError):
    """A buffer is too small, read-only, non-contiguous or on an unsupported device."""


class LayoutMismatchError(InvalidArgumentError):
    """KV tensors or stored chunks do not match the expected geometry or dtype."""


class StateError(LMCacheError, RuntimeError):
    """The operation is not valid in the object's current state."""


class BackendClosedError(StateError):
    """The backend was closed; a closed backend cannot be reopened."""


class UnsupportedOperationError(LMCacheError, NotImplementedError):
    """The backend does not support this operation (see its capabilities)."""


class BackendError(LMCacheError, RuntimeError):
    """A storage backend failed at run time."""


class TransientBackendError(BackendError):
    """A failure that may go away on retry (connection loss, timeout, throttling)."""


class BackendUnavailableError(TransientBackendError, ConnectionError):
    """The backend's server or medium cannot be reached."""


class BackendTimeoutError(TransientBackendError, TimeoutError):
    """The backend did not answer within the configured timeout."""


class PermanentBackendError(BackendError):
    """A failure that retrying will not fix (bad bucket, permission, protocol error)."""


class AuthError(PermanentBackendError, PermissionError):
    """Authentication or authorisation with the backend failed."""


class IntegrityError(BackendError):
    """A stored value is truncated, corrupted or does not belong to its key."""


class CapacityError(BackendError):
    """The store is full and cannot make room for the value."""


_TRANSIENT_ERRNOS = frozenset(
    {errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED}
)
_CAPACITY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.ENOMEM})
_AUTH_ERRNOS = frozenset({errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """Map ``OSError`` raised in the block to the matching :class:`BackendError`.

    Args:
        what: A short description of the operation, used in the message.
    """
    try:
        yield
    except TimeoutError as exc:
        raise BackendTimeoutError(f"{what}: timed out") from exc
    except OSError as exc:
        code = exc.errno
        msg = f"{what}: {exc.strerror or exc}"
        if code in _CAPACITY_ERRNOS:
            raise CapacityError(msg) from exc
        if code in _AUTH_ERRNOS:
            raise AuthError(msg) from exc
        if code in _TRANSIENT_ERRNOS or isinstance(exc, ConnectionError):
            raise BackendUnavailableError(msg) from exc
        raise PermanentBackendError(msg) from exc
