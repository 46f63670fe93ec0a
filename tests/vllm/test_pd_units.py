"""The prefill/decode role logic (``lmcache.integrations.vllm.pd``) without vLLM.

Two :class:`~lmcache.engine.CacheEngine` instances over one ``file://`` tier stand for a prefill
and a decode instance: a transfer sent by one is loaded by the other token for token, the
prompt's whole chunks are ordinary prefix hits afterwards, and a transfer that never lands ends
the load after ``pd_transfer_timeout`` with nothing loaded.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import start_process

from lmcache.backends.base import EXISTS, PutResult, rejected
from lmcache.config import LMCacheConfig
from lmcache.engine import CacheEngine
from lmcache.errors import ConfigError, InvalidArgumentError
from lmcache.integrations.vllm.pd import PD_TAG, PDScheduler, PDWorker, TransferRef, TransferSave, parse_transfer_id
from lmcache.integrations.vllm.slots import ConnectorSettings
from lmcache.keys import ChunkHasher
from lmcache.layouts import KVGeometry

torch = pytest.importorskip("torch")
transformers_integration = pytest.importorskip("lmcache.integrations.transformers")
ContiguousKV = transformers_integration.ContiguousKV

GEOMETRY = KVGeometry(2, 2, 8, "float32")
CHUNK = 16


class Counts:
    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def __call__(self, name: str, n: int = 1) -> None:
        self.data[name] = self.data.get(name, 0) + n


def _engine(tier: Path) -> CacheEngine:
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[f"file://{tier}"])
    return CacheEngine(GEOMETRY, "pd-unit", config=cfg)


def _random_kv(n: int, seed: int) -> Any:
    kv = ContiguousKV.empty(GEOMETRY, n)
    gen = torch.Generator().manual_seed(seed)
    for t in kv.keys + kv.values:
        t.copy_(torch.randn(t.shape, generator=gen))
    return kv


def _request(req_id: str, prompt: list[int], params: dict[str, Any] | None, status: str = "") -> Any:
    return types.SimpleNamespace(request_id=req_id, prompt_token_ids=prompt, kv_transfer_params=params, status=status)


@pytest.mark.parametrize("n", [5, 16, 48, 53])  # shorter than a chunk, exact multiples, a partial tail
def test_a_transfer_sent_by_one_instance_is_loaded_by_another(tmp_path: Path, n: int) -> None:
    prompt = [(i * 31 + n) % 997 + 1 for i in range(n)]
    src = _random_kv(n, seed=n)
    sent, got = Counts(), Counts()
    with _engine(tmp_path) as prefill, _engine(tmp_path) as decode:
        sender = PDWorker(10.0, sent)
        sender.start_save(prefill, src, TransferSave("p-1", prompt, [], "t-1"))
        assert sender.finished_sending(set()) == set()  # vLLM has not finished the request yet
        sender._sending["p-1"].result(30)
        assert sender.finished_sending({"p-1", "other"}) == {"p-1"}
        assert sender.pending() == 0
        dst = ContiguousKV.empty(GEOMETRY, n)
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef("t-1", n))
        assert PDWorker(10.0, got).load(decode, dst, load) == n
        for a, b in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
            assert torch.equal(a[..., : n - 1, :], b[..., : n - 1, :])
        # The whole chunks are ordinary prefix hits; the tail lives only under the transfer key.
        assert decode.lookup(prompt, budget=5.0) == n - n % CHUNK
    assert sent.data["pd_sent_tokens"] == n


def test_a_transfer_that_never_lands_loads_nothing_after_the_timeout(tmp_path: Path) -> None:
    prompt = list(range(1, 41))
    counts = Counts()
    with _engine(tmp_path) as prefill, _engine(tmp_path) as decode:
        sender = PDWorker(10.0, Counts())
        sender.start_save(prefill, _random_kv(40, 1), TransferSave("p", prompt, [], "landed"))
        sender._sending["p"].result(30)
        load = types.SimpleNamespace(tokens=prompt, start=0, end=39, transfer=TransferRef("other-id", 40))
        assert PDWorker(0.3, counts).load(decode, ContiguousKV.empty(GEOMETRY, 40), load) == 0
    assert counts.data["pd_transfer_timeouts"] == 1


def _reject_puts(engine: CacheEngine, monkeypatch: pytest.MonkeyPatch, which: Any) -> None:
    """Fault injection: the engine's tier rejects the puts of the keys ``which(key)`` picks."""
    real = engine.backend.put

    async def put(keys: Any, srcs: Any) -> list[PutResult]:
        keys, srcs = list(keys), list(srcs)
        out: list[PutResult] = [rejected("capacity") if which(k) else EXISTS for k in keys]
        keep = [i for i, k in enumerate(keys) if not which(k)]
        if keep:
            for i, r in zip(keep, await real([keys[i] for i in keep], [srcs[i] for i in keep]), strict=True):
                out[i] = r
        return out

    monkeypatch.setattr(engine.backend, "put", put)


