"""Layer-wise pipelining for the vLLM connector (``layerwise``): copy one layer at a time.

vLLM calls ``wait_for_layer_load(layer)`` just before a layer's attention and
``save_kv_layer(layer, ...)`` just after it. With ``layerwise`` on, the connector uses them:

* **Loads** (the synchronous ones: see below). ``start_load_kv`` hands the step's loads to a copy
  thread and returns at once. The thread fetches every hit chunk into staging buffers (whole
  chunks, all layers: the value format is the same as in whole-chunk mode), then scatters them into
  vLLM's paged KV layer by layer, in layer order, and marks each layer done.
  ``wait_for_layer_load(layer)`` waits only for that layer, so layer *i*'s attention runs while
  layers *i+1…* are still being copied. Layer 0 waits for the fetch, since every chunk value holds
  every layer.
* **Stores.** At the first ``save_kv_layer`` of a step the copy thread plans the step's stores (the
  chunks to write, skipping the leading chunks the tiers already hold), and each layer handed over
  is gathered from vLLM's blocks into the staging buffers of those chunks while the next layers
  compute. ``wait_for_save`` waits for the gathers and hands the whole chunks to
  :meth:`lmcache.engine.CacheEngine.store`, which copies them into its pool and puts them exactly
  as in whole-chunk mode: the stored value is the same bytes under the same key.

Asynchronous loads (``async_loading``) are not layer-wise: their request is parked until the load
has ended, so no forward waits on them. ``layerwise`` applies to synchronous loads
(``async_loading: false``) and to every store.

Every layer of vLLM's cache is bound as its own one-layer :class:`~lmcache.kernels.PagedKV`, in the
layout vLLM's attention backend gave the whole cache, so a layer's copy is the same kernel as a
whole chunk's restricted to one layer. Staging buffers are kept and reused (a fresh allocation
costs page faults on every step). On CUDA each copy is synchronised on the copy thread, after the
copy stream was made to wait for the forward's stream (an event recorded when the work was handed
over); this path is written for CUDA but has only run on the CPU.

This module does not import vLLM.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from lmcache.engine import CacheEngine
from lmcache.errors import InvalidArgumentError
from lmcache.integrations.vllm.slots import SlotMappedKV
from lmcache.kernels import PagedKV
from lmcache.layouts import KVGeometry

__all__ = ["LayerwiseKV", "LayerwiseLoads", "LayerwiseSaves", "StagedChunks"]

logger = logging.getLogger(__name__)


class _Load(Protocol):
    """What a planned load says (the connector's ``LoadSpec``)."""

    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]


class _Save(Protocol):
    """What a planned store says (the connector's ``SaveSpec``)."""

    tokens: list[int]
    start: int
    block_ids: list[int]


def _fence(device: torch.device) -> Any:
    """An event on the calling thread's CUDA stream (what the forward has queued so far), or None."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


def _after(fence: Any, device: torch.device) -> None:
    """Make the copy thread's stream wait for ``fence`` (copies then see the forward's KV writes)."""
    if fence is not None:
        torch.cuda.current_stream(device).wait_event(fence)


class _StagingPool:
    """Reusable chunk-shaped buffers on the KV's device.

    Buffers are flat allocations handed out as ``[layers, kv_parts, tokens, heads, head_dim]``
    views; a returned buffer is reused for any chunk that fits. At most ``keep_bytes`` of free
    buffers are kept.
    """

    def __init__(self, geometry: KVGeometry, device: torch.device, keep_bytes: int = 1 << 30) -> None:
        self.geometry = geometry
        self.device = device
        self.keep_bytes = keep_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A flat buffer and its chunk view for ``tokens`` tokens."""
        shape = self.geometry.chunk_shape(tokens)
        need = 1
        for n in shape:
            need *= n
        with self._lock:
            fits = [i for i, t in enumerate(self._free) if t.numel() >= need]
            flat = self._free.pop(min(fits, key=lambda i: self._free[i].numel())) if fits else None
        if flat is None:
            flat = torch.empty(need, dtype=self.geometry.torch_dtype, device=self.device)
        return flat, flat[:need].view(shape)

    def give(self, flat: torch.Tensor) -> None:
        """Return a buffer from :meth:`take`."""
        with self._lock:
            kept = sum(t.numel() for t in self._free) * flat.element_size()
            if kept + flat.numel() * flat.element_size() <= self.keep_bytes:
                self._free.append(flat)


@dataclasses.dataclass
class _Staged:
    """One chunk in a staging buffer, and where its tokens go in vLLM's KV."""

    start: int
    end: int
    flat: torch.Tensor
    buf: torch.Tensor
    slots: torch.Tensor | None = None  # slots of tokens [lo, hi) (loads) or [start, end) (stores)
    lo: int = 0
    hi: int = 0


