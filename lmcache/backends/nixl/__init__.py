"""``nixl://`` and ``nixl+posix://``: values moved by NVIDIA NIXL transfers, to a peer store's memory or to files.

Two forms:

``nixl://host:port?timeout=30&workers=4&progress_thread=false&ucx_workers=1&native_lane=auto``
    A peer process (``python -m lmcache.backends.nixl.peer --port P --capacity 8GiB``) holds a
    NIXL-registered DRAM pool and the index; :class:`NixlBackend` reserves and looks up values
    over a small control protocol and moves the bytes itself with one-sided NIXL transfers.

``nixl+posix:///abs/dir`` (or ``nixl:///abs/dir?backend=posix``)
    NIXL's POSIX backend as a file store: :class:`NixlPosixBackend`, the ``file://`` layout and
    rules with every read and write of file bytes done as a NIXL DRAM↔FILE transfer.

The package, one topic per module (a name with a leading underscore is private to its module):

* :mod:`~lmcache.backends.nixl.sdk`: loading NIXL, agents, registration, transfers.
* :mod:`~lmcache.backends.nixl.wire`: the control protocol between client and peer.
* :mod:`~lmcache.backends.nixl.lanes`: who makes the data path's NIXL calls (native, Python or
  direct lane, picked once at open).
* :mod:`~lmcache.backends.nixl.native`: the native lane, C (``_lane.c``) built on first use.
* :mod:`~lmcache.backends.nixl.peer`: the peer store and its server.
* :mod:`~lmcache.backends.nixl.backend`: ``nixl://host:port``.
* :mod:`~lmcache.backends.nixl.posix`: ``nixl+posix://``.

Install: ``pip install 'lmcache[nixl]'`` (``nixl-cu12``; the import name ``nixl`` comes from
``pip install --no-deps nixl``, or ``nixl_cu12`` is used directly). UCX reads its configuration
from the environment: on hosts without InfiniBand set ``UCX_MODULES=^ib`` (otherwise processes
can crash at exit), and ``UCX_NET_DEVICES`` to the interfaces to use (``lo`` for a single host).
The NIXL agent's listener is not used (metadata travels over the control socket). Throughput
against the raw SDK, lane by lane, is in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from lmcache.backends.nixl.backend import NixlBackend, NixlSettings
from lmcache.backends.nixl.posix import NixlPosixBackend, NixlPosixSettings
from lmcache.backends.nixl.sdk import import_nixl

__all__ = ["NixlBackend", "NixlPosixBackend", "NixlPosixSettings", "NixlSettings", "import_nixl"]
