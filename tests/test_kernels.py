"""Gather/scatter between paged engine KV and chunk buffers.

The torch path is checked here against a per-token reference. The Triton kernels are checked
against the torch path on the CPU under ``TRITON_INTERPRET=1`` in a child process (the variable
must be set before Triton builds the kernels, and must not leak into other tests).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcache.errors import InvalidArgumentError, InvalidBufferError, LayoutMismatchError
from lmcache.kernels import PagedKV, gather, scatter
from lmcache.layouts import (
    FLASH_ATTN,
    FLASHINFER,
    HF_CONTIGUOUS,
    LAYOUTS,
    MLA,
    VLLM_CPU,
    VLLM_CPU_VEC,
    VLLM_MLA,
    VLLM_PAGED,
    KVGeometry,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
HAS_TRITON = importlib.util.find_spec("triton") is not None


def bits(t: torch.Tensor) -> torch.Tensor:
    """Compare bit patterns, so NaN payloads and -0.0 count too."""
    return t.view(_RAW[t.element_size()])


def random_bits(shape, dtype, gen: torch.Generator) -> torch.Tensor:
    raw = _RAW[torch.empty((), dtype=dtype).element_size()]
    info = torch.iinfo(raw)
    return torch.randint(info.min, info.max, shape, dtype=raw, generator=gen).view(dtype)


def physical_shape(layout, nb, bs, h, d):
    return {
        "flash_attn": (2, nb, bs, h, d),
        "flashinfer": (nb, 2, bs, h, d),
        "vllm_cpu": (2, nb, h, bs, d),
        "mla": (nb, bs, d),
        "hf": (nb, h, bs, d),
        "vllm_paged": (nb, h, bs, 2 * d),
        "vllm_mla": (nb, 1, bs, d),
        "vllm_cpu_vec": (nb, h, bs, 2 * d),
    }[layout.name]


def make_kv(layout, *, layers, nb, bs, h, d, dtype, stacked=False, hnd=False, seed=0):
    """Engine KV in ``layout``. ``hnd``: vLLM's HND stride order (an NHD-shaped view of HND memory).

    For vLLM 0.32's ``[blocks, heads, block_size, content]`` layouts ``hnd`` means the other order
    too: an HND-shaped view of NHD memory (``VLLM_CPU_VEC`` blocks must be contiguous: ignored).
    """
    gen = torch.Generator().manual_seed(seed)
    shape = physical_shape(layout, nb, bs, h, d)
    if layout is HF_CONTIGUOUS:
        return [(random_bits(shape, dtype, gen), random_bits(shape, dtype, gen)) for _ in range(layers)]
    if hnd and layout in (FLASH_ATTN, FLASHINFER):
        # Allocate [.., H, S, D] memory and view it with the layout's logical [.., S, H, D] order.
        s_axis = layout.axes.index("S") + (1 if stacked else 0)
        mem_shape = list((layers, *shape) if stacked else shape)
        mem_shape[s_axis], mem_shape[s_axis + 1] = mem_shape[s_axis + 1], mem_shape[s_axis]
        if stacked:
            return random_bits(tuple(mem_shape), dtype, gen).transpose(s_axis, s_axis + 1)
        return [random_bits(tuple(mem_shape), dtype, gen).transpose(s_axis, s_axis + 1) for _ in range(layers)]
    if hnd and layout in (VLLM_PAGED, VLLM_MLA):
        h_axis = 2 if stacked else 1
        mem_shape = list((layers, *shape) if stacked else shape)
        mem_shape[h_axis], mem_shape[h_axis + 1] = mem_shape[h_axis + 1], mem_shape[h_axis]
        if stacked:
            return random_bits(tuple(mem_shape), dtype, gen).transpose(h_axis, h_axis + 1)
        return [random_bits(tuple(mem_shape), dtype, gen).transpose(h_axis, h_axis + 1) for _ in range(layers)]
    if stacked:
        return random_bits((layers, *shape), dtype, gen)
    return [random_bits(shape, dtype, gen) for _ in range(layers)]


def clone_kv(kv):
    if isinstance(kv, torch.Tensor):
        return kv.clone()
    return [tuple(x.clone() for x in t) if isinstance(t, tuple) else t.clone() for t in kv]


def tensors(kv) -> list[torch.Tensor]:
    """Every tensor of engine KV made by :func:`make_kv` (stacked, per layer, or (K, V) pairs)."""
    if isinstance(kv, torch.Tensor):
        return [kv]
    return [x for t in kv for x in (t if isinstance(t, tuple) else (t,))]


def reference_gather(kv: PagedKV, slots: list[int]) -> torch.Tensor:
    """Token by token, straight from the layout's views (the slow, obvious way)."""
    g = kv.geometry
    out = torch.empty(g.chunk_shape(len(slots)), dtype=kv.dtype)
    for e, entry in enumerate(kv.entries):
        layer, part = divmod(e, g.kv_parts)
        for t, slot in enumerate(slots):
            out[layer, part, t] = entry[slot // kv.block_size, slot % kv.block_size]
    return out


@st.composite
def cases(draw):
    layout = draw(st.sampled_from(list(LAYOUTS.values())))
    dtype = draw(st.sampled_from(DTYPES))
    bs = draw(st.integers(1, 8))
    nb = draw(st.integers(1, 6))
    h = 1 if layout.is_mla else draw(st.integers(1, 3))
    d = draw(st.integers(1, 6))
    layers = draw(st.integers(1, 3))
    stacked = layout is not HF_CONTIGUOUS and draw(st.booleans())
    hnd = draw(st.booleans())
    num_slots = nb * bs
    n = draw(st.integers(0, num_slots))
    slots = draw(st.permutations(range(num_slots)))[:n]
    seed = draw(st.integers(0, 2**16))
    return (
        dict(layout=layout, layers=layers, nb=nb, bs=bs, h=h, d=d, dtype=dtype, stacked=stacked, hnd=hnd),
        slots,
        seed,
    )


def run_copy(kv: PagedKV, op: str, slots, buf: torch.Tensor, backend: str) -> None:
    """``kv.gather``/``kv.scatter`` with ``backend``.

    Where ``PagedKV`` does not yet send a layout to the Triton kernels although they support it
    (K and V entries with strides of their own, e.g. ``VLLM_CPU_VEC``), the kernels are called
    directly with the slots checked as ``PagedKV`` does.
    """
    if backend == "triton":
        from lmcache.kernels import triton_kernels

        assert triton_kernels.supports(kv)
        try:
            kv._choose("triton")
        except LayoutMismatchError:
            kv._check_buffer(buf, "chunk buffer")
            checked = kv._slots(slots, buf.shape[2], check=True, unique=op == "scatter")
            triton_kernels.copy(op, kv, checked, buf)
            return
    {"gather": gather, "scatter": scatter}[op](kv, slots, buf, backend=backend)


def check_round_trip(spec, slots, seed, backend):
    """Gather from one cache, scatter into a fresh one: touched slots equal, the rest untouched."""
    engine = make_kv(**spec, seed=seed)
    kv = PagedKV(engine, layout=spec["layout"])
    assert kv.geometry.num_layers == spec["layers"]
    out = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=kv.dtype)
    run_copy(kv, "gather", slots, out, backend)
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))

    fresh = make_kv(**spec, seed=seed + 1)
    before = clone_kv(fresh)
    target = PagedKV(fresh, layout=spec["layout"])
    run_copy(target, "scatter", torch.tensor(slots, dtype=torch.int64), out, backend)
    touched = set(slots)
    after = PagedKV(fresh, layout=spec["layout"]).entries
    old = PagedKV(before, layout=spec["layout"]).entries
    src = kv.entries
    for e in range(len(after)):
        for slot in range(kv.num_slots):
            b, o = divmod(slot, kv.block_size)
            want = src[e][b, o] if slot in touched else old[e][b, o]
            assert torch.equal(bits(after[e][b, o]), bits(want)), (e, slot, slot in touched)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_torch_round_trip_property(case):
    spec, slots, seed = case
    check_round_trip(spec, slots, seed, "torch")


