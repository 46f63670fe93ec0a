"""``lmcache bench codec`` on real KV (SmolLM2-135M), small: fp8 keeps the model's answers."""

from __future__ import annotations

import pytest
from servers import RedisServer

from lmcache.bench import WORKLOADS
from lmcache.bench.codec import bench_codecs, bench_e2e, parse_spec, tier_url
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


def test_e2e_rows_read_the_kv_from_redis_through_each_codec(redis_server: RedisServer) -> None:
    """The end-to-end mode: every codec's warm prompts load the whole document from the Redis tier."""
    pytest.importorskip("transformers")
    assert tier_url("redis://h:1/0", "zstd?codec_level=9") == "redis://h:1/0?codec=zstd&codec_level=9"
    e2e = bench_e2e(
        ["raw", "fp8", "int4"],
        redis_server.url,
        model_name="random-125m",
        docs=1,
        doc_tokens=128,
        questions=2,
        question_tokens=8,
        chunk_size=64,
        read_rounds=2,
        progress=False,
    )
    rows = e2e["rows"]
    assert list(rows) == ["memory", "raw", "fp8", "int4"]
    for spec in ("raw", "fp8", "int4"):
        assert [r["cached_tokens"] for r in rows[spec]["runs"]] == [128, 128]  # both chunks, from Redis
        assert rows[spec]["kv_bytes"] == 128 * 12 * 2 * 4 * 64 * 2  # 16-bit KV of the random 125M Llama
        assert rows[spec]["warm_ttft_s"] > 0
        assert rows[spec]["read_chunks"] == 2 and rows[spec]["read_gbps"] > 0  # the tier read alone
    assert rows["raw"]["ttft_vs_raw"] == 1 and rows["raw"]["read_vs_raw"] == 1


async def test_e2e_auto_redis_is_a_throwaway_server() -> None:
    """``--e2e-redis auto``: a local redis-server that answers while in use and is gone after."""
    import shutil
    import socket

    from lmcache.backends.registry import open_backend
    from lmcache.bench.codec import local_redis

    if not (shutil.which("redis-server") or shutil.which("valkey-server")):
        pytest.skip("needs redis-server (apt-get install redis-server)")
    with local_redis() as url:
        async with open_backend(url) as backend:
            await backend.ping()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), 1):
        pass
