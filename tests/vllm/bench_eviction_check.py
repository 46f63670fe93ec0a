"""Cost of one ``BlockRemoved`` eviction check: a batched ``contains`` against a ``server: auto`` server.

Run: ``.venv/bin/python tests/vllm/bench_eviction_check.py`` (starts a server in a private tmp
run folder, stops it at the end). Prints the median and p90 time of
:func:`lmcache.integrations.vllm.events.tiers_holding` over 256 and 2048 keys (half held), the
check the vLLM connector runs every ``eviction_check_interval`` on its engine loop.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import tempfile
import time

from lmcache.backends.registry import open_backend
from lmcache.integrations.vllm.events import tiers_holding
from lmcache.integrations.vllm.server_auto import ensure_server
from lmcache.keys import CacheKey

REPEAT = 20


async def _measure(url: str) -> None:
    async with open_backend(url) as backend:
        for n in (256, 2048):
            keys = [CacheKey("bench", 1, 0, i.to_bytes(32, "little"), "float32") for i in range(n)]
            await backend.put(keys[: n // 2], [b"x" * 1024] * (n // 2))
            times = []
            for _ in range(REPEAT):
                t = time.perf_counter()
                found = await tiers_holding([backend], keys, 5.0)
                times.append(time.perf_counter() - t)
            assert sum(found) == n // 2
            p90 = sorted(times)[int(0.9 * REPEAT) - 1]
            print(f"keys={n} median_ms={statistics.median(times) * 1e3:.2f} p90_ms={p90 * 1e3:.2f}")


def main() -> None:
    run = tempfile.mkdtemp(prefix="lmcache-bench-xdg.")
    os.environ["XDG_RUNTIME_DIR"] = run
    server = ensure_server(["memory://?capacity=1GiB"])
    try:
        asyncio.run(_measure(server.url))
    finally:
        if server.pid is not None:
            os.kill(server.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while os.waitpid(server.pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.1)  # our child: reaped here once it has flushed and exited
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