@st.composite
def whole_block_cases(draw):
    """Chunks made of whole engine blocks (the usual shape of a vLLM chunk): the block fast path."""
    spec, _, seed = draw(cases())
    blocks = draw(st.permutations(range(spec["nb"])))[: draw(st.integers(1, spec["nb"]))]
    slots = [b * spec["bs"] + o for b in blocks for o in range(spec["bs"])]
    return spec, slots, seed


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(whole_block_cases())
def test_torch_round_trip_whole_blocks(case):
    spec, slots, seed = case
    check_round_trip(spec, slots, seed, "torch")


def test_whole_block_fast_path_is_taken_for_token_major_layouts():
    for layout in (FLASH_ATTN, FLASHINFER):
        kv = PagedKV(make_kv(layout, layers=2, nb=4, bs=4, h=2, d=8, dtype=torch.float16), layout=layout)
        assert kv._block_views is not None
        assert kv._whole_blocks(torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])).tolist() == [2, 0]
        assert kv._whole_blocks(torch.tensor([8, 9, 10, 12])) is None
        assert kv._whole_blocks(torch.tensor([9, 10, 11, 12])) is None
    hnd = PagedKV(make_kv(FLASH_ATTN, layers=2, nb=4, bs=4, h=2, d=8, dtype=torch.float16, hnd=True), layout=FLASH_ATTN)
    assert hnd._block_views is None  # head-major blocks: the strided block path (test_kernels_strided_blocks.py)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def triton_round_trip_property(case):
    """Run by the child process below (not collected by pytest: no ``test_`` prefix)."""
    spec, slots, seed = case
    check_round_trip(spec, slots, seed, "triton")
    # And the two implementations agree on the same input.
    engine = make_kv(**spec, seed=seed)
    kv = PagedKV(engine, layout=spec["layout"])
    a = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=kv.dtype)
    b = torch.empty_like(a)
    kv.gather(slots, a, backend="torch")
    run_copy(kv, "gather", slots, b, "triton")
    assert torch.equal(bits(a), bits(b))


