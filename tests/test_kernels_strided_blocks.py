"""Whole-block copies for vLLM-CPU's head-major and packed layouts (``vllm_cpu``, ``vllm_cpu_vec``, ``vllm_paged``).

Their blocks are not one contiguous ``[block_size, heads, head_dim]`` run (heads come first, and
``vllm_cpu_vec`` stores K transposed), so whole-block chunks used to fall back to one tiny row per
token. They now move one whole block per index, per entry; these tests pin that the path is taken
and that it moves exactly the bytes of the layout's own views, both ways.
"""

from __future__ import annotations

import pytest
import torch
from paged_reference import RAW, bits, reference_gather

from lmcache.kernels import PagedKV
from lmcache.layouts import VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED, KVLayout


def _engine(layout: KVLayout, layers: int, nb: int, bs: int, h: int, d: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, nb, h, bs, d) if layout is VLLM_CPU else (nb, h, bs, 2 * d)
    raw = RAW[torch.empty((), dtype=dtype).element_size()]
    return [torch.randint(-(2**15), 2**15 - 1, shape, dtype=raw, generator=gen).view(dtype) for _ in range(layers)]


@pytest.mark.parametrize("layout", [VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED], ids=lambda lay: lay.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("nb", "bs", "blocks"),
    [(6, 16, [4, 1, 5]), (12, 2, [7, 0, 11, 3, 9, 1, 10, 2, 5, 8])],  # block by block; one op per entry (> 8)
    ids=["few-blocks", "many-blocks"],
)
def test_whole_blocks_take_the_block_path_and_copy_exact_bytes(layout, dtype, nb, bs, blocks, monkeypatch):
    h, d = 3, 8
    kv = PagedKV(_engine(layout, 3, nb, bs, h, d, dtype, seed=1), layout=layout)
    assert kv._block_views is None  # head-major blocks: not one contiguous run per block

    calls: list[str] = []
    original = PagedKV._copy_strided_blocks

    def spy(self, op, blocks, buf):
        calls.append(op)
        return original(self, op, blocks, buf)

    monkeypatch.setattr(PagedKV, "_copy_strided_blocks", spy)
    slots = [b * bs + o for b in blocks for o in range(bs)]
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=dtype)
    kv.gather(slots, out)
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))

    fresh_tensors = _engine(layout, 3, nb, bs, h, d, dtype, seed=2)
    before = [t.clone() for t in fresh_tensors]
    fresh = PagedKV(fresh_tensors, layout=layout)
    fresh.scatter(torch.tensor(slots), out)
    assert calls == ["gather", "scatter"]
    assert torch.equal(bits(reference_gather(fresh, slots)), bits(out))
    # Blocks outside the chunk keep their bytes.
    old = PagedKV(before, layout=layout)
    for b in set(range(nb)) - set(blocks):
        for new_entry, old_entry in zip(fresh.entries, old.entries, strict=True):
            assert torch.equal(bits(new_entry[b]), bits(old_entry[b]))


def test_partial_blocks_still_use_per_token_rows(monkeypatch):
    kv = PagedKV(_engine(VLLM_CPU_VEC, 2, 4, 8, 2, 4, torch.float32, seed=3), layout=VLLM_CPU_VEC)
    monkeypatch.setattr(PagedKV, "_copy_strided_blocks", lambda *a: pytest.fail("not whole blocks"))
    slots = [9, 10, 3, 30]
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=kv.dtype)
    kv.gather(slots, out)
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))


def test_auto_backend_on_the_cpu_does_not_probe_for_triton(monkeypatch):
    # "auto" only ever picks Triton on CUDA; probing for it cost a find_spec per CPU copy.
    from lmcache.kernels import triton_kernels

    monkeypatch.setattr(triton_kernels, "available", lambda: pytest.fail("probed for triton on the CPU"))
    kv = PagedKV(_engine(VLLM_CPU, 1, 2, 4, 1, 4, torch.float32, seed=4), layout=VLLM_CPU)
    out = torch.empty(kv.geometry.chunk_shape(4), dtype=kv.dtype)
    kv.gather([4, 5, 6, 7], out)
    assert torch.equal(bits(out), bits(reference_gather(kv, [4, 5, 6, 7])))
