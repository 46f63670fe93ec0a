"""``lmcache bench sglang``: SGLang's zero-copy HiCache calls through lmcache vs lmcache's own calls.

Both sides move the same pages of a real SGLang host pool (``MHATokenToKVPoolHost``, CPU
tensors) to and from one :class:`~lmcache.tiered.TieredBackend`, in the same run:

* adapter: :meth:`~lmcache.integrations.sglang.LMCacheHiCacheStorage.batch_set_v1` and
  ``batch_get_v1`` (key derivation, the pool's page-address helper, the hop to the event loop);
* baseline: ``put`` and ``get_into`` of the backend with the same segment views and keys built
  beforehand, run on the same loop thread (what any synchronous caller pays).

The goal is adapter throughput ≥ 90% of the baseline, both ways. Every round uses fresh keys
(values are write-once) and deletes them afterwards, outside the timed part.

The module also holds what the tests share: :func:`import_sglang` (SGLang's host-pool modules
import its model configs, which import torchvision; PyPI's torchvision wheels are CUDA builds
that cannot load against the CPU torch, so an inert stand-in is used when the real one fails to
import: nothing here calls it), :func:`host_pool` and :func:`storage_config`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.abc
import importlib.machinery
import sys
import time
import types
from collections.abc import Callable
from typing import Any

from lmcache.bench import positive_int, report

__all__ = ["add_parser", "bench_sglang", "host_pool", "import_sglang", "print_summary", "run_cli", "storage_config"]

DESCRIPTION = "SGLang HiCache batch_set_v1/batch_get_v1 through lmcache vs the backend's put/get_into"
GOAL_RATIO = 0.9


class _Inert:
    """Stands in for any torchvision attribute; only ever touched at import time by SGLang."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __getattr__(self, name: str) -> _Inert:
        return _Inert()


class _InertTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: _Inert()  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_sglang(*extra: str) -> types.ModuleType:
    """Import SGLang's storage and host-pool modules (and the modules ``extra``) on the CPU torch.

    When torchvision does not import, an inert stand-in serves SGLang's module-level
    ``import torchvision…`` lines during these imports only: afterwards it is taken out again
    (of ``sys.meta_path`` and ``sys.modules``), so no other code ever sees it.

    Raises:
        ImportError: SGLang (or one of the few packages those modules import) is missing.
    """
    modules = (
        "sglang",
        "sglang.srt.mem_cache.hicache_storage",
        "sglang.srt.mem_cache.memory_pool",
        "sglang.srt.mem_cache.pool_host.mha",
        "sglang.srt.mem_cache.pool_host.mla",
        "sglang.srt.mem_cache.storage.backend_factory",
        *extra,
    )
    if all(m in sys.modules for m in modules):
        return sys.modules["sglang"]
    stand_in: _InertTorchvision | None = None
    try:
        import torchvision  # noqa: F401
    except Exception:
        # transformers asks once (cached) whether torchvision is usable: it must hear "no"
        # before the stand-in exists, so it never calls into it.
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
        _drop_torchvision()
        stand_in = _InertTorchvision()
        sys.meta_path.insert(0, stand_in)
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if stand_in is not None:
            sys.meta_path.remove(stand_in)
            _drop_torchvision()
    return sys.modules["sglang"]


def _drop_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


#: The host RAM :func:`host_pool` books its pools against (bytes).
HOST_POOL_BUDGET = 4 << 30


def host_pool(
    kind: str,
    layout: str,
    *,
    page_size: int = 4,
    layers: int = 3,
    heads: int = 2,
    head_dim: int = 8,
    pages: int = 16,
    dtype: Any = None,
) -> Any:
    """One of SGLang's own host pools on CPU tensors (``kind``: ``"mha"`` or ``"mla"``)."""
    import_sglang()
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool
    from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
    from sglang.srt.mem_cache.pool_host.mla import MLATokenToKVPoolHost

    try:
        from sglang.srt.mem_cache.pool_host.base import host_memory_budget_scope
    except ImportError:  # an SGLang without the budget check
        scope: Any = contextlib.nullcontext()
    else:
        # SGLang sizes a host pool against the RAM free right now minus a 10 GiB reserve; these
        # pools are a few MB, and a shared host's free RAM at that moment must not decide whether
        # they can be made. The scope books them against a fixed allowance instead.
        scope = host_memory_budget_scope(HOST_POOL_BUDGET)
    dtype = dtype or torch.bfloat16
    tokens = pages * page_size
    with scope:
        if kind == "mha":
            dev = MHATokenToKVPool(
                tokens, page_size, dtype, heads, head_dim, layers, "cpu", False, start_layer=0, end_layer=layers
            )
            return MHATokenToKVPoolHost(
                dev.get_device_pool_infos()[0].buffer_info,
                2.0,
                0,
                page_size,
                layout,
                pin_memory=False,
                device_capacity_tokens=dev.size,
                start_layer=0,
                end_layer=layers,
            )
        if kind == "mla":
            dev = MLATokenToKVPool(tokens, page_size, dtype, head_dim * 2, head_dim, layers, "cpu", False, 0, layers)
            return MLATokenToKVPoolHost(
                dev.get_device_pool_infos()[0].buffer_info,
                2.0,
                0,
                page_size,
                layout,
                pin_memory=False,
                device_capacity_tokens=dev.size,
                start_layer=0,
                end_layer=layers,
                target_layer_num=layers,
            )
    raise ValueError(f"kind must be mha or mla, got {kind!r}")