PACKED_SPECS = [
    # (layout, dtype, spec, slot mappings): chunks shorter than a block, spanning blocks from
    # unaligned offsets, scattered, and whole blocks; block_size 4 and 3.
    (layout, dtype, spec, slot_sets)
    for layout in (VLLM_CPU_VEC, VLLM_PAGED, VLLM_MLA)
    for dtype in (torch.float32, torch.bfloat16)
    for spec, slot_sets in (
        (
            dict(layers=2, nb=5, bs=4, h=1 if layout.is_mla else 2, d=3),
            [[5, 6], [1], list(range(6, 17)), [17, 2, 11, 19, 8], [*range(8, 12), *range(0, 4)]],
        ),
        (dict(layers=1, nb=4, bs=3, h=1, d=4, stacked=True), [[4], list(range(2, 10))]),
    )
]


def triton_packed_layouts():
    """Run by the child process below: vLLM 0.32's packed layouts, Triton against torch, both ways."""
    from lmcache.kernels import triton_kernels

    for layout, dtype, spec, slot_sets in PACKED_SPECS:
        engine = make_kv(layout, **spec, dtype=dtype)
        kv = PagedKV(engine, layout=layout)
        assert triton_kernels.supports(kv)
        for slots in slot_sets:
            where = (layout.name, dtype, spec, slots)
            want = torch.empty(kv.geometry.chunk_shape(len(slots)), dtype=dtype)
            kv.gather(slots, want, backend="torch")
            assert torch.equal(bits(want), bits(reference_gather(kv, slots))), where
            got = torch.full_like(want, float("nan"))
            run_copy(kv, "gather", slots, got, "triton")
            assert torch.equal(bits(got), bits(want)), where
            # Scatter into two copies of another cache: the whole layer tensors must agree bit for bit.
            fresh = make_kv(layout, **spec, dtype=dtype, seed=1)
            by_torch, by_triton = clone_kv(fresh), clone_kv(fresh)
            PagedKV(by_torch, layout=layout).scatter(slots, want, backend="torch")
            run_copy(PagedKV(by_triton, layout=layout), "scatter", slots, want, "triton")
            pairs = list(zip(tensors(by_torch), tensors(by_triton), tensors(fresh), strict=True))
            assert all(torch.equal(bits(a), bits(b)) for a, b, _ in pairs), where
            assert not all(torch.equal(bits(a), bits(old)) for a, _, old in pairs), where  # it did write


