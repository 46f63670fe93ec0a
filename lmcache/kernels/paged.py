"""Batched gather/scatter between an engine's paged KV and chunk buffers (torch implementation).

A :class:`PagedKV` binds an engine's KV tensors once (at ``register_kv_caches`` time): it checks
their layout and geometry and precomputes how to address every layer's K and V ("entries") so
that each copy is one indexing op per storage, not one per layer or token:

* every entry is a ``[num_blocks, block_size, heads, head_dim]`` view (see
  :meth:`lmcache.layouts.KVLayout.part_views`);
* entries that live in one storage (a stacked ``[layers, ...]`` tensor, or K and V of one layer)
  are addressed through a single *row view*: an ``as_strided`` view whose row ``r`` is the
  ``[heads, head_dim]`` slice starting ``r * unit`` elements into the storage, where ``unit`` is
  the gcd of the block, token and entry strides. A token's row is then plain integer arithmetic,
  and the whole chunk is one ``index_select`` (gather) or ``index_copy_`` (scatter) over that view.
  Row views overlap in memory; that is fine because a copy only ever touches the distinct rows of
  distinct slots (duplicate slots in a scatter are rejected).
* on the CPU, a chunk made of whole blocks (the usual case) skips per-token rows: token-major
  blocks move as one contiguous row per block, head-major or packed ones (``vllm_cpu``,
  ``vllm_paged``, ``vllm_cpu_vec``'s transposed K) in one C call per chunk
  (:mod:`lmcache.kernels.native_copy`; numpy's strided copy per block and entry without a compiler).

Copies move raw elements: tensors are reinterpreted as same-width integers, so every dtype (fp8
included) is copied bit-exactly.

On CUDA a copy runs on a side stream that first waits for the caller's current stream, and
returns a :class:`CopyHandle` whose event the caller waits on; chunk buffers may live on the GPU or
in (pinned) host memory, in which case the copy stages through a device buffer and moves with
``non_blocking=True``. On the CPU the copy is done when the call returns.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from typing import Any, Literal

import numpy as np
import torch

from lmcache.errors import InvalidArgumentError, InvalidBufferError, LayoutMismatchError
from lmcache.layouts import KVGeometry, KVLayout, _as_layers, detect_layout, dtype_name, get_layout

__all__ = ["Backend", "CopyHandle", "PagedKV", "gather", "scatter"]

logger = logging.getLogger(__name__)

#: Which implementation copies: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton on CUDA when installed).
Backend = Literal["auto", "torch", "triton"]

#: Up to this many blocks per chunk, whole-block copies of strided entries go block by block in numpy.
_NUMPY_MAX_BLOCKS = 8

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_raw(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as same-width integers, so copies are bit-exact for any dtype."""
    return t.view(_INT_OF_WIDTH[t.element_size()])


