"""Non-prefix KV reuse (lmcache.blend) through ``CachedCausalLM.prefill_segments``, on tiny Llamas.

Exactness is checked on one thread, where a full recompute through the blender runs the very
same operations as the model's forward. Quality on a trained model is the ``lmcache bench rag``
workload's job (SmolLM2), not a test's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'lmcache[hf]' for the transformers integration")

from lmcache.backends.base import StorageBackend  # noqa: E402
from lmcache.blend import (  # noqa: E402
    AFTER_TAG,
    BLEND_TAG,
    SegmentBlender,
    SegmentStore,
    prefix_digest,
    rope_frequencies,
    rotate_keys,
)
from lmcache.config import LMCacheConfig  # noqa: E402
from lmcache.engine import CacheEngine  # noqa: E402
from lmcache.errors import BackendUnavailableError, UnsupportedOperationError  # noqa: E402
from lmcache.integrations.transformers import CachedCausalLM, ContiguousKV, geometry_of  # noqa: E402
from lmcache.tiered import TieredBackend  # noqa: E402

TINY = {
    "vocab_size": 500,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


def _model(seed: int = 0, **overrides: object):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()


def _cfg(tiers: list[str]) -> LMCacheConfig:
    return LMCacheConfig.load(environ={}, chunk_size=16, tiers=tiers, lookup_budget=30.0)


def _segments(seed: int = 1) -> list[torch.Tensor]:
    """Three documents of 40, 23 and 33 tokens (partial chunks) and a 7-token question."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, 500, (n,), generator=g) for n in (40, 23, 33, 7)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _kv(model, ids: torch.Tensor, position_ids: torch.Tensor | None = None):
    with torch.no_grad():
        out = model(ids[None], position_ids=None if position_ids is None else position_ids[None], use_cache=True)
    return [(layer.keys, layer.values) for layer in out.cache.layers], out.logits[:, -1]


@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["default", "llama3"])
def test_rotating_position_zero_kv_equals_computing_it_at_p(rope: dict | None) -> None:
    model = _model(rope_parameters=rope) if rope else _model()
    inv_freq = rope_frequencies(model.model.rotary_emb)
    ids = _segments()[0]
    at_zero, _ = _kv(model, ids)
    for p in (1, 37, 1000, 3000):
        at_p, _ = _kv(model, ids, torch.arange(p, p + ids.shape[0]))
        for (k0, v0), (kp, vp) in zip(at_zero, at_p, strict=True):
            torch.testing.assert_close(rotate_keys(k0, p, inv_freq), kp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(v0, vp, rtol=1e-4, atol=1e-4)
            # and back: position p to position 0
            torch.testing.assert_close(rotate_keys(kp, -p, inv_freq), k0, rtol=1e-4, atol=1e-4)


def test_ratio_one_reproduces_plain_prefill_bit_for_bit(tmp_path: Path) -> None:
    model = _model()
    d0, d1, d2, q = _segments()
    with CachedCausalLM(model, config=_cfg([f"file://{tmp_path}/kv"]), model_id="tiny", blend=True) as lm:
        assert lm.cache_segments([d0, d1, d2]) == 3
        lm.engine.flush()
        assert lm.cache_segments([d1]) == 0  # cached already
        prompt = [d2, d0, d1, q]  # another order: no prefix of it was ever computed
        ref_kv, ref = _kv(model, torch.cat(prompt))
        res = lm.prefill_segments(prompt, recompute_ratio=1.0)
        assert res.segments_hit == 3 and res.reused_tokens == 96
        assert res.recomputed_tokens == res.prompt_tokens == 103
        assert torch.equal(res.logits, ref)
        for layer, (k, v) in zip(res.cache.layers, ref_kv, strict=True):
            assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)

        naive = lm.prefill_segments(prompt, recompute_ratio=0.0)
        assert naive.recomputed_tokens == q.shape[0]  # only the question
        blended = lm.prefill_segments(prompt, recompute_ratio=0.3)
        assert naive.recomputed_tokens < blended.recomputed_tokens < res.recomputed_tokens
        # the recomputed tokens restore cross-attention: closer to the full prefill than concatenation
        assert (blended.logits - ref).abs().max() < (naive.logits - ref).abs().max()
        # the blended cache decodes on like any DynamicCache
        with torch.no_grad():
            nxt = model(res.logits.argmax(-1, keepdim=True), cache=res.cache, use_cache=True).logits
        assert nxt.shape[-1] == TINY["vocab_size"]