def run_interpreted(function: str) -> None:
    """Run ``function`` of this module in a child process with ``TRITON_INTERPRET=1``."""
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
    }
    code = f"import test_kernels as t; t.{function}(); print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=env,
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'lmcache[triton]'")
def test_triton_kernels_match_torch_under_interpreter():
    run_interpreted("triton_round_trip_property")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'lmcache[triton]'")
def test_triton_kernels_copy_packed_layouts_under_interpreter():
    run_interpreted("triton_packed_layouts")


def test_triton_kernels_address_strides_shared_per_kv_part():
    """Which bound KVs the kernels take (no Triton needed: only strides are looked at)."""
    from lmcache.kernels import triton_kernels

    spec = dict(layers=2, nb=3, bs=4, h=2, d=5, dtype=torch.bfloat16)
    # VLLM_CPU_VEC: K is [head_dim, block_size] within a block and head, V [block_size, head_dim].
    vec = PagedKV(make_kv(VLLM_CPU_VEC, **spec), layout=VLLM_CPU_VEC)
    assert vec.shared_strides is None
    per_block, per_head = 2 * 4 * 5 * 2, 4 * 5 * 2
    assert triton_kernels.part_strides(vec) == ((per_block, 1, per_head, 4), (per_block, 5, per_head, 1))
    assert triton_kernels.supports(vec)
    # Shared strides take the one-stride-set kernels.
    for layout in (FLASH_ATTN, VLLM_PAGED, VLLM_MLA, MLA):
        kv = PagedKV(make_kv(layout, **dict(spec, h=1 if layout.is_mla else 2)), layout=layout)
        assert kv.shared_strides is not None
        assert triton_kernels.part_strides(kv) == (kv.shared_strides,)
    # Layers whose K strides differ (one NHD, one HND) cannot be addressed.
    mixed = [make_kv(FLASH_ATTN, **dict(spec, layers=1))[0], make_kv(FLASH_ATTN, **dict(spec, layers=1), hnd=True)[0]]
    kv = PagedKV(mixed, layout=FLASH_ATTN)
    assert not triton_kernels.supports(kv) and triton_kernels.part_strides(kv) is None
    with pytest.raises(LayoutMismatchError):
        triton_kernels.copy("gather", kv, torch.tensor([0]), torch.empty(kv.geometry.chunk_shape(1), dtype=kv.dtype))


# -- specific cases ------------------------------------------------------------------------------

SPEC = dict(layers=3, nb=6, bs=4, h=2, d=8, dtype=torch.float16)


@pytest.mark.parametrize("layout", list(LAYOUTS.values()))
def test_partial_chunk_and_duplicate_gather(layout):
    spec = dict(SPEC, h=1 if layout.is_mla else 2)
    kv = PagedKV(make_kv(layout, **spec), layout=layout)
    # A partial chunk: 5 tokens, duplicates allowed when reading.
    slots = [3, 0, 23, 3, 7]
    out = torch.empty(kv.geometry.chunk_shape(5), dtype=kv.dtype)
    kv.gather(slots, out)
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))
    # An empty chunk is valid and does nothing.
    kv.gather([], torch.empty(kv.geometry.chunk_shape(0), dtype=kv.dtype))


def test_stacked_layers_share_one_copy_group():
    stacked = make_kv(FLASH_ATTN, **SPEC, stacked=True)
    assert len(PagedKV(stacked, layout=FLASH_ATTN)._groups) == 1
    # Per-layer views of one stacked tensor (how vLLM's cross-layer allocation looks) merge too.
    assert len(PagedKV(list(stacked.unbind(0)), layout=FLASH_ATTN)._groups) == 1
    assert len(PagedKV(make_kv(FLASH_ATTN, **SPEC), layout=FLASH_ATTN)._groups) == 3


def test_fp8_and_int_dtypes_copy_bit_exact():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtypes")
    raw = torch.randint(0, 256, (3, 2, 6, 4, 2, 8), dtype=torch.uint8)
    engine = raw.view(torch.float8_e4m3fn)
    kv = PagedKV(engine, layout=FLASH_ATTN)
    assert kv.geometry.dtype == "float8_e4m3fn"
    slots = [5, 1, 22]
    out = torch.empty(kv.geometry.chunk_shape(3), dtype=kv.dtype)
    kv.gather(slots, out)
    assert torch.equal(bits(out), bits(reference_gather(kv, slots)))