def _widen(views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Reinterpret ``[blocks, tokens, heads, dim]`` views as the widest integer words that fit.

    Moving a 128-wide bf16 row as 32 int64 words instead of 128 int16 elements makes torch's
    index kernels ~1.6x faster on the CPU. Possible when the head dim is contiguous and every
    stride and offset is a whole number of words.
    """
    esz = views[0].element_size()
    for word in (8, 4, 2):
        ratio = word // esz
        if ratio <= 1:
            break
        v0 = views[0]
        fits = (
            v0.stride(3) == 1
            and v0.shape[3] % ratio == 0
            and all(s % ratio == 0 for s in v0.stride()[:3])
            and all(v.storage_offset() % ratio == 0 for v in views)
            and v0.untyped_storage().data_ptr() % word == 0
        )
        if fits:
            return [v.view(_INT_OF_WIDTH[word]) for v in views]
    return views


class CopyHandle:
    """Completion of one gather or scatter.

    On the CPU it is complete on return. On CUDA it holds the event recorded after the copy on
    the side stream.
    """

    __slots__ = ("event", "stream")

    def __init__(self, event: Any = None, stream: Any = None) -> None:
        self.event = event
        self.stream = stream

    def done(self) -> bool:
        """Whether the copy has finished (never blocks)."""
        return self.event is None or bool(self.event.query())

    def synchronize(self) -> None:
        """Block the calling thread until the copy has finished (needed before reading a host buffer)."""
        if self.event is not None:
            self.event.synchronize()

    def wait(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait for the copy, without blocking the host."""
        if self.event is not None:
            (stream or torch.cuda.current_stream(self.event.device)).wait_event(self.event)


class _Group:
    """Entries sharing one storage, addressed through one row view."""

    __slots__ = (
        "first",
        "last",
        "raw_rows",
        "row_offsets",
        "row_offsets_cpu",
        "slot_block",
        "slot_token",
    )

    def __init__(
        self,
        entries: list[int],
        raw_rows: torch.Tensor,
        row_offsets: list[int],
        slot_block: int,
        slot_token: int,
    ) -> None:
        self.first, self.last = entries[0], entries[-1]
        if entries != list(range(self.first, self.last + 1)):
            raise AssertionError("group entries must be consecutive")  # guaranteed by _build_groups
        self.raw_rows = raw_rows
        self.row_offsets_cpu = torch.tensor(row_offsets, dtype=torch.int64)
        self.row_offsets = self.row_offsets_cpu.to(raw_rows.device)
        self.slot_block = slot_block  # rows between consecutive blocks
        self.slot_token = slot_token  # rows between consecutive tokens of a block

    def rows(self, blocks: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        token_rows = blocks * self.slot_block + offsets * self.slot_token
        offs = self.row_offsets if token_rows.device == self.row_offsets.device else self.row_offsets_cpu
        return (offs[:, None] + token_rows[None, :]).reshape(-1)


class PagedKV:
    """An engine's KV cache bound for batched copies to and from chunk buffers.

    Args:
        tensors: Per-layer KV (see :func:`lmcache.layouts.detect_layout` for accepted forms).
        layout: The layout, or ``None`` to detect it from shapes and the facts below.
        block_size: Tokens per engine block (vLLM ``cache_config.block_size``); for the
            transformers layout, the cache's sequence capacity.
        num_kv_heads: KV heads per worker, when known (helps detection, checked otherwise).
        head_dim: Head dim, when known.
        is_mla: Whether the model uses MLA, when known.
        geometry: The expected geometry; a mismatch with the tensors raises.

    Raises:
        LayoutMismatchError: The tensors do not form one consistent KV cache of the layout.
    """

    def __init__(
        self,
        tensors: Any,
        *,
        layout: KVLayout | str | None = None,
        block_size: int | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        is_mla: bool | None = None,
        geometry: KVGeometry | None = None,
    ) -> None:
        layers = _as_layers(tensors)
        if layout is None:
            if geometry is not None:
                num_kv_heads = num_kv_heads or geometry.num_kv_heads
                head_dim = head_dim or geometry.head_dim
                is_mla = geometry.is_mla if is_mla is None else is_mla
            layout = detect_layout(
                layers, block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim, is_mla=is_mla
            )
        self.layout = get_layout(layout)
        self.geometry, self.num_blocks, self.block_size = self.layout.geometry(layers)
        if geometry is not None and geometry != self.geometry:
            raise LayoutMismatchError(f"engine KV has geometry {self.geometry.identity}, expected {geometry.identity}")
        if block_size is not None and block_size != self.block_size:
            raise LayoutMismatchError(f"engine KV has block_size {self.block_size}, expected {block_size}")
        self.entries: list[torch.Tensor] = [p for layer in layers for p in self.layout.part_views(layer)]
        first = self.entries[0]
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        self.num_slots = self.num_blocks * self.block_size
        #: Element strides ``(block, token, head, dim)`` shared by every entry, or None if they differ.
        strides = {tuple(e.stride()) for e in self.entries}
        self.shared_strides: tuple[int, ...] | None = strides.pop() if len(strides) == 1 else None
        self._groups = self._build_groups()
        # Usually every group steps the same number of rows per block and per token: then the
        # row numbers of all entries come from one broadcast add per copy, not ops per group.
        steps = {(g.slot_block, g.slot_token) for g in self._groups}
        self._uniform_steps: tuple[int, int] | None = steps.pop() if len(steps) == 1 else None
        self._all_offsets_cpu = torch.cat([g.row_offsets_cpu for g in self._groups])
        self._all_offsets = self._all_offsets_cpu.to(self.device)
        self._ptr_table: torch.Tensor | None = None
        self._block_views = self._build_block_views()
        # Entries whose blocks are not one contiguous run of [block_size, heads, head_dim] (head-major
        # vllm_cpu / vllm_paged, vllm_cpu_vec's transposed K) still copy whole blocks per entry.
        self._strided_block_entries: list[torch.Tensor] | None = None
        if self._block_views is None:
            raw = [_as_raw(e) for e in self.entries]
            # _widen checks the first view's strides for all: only sound when they are shared.
            self._strided_block_entries = _widen(raw) if self.shared_strides is not None else raw
        # The C loop for those copies (kernels/native_copy.py), looked up on the first such copy.
        self._native_plan: Any = None
        self._native_checked = False
        self._streams: dict[int, Any] = {}
        self._lock = threading.Lock()
        logger.debug(
            "bound %s KV: %s, %d blocks x %d tokens, %d copy group(s)",
            self.layout.name,
            self.geometry.identity,
            self.num_blocks,
            self.block_size,
            len(self._groups),
        )

    # -- planning ------------------------------------------------------------------------------

    def _build_groups(self) -> list[_Group]:
        """Partition entries into runs of consecutive entries that share a storage and strides."""
        groups: list[_Group] = []
        run: list[int] = []

        def key(i: int) -> tuple[int, tuple[int, ...]]:
            e = self.entries[i]
            return (e.untyped_storage().data_ptr(), tuple(e.stride()))

        for i in range(len(self.entries)):
            if run and key(i) != key(run[0]):
                groups.append(self._make_group(run))
                run = []
            run.append(i)
        groups.append(self._make_group(run))
        return groups

    def _make_group(self, entries: list[int]) -> _Group:
        views = [_as_raw(self.entries[i]) for i in entries]
        views = _widen(views)
        s_block, s_token, s_head, s_dim = views[0].stride()
        offsets = [v.storage_offset() for v in views]
        base = min(offsets)
        unit = math.gcd(s_block, s_token, *(o - base for o in offsets))
        unit = unit or 1
        heads, head_dim = views[0].shape[2], views[0].shape[3]
        storage_elems = views[0].untyped_storage().nbytes() // views[0].element_size()
        row_span = (heads - 1) * s_head + (head_dim - 1) * s_dim + 1
        num_rows = (storage_elems - base - row_span) // unit + 1
        rows = views[0].as_strided((num_rows, heads, head_dim), (unit, s_head, s_dim), base)
        group = _Group(entries, rows, [(o - base) // unit for o in offsets], s_block // unit, s_token // unit)
        return group

    def _build_block_views(self) -> list[torch.Tensor] | None:
        """Per entry, a ``[num_blocks, block_size * heads * head_dim]`` view, if every block is contiguous.

        A chunk whose slots are whole blocks (the usual case: chunk boundaries are multiples of the
        engine's block size) then moves as a few large rows per entry instead of one small row per
        token; on the CPU that runs near memcpy speed, where per-token rows cost ~100 ns each.
        """
        views = []
        for entry in self.entries:
            raw = _widen([_as_raw(entry)])[0]
            nb, bs, heads, width = raw.shape
            s_block, s_token, s_head, s_dim = raw.stride()
            if (s_dim, s_head, s_token) != (1, width, heads * width):
                return None
            views.append(raw.as_strided((nb, bs * heads * width), (s_block, 1)))
        if len({v.dtype for v in views}) != 1:
            return None
        return views

    def _whole_blocks(self, slots: torch.Tensor) -> torch.Tensor | None:
        """The block ids when ``slots`` are whole blocks in order of their offsets, else None."""
        bs = self.block_size
        if slots.numel() == 0 or slots.numel() % bs:
            return None
        per_block = slots.view(-1, bs)
        blocks = torch.div(per_block[:, 0], bs, rounding_mode="floor")
        if per_block[:, 0].remainder(bs).any():
            return None
        expected = per_block[:, :1] + torch.arange(bs, dtype=slots.dtype, device=slots.device)
        return blocks if torch.equal(per_block, expected) else None

    def _copy_strided_blocks(self, op: str, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        """Copy whole blocks of strided entries on the CPU, a whole block per copy call.

        Each entry's ``[num_blocks, block_size, heads, head_dim]`` view is copied block by block
        (or indexed along its block axis), so the copy loop walks a whole block (any strides:
        head-major, transposed K) per call instead of one tiny ``[heads, head_dim]`` row per token
        (figures: docs/benchmarks.md, kernels).
        """
        assert self._strided_block_entries is not None
        plan = self._block_copy_plan()
        if plan is not None:
            # One C call for every entry and block of the chunk, GIL released, no OpenMP.
            plan.copy(op == "scatter", blocks, buf)
            return
        first = self._strided_block_entries[0]
        bs, heads, width = first.shape[1:]
        words = buf.view(first.dtype).view(len(self.entries), blocks.numel(), bs, heads, width)
        entries = self._strided_block_entries
        if blocks.numel() > _NUMPY_MAX_BLOCKS:
            # Many small blocks: one indexing op per entry is cheaper than a call per block.
            if op == "gather":
                for entry, part in zip(entries, words, strict=True):
                    torch.index_select(entry, 0, blocks, out=part)
            else:
                idx = blocks.numpy()
                for entry, part in zip(entries, words, strict=True):
                    entry.numpy()[idx] = part.numpy()
            return
        # Few large blocks: numpy's strided copy loop beat torch's index_select / index_copy_
        # (which run these layouts' strides at about half the speed).
        ids = blocks.tolist()
        for entry, part in zip(entries, words, strict=True):
            kv_np, chunk_np = entry.numpy(), part.numpy()
            for j, b in enumerate(ids):
                if op == "gather":
                    np.copyto(chunk_np[j], kv_np[b])
                else:
                    np.copyto(kv_np[b], chunk_np[j])

    def _block_copy_plan(self) -> Any:
        """The native copy plan of the strided entries (built once), or None to copy with numpy."""
        if not self._native_checked:
            from lmcache.kernels import native_copy

            lib = native_copy.library()
            entries = self._strided_block_entries
            if lib is not None and entries is not None and self.device.type == "cpu":
                self._native_plan = native_copy.BlockCopyPlan(entries, lib)
            self._native_checked = True
        return self._native_plan

    def _copy_blocks(self, op: str, blocks: torch.Tensor, buf: torch.Tensor) -> None:
        """Copy whole blocks on the CPU (``blocks`` and ``buf`` are CPU tensors)."""
        assert self._block_views is not None
        dtype = self._block_views[0].dtype
        words = buf.view(dtype).view(len(self.entries), blocks.numel(), -1)
        if op == "gather":
            for view, part in zip(self._block_views, words, strict=True):
                torch.index_select(view, 0, blocks, out=part)
            return
        # numpy's fancy assignment copies whole rows with memcpy; torch's index_copy_ runs at
        # about 40% of that on the CPU (measured with 32 KiB block rows).
        idx = blocks.numpy()
        for view, part in zip(self._block_views, words, strict=True):
            view.numpy()[idx] = part.numpy()

    # -- validation ----------------------------------------------------------------------------

    def _slots(self, slots: Any, num_tokens: int, *, check: bool, unique: bool) -> torch.Tensor:
        if not isinstance(slots, torch.Tensor):
            try:
                slots = torch.as_tensor(np.asarray(slots, dtype=np.int64))
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(f"slot mapping must be a sequence of ints: {exc}") from None
        if slots.is_floating_point() or slots.is_complex() or slots.dtype == torch.bool:
            raise InvalidArgumentError(f"slot mapping must hold integers, got {slots.dtype}")
        if slots.dim() != 1:
            raise InvalidArgumentError(f"slot mapping must be 1-D, got shape {tuple(slots.shape)}")
        if slots.numel() != num_tokens:
            raise LayoutMismatchError(f"slot mapping has {slots.numel()} slots, the chunk buffer {num_tokens} tokens")
        if slots.device.type not in ("cpu", self.device.type) or (
            slots.device.type != "cpu" and slots.device != self.device
        ):
            raise InvalidArgumentError(f"slot mapping is on {slots.device}, the KV cache on {self.device}")
        slots = slots.to(torch.int64)
        if check and slots.numel():
            # On CUDA this reads two scalars back (a sync); CPU slot mappings avoid it.
            lo, hi = (int(x) for x in torch.aminmax(slots))
            if lo < 0 or hi >= self.num_slots:
                bad = lo if lo < 0 else hi
                raise InvalidArgumentError(f"slot {bad} is outside the KV cache's {self.num_slots} slots")
            if unique and torch.unique(slots).numel() != slots.numel():
                raise InvalidArgumentError("slot mapping of a scatter has duplicate slots")
        return slots

    def _check_buffer(self, buf: torch.Tensor, what: str) -> None:
        if not isinstance(buf, torch.Tensor):
            raise InvalidBufferError(f"{what} must be a torch.Tensor, got {type(buf).__name__}")
        if buf.device != self.device and not (self.device.type == "cuda" and buf.device.type == "cpu"):
            raise InvalidBufferError(f"{what} is on {buf.device}; the KV cache is on {self.device}")
        if buf.dtype != self.dtype:
            raise LayoutMismatchError(f"{what} has dtype {dtype_name(buf.dtype)}, the KV cache {self.geometry.dtype}")
        g = self.geometry
        if buf.dim() != 5 or tuple(buf.shape[:2]) + tuple(buf.shape[3:]) != (
            g.num_layers,
            g.kv_parts,
            g.num_kv_heads,
            g.head_dim,
        ):
            raise LayoutMismatchError(
                f"{what} has shape {tuple(buf.shape)}; {g.identity} chunks are {g.chunk_shape(0)[:2]} + "
                f"(tokens,) + {g.chunk_shape(0)[3:]}"
            )
        if not buf.is_contiguous():
            raise InvalidBufferError(f"{what} must be contiguous")

    # -- copies --------------------------------------------------------------------------------

    def gather(
        self,
        slots: Any,
        out: torch.Tensor,
        *,
        backend: Backend = "auto",
        stream: Any = None,
        validate: bool = True,
    ) -> CopyHandle:
        """Copy the KV of ``slots`` (all layers) into the chunk buffer ``out``.

        Args:
            slots: One slot per token (``block_id * block_size + offset``), int64 tensor or ints.
            out: ``[layers, kv_parts, len(slots), heads, head_dim]``, contiguous, the KV's dtype;
                on the KV's device, or in host memory (pinned for an asynchronous copy) when the
                KV is on CUDA.
            backend: ``"torch"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) or
                ``"auto"``.
            stream: CUDA stream to copy on (default: a side stream owned by this object).
            validate: Check the slot range (a device sync when ``slots`` is on CUDA).

        Returns:
            A handle; on CUDA call :meth:`CopyHandle.synchronize` before reading a host ``out``.

        Raises:
            InvalidArgumentError: Bad slot mapping (out of range, not integers, wrong device).
            LayoutMismatchError: ``out`` does not match the KV geometry or the slot count.
            InvalidBufferError: ``out`` is on the wrong device or not contiguous.
        """
        self._check_buffer(out, "chunk buffer")
        slots = self._slots(slots, out.shape[2], check=validate, unique=False)
        return self._run("gather", slots, out, backend, stream)

    def scatter(
        self,
        slots: Any,
        src: torch.Tensor,
        *,
        backend: Backend = "auto",
        stream: Any = None,
        validate: bool = True,
    ) -> CopyHandle:
        """Copy the chunk buffer ``src`` (all layers) into the KV of ``slots``.

        Arguments and errors as in :meth:`gather`; a scatter also rejects duplicate slots.
        On CUDA, make the attention stream wait (:meth:`CopyHandle.wait`) before it reads the KV,
        and keep a host ``src`` (and its pool lease) untouched until :meth:`CopyHandle.done`: the
        upload from pinned memory is asynchronous.
        """
        self._check_buffer(src, "chunk buffer")
        slots = self._slots(slots, src.shape[2], check=validate, unique=True)
        return self._run("scatter", slots, src, backend, stream)

    def _choose(self, backend: Backend) -> str:
        if backend not in ("auto", "torch", "triton"):
            raise InvalidArgumentError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if backend == "torch" or (backend == "auto" and self.device.type != "cuda"):
            # "auto" means Triton on CUDA only: skip probing for it (a find_spec per copy) on the CPU.
            return "torch"
        from lmcache.kernels import triton_kernels

        usable = triton_kernels.available() and triton_kernels.supports(self)
        if backend == "auto":
            return "triton" if usable and self.device.type == "cuda" else "torch"
        if not triton_kernels.available():
            from lmcache.errors import MissingDependencyError

            raise MissingDependencyError("triton", "triton", "the triton copy kernels")
        if not triton_kernels.supports(self):
            raise LayoutMismatchError("the triton kernels need every layer's K (and V) to have the same strides")
        if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InvalidArgumentError("the triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
        return "triton"

    def _run(self, op: str, slots: torch.Tensor, buf: torch.Tensor, backend: Backend, stream: Any) -> CopyHandle:
        impl = self._choose(backend)
        if self.device.type != "cuda":
            self._copy(op, impl, slots, buf)
            return CopyHandle()
        return self._run_cuda(op, impl, slots, buf, stream)

    def _run_cuda(self, op: str, impl: str, slots: torch.Tensor, buf: torch.Tensor, stream: Any) -> CopyHandle:
        side = stream or self._side_stream()
        # The side stream must see the KV the engine's stream wrote (gather) or may still read (scatter).
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            slots = slots.to(self.device, non_blocking=True)
            if buf.device == self.device:
                self._copy(op, impl, slots, buf)
                # buf and slots were made on another stream: keep their memory alive until side is done.
                buf.record_stream(side)
            elif op == "gather":
                staging = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
                self._copy(op, impl, slots, staging)
                buf.copy_(staging, non_blocking=True)
            else:
                staging = buf.to(self.device, non_blocking=True)
                self._copy(op, impl, slots, staging)
            slots.record_stream(side)
            event = torch.cuda.Event()
            event.record(side)
        return CopyHandle(event, side)

    def _side_stream(self) -> Any:
        with self._lock:
            idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
            if idx not in self._streams:
                self._streams[idx] = torch.cuda.Stream(device=idx)
            return self._streams[idx]

    def _copy(self, op: str, impl: str, slots: torch.Tensor, buf: torch.Tensor) -> None:
        """Do the copy on the current stream; ``buf`` and ``slots`` are on the KV's device."""
        if impl == "triton":
            from lmcache.kernels import triton_kernels

            triton_kernels.copy(op, self, slots, buf)
            return
        num_tokens = buf.shape[2]
        if num_tokens == 0:
            return
        if slots.device.type == "cpu" and buf.device.type == "cpu":
            whole = self._whole_blocks(slots)
            if whole is not None:
                if self._block_views is not None:
                    self._copy_blocks(op, whole, buf)
                else:
                    self._copy_strided_blocks(op, whole, buf)
                return
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        offsets = slots - blocks * self.block_size
        all_rows: torch.Tensor | None = None
        if self._uniform_steps is not None:
            step_block, step_token = self._uniform_steps
            token_rows = blocks * step_block + offsets * step_token
            entry_rows = self._all_offsets if token_rows.device == self._all_offsets.device else self._all_offsets_cpu
            all_rows = entry_rows[:, None] + token_rows[None, :]
        words_by_dtype: dict[torch.dtype, torch.Tensor] = {}
        for group in self._groups:
            if all_rows is not None:
                rows = all_rows[group.first : group.last + 1].reshape(-1)
            else:
                rows = group.rows(blocks, offsets)
            heads, width = group.raw_rows.shape[1], group.raw_rows.shape[2]
            words = words_by_dtype.get(group.raw_rows.dtype)
            if words is None:
                # The chunk buffer seen in the group's words; its rows are contiguous, so this is a view.
                words = buf.view(group.raw_rows.dtype).view(len(self.entries), num_tokens, heads, width)
                words_by_dtype[group.raw_rows.dtype] = words
            part = words[group.first : group.last + 1].view(-1, heads, width)
            if op == "gather":
                torch.index_select(group.raw_rows, 0, rows, out=part)
            else:
                group.raw_rows.index_copy_(0, rows, part)

    def pointer_table(self) -> torch.Tensor:
        """Addresses of every entry's ``[blocks, block_size, heads, head_dim]`` view (int64, on the KV's device)."""
        if self._ptr_table is None:
            self._ptr_table = torch.tensor([e.data_ptr() for e in self.entries], dtype=torch.int64).to(self.device)
        return self._ptr_table

    def __repr__(self) -> str:
        return (
            f"PagedKV(layout={self.layout.name}, geometry={self.geometry.identity}, blocks={self.num_blocks}, "
            f"block_size={self.block_size}, device={self.device})"
        )


def gather(
    kv: PagedKV,
    slots: Any,
    out: torch.Tensor,
    *,
    backend: Backend = "auto",
    stream: Any = None,
    validate: bool = True,
) -> CopyHandle:
    """Engine paged KV → chunk buffer; see :meth:`PagedKV.gather`."""
    return kv.gather(slots, out, backend=backend, stream=stream, validate=validate)


def scatter(
    kv: PagedKV,
    slots: Any,
    src: torch.Tensor,
    *,
    backend: Backend = "auto",
    stream: Any = None,
    validate: bool = True,
) -> CopyHandle:
    """Chunk buffer → engine paged KV; see :meth:`PagedKV.scatter`."""
    return kv.scatter(slots, src, backend=backend, stream=stream, validate=validate)
