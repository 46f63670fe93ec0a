"""Where a codec tier's read time goes: wire, decode, and waits, per group of the read pipeline.

Reads one SmolLM2-135M document's bf16 KV (2048 tokens in 256-token chunks, as ``lmcache bench
codec --e2e-redis`` does) back from a Redis through each codec, ``--rounds`` interleaved rounds,
with :attr:`lmcache.serde.layer.CodecBackend.read_trace` on, and prints per codec the median read
and the medians over the rounds of :func:`lmcache.bench.codec.read_trace_summary` (first group
landed, wire busy, decode CPU and wall time, worst wait for a worker, tail after the wire).
``--fetches``/``--workers`` try other pipeline settings (groups on the wire, worker threads).

    python scripts/codec_read_trace.py --redis "$(scripts/shaped-redis.sh url)" --codec raw --codec cachegen

The KV is computed once and kept in ``--kv-cache`` (a .npy file) for later runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import time
from pathlib import Path

import numpy as np


def real_chunks(cache: Path, doc_tokens: int, chunk: int) -> tuple[list[bytes], str]:
    """One real document's KV chunks (bf16 bytes) and the key model that names their geometry."""
    import torch

    from lmcache.bench import codec as bench
    from lmcache.layouts import KVGeometry

    if cache.exists():
        kv = torch.from_numpy(np.load(cache)).view(torch.bfloat16)
    else:
        from lmcache.bench.realmodel import real_documents

        model, tok = bench._load_smollm2()
        doc = real_documents(tok, 1, doc_tokens)[0]
        kv = bench._kv_of(model.to(torch.bfloat16), doc)
        np.save(cache, kv.view(torch.int16).numpy())
    L, P, _, H, D = kv.shape
    geometry = KVGeometry(num_layers=L, num_kv_heads=H, head_dim=D, dtype="bfloat16", is_mla=P == 1)
    return bench._chunks(kv, chunk), geometry.key_model("trace")


async def run(args: argparse.Namespace) -> None:
    """Put the chunks through each codec, read them back ``rounds`` times, print the figures."""
    from lmcache.backends.registry import open_backend
    from lmcache.bench.codec import read_trace_summary, tier_url
    from lmcache.keys import CacheKey
    from lmcache.serde import layer

    if args.fetches:
        layer.READ_FETCHES = args.fetches
    if args.workers:
        import concurrent.futures

        layer._EXECUTOR[:] = [concurrent.futures.ThreadPoolExecutor(args.workers, thread_name_prefix="lmcache-codec")]
    chunks, key_model = real_chunks(Path(args.kv_cache), args.doc_tokens, args.chunk)
    specs = args.codec or ["raw", "fp8", "int4", "cachegen"]
    backends = {s: open_backend(tier_url(args.redis, s)) for s in specs}
    keys = {s: [CacheKey(key_model, 1, 0, secrets.token_bytes(32), "bfloat16") for _ in chunks] for s in specs}
    dsts = [bytearray(len(c)) for c in chunks]
    times: dict[str, list[float]] = {s: [] for s in specs}
    traces: dict[str, list[list[dict[str, float]]]] = {s: [] for s in specs}
    try:
        for s, b in backends.items():
            await b.open()
            if not all(r.ok for r in await b.put(keys[s], chunks)):
                raise RuntimeError(f"{s}: not stored")
        for _ in range(args.rounds):
            for s, b in backends.items():
                b.read_trace = [] if s != "raw" else None
                t = time.perf_counter()
                got = await b.get_into(keys[s], dsts)
                times[s].append(time.perf_counter() - t)
                if None in got:
                    raise RuntimeError(f"{s}: a value was not read back")
                if b.read_trace:
                    traces[s].append(b.read_trace)
    finally:
        for s, b in backends.items():
            with contextlib.suppress(Exception):
                await b.delete(keys[s])
            await b.aclose()
    nbytes = sum(len(c) for c in chunks)
    raw = statistics.median(times["raw"]) if "raw" in times else None
    print(
        f"{len(chunks)} chunks, {nbytes / 1e6:.1f} MB of bf16 KV, {args.rounds} rounds, fetches {layer.READ_FETCHES}, "
        f"workers {layer.codec_executor()._max_workers}, load {os.getloadavg()}"
    )
    for s in specs:
        p50, best = statistics.median(times[s]), min(times[s])
        line = f"{s:10s} read p50 {p50 * 1e3:6.1f} ms best {best * 1e3:6.1f} ms  {nbytes / p50 / 1e9:5.2f} GB/s"
        if raw:
            line += f"  vs raw {raw / p50:4.2f}x"
        print(line)
        if traces[s]:
            figs = [read_trace_summary(t) for t in traces[s]]
            med = {k: statistics.median(f[k] for f in figs) for k in figs[0]}
            print("           median of rounds (ms): " + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in med.items()))


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--redis", required=True, help="redis:// URL (e.g. from scripts/shaped-redis.sh url)")
    p.add_argument("--codec", action="append", help="codec spec (repeatable; default raw, fp8, int4, cachegen)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--fetches", type=int, default=0, help="groups on the wire at once (default: the layer's)")
    p.add_argument("--workers", type=int, default=0, help="codec worker threads (default: the layer's)")
    p.add_argument("--doc-tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--kv-cache", default="/tmp/lmcache-trace-kv.npy", help="where the document's KV is kept")
    args = p.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
