from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'lmcache[hf]' for the transformers integration")

from lmcache.backends.base import StorageBackend  # noqa: E402
from lmcache.config import LMCacheConfig  # noqa: E402
from lmcache.engine import CacheEngine  # noqa: E402
from lmcache.errors import BackendUnavailableError, InvalidArgumentError  # noqa: E402
from lmcache.integrations.transformers import CachedCausalLM, geometry_of, model_fingerprint  # noqa: E402
from lmcache.tiered import TieredBackend  # noqa: E402

TINY = {
    "vocab_size": 500,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
}


def _model(seed: int = 0, **overrides: int):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).eval()


def _cfg(tmp_path: Path, **kw) -> LMCacheConfig:
    return LMCacheConfig.load(
        environ={}, chunk_size=16, tiers=["memory://?capacity=64MiB", f"file://{tmp_path}/kv"], **kw
    )


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exact_logits_with_and_without_cache(tmp_path: Path) -> None:
    model = _model()
    ids = torch.randint(10, 500, (1, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    with CachedCausalLM(model, config=_cfg(tmp_path)) as lm:
        first = lm.prefill(ids)
        assert first.cached_tokens == 0
        assert torch.equal(first.logits, ref)
        lm.engine.flush()
        second = lm.prefill(ids)
        assert second.cached_tokens == 96
        assert torch.equal(second.logits, ref)
        # A longer prompt over the same prefix reuses it too.
        longer = torch.cat([ids, torch.randint(10, 500, (1, 40))], dim=1)
        with torch.no_grad():
            ref_long = model(longer).logits[:, -1]
        third = lm.prefill(longer)
        assert third.cached_tokens == 96
        assert torch.equal(third.logits, ref_long)


def test_full_hit_still_computes_the_last_token(tmp_path: Path) -> None:
    model = _model()
    ids = torch.randint(10, 500, (1, 64))
    with CachedCausalLM(model, config=_cfg(tmp_path)) as lm:
        lm.prefill(ids)
        lm.engine.flush()
        res = lm.prefill(ids)
        assert res.cached_tokens == 48  # chunk 4 ends at the last token: it is recomputed
        with torch.no_grad():
            assert torch.equal(res.logits, model(ids).logits[:, -1])


def test_generate_matches_plain_generate(tmp_path: Path) -> None:
    model = _model()
    ids = torch.randint(10, 500, (1, 70))
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    with CachedCausalLM(model, config=_cfg(tmp_path)) as lm:
        assert torch.equal(lm.generate(ids, max_new_tokens=8, do_sample=False), plain)
        lm.engine.flush()
        assert lm.engine.lookup(ids[0]) == 64
        assert torch.equal(lm.generate(ids, max_new_tokens=8, do_sample=False), plain)
        assert lm.engine.stats()["retrieved_tokens"] == 64


def test_no_deprecated_cache_keyword(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers 5.2x renamed ``past_key_values`` to ``cache``: neither name may warn, cold or warm.

    Deprecations come two ways: ``FutureWarning`` from ``deprecate_kwarg`` (the forward and
    ``generate`` keywords) and ``logger.warning_once`` (``output.past_key_values``), which fires
    once per process, so it is recorded by patching rather than by a log handler.
    """
    notices: list[str] = []
    if hasattr(logging.Logger, "warning_once"):  # transformers adds it to every logger

        def record(self: logging.Logger, msg: object, *args: object, **kwargs: object) -> None:
            notices.append(str(msg))

        monkeypatch.setattr(logging.Logger, "warning_once", record)
    model = _model()
    ids = torch.randint(10, 500, (1, 70), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught, CachedCausalLM(model, config=_cfg(tmp_path)) as lm:
        warnings.simplefilter("always")
        cold = lm.prefill(ids)
        lm.engine.flush()
        warm = lm.prefill(ids)
        assert (cold.cached_tokens, warm.cached_tokens) == (0, 64)
        assert warm.cache is warm.past_key_values
        assert warm.cache.get_seq_length() == 70
        out = lm.generate(ids, max_new_tokens=3, do_sample=False)
        assert out.shape == (1, 73)
    notices += [str(w.message) for w in caught]
    deprecated = [n for n in notices if "past_key_values" in n or "cache_params" in n]
    assert not deprecated, deprecated


def test_many_threads_allclose_same_argmax(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    model = _model()
    ids = torch.randint(10, 500, (1, 90))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    with CachedCausalLM(model, config=_cfg(tmp_path)) as lm:
        lm.prefill(ids)
        lm.engine.flush()
        res = lm.prefill(ids)
        assert res.cached_tokens == 80
        assert torch.allclose(res.logits, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(res.logits.argmax(-1), ref.argmax(-1))


def test_models_with_other_geometry_or_weights_never_share_chunks(tmp_path: Path) -> None:
    ids = torch.randint(10, 500, (1, 64))
    cfg = _cfg(tmp_path)
    with CachedCausalLM(_model(), config=cfg, model_id="shared-name") as lm:
        lm.prefill(ids)
    # Same model id, one more layer: the geometry is part of the key, so nothing matches.
    with CachedCausalLM(_model(num_hidden_layers=3), config=cfg, model_id="shared-name") as lm:
        assert lm.engine.lookup(ids[0]) == 0
    # Same config, other weights: the default model id fingerprints the weights.
    assert model_fingerprint(_model(seed=1)) != model_fingerprint(_model(seed=2))


def test_bad_input_is_a_typed_error(tmp_path: Path) -> None:
    with CachedCausalLM(_model(), config=_cfg(tmp_path)) as lm:
        for bad in (torch.ones(1, 5), torch.ones(2, 5, dtype=torch.int64), torch.ones(5, dtype=torch.int64)):
            with pytest.raises(InvalidArgumentError):
                lm.prefill(bad)
        with pytest.raises(InvalidArgumentError):
            lm.prefill(torch.ones(1, 0, dtype=torch.int64))


class _DownBackend(StorageBackend):
    """Fault injection: a backend whose server is gone."""

    schemes = ("down",)

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> _DownBackend:
        return cls()

    @property
    def url(self) -> str:
        return "down://"

    async def _contains(self, keys):
        raise BackendUnavailableError("server gone")

    async def _get_into(self, keys, dsts):
        raise BackendUnavailableError("server gone")

    async def _put(self, keys, srcs):
        raise BackendUnavailableError("server gone")

    async def _delete(self, keys):
        raise BackendUnavailableError("server gone")


def test_failing_backend_degrades_to_recompute(tmp_path: Path) -> None:
    model = _model()
    ids = torch.randint(10, 500, (1, 50))
    with torch.no_grad():
        ref = model(ids).logits[:, -1]
    backend = TieredBackend([_DownBackend()], own_tiers=True)
    engine = CacheEngine(geometry_of(model), "m", config=_cfg(tmp_path), backend=backend)
    try:
        lm = CachedCausalLM(model, engine)
        for _ in range(2):
            res = lm.prefill(ids)
            assert res.cached_tokens == 0
            assert torch.equal(res.logits, ref)
        engine.flush()
        assert backend.stats()["tiers"][0]["errors"] > 0
    finally:
        engine._run(backend.aclose())
        engine.close()


_CHILD = """
import json, sys, torch, transformers
from lmcache.config import LMCacheConfig
from lmcache.integrations.transformers import CachedCausalLM
torch.set_num_threads(1)
torch.manual_seed(0)
cfg = json.loads(sys.argv[2])
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
ids = torch.arange(10, 110).unsqueeze(0)
config = LMCacheConfig.load(chunk_size=16, tiers=["memory://?capacity=16MiB", "file://" + sys.argv[1]])
with CachedCausalLM(model, config=config) as lm:
    res = lm.prefill(ids)
    print(json.dumps({"cached": res.cached_tokens, "argmax": int(res.logits.argmax())}))
"""


def test_second_process_gets_hits_from_file_tier(tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tmp_path / "kv"), json.dumps(TINY)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["cached"] == 0
    assert runs[1]["cached"] == 96
    assert runs[0]["argmax"] == runs[1]["argmax"]
