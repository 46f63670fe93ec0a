"""Checks lmcache's vLLM layouts against vLLM itself; run by test_vllm_layouts.py in the vLLM venv.

Prints one JSON line ``RESULT {...}``: per case, whether lmcache read (gather) and wrote (scatter)
exactly what vLLM's own code path writes and reads.

* vLLM-CPU: K and V are written by vLLM's ``cpu_attn_reshape_and_cache`` for each ISA this
  machine runs (``vec``, ``vec16``), at slots that start and end inside a block.
* GPU backends (their CUDA write kernels cannot run here): K and V are written into the views
  vLLM's flash-attn backend attends over (``kv_cache.transpose(1, 2).split(head_size, -1)``),
  for both physical orders vLLM 0.32 allocates (``LBHNC`` and ``LBNHC``); MLA into its
  ``[blocks, 1, block_size, latent]`` view.
* The connector's layout choice: a backend, ISA or cache dtype it does not know is refused.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import torch


def _cpu_cases() -> list[dict[str, Any]]:
    from lmcache.kernels import PagedKV
    from lmcache.layouts import VLLM_CPU_VEC
    from vllm import _custom_ops as ops

    out = []
    for isa in ("vec", "vec16"):
        for dtype in (torch.float32, torch.bfloat16):
            for block, heads, dim in ((32, 3, 64), (128, 2, 64), (32, 2, 80)):
                if dim % 32 and isa == "vec":
                    continue
                gen = torch.Generator().manual_seed(block + dim)
                layers, blocks = 2, 5
                caches = [torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype) for _ in range(layers)]
                first, n = block - 7, block + 19  # starts in block 0, crosses into block 2
                slots = torch.arange(first, first + n) + block  # shifted to block 1: block 0 unused
                keys = [torch.randn(n, heads, dim, generator=gen).to(dtype) for _ in range(layers)]
                values = [torch.randn(n, heads, dim, generator=gen).to(dtype) for _ in range(layers)]
                for cache, k, v in zip(caches, keys, values, strict=True):
                    kc, vc = cache.view(blocks, heads, 2 * block, dim).chunk(2, dim=2)
                    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa)
                kv = PagedKV(caches, layout=VLLM_CPU_VEC, block_size=block)
                chunk = torch.empty(layers, 2, n, heads, dim, dtype=dtype)
                kv.gather(slots, chunk)
                gathered = all(
                    torch.equal(chunk[i, 0], keys[i]) and torch.equal(chunk[i, 1], values[i]) for i in range(layers)
                )
                blank = [torch.zeros_like(c) for c in caches]
                PagedKV(blank, layout=VLLM_CPU_VEC, block_size=block).scatter(slots, chunk)
                scattered = all(torch.equal(a, b) for a, b in zip(blank, caches, strict=True))
                name = f"cpu/{isa}/{str(dtype).removeprefix('torch.')}/bs{block}/d{dim}"
                out.append({"case": name, "gather": gathered, "scatter": scattered})
    return out


def _gpu_cases() -> list[dict[str, Any]]:
    from lmcache.kernels import PagedKV
    from lmcache.layouts import VLLM_MLA, VLLM_PAGED

    out = []
    blocks, heads, block, dim, n = 6, 2, 16, 8, 21
    slots = torch.tensor([3 * block + 5 + i for i in range(n)])
    gen = torch.Generator().manual_seed(3)
    for order in ("LBHNC", "LBNHC"):
        # vLLM allocates [B, H, N, C] views; LBNHC stores N outside H (an NHD cache).
        if order == "LBHNC":
            cache = torch.zeros(blocks, heads, block, 2 * dim)
        else:
            cache = torch.zeros(blocks, block, heads, 2 * dim).transpose(1, 2)
        k, v = torch.randn(n, heads, dim, generator=gen), torch.randn(n, heads, dim, generator=gen)
        # What FlashAttentionImpl.forward attends over: [B, N, H, D] views of K and V.
        key_cache, value_cache = cache.transpose(1, 2).split(dim, dim=-1)
        b, o = slots // block, slots % block
        key_cache[b, o] = k
        value_cache[b, o] = v
        kv = PagedKV([cache], layout=VLLM_PAGED, block_size=block)
        chunk = torch.empty(1, 2, n, heads, dim)
        kv.gather(slots, chunk)
        blank = torch.zeros_like(cache)
        PagedKV([blank], layout=VLLM_PAGED, block_size=block).scatter(slots, chunk)
        out.append(
            {
                "case": f"paged/{order}",
                "gather": torch.equal(chunk[0, 0], k) and torch.equal(chunk[0, 1], v),
                "scatter": torch.equal(blank, cache),
            }
        )
    latent = 24
    cache = torch.zeros(blocks, 1, block, latent)
    lat = torch.randn(n, latent, generator=gen)
    cache[slots // block, 0, slots % block] = lat
    chunk = torch.empty(1, 1, n, 1, latent)
    PagedKV([cache], layout=VLLM_MLA, block_size=block).gather(slots, chunk)
    blank = torch.zeros_like(cache)
    PagedKV([blank], layout=VLLM_MLA, block_size=block).scatter(slots, chunk)
    out.append({"case": "mla", "gather": torch.equal(chunk[0, 0, :, 0], lat), "scatter": torch.equal(blank, cache)})
    return out


def _refusals() -> list[dict[str, Any]]:
    from lmcache.errors import UnsupportedOperationError
    from lmcache.integrations.vllm.connector import vllm_kv_layout
    from lmcache.layouts import KVGeometry

    def config(backend: str, isa: str | None, cache_dtype: str = "auto") -> Any:
        cls = type("B", (), {"get_name": staticmethod(lambda: backend)})
        layer = types.SimpleNamespace(get_attn_backend=lambda: cls, isa=isa)
        return types.SimpleNamespace(
            compilation_config=types.SimpleNamespace(static_forward_context={"l.0": layer}),
            cache_config=types.SimpleNamespace(cache_dtype=cache_dtype, block_size=32),
            model_config=types.SimpleNamespace(dtype=torch.float32),
        )

    geo = KVGeometry(1, 2, 64, "float32")
    out = []
    for backend, isa, dtype, expect in (
        ("CPU_ATTN", "vec", "auto", "vllm_cpu_vec"),
        ("CPU_ATTN", "vec16", "auto", "vllm_cpu_vec"),
        ("FLASH_ATTN", None, "auto", "vllm_paged"),
        ("CPU_ATTN", "amx", "auto", None),
        ("CPU_ATTN", "neon", "auto", None),
        ("SOME_NEW_BACKEND", None, "auto", None),
        ("FLASH_ATTN", None, "fp8", None),
    ):
        try:
            got = vllm_kv_layout(config(backend, isa, dtype), ["l.0"], geo)[0].name
        except UnsupportedOperationError as exc:
            got = None
            detail = str(exc)
        else:
            detail = ""
        out.append({"case": f"choose/{backend}/{isa}/{dtype}", "ok": got == expect, "detail": detail})
    return out


def main() -> None:
    result = {"cpu": _cpu_cases(), "gpu": _gpu_cases(), "choose": _refusals()}
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
