"""Prefill/decode disaggregation through lmcache: the connector's ``kv_producer``/``kv_consumer`` logic.

A prefill instance (``kv_producer``, or ``kv_both``) gets a request whose ``kv_transfer_params``
say ``do_remote_decode``; it computes the prompt (the proxy asks for one token), stores the whole
prompt's KV through its tiers and hands back ``kv_transfer_params`` naming the transfer. A decode
instance (``kv_consumer``, or ``kv_both``) gets the same prompt with those params
(``do_remote_prefill``), reports every prompt token but the last as external, and loads them.

What goes where (the transfer is ordinary lmcache traffic through any tier both instances reach:
``lm://``/``lm+unix://``, ``redis://``, ``nixl://``, a shared ``file://``):

* The prompt's **whole chunks** go under the ordinary prefix keys, so the transferred KV is also
  an ordinary cache hit for later requests on any instance.
* The **last chunk** (the partial tail, or the last whole chunk when the prompt ends on a chunk
  boundary) goes under a **transfer key**: the same chained hash in a scope with one more tag,
  ``lmcache_pd=<transfer id>``. Only the consumer holding that id looks it up, so partial chunks
  never enter the shared prefix space and unrelated requests never collide. It is put after every
  whole chunk of the prompt has landed, so it doubles as the transfer's completion mark.

The producer's save runs asynchronously after the step that computed the prompt's last token;
``request_finished`` returns ``True`` (vLLM keeps the blocks) and the worker reports the request
in ``finished_sending`` once the save has landed, failed or outrun ``pd_transfer_timeout``. A
send that fails is logged with its reason and publishes a **failure mark** (a small value beside
the transfer key, same scope), so the consumer stops waiting at once.

When the only tier is the cache server reached with shared memory, the transfer goes **in
place**: the producer copies vLLM's blocks straight into tier-0 blocks it reserved in the
server's pool (the transfer key last in the same reservation, published by one commit), and the
consumer copies into vLLM's blocks straight from checked views of the pool. Otherwise chunks go
through the engine's chunk buffers (the copy of chunk ``i + 1`` overlapping the put of chunk
``i``, the gets running ahead of the copies on the consumer).

The consumer's load waits, off the scheduler, for the completion mark or the failure mark (at
most ``pd_transfer_timeout`` seconds: a producer that died or a tier that went away never hangs a
request), then loads the whole chunks and the tail. Whatever it could not load is reported as
failed blocks: vLLM recomputes them (``kv_load_failure_policy: recompute``) or fails the request
(``fail``). A transfer is tried once per request; a recomputing request looks lmcache up again as
an ordinary request.

This module holds the role logic only; :mod:`lmcache.integrations.vllm.connector` calls it from
small hooks. It imports no vLLM module.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lmcache.engine import CacheEngine
from lmcache.errors import IntegrityError, InvalidArgumentError
from lmcache.integrations.vllm.slots import SlotMappedKV
from lmcache.keys import Chunk, ChunkHasher, KeyScope
from lmcache.serde.codec import parse_codec_header
from lmcache.serde.frame import payload_checksum

__all__ = [
    "PD_TAG",
    "PDScheduler",
    "PDWorker",
    "TransferRef",
    "TransferSave",
    "parse_transfer_id",
]

logger = logging.getLogger(__name__)

#: The scope tag that makes a key a transfer key.
PD_TAG = "lmcache_pd"
#: Transfer ids come from the network (a client or proxy may name one): a short, plain token.
_TRANSFER_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: vLLM roles that may send (``do_remote_decode``) and receive (``do_remote_prefill``).
#: Bytes enough to tell a codec header from raw KV at the start of a value.
_CODEC_PEEK = 256
#: The value of a failure mark (its presence is the message; the bytes only name it).
_FAILURE_MARK = b"lmcache-pd-send-failed"
_SENDERS = frozenset({"kv_producer", "kv_both"})
#: Longest an in-place send waits, in the step that sent it, for its commit to land (seconds).
_COMMIT_WAIT_S = 0.05
_RECEIVERS = frozenset({"kv_consumer", "kv_both"})


def parse_transfer_id(value: object) -> str:
    """Check a transfer id taken from ``kv_transfer_params``.

    Raises:
        InvalidArgumentError: Not a string of 1-128 letters, digits or ``._:-``.
    """
    if not isinstance(value, str) or not _TRANSFER_ID.fullmatch(value):
        raise InvalidArgumentError(
            f"lmcache_transfer_id must be 1-128 characters of [A-Za-z0-9._:-], got {value!r:.80}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class TransferRef:
    """What a consumer needs to find a producer's transfer.

    Attributes:
        transfer_id: Names the transfer key's scope tag.
        num_tokens: The prompt length the producer stored (must equal the consumer's prompt).
    """

    transfer_id: str
    num_tokens: int


@dataclasses.dataclass
class TransferSave:
    """Worker order: store ``tokens`` (the whole prompt) from ``block_ids`` as transfer ``transfer_id``."""

    req_id: str
    tokens: list[int]
    block_ids: list[int]
    transfer_id: str


def _params(request: Any) -> Mapping[str, Any]:
    params = getattr(request, "kv_transfer_params", None)
    return params if isinstance(params, Mapping) else {}


@dataclasses.dataclass
class _Incoming:
    ref: TransferRef
    computed: int


class PDScheduler:
    """The scheduler side of the roles: which requests send or receive a transfer.

    Args:
        kv_role: vLLM's ``kv_role`` (``kv_producer``, ``kv_consumer`` or ``kv_both``).
        count: Adds to one of the connector's counters.
    """

    def __init__(self, kv_role: str | None, count: Callable[[str, int], None]) -> None:
        self.kv_role = kv_role or "kv_both"
        self._count = count
        self._outgoing: dict[str, str] = {}  # request id -> transfer id, until it finishes
        self._planned: set[str] = set()  # outgoing requests whose save went to the workers
        self._incoming: dict[str, _Incoming] = {}  # matched, waiting for update_state_after_alloc
        self._tried: set[str] = set()  # requests whose transfer was tried (once per request)

    # -- consumer ------------------------------------------------------------------------------

    def _incoming_ref(self, request: Any) -> TransferRef | None:
        params = _params(request)
        if self.kv_role not in _RECEIVERS or not params.get("do_remote_prefill"):
            return None
        if request.request_id in self._tried:
            return None
        prompt = request.prompt_token_ids or ()
        try:
            tid = parse_transfer_id(params.get("lmcache_transfer_id"))
            num = params.get("lmcache_num_tokens")
            if not isinstance(num, int) or isinstance(num, bool) or num != len(prompt):
                raise InvalidArgumentError(f"lmcache_num_tokens {num!r:.40} is not this prompt's length {len(prompt)}")
        except InvalidArgumentError as exc:
            # Not ours (another connector's params) or garbled: serve it as an ordinary request.
            logger.warning("lmcache: request %s: unusable kv_transfer_params: %s", request.request_id, exc)
            self._count("pd_bad_params", 1)
            return None
        return TransferRef(tid, num)

    def match(self, request: Any, num_computed_tokens: int) -> tuple[int, bool] | None:
        """``get_num_new_matched_tokens`` for a request that receives a transfer, else ``None``.

        Every prompt token but the last is external (vLLM computes the last one for its
        logits); the load is always asynchronous, since it may wait for the transfer to land.
        """
        ref = self._incoming_ref(request)
        if ref is None:
            return None
        new = ref.num_tokens - 1 - num_computed_tokens
        if new <= 0:
            self._tried.add(request.request_id)  # vLLM's own prefix cache has it all
            return 0, False
        self._incoming[request.request_id] = _Incoming(ref, num_computed_tokens)
        return new, True

    def take_incoming(self, req_id: str) -> tuple[TransferRef, int] | None:
        """The matched transfer of ``req_id`` and vLLM's own computed tokens then (once)."""
        got = self._incoming.pop(req_id, None)
        if got is None:
            return None
        self._tried.add(req_id)
        self._count("pd_transfers_received", 1)
        return got.ref, got.computed

    # -- producer ------------------------------------------------------------------------------

    def note(self, request: Any) -> None:
        """Remember a request that must send its prompt's KV (``do_remote_decode``)."""
        params = _params(request)
        req_id = request.request_id
        if self.kv_role not in _SENDERS or not params.get("do_remote_decode") or req_id in self._outgoing:
            return
        tid = params.get("lmcache_transfer_id")
        try:
            tid = parse_transfer_id(tid) if tid is not None else uuid.uuid4().hex
        except InvalidArgumentError as exc:
            logger.warning("lmcache: request %s: %s; using a fresh transfer id", req_id, exc)
            tid = uuid.uuid4().hex
        self._outgoing[req_id] = tid

    def sending(self, req_id: str) -> bool:
        """True for a request that sends its prompt (its ordinary saves are replaced by the transfer)."""
        return req_id in self._outgoing

    def plan_save(
        self, req_id: str, prompt: list[int], computed: int, block_ids: list[int], block_size: int
    ) -> TransferSave | None:
        """The transfer order once the whole prompt's KV is computed and its blocks are known."""
        if req_id in self._planned or computed < len(prompt) or not prompt:
            return None
        if len(block_ids) * block_size < len(prompt):
            return None  # the block table is not known that far yet; retried next step
        self._planned.add(req_id)
        self._count("pd_transfers_sent", 1)
        blocks = list(block_ids[: -(-len(prompt) // block_size)])
        return TransferSave(req_id, list(prompt), blocks, self._outgoing[req_id])

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None] | None:
        """``request_finished`` for a sending request, else ``None``.

        Returns ``(True, params)`` when the save went to the workers: they report the request
        in ``finished_sending`` once it is done, and vLLM frees the blocks then. The params go
        back to the client (the proxy), which hands them to the decoder.
        """
        req_id = request.request_id
        self._incoming.pop(req_id, None)
        self._tried.discard(req_id)
        tid = self._outgoing.pop(req_id, None)
        if tid is None:
            return None
        if req_id not in self._planned:
            return False, None  # aborted before its prompt was computed: nothing to send
        self._planned.discard(req_id)
        status = getattr(request, "status", None)
        params = None
        # vLLM's RequestStatus by name: a finished prompt (length cap or stop), not an abort or error.
        if getattr(status, "name", status) in ("FINISHED_LENGTH_CAPPED", "FINISHED_STOPPED"):
            params = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "lmcache_transfer_id": tid,
                "lmcache_num_tokens": len(request.prompt_token_ids or ()),
                "remote_request_id": req_id,
            }
        return True, params

    def forget(self, req_id: str) -> None:
        """Drop a request's consumer state (it finished without :meth:`finished`)."""
        self._incoming.pop(req_id, None)
        self._tried.discard(req_id)


def _transfer_scope(scope: KeyScope, transfer_id: str) -> KeyScope:
    tags = dict(scope.tags)
    tags[PD_TAG] = transfer_id
    return KeyScope.create(scope.model, world_size=scope.world_size, rank=scope.rank, dtype=scope.dtype, tags=tags)


async def _seal(lm: Any, held: Any, i: int) -> None:
    lm.seal_in_place(held, i)


def _fill_and_seal(lm: Any, held: Any, i: int, run: Callable[[torch.Tensor], int], view: torch.Tensor) -> None:
    """Copy reserved value ``i`` of ``held`` into ``view`` with a hashed copy and seal it with that hash."""
    lm.seal_in_place(held, i, checksum=run(view))


def _unclipped_top(dst: Any, end: int) -> Any:
    """``dst`` without its upper clip when the request's own blocks reach token ``end``.

    A transfer's last chunk ends at the prompt's end, one token past what vLLM plans to load (it
    computes the last token itself). Clipped, that chunk is copied token by token (about 20
    times slower than whole blocks); unclipped, the last token's KV is written into its slot,
    which lies in a block of this request's own (allocated for the load, never one shared
    through vLLM's prefix cache: those end at ``lo``) and which vLLM's forward overwrites when
    it computes that token. Where the block table does not reach ``end``, ``dst`` is kept.
    """
    if (
        isinstance(dst, SlotMappedKV)
        and dst.hi is not None
        and dst.hi < end
        and dst.block_ids.numel() * dst.block_size >= end
    ):
        return SlotMappedKV(dst.kv, dst.block_ids.tolist(), lo=dst.lo, hi=None)
    return dst


def _hashed_copy(view: Any, start: int, end: int, *, scatter: bool) -> Callable[[torch.Tensor], int] | None:
    """The copy of tokens ``[start, end)`` between ``view`` and a chunk buffer that also hashes the buffer.

    The in-place transfer's copies: a gather into a reserved pool block that also yields the
    value's checksum (no second pass over the block to seal it), or a scatter out of a pool
    value that also yields the checksum to compare with the stored one (no separate verify
    pass). One C call per chunk (:meth:`~lmcache.kernels.native_copy.BlockCopyPlan.copy_hashed`,
    GIL released); the hash is :func:`~lmcache.serde.frame.payload_checksum`'s.

    Returns:
        A function copying with a given chunk buffer (contiguous) and returning the xxh3-64 of
        its bytes; None when this copy cannot go that way (not vLLM-CPU's strided blocks, not
        whole blocks, a clipped scatter, no compiled copy or no xxh3 C functions): the caller
        then copies and hashes separately.
    """
    if not isinstance(view, SlotMappedKV) or end <= start:
        return None
    kv, bs = view.kv, view.block_size
    if start % bs or (end - start) % bs or end > view.block_ids.numel() * bs:
        return None
    if scatter and (start < view.lo or (view.hi is not None and end > view.hi)):
        return None  # a clipped scatter writes part of a block: the ordinary path does that
    if kv.device.type != "cpu" or kv._strided_block_entries is None:
        return None
    from lmcache.kernels import native_copy

    plan, hasher = kv._block_copy_plan(), native_copy.xxh3()
    if plan is None or hasher is None:
        return None
    blocks = view.block_ids[start // bs : end // bs]
    if int(blocks.min()) < 0 or int(blocks.max()) >= kv.num_blocks:
        return None  # the ordinary copy raises the typed error for it
    if scatter and torch.unique(blocks).numel() != blocks.numel():
        return None

    def run(buf: torch.Tensor) -> int:
        if not buf.is_contiguous():
            raise InvalidArgumentError("a hashed chunk copy needs a contiguous chunk buffer")
        return plan.copy_hashed(scatter, blocks, buf, hasher)

    return run


def _in_place_tier(engine: CacheEngine) -> Any:
    """The engine's only tier when it is a cache server whose pool this process maps, else None."""
    try:
        from lmcache.serde.layer import CodecBackend
        from lmcache.server.client import LMServerBackend
    except ImportError:  # pragma: no cover - the server extra is not installed
        return None
    backend: Any = engine.backend
    tiers = getattr(backend, "tiers", None)
    if tiers is not None:
        if len(tiers) != 1:
            return None
        backend = tiers[0]
    # Tiers come wrapped for codecs; only raw values are the chunk's bytes as they lie.
    if isinstance(backend, CodecBackend):
        if backend.codec.name != "raw":
            return None
        backend = backend.inner
    return backend if isinstance(backend, LMServerBackend) and backend.pool_active else None


def _failure_hash(tail_hash: bytes) -> bytes:
    """The chunk hash of a transfer's failure mark (beside its completion mark, same scope)."""
    return hashlib.blake2b(b"lmcache-pd-failed\0" + tail_hash, digest_size=len(tail_hash)).digest()


def _last_chunk(engine: CacheEngine, tokens: list[int]) -> Chunk:
    """The prompt's last chunk (partial or whole), hashed as the chain continues."""
    cfg = engine.config
    return ChunkHasher(cfg.chunk_size, save_partial_chunks=True, seed=cfg.hash_seed).chunks(tokens)[-1]


class PDWorker:
    """The worker side: sends transfers (producer) and loads them (consumer).

    Args:
        timeout: ``pd_transfer_timeout``: the most a send may take before it is reported done
            anyway, and the most a load waits for its transfer.
        count: Adds to one of the connector's counters (thread-safe).
        poll: Seconds between looks for a transfer that has not landed yet.
    """

    def __init__(self, timeout: float, count: Callable[[str, int], None], poll: float = 0.02) -> None:
        self.timeout = timeout
        self.poll = poll
        self._count = count
        self._sending: dict[str, concurrent.futures.Future[bool]] = {}
        self._finished: set[str] = set()  # sending requests vLLM has finished (it awaits them)
        # Runs every other hashed chunk copy of an in-place transfer (its thread starts on first use).
        self._helper_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lmcache-pd-copy")

    # -- producer ------------------------------------------------------------------------------

    def start_save(self, engine: CacheEngine, src: Any, save: TransferSave) -> None:
        """Copy the prompt's KV out of ``src`` now; the puts land in the background.

        The whole chunks go under their ordinary keys (those the tier holds already are
        skipped), the last chunk (partial or whole) under the transfer key once every whole
        chunk is in. The copies and the puts overlap: chunk ``i`` is put (on the engine's loop)
        while chunk ``i + 1`` is copied out of ``src`` here. A send that fails (a copy, a
        rejected or failed put, the deadline) publishes a failure mark under the transfer's
        scope instead, so the consumer stops waiting at once (:meth:`load`).
        """
        began = time.perf_counter()
        tail = _last_chunk(engine, save.tokens)
        scope = _transfer_scope(engine.scope, save.transfer_id)
        key, fail_key = scope.key(tail.hash), scope.key(_failure_hash(tail.hash))
        # Every whole chunk under its ordinary key: the last one too when the prompt ends on a chunk
        # boundary (it then goes under both keys), so the prefix is a hit for anyone.
        n_whole = len(save.tokens) - len(save.tokens) % engine.config.chunk_size
        whole = engine.chunks(save.tokens[:n_whole]) if n_whole else []
        keys = [engine.scope.key(c.hash) for c in whole]
        lm = _in_place_tier(engine)
        chunks = [*zip(whole, keys, strict=True), (tail, key)]
        if lm is not None and self._send_in_place(engine, lm, src, save, chunks=chunks, fail_key=fail_key, began=began):
            return
        puts: list[concurrent.futures.Future[str | None]] = []
        lease = None
        try:
            present: list[bool] | None = None
            if keys:  # a shared prefix may be there already: no copy, no put (checked like a store's)
                limit = engine.config.lookup_budget
                present = engine._within(engine._contains(keys, limit), limit, len(keys))
            if present is None:  # not known in time: put them all (a put of a held key is EXISTS)
                present = [False] * len(keys)
            for c, k, there in zip(whole, keys, present, strict=True):
                if there:
                    continue
                lease = engine.pool.acquire(shape=engine.geometry.chunk_shape(c.num_tokens))
                src.gather(c.start, c.end, lease.tensor())
                puts.append(engine._loop.submit(self._put(engine, k, lease)))
                lease = None  # the put releases it
            lease = engine.pool.acquire(shape=engine.geometry.chunk_shape(tail.num_tokens))
            src.gather(tail.start, tail.end, lease.tensor())
        except Exception as exc:  # a failed send is a recompute on the decoder, never a failed step
            if lease is not None:
                lease.release()
            reason = f"copying it out failed ({type(exc).__name__}: {exc})"
            self._sending[save.req_id] = engine._loop.submit(self._send_failed(engine, save, fail_key, reason, puts))
            return
        copied = time.perf_counter()
        self._count("pd_send_copy_us", int((copied - began) * 1e6))
        tail_lease = lease

        async def finish() -> str | None:
            try:
                for fut in puts:
                    reason = await asyncio.wrap_future(fut)
                    if reason is not None:
                        return f"the put of a whole chunk failed ({reason})"
                return await self._put(engine, key, tail_lease, release=False)
            finally:
                tail_lease.release()

        self._sending[save.req_id] = engine._loop.submit(
            self._bounded(engine, save, fail_key, finish(), began=began, puts=puts)
        )

    async def _bounded(
        self,
        engine: CacheEngine,
        save: TransferSave,
        fail_key: Any,
        finish: Any,
        *,
        began: float,
        puts: list[concurrent.futures.Future[str | None]],
    ) -> bool:
        """Run a send's ``finish`` (None, or why it failed) within the deadline; count the outcome."""
        try:
            reason = await asyncio.wait_for(finish, self.timeout)
        except TimeoutError:
            reason = f"it outran pd_transfer_timeout ({self.timeout:g} s)"
        except Exception as exc:  # the tier failed: the decoder must not wait for it
            reason = f"{type(exc).__name__}: {exc}"
        if reason is not None:
            return await self._send_failed(engine, save, fail_key, reason, puts)
        self._count("pd_sent_tokens", len(save.tokens))
        self._count("pd_sent_bytes", engine.geometry.chunk_nbytes(len(save.tokens)))
        self._count("pd_send_us", int((time.perf_counter() - began) * 1e6))
        return True

    @staticmethod
    async def _put(engine: CacheEngine, key: Any, lease: Any, *, release: bool = True) -> str | None:
        """Put one chunk buffer; None when it is in the tier, else why not."""
        try:
            result = (await engine.backend.put([key], [lease.tensor()]))[0]
            return None if result.ok else f"rejected: {result.reason}"
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            if release:
                lease.release()

    async def _send_failed(
        self,
        engine: CacheEngine,
        save: TransferSave,
        fail_key: Any,
        reason: str,
        puts: list[concurrent.futures.Future[str | None]],
    ) -> bool:
        """Count and log a failed send and publish its failure mark (best effort); returns False.

        The send's chunk puts still running are waited for first (they release their buffers).
        """
        for fut in puts:
            with contextlib.suppress(Exception):
                await asyncio.wrap_future(fut)
        logger.warning(
            "lmcache: transfer %s of request %s failed: %s; publishing a failure mark",
            save.transfer_id,
            save.req_id,
            reason,
        )
        self._count("pd_send_failures", 1)
        why = "no tier took it"
        # Through the tiered backend first; then straight to each tier, because a tier that timed
        # out on the send is suspended by the tiered backend's circuit breaker for a while (every
        # put to it rejected at once), and the mark is what ends the consumer's wait.
        for target in [engine.backend, *getattr(engine.backend, "tiers", [])]:
            try:
                # Bounded on its own: a tier that failed the send may hang this put too.
                result = (await asyncio.wait_for(target.put([fail_key], [_FAILURE_MARK]), min(self.timeout, 5.0)))[0]
            except Exception as exc:
                why = repr(exc)
                continue
            if result.ok:
                self._count("pd_failure_marks", 1)
                return False
            why = f"rejected: {result.reason}"
        # The tier is gone: the decoder runs into pd_transfer_timeout instead.
        logger.warning("lmcache: transfer %s: its failure mark could not be put (%s)", save.transfer_id, why)
        return False

    def finished_sending(self, finished_req_ids: set[str]) -> set[str]:
        """Sending requests that vLLM finished and whose save is done (landed or given up)."""
        self._finished |= finished_req_ids & self._sending.keys()
        done = {r for r in self._finished if self._sending[r].done()}
        for req_id in done:
            self._finished.discard(req_id)
            del self._sending[req_id]
        return done

    def pending(self) -> int:
        """Sends not reported yet."""
        return len(self._sending)

    def in_flight(self) -> list[concurrent.futures.Future[bool]]:
        """Sends still landing (an idle step waits for them as for loads: :mod:`~lmcache.integrations.vllm.idle`)."""
        return [fut for fut in self._sending.values() if not fut.done()]

    # -- consumer ------------------------------------------------------------------------------

    def load(self, engine: CacheEngine, dst: Any, load: Any) -> int:
        """Load a transfer into ``dst``: tokens ``[load.start, load.end)`` of the prompt ``load.tokens``.

        ``load`` is the connector's ``LoadSpec``; ``load.transfer`` names the transfer.

        Waits at most :attr:`timeout` for the transfer's completion mark (or its failure mark:
        then nothing is loaded at once), then loads the whole chunks through their ordinary keys
        and the last chunk through the transfer key. The gets run ahead on the engine's loop (up
        to half the chunk buffer pool) while earlier chunks are copied into ``dst`` here. A whole
        chunk that is not there yet (another request's store of a shared prefix may still be
        landing) is waited for within the same deadline.

        Returns:
            The end of what was loaded (``start`` when nothing was): everything up to it is valid.
        """
        tokens, start, ref = load.tokens, load.start, load.transfer
        deadline = time.monotonic() + self.timeout
        tail = _last_chunk(engine, tokens)
        scope = _transfer_scope(engine.scope, ref.transfer_id)
        key, fail_key = scope.key(tail.hash), scope.key(_failure_hash(tail.hash))
        state = self._wait_for(engine, key, fail_key, deadline)
        if state == "failed":
            logger.warning(
                "lmcache: transfer %s failed on its producer; vLLM handles the load failure", ref.transfer_id
            )
            self._count("pd_transfers_failed", 1)
            return start
        if state == "timeout":
            logger.warning(
                "lmcache: transfer %s did not land within %.1f s; vLLM handles the load failure",
                ref.transfer_id,
                self.timeout,
            )
            self._count("pd_transfer_timeouts", 1)
            return start
        began = time.perf_counter()
        self._count("pd_wait_us", int((began - deadline + self.timeout) * 1e6))
        todo = [(c, engine.scope.key(c.hash)) for c in engine.chunks(tokens[: tail.start]) if c.end > start]
        todo.append((tail, key))
        good, copy_s = start, 0.0
        dst = _unclipped_top(dst, tail.end)
        lm = _in_place_tier(engine)
        if lm is not None:
            good, copy_s = self._load_in_place(engine, lm, dst, todo, start=start, deadline=deadline)
            todo = [(c, k) for c, k in todo if c.end > good]
        window = max(1, engine.pool.num_slots // 2)
        inflight: collections.deque[tuple[Chunk, Any, concurrent.futures.Future[int | None]]] = collections.deque()
        nxt = 0
        try:
            while nxt < len(todo) or inflight:
                while nxt < len(todo) and len(inflight) < window:
                    chunk, k = todo[nxt]
                    lease = engine.pool.acquire(shape=engine.geometry.chunk_shape(chunk.num_tokens))
                    inflight.append(
                        (chunk, lease, engine._loop.submit(self._get(engine, k, lease, fail_key, deadline)))
                    )
                    nxt += 1
                chunk, lease, fut = inflight.popleft()
                try:
                    size = fut.result(timeout=self._left(deadline) + engine.config.tier_timeout)
                except Exception as exc:  # a failed load is vLLM's to recompute or fail
                    logger.warning("lmcache: transfer %s: loading a chunk failed: %r", ref.transfer_id, exc)
                    size = None
                if size != lease.nbytes:
                    lease.release()
                    return good
                t0 = time.perf_counter()
                dst.scatter(chunk.start, chunk.end, lease.tensor())
                copy_s += time.perf_counter() - t0
                lease.release()
                good = chunk.end
        finally:
            for _, lease, fut in inflight:  # stopped early: no get may write into a released buffer
                fut.cancel()
                with contextlib.suppress(Exception):
                    fut.result(timeout=engine.config.tier_timeout)
                lease.release()
        self._count("pd_loaded_bytes", engine.geometry.chunk_nbytes(tail.end - start))
        self._count("pd_load_us", int((time.perf_counter() - began) * 1e6))
        self._count("pd_load_copy_us", int(copy_s * 1e6))
        return tail.end

    async def _get(self, engine: CacheEngine, key: Any, lease: Any, fail_key: Any, deadline: float) -> int | None:
        """Read one chunk into ``lease``; a miss is retried until ``deadline`` or a failure mark."""
        while True:
            size = (await engine.backend.get_into([key], [lease.tensor()]))[0]
            if size is not None or time.monotonic() >= deadline:
                return size
            if (await engine.backend.contains([fail_key]))[0]:
                return None
            await asyncio.sleep(self.poll)

    # -- in place: the cache server's shared-memory pool (lm+unix://, lm:// on this host) --------

    def _send_in_place(
        self,
        engine: CacheEngine,
        lm: Any,
        src: Any,
        save: TransferSave,
        *,
        chunks: list[tuple[Chunk, Any]],
        fail_key: Any,
        began: float,
    ) -> bool:
        """Send by copying straight into blocks reserved in the server's pool; False if none could be.

        One reservation holds every chunk, the completion mark (the last chunk under the
        transfer key) last; one commit publishes them in that order, so the mark is never
        visible before the chunks. Chunks the server could not reserve (a put of the key in
        flight, tier 0 full) are copied into chunk buffers and put the ordinary way before the
        commit; chunks it holds already are skipped.
        """
        geometry = engine.geometry
        sizes = [geometry.chunk_nbytes(c.num_tokens) for c, _ in chunks]
        try:
            held = engine._run(
                asyncio.wait_for(lm.reserve_in_place([k for _, k in chunks], sizes), engine.config.tier_timeout)
            )
        except Exception as exc:  # the ordinary path tries again (and reports what fails)
            logger.debug("lmcache: no in-place transfer: %r", exc)
            return False
        if held is None:
            return False
        self._count("pd_send_reserve_us", int((time.perf_counter() - began) * 1e6))
        last = len(chunks) - 1
        puts: list[concurrent.futures.Future[str | None]] = []
        seals: list[concurrent.futures.Future[None]] = []
        helped: list[concurrent.futures.Future[None]] = []
        n_fused = 0
        mark_lease = None
        try:
            for i, (c, k) in enumerate(chunks):
                state = held.states[i]
                if state == "exists":
                    continue
                if state == "reserved":
                    view = torch.frombuffer(held.payload(i), dtype=geometry.torch_dtype)
                    view = view.view(geometry.chunk_shape(c.num_tokens))
                    run = _hashed_copy(src, c.start, c.end, scatter=False)
                    if run is not None:  # copied and hashed in one pass: only the header is left
                        fill = functools.partial(_fill_and_seal, lm, held, i, run, view)
                        # Every other one on the helper thread while this one copies the next.
                        if n_fused % 2:
                            helped.append(self._helper().submit(fill))
                        else:
                            fill()
                        n_fused += 1
                        continue
                    src.gather(c.start, c.end, view)
                    # Its checksum pass runs on the engine's loop while the next chunk is copied.
                    seals.append(engine._loop.submit(_seal(lm, held, i)))
                    continue
                lease = engine.pool.acquire(shape=geometry.chunk_shape(c.num_tokens))
                try:
                    src.gather(c.start, c.end, lease.tensor())
                except BaseException:
                    lease.release()
                    raise
                if i == last:
                    mark_lease = lease  # put after the commit
                else:
                    puts.append(engine._loop.submit(self._put(engine, k, lease)))
            concurrent.futures.wait(helped)
            for fut in helped:
                fut.result()
        except Exception as exc:  # a failed send is a recompute on the decoder, never a failed step
            concurrent.futures.wait(helped)  # nothing may write into the reservation after its abort
            if mark_lease is not None:
                mark_lease.release()
            reason = f"copying it out failed ({type(exc).__name__}: {exc})"

            async def failed() -> bool:
                for seal in seals:
                    with contextlib.suppress(Exception):
                        await asyncio.wrap_future(seal)
                with contextlib.suppress(Exception):
                    await lm.commit_in_place(held, abort=True)
                return await self._send_failed(engine, save, fail_key, reason, puts)

            self._sending[save.req_id] = engine._loop.submit(failed())
            return True
        self._count("pd_send_copy_us", int((time.perf_counter() - began) * 1e6))
        self._count("pd_in_place_sends", 1)

        async def finish() -> str | None:
            try:
                try:
                    for seal in seals:
                        await asyncio.wrap_future(seal)
                except Exception:
                    with contextlib.suppress(Exception):
                        await lm.commit_in_place(held, abort=True)
                    raise
                for fut in puts:
                    reason = await asyncio.wrap_future(fut)
                    if reason is not None:
                        await lm.commit_in_place(held, abort=True)
                        return f"the put of a whole chunk failed ({reason})"
                results = await lm.commit_in_place(held)
                bad = [r for r in results if r is not None and not r.ok]
                if bad:
                    return f"{len(bad)} chunk(s) were not published ({bad[0].reason})"
                if mark_lease is not None:
                    return await self._put(engine, chunks[last][1], mark_lease, release=False)
                return None
            finally:
                if mark_lease is not None:
                    mark_lease.release()

        sent = self._sending[save.req_id] = engine._loop.submit(
            self._bounded(engine, save, fail_key, finish(), began=began, puts=puts)
        )
        # The commit is one round trip: waiting for it here (GIL released) lets the engine's loop
        # run it at once instead of contending with vLLM's next steps for the GIL. Bounded: a
        # slow server leaves it to land in the background as before.
        concurrent.futures.wait([sent], timeout=_COMMIT_WAIT_S)
        return True

    def _load_in_place(
        self, engine: CacheEngine, lm: Any, dst: Any, todo: list[tuple[Chunk, Any]], *, start: int, deadline: float
    ) -> tuple[int, float]:
        """Copy chunks into ``dst`` straight from where the server holds them, in order.

        The next group of chunks is read (in place) while this one is copied. Stops at the first
        chunk it could not read this way: the caller loads the rest the ordinary way.

        Returns:
            The end of what was loaded (``start`` when nothing was), and the seconds spent copying.
        """
        geometry = engine.geometry
        limit = lm.in_place_get_bytes()
        groups: list[list[tuple[Chunk, Any]]] = [[]]
        size = 0
        for c, k in todo:
            n = geometry.chunk_nbytes(c.num_tokens)
            if groups[-1] and size + n > limit:
                groups.append([])
                size = 0
            groups[-1].append((c, k))
            size += n

        def read(group: list[tuple[Chunk, Any]]) -> concurrent.futures.Future[Any]:
            nbytes = [geometry.chunk_nbytes(c.num_tokens) for c, _ in group]
            # Unverified: each payload is hashed as it is copied into dst (below), one pass.
            return engine._loop.submit(lm.get_in_place([k for _, k in group], nbytes, verify=False))

        def release(got: Any) -> None:
            if got is not None:
                engine._loop.loop.call_soon_threadsafe(lm.release_in_place, got)

        good, copy_s = start, 0.0
        pending = collections.deque(read(g) for g in groups[:2])
        nxt = len(pending)
        try:
            for group in groups:
                fut = pending.popleft()
                t_get = time.perf_counter()
                try:
                    got = fut.result(timeout=self._left(deadline) + engine.config.tier_timeout)
                except Exception as exc:  # the ordinary path tries again (and reports what fails)
                    logger.debug("lmcache: no in-place load: %r", exc)
                    return good, copy_s
                if got is None:
                    return good, copy_s
                self._count("pd_load_get_us", int((time.perf_counter() - t_get) * 1e6))
                try:
                    t0 = time.perf_counter()
                    end, whole = self._scatter_group(lm, dst, group, got, geometry)
                    copy_s += time.perf_counter() - t0
                    good = max(good, end)
                    if not whole:
                        return good, copy_s
                finally:
                    release(got)
                if nxt < len(groups):
                    pending.append(read(groups[nxt]))
                    nxt += 1
            return good, copy_s
        finally:
            for fut in pending:  # stopped early: hand back what was read ahead
                fut.cancel()
                with contextlib.suppress(Exception):
                    release(fut.result(timeout=engine.config.tier_timeout))

    def _scatter_group(
        self, lm: Any, dst: Any, group: list[tuple[Chunk, Any]], got: Any, geometry: Any
    ) -> tuple[int, bool]:
        """Copy one in-place read's chunks into ``dst``, each checked against its stored checksum.

        The hashed copies (:func:`_hashed_copy`) of every other chunk run on the helper thread
        while this thread copies the rest (both in C, GIL released); other chunks are hashed,
        then copied. A chunk that fails its checksum is reported corrupt (a counted miss): what
        was copied from it and after it is not counted as loaded (vLLM recomputes those blocks).

        Returns:
            The end of the chunks loaded in order (0 when none was), and whether all were.
        """
        items: list[tuple[Chunk, Any, Any, int | None, torch.Tensor, Any]] = []
        for (c, k), payload, want in zip(group, got.payloads, got.checksums, strict=True):
            if payload is None or parse_codec_header(payload[:_CODEC_PEEK]) is not None:
                break  # a miss, or another writer's encoded value: load up to it
            view = torch.frombuffer(payload, dtype=geometry.torch_dtype).view(geometry.chunk_shape(c.num_tokens))
            items.append((c, k, payload, want, view, _hashed_copy(dst, c.start, c.end, scatter=True)))
        fused = [j for j, it in enumerate(items) if it[5] is not None]
        helped = {j: self._helper().submit(items[j][5], items[j][4]) for j in fused[1::2]}
        seen: dict[int, int] = {}
        try:
            for j, (c, _, payload, want, view, run) in enumerate(items):
                if j in helped:
                    continue
                if run is not None:
                    seen[j] = run(view)
                else:  # hashed first: only a checked value is copied
                    seen[j] = payload_checksum(payload)
                    if seen[j] == want:
                        dst.scatter(c.start, c.end, view)
        finally:
            concurrent.futures.wait(helped.values())  # it reads the payloads: held until it is done
        for j, fut in helped.items():
            seen[j] = fut.result()
        end = 0
        for j, (c, k, _, want, _, _) in enumerate(items):
            if seen[j] != want:
                lm.reject_in_place(k, IntegrityError(f"value for {k} failed its checksum"))
                return end, False
            end = c.end
        return end, len(items) == len(group)

    def _helper(self) -> concurrent.futures.ThreadPoolExecutor:
        """The thread that runs every other hashed chunk copy of an in-place transfer (the host's second core)."""
        return self._helper_pool

    def _left(self, deadline: float) -> float:
        return max(0.05, deadline - time.monotonic())

    def _wait_for(self, engine: CacheEngine, key: Any, fail_key: Any, deadline: float) -> str:
        """Poll for the completion mark ``key`` or the failure mark ``fail_key`` until ``deadline``.

        Returns ``"landed"``, ``"failed"`` (the producer gave up on the send) or ``"timeout"``.
        With ``key`` None only the failure mark is looked for. The completion mark wins when
        both are there (a send that landed and was then timed out on the producer).
        """
        keys = [fail_key] if key is None else [key, fail_key]
        while True:
            try:
                there = engine._run(asyncio.wait_for(engine.backend.contains(keys), self._left(deadline)))
                if key is not None and there[0]:
                    return "landed"
                if there[-1]:
                    return "failed"
            except Exception as exc:  # a tier down now may be back before the deadline
                logger.debug("lmcache: looking for a transfer failed: %s", exc)
            if time.monotonic() >= deadline:
                return "timeout"
            time.sleep(self.poll)
