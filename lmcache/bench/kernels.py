"""``lmcache bench kernels``: gather/scatter throughput between paged KV and chunk buffers.

Times :meth:`lmcache.kernels.PagedKV.gather` (engine KV → chunk buffer) and
:meth:`~lmcache.kernels.PagedKV.scatter` (chunk buffer → engine KV) for one chunk of a realistic
geometry (default: 32 layers, 8 KV heads, head dim 128, 256 tokens, block size 16: 32 MiB in
bf16), next to a baseline measured in the same run on the same number of bytes: a numpy
``copyto`` between two preallocated contiguous arrays, i.e. memcpy, the floor for any copy. A
ratio near 1 means the slot-mapped copy costs what a flat copy does. That baseline's source stays
hot in the CPU caches between rounds while the engine cache (``--cache-chunks`` chunks) does not,
so a second baseline copies from a rotating, cache-sized region ("cold").

The chunk's blocks are drawn at random from the cache (as a long-running engine's block tables
look), with ``--contiguous`` for the best case.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lmcache.bench import positive_int, report
from lmcache.kernels import PagedKV
from lmcache.layouts import LAYOUTS, KVLayout, dtype_from_name, get_layout

__all__ = ["DESCRIPTION", "add_parser", "bench_kernels", "print_summary", "run_cli"]

DESCRIPTION = "gather/scatter between paged KV and chunk buffers vs a same-run memcpy"


def _engine_shape(layout: KVLayout, *, blocks: int, block_size: int, heads: int, head_dim: int) -> tuple[int, ...]:
    """The per-layer tensor shape of ``layout``, read off its axis letters (not a table of names).

    ``X`` is the packed content axis of vLLM 0.32's layouts: the latent for MLA, K and V of one
    head (``2 * head_dim``) otherwise.
    """
    content = head_dim if layout.is_mla else 2 * head_dim
    sizes = {"K": 2, "B": blocks, "S": block_size, "H": heads, "D": head_dim, "X": content}
    return tuple(sizes[axis] for axis in layout.axes)


def _engine_kv(
    layout_name: str, *, layers: int, blocks: int, block_size: int, heads: int, head_dim: int, dtype: Any, device: str
) -> PagedKV:
    layout = get_layout(layout_name)
    if layout.is_mla:
        heads = 1
    shape = _engine_shape(layout, blocks=blocks, block_size=block_size, heads=heads, head_dim=head_dim)
    if layout.separate_kv:
        tensors: list[Any] = [
            (torch.randn(shape, device=device).to(dtype), torch.randn(shape, device=device).to(dtype))
            for _ in range(layers)
        ]
    else:
        tensors = [torch.randn(shape, device=device).to(dtype) for _ in range(layers)]
    return PagedKV(tensors, layout=layout)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    gc.collect()
    gc.disable()
    try:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0
    finally:
        gc.enable()


def bench_kernels(
    *,
    layout: str = "flash_attn",
    layers: int = 32,
    heads: int = 8,
    head_dim: int = 128,
    chunk_tokens: int = 256,
    block_size: int = 16,
    cache_chunks: int = 4,
    dtype: str = "bfloat16",
    device: str = "cpu",
    backend: str = "auto",
    contiguous: bool = False,
    repeat: int = 7,
    seed: int = 0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time one chunk's gather and scatter against a numpy copy of the same bytes.

    Args:
        layout: Engine layout name (see :data:`lmcache.layouts.LAYOUTS`).
        layers: Layers per chunk.
        heads: KV heads (forced to 1 for MLA).
        head_dim: Head dim (MLA: latent width).
        chunk_tokens: Tokens per chunk.
        block_size: Tokens per engine block.
        cache_chunks: Engine cache size, in chunks (the chunk's blocks are drawn from it).
        dtype: KV dtype name.
        device: ``"cpu"`` or ``"cuda"``; on CUDA the chunk buffer is pinned host memory.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        contiguous: Use consecutive blocks instead of random ones.
        repeat: Rounds; medians are reported.
        seed: Seed for the block choice.
        threads: torch intra-op threads for the run (default: leave torch's setting). On a busy
            machine with few cores, 1 gives steadier numbers: a descheduled helper thread can
            stall a whole parallel copy.

    Returns:
        A JSON-ready dict: params, per-round seconds, medians, GB/s and ratios vs the baseline.
    """
    torch_dtype = dtype_from_name(dtype)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            layout=layout,
            layers=layers,
            heads=heads,
            head_dim=head_dim,
            chunk_tokens=chunk_tokens,
            block_size=block_size,
            cache_chunks=cache_chunks,
            torch_dtype=torch_dtype,
            device=device,
            backend=backend,
            contiguous=contiguous,
            repeat=repeat,
            seed=seed,
        )
    finally:
        torch.set_num_threads(saved_threads)