class StagedChunks:
    """A :class:`~lmcache.engine.KVSource` over chunks already gathered into staging buffers.

    :meth:`CacheEngine.store` asks it for whole chunks; each is a plain copy out of its staging
    buffer. A chunk that was not staged (never expected) is gathered from vLLM's KV instead.
    """

    def __init__(self, geometry: KVGeometry, chunks: Sequence[_Staged], fallback: SlotMappedKV) -> None:
        self.geometry = geometry
        self._chunks = {(c.start, c.end): c for c in chunks}
        self._fallback = fallback

    def gather(self, start: int, end: int, out: torch.Tensor) -> None:
        """Copy tokens ``[start, end)`` (all layers) into ``out``."""
        chunk = self._chunks.get((start, end))
        if chunk is None:
            self._fallback.gather(start, end, out)
            return
        out.copy_(chunk.buf)


class _StagingDestination:
    """A :class:`~lmcache.engine.KVDestination` that keeps fetched chunks in staging buffers."""

    def __init__(self, geometry: KVGeometry, pool: _StagingPool) -> None:
        self.geometry = geometry
        self.pool = pool
        self.chunks: list[_Staged] = []

    def scatter(self, start: int, end: int, src: torch.Tensor) -> None:
        flat, buf = self.pool.take(end - start)
        self.chunks.append(_Staged(start, end, flat, buf))
        buf.copy_(src)


class LayerwiseKV:
    """vLLM's paged KV bound layer by layer, with the thread that copies one layer at a time.

    Args:
        kv: The whole cache, bound as one :class:`PagedKV` (its layout, geometry and block size
            apply to every layer).
        tensors: vLLM's per-layer KV tensors, in layer order (the ones ``kv`` binds).
        names: vLLM's layer names, in the same order.

    Raises:
        InvalidArgumentError: ``names`` and ``tensors`` disagree with ``kv``'s geometry.
        LayoutMismatchError: A layer does not have ``kv``'s layout.
    """

    def __init__(self, kv: PagedKV, tensors: Sequence[torch.Tensor], names: Sequence[str]) -> None:
        geometry = kv.geometry
        if len(tensors) != len(names) or len(tensors) != geometry.num_layers:
            raise InvalidArgumentError(
                f"{len(tensors)} KV tensors and {len(names)} layer names for {geometry.num_layers} layers"
            )
        one = dataclasses.replace(geometry, num_layers=1)
        self.geometry = geometry
        self.kv = kv
        self.layers = [PagedKV([t], layout=kv.layout, block_size=kv.block_size, geometry=one) for t in tensors]
        self.index = {name: i for i, name in enumerate(names)}
        self.device = kv.device
        self.staging = _StagingPool(geometry, self.device)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-layers")

    @property
    def num_layers(self) -> int:
        """Layers of the cache."""
        return len(self.layers)

    def submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args)`` on the copy thread (in submission order)."""
        return self._thread.submit(fn, *args)

    def start_loads(self, engine: CacheEngine, loads: Sequence[_Load]) -> LayerwiseLoads:
        """Fetch ``loads`` and scatter them layer by layer on the copy thread; returns at once."""
        return LayerwiseLoads(self, engine, loads)

    def start_saves(self, engine: CacheEngine, saves: Sequence[_Save]) -> LayerwiseSaves:
        """Plan ``saves`` on the copy thread; layers are then handed over with :meth:`LayerwiseSaves.layer_done`."""
        return LayerwiseSaves(self, engine, saves)

    def close(self) -> None:
        """Let queued copies finish and stop the copy thread."""
        self._thread.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"LayerwiseKV({self.num_layers} layers, {self.kv!r})"


class LayerwiseLoads:
    """One step's synchronous loads, fetched whole and then copied into vLLM's KV layer by layer."""

    def __init__(self, lw: LayerwiseKV, engine: CacheEngine, loads: Sequence[_Load]) -> None:
        self._lw = lw
        self._loads = list(loads)
        self._done = [threading.Event() for _ in range(lw.num_layers)]
        self._results: list[int | BaseException] = [0] * len(self._loads)
        self._future = lw.submit(self._run, engine, _fence(lw.device))

    def _run(self, engine: CacheEngine, fence: Any) -> None:
        lw = self._lw
        staged: list[_Staged] = []
        try:
            _after(fence, lw.device)
            # Fetch first: each chunk value holds every layer, so layer 0 needs all of them.
            for n, load in enumerate(self._loads):
                dst = _StagingDestination(lw.geometry, lw.staging)
                try:
                    self._results[n] = engine.retrieve(load.tokens, dst, start=load.start)
                except Exception as exc:  # reported by the connector as a failed load
                    self._results[n] = exc
                table = SlotMappedKV(lw.kv, load.block_ids)
                for c in dst.chunks:
                    c.lo, c.hi = max(c.start, load.start), min(c.end, load.end)
                    if c.lo < c.hi:
                        c.slots = table.slots(c.lo, c.hi)
                staged.extend(dst.chunks)
            for i, layer in enumerate(lw.layers):
                for c in staged:
                    if c.slots is None:
                        continue
                    src = c.buf[i : i + 1]
                    if (c.lo, c.hi) != (c.start, c.end):
                        src = src[:, :, c.lo - c.start : c.hi - c.start].contiguous()
                    # Slots are checked once per chunk (layer 0); the other layers use the same ones.
                    layer.scatter(c.slots, src, validate=i == 0).synchronize()
                self._done[i].set()
        except BaseException as exc:
            # A copy failed part-way: every load counts as failed (its blocks are recomputed).
            logger.warning("lmcache layer-wise load failed: %s", exc)
            self._results = [exc] * len(self._loads)
        finally:
            for event in self._done:
                event.set()  # never leave the forward waiting
            for c in staged:
                lw.staging.give(c.flat)

    def wait_layer(self, index: int) -> None:
        """Block until layer ``index`` of every load is in vLLM's KV (or the loads failed)."""
        self._done[index].wait()

    def results(self) -> list[int | BaseException]:
        """Wait for every layer; per load, the end of the tokens loaded or the error that stopped it."""
        self._future.result()
        return list(self._results)