class _BrokenKV:
    """A KV source whose copies fail (a send that fails before any put)."""

    def __init__(self, kv: Any) -> None:
        self._kv = kv
        self.geometry = kv.geometry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kv, name)

    def gather(self, start: int, end: int, out: Any) -> None:
        raise RuntimeError("injected copy failure")


def _is_tail(prompt: list[int]) -> Any:
    tail_hash = ChunkHasher(CHUNK, save_partial_chunks=True).chunks(prompt)[-1].hash
    return lambda key: dict(key.tags).get(PD_TAG) is not None and key.chunk_hash == tail_hash


def _is_ordinary(key: Any) -> bool:
    return dict(key.tags).get(PD_TAG) is None


@pytest.mark.parametrize("fault", ["last chunk rejected", "whole chunk rejected", "copy fails"])
def test_a_failed_send_ends_the_consumers_wait_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """The producer publishes a failure mark; the consumer stops waiting and loads nothing.

    The consumer's ``pd_transfer_timeout`` is long (60 s): the load ends through the failure
    mark (``pd_transfers_failed``), not through the timeout (no ``pd_transfer_timeouts``).
    """
    n = 40  # two whole chunks and a partial tail
    prompt = [(i * 7) % 500 + 1 for i in range(n)]
    sent, got = Counts(), Counts()
    with _engine(tmp_path) as prefill, _engine(tmp_path) as decode:
        src: Any = _random_kv(n, 3)
        if fault == "last chunk rejected":
            _reject_puts(prefill, monkeypatch, _is_tail(prompt))
        elif fault == "whole chunk rejected":
            _reject_puts(prefill, monkeypatch, _is_ordinary)
        else:
            src = _BrokenKV(src)
        sender = PDWorker(60.0, sent)
        sender.start_save(prefill, src, TransferSave("p", prompt, [], "t-failed"))
        assert sender._sending["p"].result(30) is False
        assert sender.finished_sending({"p"}) == {"p"}  # vLLM frees the blocks
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef("t-failed", n))
        assert PDWorker(60.0, got).load(decode, ContiguousKV.empty(GEOMETRY, n), load) == 0
    assert sent.data["pd_send_failures"] == 1 and sent.data["pd_failure_marks"] == 1
    assert "pd_sent_tokens" not in sent.data
    assert got.data["pd_transfers_failed"] == 1
    assert "pd_transfer_timeouts" not in got.data


