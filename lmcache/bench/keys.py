"""``lmcache bench keys``: how fast :class:`~lmcache.keys.ChunkHasher` turns tokens into keys.

The goal from the design is that hashing 1M tokens takes well under a second. The workload
hashes ``--tokens`` random token ids (int64, as an engine hands them over) ``--repeat`` times and
reports the median, next to a baseline measured in the same run: one flat BLAKE2b pass over the
same bytes with no chunking or chaining, i.e. the floor set by the hash function itself.
Building full :class:`~lmcache.keys.CacheKey` objects (what an engine lookup does) is timed too.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from lmcache.bench import positive_int, report
from lmcache.keys import ChunkHasher, KeyScope

__all__ = ["add_parser", "bench_keys", "print_summary", "run_cli"]

DESCRIPTION = "ChunkHasher throughput: hash N tokens into chained chunk keys"
GOAL_MS_PER_1M_TOKENS = 1000.0


def bench_keys(tokens: int = 1_000_000, chunk_size: int = 256, repeat: int = 5, seed: int = 0) -> dict[str, Any]:
    """Time hashing ``tokens`` token ids into chunk hashes and keys.

    Args:
        tokens: Number of token ids to hash.
        chunk_size: Tokens per chunk.
        repeat: Rounds; each times hashes, keys and the flat-hash baseline, interleaved.
        seed: Seed of the random token ids.

    Returns:
        A JSON-ready dict with per-round timings, medians and the ratio against the baseline.
    """
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 152_000, size=tokens, dtype=np.int64)  # a modern vocabulary's range
    hasher = ChunkHasher(chunk_size)
    scope = KeyScope.create("lmcache-bench/keys")
    raw = ids.astype("<i8").tobytes()
    hasher.hashes(ids[: chunk_size * 4])  # warm up: first calls pay for imports and allocations
    rounds = []
    n_chunks = 0
    ops: dict[str, Callable[[], Any]] = {
        "hashes_s": lambda: hasher.hashes(ids),
        "keys_s": lambda: hasher.keys(ids, scope),
        "flat_blake2b_s": lambda: hashlib.blake2b(raw, digest_size=32).digest(),
    }
    names = list(ops)
    for r in range(max(1, repeat)):
        row: dict[str, float] = {}
        # Rotate the order each round and keep the collector out of the timed calls (as timeit
        # does), so neither allocation order nor a gen-2 collection lands on one side.
        for name in names[r % 3 :] + names[: r % 3]:
            gc.collect()
            gc.disable()
            try:
                t0 = time.perf_counter()
                out = ops[name]()
                row[name] = time.perf_counter() - t0
            finally:
                gc.enable()
            if name != "flat_blake2b_s":
                n_chunks = len(out)
        rounds.append(row)
    med = {name: report.median(r[name] for r in rounds) for name in ("hashes_s", "keys_s", "flat_blake2b_s")}
    hashes_s = med["hashes_s"] or float("nan")
    keys_s = med["keys_s"] or float("nan")
    ms_per_1m = hashes_s * 1e3 * 1_000_000 / tokens
    keys_ms_per_1m = keys_s * 1e3 * 1_000_000 / tokens
    return {
        "workload": "keys",
        "params": {"tokens": tokens, "chunk_size": chunk_size, "repeat": repeat, "seed": seed},
        "chunks": n_chunks,
        "rounds": rounds,
        "median": {
            "hashes_s": med["hashes_s"],
            "keys_s": med["keys_s"],
            "flat_blake2b_s": med["flat_blake2b_s"],
            "tokens_per_s": tokens / hashes_s,
            "ms_per_1m_tokens": ms_per_1m,
            "keys_tokens_per_s": tokens / keys_s,
            "keys_ms_per_1m_tokens": keys_ms_per_1m,
        },
        # Flat BLAKE2b over the same bytes is the cost floor: ratio = hasher speed / floor speed.
        "ratio_vs_flat_blake2b": report.ratio(med["flat_blake2b_s"], med["hashes_s"]),
        "goal": {"ms_per_1m_tokens_below": GOAL_MS_PER_1M_TOKENS, "met": keys_ms_per_1m < GOAL_MS_PER_1M_TOKENS},
    }


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    """Table rows for a :func:`bench_keys` result."""
    m = result["median"]
    return [
        ["ChunkHasher.hashes", m["tokens_per_s"] / 1e6, m["ms_per_1m_tokens"], result["ratio_vs_flat_blake2b"]],
        ["ChunkHasher.keys", m["keys_tokens_per_s"] / 1e6, m["keys_ms_per_1m_tokens"], None],
        [
            "flat blake2b (baseline)",
            result["params"]["tokens"] / m["flat_blake2b_s"] / 1e6,
            m["flat_blake2b_s"] * 1e3 * 1_000_000 / result["params"]["tokens"],
            1.0,
        ],
    ]


def print_summary(result: dict[str, Any]) -> None:
    """Print the keys table to stdout."""
    p = result["params"]
    title = (
        f"keys: ChunkHasher throughput ({p['tokens']:,} tokens, chunk_size {p['chunk_size']}, "
        f"{result['chunks']:,} chunks, median of {p['repeat']})"
    )
    headers = ["operation", "Mtokens/s", "ms / 1M tokens", "ratio vs baseline"]
    print(report.render_table(headers, summary_rows(result), title=title))
    goal = result["goal"]
    verdict = "met" if goal["met"] else "NOT met"
    print(f"goal: 1M tokens to keys in < {goal['ms_per_1m_tokens_below']:.0f} ms: {verdict}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench keys`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("keys", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=positive_int, default=1_000_000, help="token ids to hash (default 1000000)")
    p.add_argument("--chunk-size", type=positive_int, default=256, help="tokens per chunk (default 256)")
    p.add_argument("--repeat", type=positive_int, default=5, help="rounds; the median is reported (default 5)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench keys`` from parsed arguments."""
    result = bench_keys(tokens=args.tokens, chunk_size=args.chunk_size, repeat=args.repeat)
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("keys", "chunkhasher"), result)
    print(f"results: {path}")
    return 0