def storage_config(
    kind: str,
    *,
    extra: dict[str, Any] | None = None,
    tp_rank: int = 0,
    tp_size: int = 1,
    model_name: str | None = "bench/model",
) -> Any:
    """SGLang's ``HiCacheStorageConfig`` for one rank."""
    import_sglang()
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(
        tp_rank=tp_rank,
        tp_size=tp_size,
        pp_rank=0,
        pp_size=1,
        attn_cp_rank=0,
        attn_cp_size=1,
        is_mla_model=kind == "mla",
        enable_storage_metrics=False,
        is_page_first_layout=True,
        model_name=model_name,
        extra_config=extra,
    )


def bench_sglang(
    *,
    tier: str = "memory://?capacity=2GiB",
    pages: int = 32,
    page_size: int = 64,
    layers: int = 16,
    heads: int = 8,
    head_dim: int = 128,
    repeat: int = 10,
) -> dict[str, Any]:
    """Time the adapter's v1 calls against the backend's own calls on one tier.

    Returns:
        A JSON-ready dict: per-round seconds, medians, GB/s and adapter/baseline ratios.
    """
    import_sglang()
    import torch

    from lmcache.integrations.sglang import LMCacheHiCacheStorage
    from lmcache.integrations.sglang.storage import page_digest
    from lmcache.tiered import TieredBackend

    pool = host_pool(
        "mha", "page_first", page_size=page_size, layers=layers, heads=heads, head_dim=head_dim, pages=pages * 2
    )
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape).to(pool.kv_buffer.dtype))
    backend = TieredBackend.from_urls([tier])
    extra = {"interface_v1": 1, "tiers": [tier]}
    store = LMCacheHiCacheStorage(storage_config("mha", extra=extra), {}, backend=backend)
    store.register_mem_pool_host(pool)
    src = pool.alloc(pages * page_size)
    dst = pool.alloc(pages * page_size)
    nbytes = pages * page_size * pool.size_per_token
    run = store.run  # the same loop thread for both sides
    scope = store.scope
    assert scope is not None
    src_views = store.page_views(pages, src)
    dst_views = store.page_views(pages, dst)
    rounds: list[dict[str, float]] = []

    def timed(op: Callable[[], Any], what: str) -> float:
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            out = op()
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        if isinstance(out, list) and out and isinstance(out[0], bool) and not all(out):
            raise RuntimeError(f"{what}: the adapter missed a page")
        return elapsed

    try:
        # Round 0 warms up (first-touch page faults of the tier's memory, lazy imports): not kept.
        for r in range(max(1, repeat) + 1):
            # Two batches per side in A B B A order, for writes and then reads: whatever runs
            # first or right after a write (page faults, writeback) weighs on both sides alike.
            adapter = [[f"r{r}-{j}-adapter-{i}" for i in range(pages)] for j in (0, 1)]
            base = [
                [scope.key(page_digest(f"r{r}-{j}-base-{i}", s)) for i in range(pages) for s in (0, 1)] for j in (0, 1)
            ]
            # A B B A in even rounds, B A A B in odd ones: the slot right after the previous
            # round's deletes (the allocator hands memory back and faults it in again) alternates.
            order = (("a", 0), ("b", 0), ("b", 1), ("a", 1)) if r % 2 == 0 else (("b", 0), ("a", 0), ("a", 1), ("b", 1))
            row = {"adapter_set_s": 0.0, "baseline_put_s": 0.0, "adapter_get_s": 0.0, "baseline_get_s": 0.0}
            for side, j in order:
                if side == "a":
                    row["adapter_set_s"] += timed(lambda pk=adapter[j]: store.batch_set_v1(pk, src), "set") / 2
                else:
                    row["baseline_put_s"] += timed(lambda bk=base[j]: run(backend.put(bk, src_views)), "put") / 2
            for side, j in order:
                if side == "a":
                    row["adapter_get_s"] += timed(lambda pk=adapter[j]: store.batch_get_v1(pk, dst), "get") / 2
                else:
                    row["baseline_get_s"] += timed(lambda bk=base[j]: run(backend.get_into(bk, dst_views)), "get") / 2
            if r > 0:
                rounds.append(row)
            run(backend.delete([*store.keys_for(adapter[0] + adapter[1]), *base[0], *base[1]]))
    finally:
        store.close()
        import asyncio

        asyncio.run(backend.aclose())
    names = ("adapter_set_s", "baseline_put_s", "adapter_get_s", "baseline_get_s")
    med = {n: report.median(r[n] for r in rounds) for n in names}
    set_ratio = report.ratio(med["baseline_put_s"], med["adapter_set_s"])
    get_ratio = report.ratio(med["baseline_get_s"], med["adapter_get_s"])
    return {
        "workload": "sglang",
        "params": {
            "tier": tier,
            "pages": pages,
            "page_size": page_size,
            "layers": layers,
            "heads": heads,
            "head_dim": head_dim,
            "repeat": repeat,
            "bytes_per_batch": nbytes,
        },
        "rounds": rounds,
        "median": med,
        "gbps": {n: (nbytes / med[n] / 1e9 if med[n] else None) for n in names},
        "ratio_set": set_ratio,
        "ratio_get": get_ratio,
        "goal": {
            "ratio_at_least": GOAL_RATIO,
            "met": bool(set_ratio and get_ratio and set_ratio >= GOAL_RATIO and get_ratio >= GOAL_RATIO),
        },
    }