def test_a_send_that_trips_the_tier_breaker_still_marks_its_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole chunk's put outruns ``tier_timeout``: the tiered backend suspends the tier (every
    put to it is then rejected at once), yet the failure mark reaches the tier and the consumer
    stops waiting (the likely cause of the transfers that never landed on a loaded host)."""
    import asyncio

    n = 40
    prompt = [(i * 11) % 600 + 2 for i in range(n)]
    sent, got = Counts(), Counts()
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[f"file://{tmp_path}"], tier_timeout=0.3)
    with CacheEngine(GEOMETRY, "pd-unit", config=cfg) as prefill, _engine(tmp_path) as decode:
        tier = prefill.backend.tiers[0]
        real = tier.put

        async def slow_put(keys: Any, srcs: Any) -> list[PutResult]:
            if any(_is_ordinary(k) for k in keys):
                await asyncio.sleep(2.0)  # past tier_timeout: cancelled, the tier suspended
            return await real(keys, srcs)

        monkeypatch.setattr(tier, "put", slow_put)
        sender = PDWorker(60.0, sent)
        sender.start_save(prefill, _random_kv(n, 9), TransferSave("p", prompt, [], "t-breaker"))
        assert sender._sending["p"].result(30) is False
        assert prefill.backend.stats()["tiers"][0]["suspended"] is True
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef("t-breaker", n))
        assert PDWorker(60.0, got).load(decode, ContiguousKV.empty(GEOMETRY, n), load) == 0
    assert sent.data["pd_send_failures"] == 1 and sent.data["pd_failure_marks"] == 1
    assert got.data["pd_transfers_failed"] == 1 and "pd_transfer_timeouts" not in got.data


@pytest.mark.parametrize(("n", "blocks"), [(48, 3), (33, 2)])
def test_the_last_chunk_is_copied_whole_into_the_requests_own_blocks(tmp_path: Path, n: int, blocks: int) -> None:
    """vLLM plans ``n - 1`` tokens; where the request's blocks reach token ``n``, the last chunk
    is copied whole (whole-block path), the last token's slot included (vLLM overwrites it);
    where they do not (33 tokens: 32 planned fill two blocks of 16), it stops at ``n - 1``."""
    from lmcache.integrations.vllm.slots import SlotMappedKV, bind_paged_kv
    from lmcache.layouts import VLLM_CPU_VEC

    block = 16
    prompt = [(i * 5) % 300 + 1 for i in range(n)]
    gen = torch.Generator().manual_seed(n)
    shape = (8, GEOMETRY.num_kv_heads, block, 2 * GEOMETRY.head_dim)
    a = [torch.randn(shape, generator=gen) for _ in range(GEOMETRY.num_layers)]
    b = [torch.zeros(shape) for _ in range(GEOMETRY.num_layers)]
    src = SlotMappedKV(bind_paged_kv(a, GEOMETRY, block, VLLM_CPU_VEC), [0, 1, 2])  # the producer has them all
    paged_b = bind_paged_kv(b, GEOMETRY, block, VLLM_CPU_VEC)
    dst = SlotMappedKV(paged_b, list(range(4, 4 + blocks)), lo=0, hi=n - 1)
    with _engine(tmp_path) as prefill, _engine(tmp_path) as decode:
        sender = PDWorker(10.0, Counts())
        sender.start_save(prefill, src, TransferSave("p", prompt, [0, 1, 2], "t-whole"))
        assert sender._sending["p"].result(30) is True
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef("t-whole", n))
        assert PDWorker(10.0, Counts()).load(decode, dst, load) == n
    whole = blocks * block >= n
    m = n if whole else n - 1  # beyond the block table there is nothing to look at
    sent, landed = torch.empty(GEOMETRY.chunk_shape(m)), torch.empty(GEOMETRY.chunk_shape(m))
    src.gather(0, m, sent)
    SlotMappedKV(paged_b, list(range(4, 4 + blocks))).gather(0, m, landed)
    assert torch.equal(sent, landed)
    assert b[0][4 + blocks :].count_nonzero() == 0  # no block outside the table was written


@pytest.fixture(scope="module")
def lm_tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An ``lmcache server`` child (memory tier in shared memory) as an ``lm+unix://`` tier URL."""
    pytest.importorskip("aiohttp", reason="the server extra is not installed (pip install 'lmcache[server]')")
    folder = tmp_path_factory.mktemp("pd-lm")
    sock, ready = folder / "lm.sock", folder / "ready.json"
    argv = [sys.executable, "-m", "lmcache", "server", "--port", "0", "--http-port", "0"]
    argv += ["--unix-socket", str(sock), "--tier", "memory://?capacity=64MiB", "--ready-file", str(ready)]
    server = start_process("lmcache-server", argv, folder, ready.exists)
    try:
        yield f"lm+unix://{sock}"
    finally:
        server.stop()


def _lm_engine(tier: str) -> CacheEngine:
    cfg = LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[tier])
    return CacheEngine(GEOMETRY, "pd-unit-lm", config=cfg)