def test_detects_layout_when_binding():
    kv = PagedKV(make_kv(FLASHINFER, **SPEC), block_size=4)
    assert kv.layout is FLASHINFER and kv.num_slots == 24
    assert "flashinfer" in repr(kv)


def test_bind_checks_expected_geometry_and_block_size():
    engine = make_kv(FLASH_ATTN, **SPEC)
    PagedKV(engine, block_size=4, geometry=KVGeometry(3, 2, 8, "float16"))
    with pytest.raises(LayoutMismatchError):
        PagedKV(engine, layout=FLASH_ATTN, geometry=KVGeometry(3, 2, 8, "bfloat16"))
    with pytest.raises(LayoutMismatchError):
        PagedKV(engine, layout=FLASH_ATTN, block_size=8)


@pytest.fixture
def kv():
    return PagedKV(make_kv(FLASH_ATTN, **SPEC), layout=FLASH_ATTN)


def chunk(kv, n, **kw):
    return torch.zeros(kv.geometry.chunk_shape(n), dtype=kw.get("dtype", kv.dtype))


@pytest.mark.parametrize("slots", [[0, 24], [-1, 2], [0, 99]])
def test_out_of_range_slots_are_rejected(kv, slots):
    buf = chunk(kv, 2)
    before = [e.clone() for e in kv.entries]
    with pytest.raises(InvalidArgumentError, match="outside"):
        kv.gather(slots, buf)
    with pytest.raises(InvalidArgumentError, match="outside"):
        kv.scatter(slots, buf)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(before, kv.entries, strict=True))


def test_bad_slot_mappings_are_rejected(kv):
    with pytest.raises(InvalidArgumentError):
        kv.gather(torch.tensor([0.0, 1.0]), chunk(kv, 2))
    with pytest.raises(InvalidArgumentError):
        kv.gather(torch.tensor([[0, 1]]), chunk(kv, 2))
    with pytest.raises(InvalidArgumentError):
        kv.gather(["a", "b"], chunk(kv, 2))
    with pytest.raises(LayoutMismatchError):
        kv.gather([0, 1, 2], chunk(kv, 2))
    with pytest.raises(InvalidArgumentError, match="duplicate"):
        kv.scatter([1, 1], chunk(kv, 2))
    # int32 slot mappings are fine (widened).
    kv.gather(torch.tensor([0, 1], dtype=torch.int32), chunk(kv, 2))


def test_bad_chunk_buffers_are_rejected(kv):
    with pytest.raises(LayoutMismatchError):
        kv.gather([0, 1], chunk(kv, 2, dtype=torch.float32))
    with pytest.raises(LayoutMismatchError):
        kv.gather([0, 1], torch.zeros(3, 2, 2, 2, 4, dtype=kv.dtype))
    with pytest.raises(LayoutMismatchError):
        kv.gather([0, 1], torch.zeros(2, 2, 2, 2, 8, dtype=kv.dtype))
    with pytest.raises(InvalidBufferError):
        kv.gather([0, 1], torch.zeros(3, 2, 8, 2, 2, dtype=kv.dtype).transpose(2, 4))
    with pytest.raises(InvalidBufferError):
        kv.gather([0, 1], torch.zeros(3, 2, 2, 2, 8, dtype=kv.dtype, device="meta"))
    with pytest.raises(InvalidBufferError):
        kv.scatter([0, 1], "not a tensor")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        kv.gather([0, 1], chunk(kv, 2), backend="cuda-magic")  # type: ignore[arg-type]


def test_slots_on_another_device_are_rejected(kv):
    with pytest.raises(InvalidArgumentError):
        kv.gather(torch.zeros(2, dtype=torch.int64, device="meta"), chunk(kv, 2))


def test_triton_backend_on_cpu_needs_the_interpreter(kv, monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidArgumentError, match="CUDA"):
        kv.gather([0, 1], chunk(kv, 2), backend="triton")
    # "auto" on the CPU always takes the torch path.
    kv.gather([0, 1], chunk(kv, 2), backend="auto")