class LayerwiseSaves:
    """One step's stores, gathered out of vLLM's KV layer by layer as the forward hands layers over."""

    def __init__(self, lw: LayerwiseKV, engine: CacheEngine, saves: Sequence[_Save]) -> None:
        self._lw = lw
        self._engine = engine
        self._saves = list(saves)
        self._staged: list[list[_Staged]] = [[] for _ in self._saves]
        self._starts = [s.start for s in self._saves]
        self._errors: list[BaseException | None] = [None] * len(self._saves)
        self._handed: set[int] = set()
        self._last = lw.submit(self._plan)

    def _plan(self) -> None:
        """Pick each store's chunks and their staging buffers (on the copy thread: lookups are I/O)."""
        lw = self._lw
        for n, save in enumerate(self._saves):
            try:
                # The tiers' leading run of this prefix is neither gathered nor put (as store() would skip it).
                hit = self._engine.lookup(save.tokens) if save.tokens else 0
                start = max(save.start, hit)
                table = SlotMappedKV(lw.kv, save.block_ids)
                for chunk in self._engine.chunks(save.tokens):
                    if chunk.end <= start:
                        continue
                    flat, buf = lw.staging.take(chunk.num_tokens)
                    self._staged[n].append(_Staged(chunk.start, chunk.end, flat, buf))
                    self._staged[n][-1].slots = table.slots(chunk.start, chunk.end)
                self._starts[n] = start
            except Exception as exc:  # a store that cannot be planned is a future miss
                self._errors[n] = exc
                self._drop(n)

    def _drop(self, n: int) -> None:
        for c in self._staged[n]:
            self._lw.staging.give(c.flat)
        self._staged[n] = []

    def _gather(self, index: int, fence: Any) -> None:
        _after(fence, self._lw.device)
        layer = self._lw.layers[index]
        for n, chunks in enumerate(self._staged):
            try:
                for c in chunks:
                    assert c.slots is not None
                    layer.gather(c.slots, c.buf[index : index + 1], validate=index == 0).synchronize()
            except Exception as exc:
                self._errors[n] = exc
                self._drop(n)

    def layer_done(self, index: int) -> None:
        """Layer ``index`` of this step is computed: gather it on the copy thread."""
        if index in self._handed:
            return
        self._handed.add(index)
        self._last = self._lw.submit(self._gather, index, _fence(self._lw.device))

    def finish(self) -> list[tuple[int, StagedChunks] | BaseException]:
        """Wait for the gathers (gathering layers never handed over now); per store, what to put.

        Returns:
            Per store: ``(start, source)`` for :meth:`CacheEngine.store` (chunks ending at or
            before ``start`` are cached already), or the error that stopped it.
        """
        for i in range(self._lw.num_layers):
            self.layer_done(i)  # layers vLLM did not hand over (no-op for the others)
        self._last.result()
        out: list[tuple[int, StagedChunks] | BaseException] = []
        for n, save in enumerate(self._saves):
            err = self._errors[n]
            if err is not None:
                out.append(err)
                continue
            fallback = SlotMappedKV(self._lw.kv, save.block_ids)
            out.append((self._starts[n], StagedChunks(self._lw.geometry, self._staged[n], fallback)))
        return out

    def release(self) -> None:
        """Return the staging buffers (after :meth:`CacheEngine.store` has copied them)."""
        for n in range(len(self._saves)):
            self._drop(n)