@pytest.mark.parametrize("n", [5, 48, 53])  # the tail only, ending on a chunk boundary, mid-chunk
def test_a_transfer_through_the_cache_server_goes_in_place(lm_tier: str, n: int) -> None:
    """Gathered straight into the server's pool, scattered straight out of it: same KV, same keys."""
    prompt = [(i * 13 + n) % 911 + 1 for i in range(n)]
    src = _random_kv(n, seed=100 + n)
    sent, got = Counts(), Counts()
    with _lm_engine(lm_tier) as prefill, _lm_engine(lm_tier) as decode:
        sender = PDWorker(10.0, sent)
        sender.start_save(prefill, src, TransferSave("p", prompt, [], f"lm-{n}"))
        assert sender._sending["p"].result(30) is True
        dst = ContiguousKV.empty(GEOMETRY, n)
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef(f"lm-{n}", n))
        assert PDWorker(10.0, got).load(decode, dst, load) == n
        for a, b in zip(src.keys + src.values, dst.keys + dst.values, strict=True):
            assert torch.equal(a[..., : n - 1, :], b[..., : n - 1, :])
        assert decode.lookup(prompt, budget=5.0) == n - n % CHUNK  # whole chunks: ordinary hits
        # A second send of the same prompt finds its whole chunks held: nothing copied for them.
        sender.start_save(prefill, src, TransferSave("p2", prompt, [], f"lm2-{n}"))
        assert sender._sending["p2"].result(30) is True
    assert sent.data["pd_in_place_sends"] == 2 and "pd_send_failures" not in sent.data
    assert got.data["pd_loaded_bytes"] == GEOMETRY.chunk_nbytes(n)


def test_a_failed_in_place_send_aborts_its_reservation_and_marks_the_failure(lm_tier: str) -> None:
    n = 40
    prompt = [(i * 17) % 700 + 3 for i in range(n)]
    sent, got = Counts(), Counts()
    with _lm_engine(lm_tier) as prefill, _lm_engine(lm_tier) as decode:
        sender = PDWorker(60.0, sent)
        sender.start_save(prefill, _BrokenKV(_random_kv(n, 5)), TransferSave("p", prompt, [], "lm-broken"))
        assert sender._sending["p"].result(30) is False
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef("lm-broken", n))
        assert PDWorker(60.0, got).load(decode, ContiguousKV.empty(GEOMETRY, n), load) == 0
        # The aborted reservation left the chunks free: an ordinary send of them now lands.
        sender.start_save(prefill, _random_kv(n, 5), TransferSave("p2", prompt, [], "lm-fixed"))
        assert sender._sending["p2"].result(30) is True
    assert sent.data["pd_failure_marks"] == 1
    assert got.data["pd_transfers_failed"] == 1 and "pd_transfer_timeouts" not in got.data


def test_scheduler_producer_holds_blocks_until_sent_and_hands_back_params() -> None:
    counts = Counts()
    pd = PDScheduler("kv_producer", counts)
    prompt = list(range(70))
    req = _request("r1", prompt, {"do_remote_decode": True, "lmcache_transfer_id": "abc"}, "FINISHED_LENGTH_CAPPED")
    pd.note(req)
    assert pd.sending("r1")
    assert pd.plan_save("r1", prompt, 64, list(range(3)), 32) is None  # prompt not computed yet
    assert pd.plan_save("r1", prompt, 70, list(range(2)), 32) is None  # block table too short
    save = pd.plan_save("r1", prompt, 70, list(range(5)), 32)
    assert save is not None and save.transfer_id == "abc" and save.block_ids == [0, 1, 2]
    assert pd.plan_save("r1", prompt, 71, list(range(5)), 32) is None  # once
    delay, params = pd.finished(req)
    assert delay is True
    assert params is not None and params["do_remote_prefill"] is True and params["lmcache_transfer_id"] == "abc"
    assert params["lmcache_num_tokens"] == 70
    # Aborted before its prompt was computed: nothing to send, blocks freed at once.
    other = _request("r2", prompt, {"do_remote_decode": True}, "FINISHED_ABORTED")
    pd.note(other)
    assert pd.finished(other) == (False, None)
    # Not a PD request, or a consumer role: no transfer.
    assert pd.finished(_request("r3", prompt, None)) is None
    consumer = PDScheduler("kv_consumer", counts)
    consumer.note(req)
    assert not consumer.sending("r1")


