"""The standalone cache server (``lmcache server``), its lm:// wire protocol and client.

Modules: :mod:`~lmcache.server.protocol` (frames), :mod:`~lmcache.server.shm` (shared-memory
segments and their ownership), :mod:`~lmcache.server.daemon` (the server), :mod:`~lmcache.server.http`
(control API), :mod:`~lmcache.server.metrics` (Prometheus), :mod:`~lmcache.server.timed` (per-tier
timings), :mod:`~lmcache.server.client`
(``LMServerBackend`` for ``lm://`` and ``lm+unix://``), :mod:`~lmcache.server.ctl`
(``lmcache server-ctl``). Nothing is imported here, so ``import lmcache.server.client`` does not
pull in aiohttp or prometheus-client.
"""

from __future__ import annotations

__all__: list[str] = []