def test_cpu_handle_is_complete(kv):
    handle = kv.gather([0, 1], chunk(kv, 2))
    assert handle.done()
    handle.synchronize()
    handle.wait()


# -- CUDA (runs where a GPU exists) ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("layout", [FLASH_ATTN, FLASHINFER, VLLM_CPU, MLA, HF_CONTIGUOUS])
def test_cuda_round_trip_through_pinned_host_buffer(layout, backend):
    if backend == "triton" and not HAS_TRITON:
        pytest.skip("triton is not installed")
    spec = dict(layers=4, nb=64, bs=16, h=1 if layout is MLA else 8, d=64, dtype=torch.bfloat16)
    cpu = make_kv(layout, **spec)
    to_cuda = lambda t: tuple(x.cuda() for x in t) if isinstance(t, tuple) else t.cuda()  # noqa: E731
    kv = PagedKV([to_cuda(t) for t in cpu], layout=layout)
    slots = torch.randperm(kv.num_slots)[:200]
    host = torch.empty(kv.geometry.chunk_shape(200), dtype=kv.dtype, pin_memory=True)
    kv.gather(slots, host, backend=backend).synchronize()
    ref = reference_gather(PagedKV(cpu, layout=layout), slots.tolist())
    assert torch.equal(bits(host), bits(ref))
    dev = torch.empty_like(host, device="cuda")
    kv.gather(slots.cuda(), dev, backend=backend).wait()
    assert torch.equal(bits(dev.cpu()), bits(ref))
    fresh = PagedKV([to_cuda(t) for t in make_kv(layout, **spec, seed=7)], layout=layout)
    fresh.scatter(slots, host, backend=backend).wait()
    back = torch.empty_like(host)
    fresh.gather(slots, back, backend="torch").synchronize()
    assert torch.equal(bits(back), bits(ref))


# -- benchmark function (no timing assertions: it must run and report consistent numbers) ----------


@pytest.mark.parametrize("layout", ["flash_attn", "mla"])
def test_bench_kernels_reports_ratios(layout):
    from lmcache.bench.kernels import bench_kernels

    result = bench_kernels(layout=layout, layers=2, heads=2, head_dim=8, chunk_tokens=32, block_size=8, repeat=2)
    p = result["params"]
    assert p["chunk_bytes"] == KVGeometry(
        2, 1 if layout == "mla" else 2, 8, "bfloat16", is_mla=layout == "mla"
    ).chunk_nbytes(32)
    assert len(result["rounds"]) == 2
    for name in ("gather", "scatter", "numpy_copy", "numpy_copy_cold"):
        assert result["gbps"][name] > 0
    expected = result["gbps"]["gather"] / result["gbps"]["numpy_copy"]
    assert result["ratio_vs_numpy_copy"]["gather"] == pytest.approx(expected)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: pip install 'lmcache[triton]'")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="kernels are interpreted in this process")
@pytest.mark.parametrize("kernel", ["gather_kernel", "scatter_kernel", "gather_kv_kernel", "scatter_kv_kernel"])
@pytest.mark.parametrize("word", ["u8", "i16", "i32"])
def test_triton_kernels_compile_for_cuda_without_a_gpu(kernel, word, tmp_path, monkeypatch):
    """Ahead-of-time compile for sm_90: catches code the interpreter accepts but the compiler does not."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmcache.kernels import _triton_jit

    buf = "out" if kernel.startswith("gather") else "src"
    ints = ("num_tokens", "hd", "head_dim", "block_size")
    axes = ("block", "token", "head", "dim")
    parts = ("k", "v") if "_kv_" in kernel else ("s",)  # K and V strides of their own, or one shared set
    strides = tuple(f"{p}_{a}" for p in parts for a in axes)
    signature = {"ptrs": "*i64", "slots": "*i64", buf: f"*{word}"}
    signature |= {name: "i32" for name in ints} | {name: "i64" for name in strides}
    signature |= {"BLOCK_T": "constexpr", "BLOCK_HD": "constexpr"}
    src = ASTSource(fn=getattr(_triton_jit, kernel), signature=signature, constexprs={"BLOCK_T": 4, "BLOCK_HD": 1024})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert "ld.global" in ptx and "st.global" in ptx