def test_scheduler_consumer_reports_all_but_the_last_token_once() -> None:
    counts = Counts()
    pd = PDScheduler("kv_consumer", counts)
    prompt = list(range(100))
    params = {"do_remote_prefill": True, "lmcache_transfer_id": "t", "lmcache_num_tokens": 100}
    req = _request("d1", prompt, params)
    assert pd.match(req, 0) == (99, True)
    assert pd.match(req, 32) == (67, True)  # vLLM's own prefix cache had 32 tokens
    ref, computed = pd.take_incoming("d1")
    assert ref == TransferRef("t", 100) and computed == 32
    assert pd.match(req, 0) is None  # tried once: a recompute looks up as an ordinary request
    # Params that do not fit the prompt, or a bad id, make an ordinary request.
    assert pd.match(_request("d2", prompt, {**params, "lmcache_num_tokens": 99}), 0) is None
    assert pd.match(_request("d3", prompt, {**params, "lmcache_transfer_id": "../x"}), 0) is None
    assert counts.data["pd_bad_params"] == 2
    assert PDScheduler("kv_producer", counts).match(_request("d4", prompt, params), 0) is None


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 129, 5, None, "a b"])
def test_bad_transfer_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_transfer_id(bad)


@pytest.mark.parametrize("bad", [0, -2, "soon", True])
def test_pd_transfer_timeout_must_be_positive_seconds(bad: object) -> None:
    assert ConnectorSettings.from_extra_config({"pd_transfer_timeout": "2.5"}, environ={}).pd_transfer_timeout == 2.5
    with pytest.raises(ConfigError, match="pd_transfer_timeout"):
        ConnectorSettings.from_extra_config({"pd_transfer_timeout": bad}, environ={})


def test_proxy_prefill_request_asks_for_one_token_and_a_transfer() -> None:
    pytest.importorskip("aiohttp")
    from lmcache.integrations.vllm.pd_proxy import prefill_request

    body = {"prompt": [1, 2], "max_tokens": 64, "stream": True, "stream_options": {}, "min_tokens": 4}
    out = prefill_request(body, "tid")
    assert out["max_tokens"] == 1 and out["stream"] is False
    assert "stream_options" not in out and "min_tokens" not in out
    assert out["kv_transfer_params"] == {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "lmcache_transfer_id": "tid",
    }
    assert body["max_tokens"] == 64  # the client's request is untouched


def _paged_pair(n: int, blocks: int) -> tuple[Any, Any]:
    """A producer's vLLM-CPU blocks (random) and a consumer's (zero), block size = chunk size."""
    from lmcache.integrations.vllm.slots import SlotMappedKV, bind_paged_kv
    from lmcache.layouts import VLLM_CPU_VEC

    gen = torch.Generator().manual_seed(n)
    shape = (8, GEOMETRY.num_kv_heads, CHUNK, 2 * GEOMETRY.head_dim)
    a = [torch.randn(shape, generator=gen) for _ in range(GEOMETRY.num_layers)]
    b = [torch.zeros(shape) for _ in range(GEOMETRY.num_layers)]
    src = SlotMappedKV(bind_paged_kv(a, GEOMETRY, CHUNK, VLLM_CPU_VEC), list(range(blocks)))
    paged_b = bind_paged_kv(b, GEOMETRY, CHUNK, VLLM_CPU_VEC)
    return src, SlotMappedKV(paged_b, list(range(4, 4 + blocks)), lo=0, hi=n - 1)


