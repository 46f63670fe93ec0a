"""The hashed block copies of a PD transfer (``BlockCopyPlan.copy_hashed``, ``lmc_block_copy_hashed``).

A gather that also hashes what it writes (through a scratch buffer and streaming stores, or
straight), and a scatter that also hashes what it reads, must move exactly the bytes of the plain
C copy and return :func:`~lmcache.serde.frame.payload_checksum` of the chunk: the in-place
transfer seals and verifies values with that hash instead of a second pass over them.
"""

from __future__ import annotations

import pytest
import torch
from paged_reference import bits, random_cache

from lmcache.kernels import PagedKV, native_copy
from lmcache.layouts import VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED
from lmcache.serde.frame import payload_checksum

pytestmark = pytest.mark.skipif(
    native_copy.library() is None or native_copy.xxh3() is None,
    reason="no C compiler for the native block copies, or xxhash's C functions are not reachable",
)


def _plan(kv: PagedKV) -> native_copy.BlockCopyPlan:
    plan = kv._block_copy_plan()
    assert plan is not None
    return plan


@pytest.fixture(params=[True, False], ids=["simd", "scalar"])
def simd(request):
    native_copy.set_simd(request.param)
    yield request.param
    native_copy.set_simd(True)


@pytest.mark.usefixtures("simd")
@pytest.mark.parametrize("stream", [True, False], ids=["bounce", "straight"])
@pytest.mark.parametrize("layout", [VLLM_CPU, VLLM_CPU_VEC, VLLM_PAGED], ids=lambda lay: lay.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    ("nb", "bs", "h", "d", "blocks"),
    [(6, 16, 3, 8, [4, 1, 5]), (5, 37, 2, 20, [3, 0]), (3, 32, 2, 64, [2, 0])],
    ids=["few-blocks", "odd-tiles", "whole-tiles"],
)
def test_hashed_copies_move_the_plain_copys_bytes_and_hash_them(layout, dtype, nb, bs, h, d, blocks, stream):
    kv = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=1), layout=layout)
    ids = torch.tensor(blocks, dtype=torch.int64)
    shape = kv.geometry.chunk_shape(len(blocks) * bs)
    want = torch.empty(shape, dtype=dtype)
    _plan(kv).copy(False, ids, want)
    # Odd storage offsets: the streamed stores then fall back to ordinary ones.
    for offset in (0, 1):
        store = torch.full((want.numel() + offset,), 7, dtype=dtype)
        got = store[offset:].view(shape)
        digest = _plan(kv).copy_hashed(False, ids, got, native_copy.xxh3(), stream=stream)
        assert torch.equal(bits(got), bits(want))
        assert digest == payload_checksum(got.contiguous().view(torch.uint8).numpy())

    # Scatter into two fresh caches, one per copy: the same caches, and the hash of what was read.
    plain = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=2), layout=layout)
    hashed = PagedKV(random_cache(layout, 3, nb, bs, h, d, dtype, seed=2), layout=layout)
    _plan(plain).copy(True, ids, want)
    digest = _plan(hashed).copy_hashed(True, ids, want, native_copy.xxh3())
    assert digest == payload_checksum(want.view(torch.uint8).numpy())
    for a, b in zip(plain.entries, hashed.entries, strict=True):
        assert torch.equal(bits(a), bits(b))


def test_the_hash_state_is_fresh_per_copy():
    """Two copies of the same chunk hash alike (no state carried over between calls)."""
    kv = PagedKV(random_cache(VLLM_CPU_VEC, 2, 4, 16, 2, 8, torch.float32, seed=3), layout=VLLM_CPU_VEC)
    ids = torch.tensor([1, 3])
    out = torch.empty(kv.geometry.chunk_shape(32))
    first = _plan(kv).copy_hashed(False, ids, out, native_copy.xxh3())
    assert _plan(kv).copy_hashed(False, ids, out, native_copy.xxh3()) == first
    assert _plan(kv).copy_hashed(True, ids, out, native_copy.xxh3()) == first