def _run(
    *,
    layout: str,
    layers: int,
    heads: int,
    head_dim: int,
    chunk_tokens: int,
    block_size: int,
    cache_chunks: int,
    torch_dtype: torch.dtype,
    device: str,
    backend: str,
    contiguous: bool,
    repeat: int,
    seed: int,
) -> dict[str, Any]:
    if get_layout(layout).is_mla:
        heads = 1
    blocks_per_chunk = -(-chunk_tokens // block_size)
    num_blocks = blocks_per_chunk * max(1, cache_chunks)
    kv = _engine_kv(
        layout,
        layers=layers,
        blocks=num_blocks,
        block_size=block_size,
        heads=heads,
        head_dim=head_dim,
        dtype=torch_dtype,
        device=device,
    )
    rng = np.random.default_rng(seed)
    chosen = np.arange(blocks_per_chunk) if contiguous else rng.permutation(num_blocks)[:blocks_per_chunk]
    slots_np = (chosen[:, None] * block_size + np.arange(block_size)[None, :]).reshape(-1)[:chunk_tokens]
    slots = torch.from_numpy(slots_np.astype(np.int64))
    shape = kv.geometry.chunk_shape(chunk_tokens)
    pin = device != "cpu" and torch.cuda.is_available()
    buf = torch.empty(shape, dtype=torch_dtype, pin_memory=pin)
    nbytes = buf.numel() * buf.element_size()
    src_np = np.random.default_rng(seed + 1).integers(0, 255, nbytes, dtype=np.uint8)
    dst_np = np.empty_like(src_np)
    # A second baseline reads from a region as large as the engine cache, a different chunk's
    # worth each time, so its source is as cold in the CPU caches as the gather's.
    cache_bytes = nbytes * max(1, cache_chunks)
    cold_np = np.random.default_rng(seed + 2).integers(0, 255, cache_bytes, dtype=np.uint8)
    cold_at = [0]

    def cold_copy() -> None:
        start = cold_at[0]
        cold_at[0] = (start + nbytes) % cache_bytes
        np.copyto(dst_np, cold_np[start : start + nbytes])

    if device == "cpu":

        def sync() -> None:
            pass

    else:

        def sync() -> None:
            torch.cuda.synchronize()

    ops: dict[str, Callable[[], Any]] = {
        "gather_s": lambda: kv.gather(slots, buf, backend=backend).synchronize(),  # type: ignore[arg-type]
        "scatter_s": lambda: kv.scatter(slots, buf, backend=backend).synchronize(),  # type: ignore[arg-type]
        "numpy_copy_s": lambda: np.copyto(dst_np, src_np),
        "numpy_copy_cold_s": cold_copy,
    }
    for op in ops.values():  # warm up: first calls pay for allocation, page faults, JIT
        op()
        op()
    names = list(ops)
    rounds: list[dict[str, float]] = []
    for r in range(max(1, repeat)):
        # Rotate the order so no side always runs first (with a cold cache).
        k = r % len(names)
        rounds.append({name: _timed(ops[name], sync) for name in names[k:] + names[:k]})
    med = {name: report.median(row[name] for row in rounds) for name in names}

    def gbps(seconds: float | None) -> float | None:
        return nbytes / seconds / 1e9 if seconds else None

    return {
        "workload": "kernels",
        "params": {
            "layout": kv.layout.name,
            "geometry": kv.geometry.identity,
            "chunk_tokens": chunk_tokens,
            "block_size": block_size,
            "num_blocks": num_blocks,
            "device": device,
            "backend": backend,
            "contiguous_blocks": contiguous,
            "repeat": repeat,
            "chunk_bytes": nbytes,
            "torch_threads": torch.get_num_threads(),
        },
        "rounds": rounds,
        "median": med,
        "gbps": {
            "gather": gbps(med["gather_s"]),
            "scatter": gbps(med["scatter_s"]),
            "numpy_copy": gbps(med["numpy_copy_s"]),
            "numpy_copy_cold": gbps(med["numpy_copy_cold_s"]),
        },
        # Throughput ratios (system / baseline): 1.0 = as fast as memcpy of the same bytes.
        "ratio_vs_numpy_copy": {
            "gather": report.ratio(gbps(med["gather_s"]), gbps(med["numpy_copy_s"])),
            "scatter": report.ratio(gbps(med["scatter_s"]), gbps(med["numpy_copy_s"])),
        },
        "ratio_vs_numpy_copy_cold": {
            "gather": report.ratio(gbps(med["gather_s"]), gbps(med["numpy_copy_cold_s"])),
            "scatter": report.ratio(gbps(med["scatter_s"]), gbps(med["numpy_copy_cold_s"])),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    """Print the kernels table to stdout."""
    p = result["params"]
    title = (
        f"kernels: {p['layout']} {p['geometry']}, {p['chunk_tokens']} tokens/chunk "
        f"({p['chunk_bytes'] / 2**20:.1f} MiB), block size {p['block_size']}, {p['device']}/{p['backend']}, "
        f"{p['torch_threads']} torch thread(s), median of {p['repeat']}"
    )
    g, m = result["gbps"], result["median"]
    r, rc = result["ratio_vs_numpy_copy"], result["ratio_vs_numpy_copy_cold"]
    rows = [
        ["gather (KV -> chunk)", g["gather"], m["gather_s"] * 1e3, r["gather"], rc["gather"]],
        ["scatter (chunk -> KV)", g["scatter"], m["scatter_s"] * 1e3, r["scatter"], rc["scatter"]],
        ["numpy copy (baseline)", g["numpy_copy"], m["numpy_copy_s"] * 1e3, 1.0, None],
        ["numpy copy, cold source", g["numpy_copy_cold"], m["numpy_copy_cold_s"] * 1e3, None, 1.0],
    ]
    headers = ["operation", "GB/s", "ms / chunk", "ratio vs numpy", "ratio vs cold numpy"]
    print(report.render_table(headers, rows, title=title))


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench kernels`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("kernels", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="flash_attn", help="engine KV layout")
    p.add_argument("--layers", type=positive_int, default=32)
    p.add_argument("--heads", type=positive_int, default=8, help="KV heads (MLA: 1)")
    p.add_argument("--head-dim", type=positive_int, default=128)
    p.add_argument("--chunk-tokens", type=positive_int, default=256)
    p.add_argument("--block-size", type=positive_int, default=16)
    p.add_argument("--cache-chunks", type=positive_int, default=4, help="engine cache size in chunks (default 4)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--contiguous", action="store_true", help="consecutive blocks instead of random ones")
    p.add_argument("--repeat", type=positive_int, default=7, help="rounds; the median is reported (default 7)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench kernels`` from parsed arguments."""
    result = bench_kernels(
        layout=args.layout,
        layers=args.layers,
        heads=args.heads,
        head_dim=args.head_dim,
        chunk_tokens=args.chunk_tokens,
        block_size=args.block_size,
        cache_chunks=args.cache_chunks,
        dtype=args.dtype,
        device=args.device,
        backend=args.backend,
        contiguous=args.contiguous,
        repeat=args.repeat,
        threads=args.threads,
    )
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("kernels", args.layout), result)
    print(f"results: {path}")
    return 0