@pytest.mark.parametrize("n", [48, 53])  # whole blocks only; a partial tail (copied and hashed apart)
def test_an_in_place_transfer_copies_and_hashes_in_one_pass(
    lm_tier: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM-CPU blocks go into the pool and out again by the hashed C copies: same KV, no seal pass."""
    from lmcache.kernels import native_copy
    from lmcache.server.client import LMServerBackend

    if native_copy.library() is None or native_copy.xxh3() is None:
        pytest.skip("no native block copies or xxh3 C functions")
    calls: list[bool] = []
    original = native_copy.BlockCopyPlan.copy_hashed

    def spy(self: Any, scatter: bool, *args: Any, **kw: Any) -> int:
        calls.append(scatter)
        return original(self, scatter, *args, **kw)

    monkeypatch.setattr(native_copy.BlockCopyPlan, "copy_hashed", spy)
    hashed_seals: list[int | None] = []
    seal = LMServerBackend.seal_in_place
    monkeypatch.setattr(
        LMServerBackend,
        "seal_in_place",
        lambda self, held, i, checksum=None: (hashed_seals.append(checksum), seal(self, held, i, checksum=checksum)),
    )
    blocks = -(-n // CHUNK)
    prompt = [(i * 7 + n) % 613 + 1 for i in range(n)]
    src, dst = _paged_pair(n, blocks)
    with _lm_engine(lm_tier) as prefill, _lm_engine(lm_tier) as decode:
        sender = PDWorker(10.0, Counts())
        sender.start_save(prefill, src, TransferSave("p", prompt, list(range(blocks)), f"fused-{n}"))
        assert sender._sending["p"].result(30) is True
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef(f"fused-{n}", n))
        assert PDWorker(10.0, Counts()).load(decode, dst, load) == n
    sent, landed = torch.empty(GEOMETRY.chunk_shape(n - 1)), torch.empty(GEOMETRY.chunk_shape(n - 1))
    src.gather(0, n - 1, sent)
    dst.gather(0, n - 1, landed)
    assert torch.equal(sent, landed)
    # Sent: every whole chunk, and a whole last chunk once more under the transfer key; a partial
    # tail is copied and hashed apart. Loaded: the whole chunks before the tail, and a whole tail.
    whole = n // CHUNK
    gathers = whole + (n % CHUNK == 0)
    assert calls.count(False) == gathers and calls.count(True) == whole
    assert sum(c is not None for c in hashed_seals) == gathers


@pytest.mark.parametrize("bad", [0, 1])  # copied on the load thread, on the helper thread
def test_a_corrupt_in_place_value_is_a_miss_not_loaded(lm_tier: str, bad: int) -> None:
    """A pool value whose bytes changed after it was sealed fails the scatter's hash: loaded up to it only."""
    from lmcache.integrations.vllm.pd import _in_place_tier

    n = 48
    prompt = [(i * 11 + 5 * bad) % 577 + 2 for i in range(n)]
    src, dst = _paged_pair(n, 3)
    with _lm_engine(lm_tier) as prefill, _lm_engine(lm_tier) as decode:
        sender = PDWorker(10.0, Counts())
        sender.start_save(prefill, src, TransferSave("p", prompt, [0, 1, 2], f"corrupt-{bad}"))
        assert sender._sending["p"].result(30) is True
        lm = _in_place_tier(decode)
        key = decode.scope.key(decode.chunks(prompt)[bad].hash)

        async def corrupt() -> None:
            got = await lm.get_in_place([key], [GEOMETRY.chunk_nbytes(CHUNK)])
            payload = got.payloads[0]
            payload[100] ^= 0x40  # in the server's pool, after the value was sealed
            lm.release_in_place(got)

        decode._run(corrupt())
        before = lm.counters.corrupt
        load = types.SimpleNamespace(tokens=prompt, start=0, end=n - 1, transfer=TransferRef(f"corrupt-{bad}", n))
        assert PDWorker(10.0, Counts()).load(decode, dst, load) == bad * CHUNK
        assert lm.counters.corrupt > before


def test_an_idle_step_waits_for_a_send_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send still landing is among what an idle step waits for (the connector's get_finished), as a load is."""
    import asyncio
    import concurrent.futures
    import threading

    from lmcache.integrations.vllm.idle import IdleWait

    release = threading.Event()
    prompt = [(i * 3) % 500 + 1 for i in range(20)]
    with _engine(tmp_path) as prefill:
        put = prefill.backend.put

        async def held_put(keys: Any, values: Any) -> Any:
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
            return await put(keys, values)

        monkeypatch.setattr(prefill.backend, "put", held_put)
        sender = PDWorker(30.0, Counts())
        sender.start_save(prefill, _random_kv(20, 1), TransferSave("p", prompt, [], "idle-send"))
        flying = sender.in_flight()
        assert len(flying) == 1 and not flying[0].done()

        def land() -> None:  # once the step waits on it (no timing involved)
            while not flying[0]._waiters:  # type: ignore[attr-defined]
                threading.Event().wait(0.001)
            release.set()

        lander = threading.Thread(target=land)
        lander.start()
        idle = IdleWait(timeout=60.0)  # never reached: the send's landing ends the wait
        idle.step(types.SimpleNamespace(attn_metadata=None))
        assert idle.wait(sender.in_flight())
        assert concurrent.futures.wait(flying, timeout=30).done
        assert flying[0].result() is True and sender.in_flight() == []
        lander.join()