def test_uncached_segments_are_computed_and_stored_position_free(tmp_path: Path) -> None:
    model = _model()
    d0, d1, d2, q = _segments()
    with CachedCausalLM(model, config=_cfg(["memory://?capacity=64MiB"]), model_id="tiny") as lm:
        cold = lm.prefill_segments([d0, d1, q])
        _, ref = _kv(model, torch.cat([d0, d1, q]))
        assert cold.reused_tokens == 0 and torch.equal(cold.logits, ref)  # nothing reused: a full prefill
        lm.engine.flush()
        store = SegmentStore(lm.engine)
        assert all(dict(key.tags)[BLEND_TAG] for key in store.keys(d1))
        # segment keys never meet prefix keys: the prefix cache holds nothing of d0
        assert lm.engine.lookup(torch.cat([d0, d1, q])) == 0
        warm = lm.prefill_segments([d2, d1, d0, q])  # d1 and d0 reused at new positions
        assert warm.segments_hit == 2 and warm.reused_tokens == 63
        # d1 was stored as computed alone at position 0: its stored keys equal that
        alone, _ = _kv(model, d1)
        kv = lm._segment_kv_alone(d1)
        assert torch.equal(kv.keys[1], alone[1][0])


def test_segments_cached_after_a_prefix_are_keyed_by_it_and_its_kv_is_exact(tmp_path: Path) -> None:
    model = _model()
    d0, d1, d2, q = _segments()
    system = torch.randint(10, 500, (9,), generator=torch.Generator().manual_seed(7))
    other = system.flip(0)
    with CachedCausalLM(model, config=_cfg([f"file://{tmp_path}/kv"]), model_id="tiny", blend=True) as lm:
        assert lm.cache_segments([d0, d1, d2], prefix=system) == 3
        lm.engine.flush()
        assert lm.cache_segments([d1], prefix=system) == 0
        after = SegmentStore(lm.engine, system)
        assert {dict(key.tags)[AFTER_TAG] for key in after.keys(d1)} == {prefix_digest(system)}
        # stored as computed right after the prefix, keys rotated back to position 0
        ref_kv, _ = _kv(model, torch.cat([system, d1]))
        kv = ContiguousKV.empty(lm.geometry, d1.shape[0])
        assert after.load(d1, kv)
        inv_freq = rope_frequencies(model.model.rotary_emb)
        for layer, (k, v) in enumerate(ref_kv):
            torch.testing.assert_close(kv.keys[layer], rotate_keys(k[:, :, 9:], -9, inv_freq), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(kv.values[layer], v[:, :, 9:], rtol=1e-5, atol=1e-5)
        # another prefix, or none, never finds them
        assert not SegmentStore(lm.engine, other).contains(d1) and not SegmentStore(lm.engine).contains(d1)

        prompt = [d2, d0, d1, q]
        ref_kv, ref = _kv(model, torch.cat([system, *prompt]))
        full = lm.prefill_segments(prompt, recompute_ratio=1.0, prefix=system)
        assert full.segments_hit == 3 and torch.equal(full.logits, ref)  # the prefix was not cached yet
        lm.engine.flush()
        naive = lm.prefill_segments(prompt, recompute_ratio=0.0, prefix=system)
        assert naive.segments_hit == 4 and naive.reused_tokens == 9 + 96
        assert naive.recomputed_tokens == q.shape[0]  # the prefix is exact: never recomputed
        for layer, (k, v) in zip(naive.cache.layers, ref_kv, strict=True):
            torch.testing.assert_close(layer.keys[:, :, :9], k[:, :, :9], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer.values[:, :, :9], v[:, :, :9], rtol=1e-5, atol=1e-5)
        blended = lm.prefill_segments(prompt, recompute_ratio=0.3, prefix=system)
        assert blended.recomputed_tokens == q.shape[0] + 29  # ceil(0.3 * 96) documents' tokens
        assert lm.prefill_segments([d0, q], prefix=other).segments_hit == 0


def test_selection_ranks_reused_tokens_by_value_deviation() -> None:
    v = torch.randn(1, 2, 8, 4, generator=torch.Generator().manual_seed(0))
    old_v = v.clone()
    old_v[:, :, 5] += 0.5  # a moderate value deviation at token 5
    old_v[:, 1, 2] += 3.0  # the largest, in one head, at token 2
    reused = torch.ones(8, dtype=torch.bool)
    reused[7] = False  # the question
    always = torch.tensor([7])
    rows = SegmentBlender._select(v, old_v=old_v, reused=reused, always=always, ratio=2 / 7, n_reused=7)
    assert rows.tolist() == [2, 5, 7]


_CHILD = """
import sys, torch, transformers
from lmcache.config import LMCacheConfig
from lmcache.integrations.transformers import CachedCausalLM
torch.set_num_threads(1)
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{tiny})).eval()
g = torch.Generator().manual_seed(1)
segs = [torch.randint(10, 500, (n,), generator=g) for n in (40, 23, 33, 7)]
cfg = LMCacheConfig.load(environ={{}}, chunk_size=16, tiers=["file://{path}"])
with CachedCausalLM(model, config=cfg, model_id="tiny") as lm:
    print(lm.cache_segments(segs[:3]))
"""


def test_segments_cached_by_one_process_blend_in_another(tmp_path: Path) -> None:
    path = tmp_path / "kv"
    child = _CHILD.format(tiny=json.dumps(TINY), path=path)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.split()[-1] == "3"
    model = _model()
    d0, d1, d2, q = _segments()
    with CachedCausalLM(model, config=_cfg([f"file://{path}"]), model_id="tiny") as lm:
        res = lm.prefill_segments([d1, d2, d0, q], recompute_ratio=1.0)
        assert res.segments_hit == 3 and res.reused_tokens == 96
        _, ref = _kv(model, torch.cat([d1, d2, d0, q]))
        assert torch.equal(res.logits, ref)


def test_unsupported_models_are_rejected_at_construction(tmp_path: Path) -> None:
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    ).eval()
    cfg = _cfg(["memory://?capacity=64MiB"])
    with pytest.raises(UnsupportedOperationError):
        CachedCausalLM(gpt2, config=cfg, blend=True)
    dynamic = _model(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    with pytest.raises(UnsupportedOperationError, match="dynamic"):
        CachedCausalLM(dynamic, config=cfg, blend=True)
    # prefix caching still works with it; blending says no
    with CachedCausalLM(gpt2, config=cfg) as lm, pytest.raises(UnsupportedOperationError):
        lm.prefill_segments([[1, 2, 3], [4, 5]])


class _BrokenReads(StorageBackend):
    """Fault injection: claims to hold every key, then fails every read and write."""

    schemes = ("broken",)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> _BrokenReads:
        return cls()

    @property
    def url(self) -> str:
        return "broken://"

    async def _contains(self, keys):
        return [True] * len(keys)

    async def _get_into(self, keys, dsts):
        raise BackendUnavailableError("disk gone")

    async def _put(self, keys, srcs):
        raise BackendUnavailableError("disk gone")

    async def _delete(self, keys):
        raise BackendUnavailableError("disk gone")


def test_failing_backend_degrades_to_full_compute() -> None:
    model = _model()
    segs = _segments()
    _, ref = _kv(model, torch.cat(segs))
    backend = TieredBackend([_BrokenReads()], own_tiers=True)
    engine = CacheEngine(geometry_of(model), "m", config=_cfg(["memory://"]), backend=backend)
    try:
        lm = CachedCausalLM(model, engine, blend=True)
        for _ in range(2):
            res = lm.prefill_segments(segs)
            assert res.reused_tokens == 0 and res.segments_hit == 0
            assert torch.equal(res.logits, ref)
        engine.flush()
        assert engine.stats()["get_failures"] > 0
    finally:
        engine._run(backend.aclose())
        engine.close()


def test_bench_rag_runs_every_system_and_ratio_one_agrees_exactly(tmp_path: Path) -> None:
    from lmcache.cli import main

    out = tmp_path / "rag.json"
    argv = ["bench", "rag", "--model-size", "tiny", "--docs", "4", "--doc-tokens", "40", "--k", "3"]
    argv += ["--question-tokens", "6", "--queries", "2", "--answer-tokens", "4", "--chunk-size", "16"]
    argv += ["--ratios", "0,0.15,1", "--tier", "memory://?capacity=64MiB", "--json", str(out), "--no-progress"]
    assert main(argv) == 0
    result = json.loads(out.read_text())["results"]
    assert set(result) == {"full", "prefix", "blend@0", "blend@0.15", "blend@1"}
    exact = result["blend@1"]
    # the baseline computes only the last token's logits (a one-row head rounds differently): not bit-equal
    assert exact["top1_agreement"] == 1.0 and exact["kl_first_token"] < 1e-9 and exact["answer_exact"] == 1.0
    assert result["blend@0"]["recomputed_share"] < result["blend@0.15"]["recomputed_share"] < 1.0