def print_summary(result: dict[str, Any]) -> None:
    """Print the comparison table."""
    p = result["params"]
    g = result["gbps"]
    m = result["median"]
    title = (
        f"sglang: {p['pages']} pages x {p['bytes_per_batch'] // p['pages']:,} B on {p['tier']} "
        f"(MHA page_first, median of {p['repeat']})"
    )
    rows = [
        ["batch_set_v1 (adapter)", m["adapter_set_s"] * 1e3, g["adapter_set_s"], result["ratio_set"]],
        ["put (baseline)", m["baseline_put_s"] * 1e3, g["baseline_put_s"], 1.0],
        ["batch_get_v1 (adapter)", m["adapter_get_s"] * 1e3, g["adapter_get_s"], result["ratio_get"]],
        ["get_into (baseline)", m["baseline_get_s"] * 1e3, g["baseline_get_s"], 1.0],
    ]
    print(report.render_table(["operation", "ms / batch", "GB/s", "ratio vs baseline"], rows, title=title))
    verdict = "met" if result["goal"]["met"] else "NOT met"
    print(f"goal: adapter >= {GOAL_RATIO:.0%} of the baseline both ways: {verdict}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``bench sglang`` on the ``bench`` subparsers."""
    p = subparsers.add_parser("sglang", help=DESCRIPTION, description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="memory://?capacity=2GiB", help="the tier (default memory://?capacity=2GiB)")
    p.add_argument("--pages", type=positive_int, default=32, help="pages per batch (default 32)")
    p.add_argument("--page-size", type=positive_int, default=64, help="tokens per SGLang page (default 64)")
    p.add_argument("--layers", type=positive_int, default=16, help="layers (default 16)")
    p.add_argument("--heads", type=positive_int, default=8, help="KV heads (default 8)")
    p.add_argument("--head-dim", type=positive_int, default=128, help="head dim (default 128)")
    p.add_argument("--repeat", type=positive_int, default=10, help="rounds; the median is reported (default 10)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write results here (default bench-results/…)")
    return p


def run_cli(args: argparse.Namespace) -> int:
    """Run ``bench sglang`` from parsed arguments."""
    result = bench_sglang(
        tier=args.url,
        pages=args.pages,
        page_size=args.page_size,
        layers=args.layers,
        heads=args.heads,
        head_dim=args.head_dim,
        repeat=args.repeat,
    )
    result["machine"] = report.machine_info()
    print_summary(result)
    path = report.write_json(args.json_path or report.default_json_path("sglang", "hicache"), result)
    print(f"results: {path}")
    return 0
