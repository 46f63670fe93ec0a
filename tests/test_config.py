from __future__ import annotations

from pathlib import Path

import pytest

from lmcache.config import LMCacheConfig, format_size, parse_duration, parse_size
from lmcache.errors import ConfigError


def test_defaults() -> None:
    cfg = LMCacheConfig.load(environ={})
    assert cfg.chunk_size == 256
    assert cfg.save_partial_chunks is False
    assert cfg.tiers == ["memory://?capacity=2GiB"]


def test_precedence_defaults_yaml_env_kwargs(tmp_path: Path) -> None:
    f = tmp_path / "lmcache.yaml"
    f.write_text("chunk_size: 128\ntier_timeout: 250ms\nsave_partial_chunks: true\ntiers:\n  - memory://\n")
    env = {"LMCACHE_CONFIG_FILE": str(f), "LMCACHE_CHUNK_SIZE": "64", "LMCACHE_UNRELATED_THING": "x"}
    cfg = LMCacheConfig.load(environ=env)
    assert cfg.chunk_size == 64  # env beats YAML
    assert cfg.tier_timeout == pytest.approx(0.25)  # YAML beats defaults
    assert cfg.save_partial_chunks is True
    assert cfg.tiers == ["memory://"]
    assert LMCacheConfig.load(environ=env, chunk_size=32).chunk_size == 32  # kwargs beat env
    env_tiers = {"LMCACHE_TIERS": "memory://?capacity=1GiB  file:///tmp/x"}
    assert LMCacheConfig.load(environ=env_tiers).tiers == ["memory://?capacity=1GiB", "file:///tmp/x"]


def test_unknown_key_names_key_and_valid_options(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"chunksize.*valid options:.*chunk_size"):
        LMCacheConfig.load(environ={}, chunksize=3)
    f = tmp_path / "c.yaml"
    f.write_text("chunk_sise: 3\n")
    with pytest.raises(ConfigError, match="chunk_sise"):
        LMCacheConfig.load(f, environ={})


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("chunk_size", "big", "an integer"),
        ("chunk_size", 0, ">= 1"),
        ("eviction_policy", "random", "one of 'lru'"),
        ("tier_timeout", "soon", "a duration"),
        ("save_partial_chunks", "maybe", "true or false"),
        ("tiers", [], "at least one"),
        ("tiers", ["not a url"], "backend URLs"),
    ],
)
def test_bad_values_name_key_and_what_is_valid(key: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        LMCacheConfig.load(environ={}, **{key: value})
    assert key in str(info.value)


def test_bad_env_value_names_the_source() -> None:
    with pytest.raises(ConfigError, match="environment"):
        LMCacheConfig.load(environ={"LMCACHE_CHUNK_SIZE": "-3"})


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        LMCacheConfig.load(tmp_path / "missing.yaml", environ={})
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        LMCacheConfig.load(f, environ={})
    f.write_text("chunk_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        LMCacheConfig.load(f, environ={})


def test_replace_validates() -> None:
    cfg = LMCacheConfig.load(environ={})
    assert cfg.replace(chunk_size=16).chunk_size == 16
    with pytest.raises(ConfigError):
        cfg.replace(chunk_size="x")


@pytest.mark.parametrize(
    ("text", "n"),
    [("4096", 4096), ("8GiB", 8 << 30), ("512 MiB", 512 << 20), ("1.5KiB", 1536), ("2gb", 2 * 10**9), (7, 7)],
)
def test_parse_size(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "-1", "8 parsecs", "GiB", True, -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_format_size_and_duration() -> None:
    assert format_size(8 << 30) == "8GiB"
    assert format_size(1000) == "1000"
    assert parse_duration("250ms") == pytest.approx(0.25)
    assert parse_duration("2m") == 120
