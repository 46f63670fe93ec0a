"""``lmcache bench codec`` on real KV (SmolLM2-135M), small: fp8 keeps the model's answers."""

from __future__ import annotations

import pytest

from lmcache.bench import WORKLOADS
from lmcache.bench.codec import bench_codecs, parse_spec
from lmcache.errors import ConfigError, MissingDependencyError


def test_specs_and_registration() -> None:
    assert WORKLOADS["codec"] == "lmcache.bench.codec"
    assert parse_spec("zstd?codec_level=9&shuffle=false") == {
        "codec": "zstd",
        "codec_level": "9",
        "codec_shuffle": "false",
    }
    with pytest.raises(ConfigError):
        parse_spec("zstd?level")


def test_fp8_on_real_kv_halves_it_and_keeps_the_next_tokens() -> None:
    pytest.importorskip("transformers")
    try:
        result = bench_codecs(
            ["raw", "fp8"],
            docs=1,
            doc_tokens=256,
            question_tokens=16,
            decode_steps=8,
            repeat=1,
            models=("smollm2",),
            progress=False,
        )
    except MissingDependencyError as exc:
        pytest.skip(f"no SmolLM2 checkpoint: {exc}")
    rows = result["models"]["smollm2"]["codecs"]
    assert rows["raw"]["mean_kl"] == 0 and rows["raw"]["top1_agreement"] == 1
    assert rows["fp8"]["ratio"] > 1.9
    assert rows["fp8"]["mean_kl"] < 0.05 and rows["fp8"]["top1_agreement"] >= 0.85
