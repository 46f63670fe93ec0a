"""Whole-block copies of strided entries in C (``lmcache.kernels.native_copy``).

For ``vllm_cpu``, ``vllm_cpu_vec`` (transposed K) and ``vllm_paged`` blocks, a chunk of whole
blocks is copied by one C call per chunk (GIL released, no numpy/torch copy loop, no OpenMP).
These tests pin that the C path is the one taken and that it moves exactly the bytes of the
numpy path and of the layout's own views, both ways, for every element size, with block sizes
and head dims that are not multiples of the C loop's tile; and that without the compiled
library the numpy path still copies.
"""

from __future__ import annotations

import pytest
import torch
from paged_reference import bits, random_cache, reference_gather

from lmcache.kernels import PagedKV, native_copy
from lmcache.layouts import VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED

_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
if hasattr(torch, "float8_e4m3fn"):
    _DTYPES.append(torch.float8_e4m3fn)

pytestmark = pytest.mark.skipif(native_copy.library() is None, reason="no C compiler for the native block copies")


def _numpy_only(kv: PagedKV) -> PagedKV:
    kv._native_checked, kv._native_plan = True, None  # as if the library could not be built
    return kv


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request):
    """The SIMD tiles (where the CPU has them), then the scalar ones."""
    native_copy.set_simd(request.param)
    yield request.param
    native_copy.set_simd(True)


@pytest.mark.usefixtures("simd")
@pytest.mark.parametrize("layout", [VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED], ids=lambda lay: lay.name)
@pytest.mark.parametrize("dtype", _DTYPES, ids=str)
@pytest.mark.parametrize(
    ("nb", "bs", "h", "d", "blocks"),
    [
        (6, 16, 3, 8, [4, 1, 5]),
        (5, 37, 2, 20, [3, 0]),  # block size and head dim not multiples of the C tiles (8, 16)
        (3, 32, 2, 64, [2, 0]),  # whole tiles only
        (12, 2, 1, 4, [7, 0, 11, 3, 9, 1, 10, 2, 5, 8]),  # more than 8 blocks (numpy indexes then)
    ],
    ids=["few-blocks", "odd-tiles", "whole-tiles", "many-blocks"],
)
def test_the_c_copy_moves_the_bytes_numpy_and_the_views_move(layout, dtype, nb, bs, h, d, blocks, monkeypatch):
    calls: list[bool] = []
    original = native_copy.BlockCopyPlan.copy

    def spy(self, scatter, blk, chunk):
        calls.append(scatter)
        return original(self, scatter, blk, chunk)

    monkeypatch.setattr(native_copy.BlockCopyPlan, "copy", spy)
    slots = [b * bs + o for b in blocks for o in range(bs)]
    kv = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=1), layout=layout)
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=dtype)
    kv.gather(slots, out)
    want = torch.empty_like(out)
    _numpy_only(PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=1), layout=layout)).gather(slots, want)
    assert torch.equal(bits(out), bits(want))
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))

    # Scatter the chunk into two fresh caches, one per path: identical caches, blocks outside untouched.
    fresh = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=2), layout=layout)
    numpy_fresh = _numpy_only(PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=2), layout=layout))
    fresh.scatter(torch.tensor(slots), out)
    numpy_fresh.scatter(torch.tensor(slots), out)
    assert calls == [False, True]  # the C path did both copies of the default PagedKVs, numpy none
    for a, b in zip(fresh.entries, numpy_fresh.entries, strict=True):
        assert torch.equal(bits(a), bits(b))
    assert torch.equal(bits(reference_gather(fresh, slots)), bits(out))
    untouched = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=2), layout=layout)
    for blk in set(range(nb)) - set(blocks):
        for new_entry, old_entry in zip(fresh.entries, untouched.entries, strict=True):
            assert torch.equal(bits(new_entry[blk]), bits(old_entry[blk]))


def test_a_scatter_from_a_read_only_buffer(monkeypatch):
    """The engine scatters straight from a memory tier's pool, which torch may see as read-only."""
    layout, nb, bs, h, d = VLLM_CPU_VEC, 4, 8, 2, 4
    kv = PagedKV(random_cache(layout, 2, nb, bs, h, d, torch.float32, seed=3), layout=layout)
    src = torch.arange(kv.geometry.chunk_numel(2 * bs), dtype=torch.float32).view(kv.geometry.chunk_shape(2 * bs))
    frozen = bytes(src.numpy().tobytes())
    with pytest.warns(UserWarning, match="not writable"):
        view = torch.frombuffer(frozen, dtype=torch.float32).view(src.shape)
    slots = [b * bs + o for b in (2, 0) for o in range(bs)]
    calls: list[bool] = []
    original = native_copy.BlockCopyPlan.copy
    monkeypatch.setattr(native_copy.BlockCopyPlan, "copy", lambda self, *a: calls.append(a[0]) or original(self, *a))
    kv.scatter(slots, view)
    assert calls == [True]
    assert torch.equal(reference_gather(kv, slots), src)


def test_without_the_library_numpy_copies(monkeypatch):
    monkeypatch.setenv("LMCACHE_COPY_NATIVE", "0")
    monkeypatch.setattr(native_copy, "_state", {})
    assert native_copy.library() is None
    layout, nb, bs, h, d = VLLM_CPU_VEC, 4, 8, 2, 4
    kv = PagedKV(random_cache(layout, 2, nb, bs, h, d, torch.bfloat16, seed=4), layout=layout)
    slots = [b * bs + o for b in (3, 1) for o in range(bs)]
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=torch.bfloat16)
    kv.gather(slots, out)
    assert kv._native_plan is None
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))
