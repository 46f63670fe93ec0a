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
    env = {"LMCACHE_CONFIG_FILE": str(f), "LMCACHE_CHUNK_SIZE": "64", "LMCACHE_TEST_UNRELATED_THING": "x"}
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
        ("eviction_policy", "random", "one of .*'lru'"),
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


# -- bad input that used to slip through (issue 17 §3) ------------------------------------------


def test_tag_values_must_be_strings(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("tags: {tenant: 5}\n")
    with pytest.raises(ConfigError, match=r"tags=.*tenant.*quote it"):
        LMCacheConfig.load(f, environ={})
    with pytest.raises(ConfigError, match="tags"):
        LMCacheConfig.load(environ={}, tags={"tenant": None})
    f.write_text("tags: {tenant: '5', adapter: lora-a}\n")
    assert LMCacheConfig.load(f, environ={}).tags == {"tenant": "5", "adapter": "lora-a"}


@pytest.mark.parametrize(
    ("text", "tags"),
    [
        ("tenant=acme,team=x", {"tenant": "acme", "team": "x"}),
        (" tenant = acme , ", {"tenant": "acme"}),
        ('{"tenant": "acme", "team": "x"}', {"tenant": "acme", "team": "x"}),
        ("", {}),
    ],
)
def test_lmcache_tags_can_be_set_in_the_environment(text: str, tags: dict[str, str]) -> None:
    assert LMCacheConfig.load(environ={"LMCACHE_TAGS": text}).tags == tags
    for bad in ("tenant", '{"tenant": 5}', "{not json", "a=1,a=2", "=x"):
        with pytest.raises(ConfigError, match=r"tags=.*\(from environment\)"):
            LMCacheConfig.load(environ={"LMCACHE_TAGS": bad})


def test_unknown_lmcache_variable_names_the_close_match() -> None:
    with pytest.raises(ConfigError, match="LMCACHE_CHUNKSIZE; did you mean LMCACHE_CHUNK_SIZE"):
        LMCacheConfig.load(environ={"LMCACHE_CHUNKSIZE": "512"})
    with pytest.raises(ConfigError, match="LMCACHE_TIER_TIMOUT; did you mean LMCACHE_TIER_TIMEOUT"):
        LMCacheConfig.load(environ={"LMCACHE_TIER_TIMOUT": "1"})
    # Variables read elsewhere stay allowed.
    env = {
        "LMCACHE_TEST_REDIS_URL": "redis://127.0.0.1:1/0",
        "LMCACHE_SERVER_TOKEN": "t",
        "LMCACHE_TIERED_WRITE_BACK_BATCH": "3",
        "LMCACHE_REDIS_PASSWORD": "pw",  # a backend's option: checked when that backend is built
        "LMCACHE_REDIS_CLUSTER_NODES": "h:1",
        "LMCACHE_NATIVE_DIR": "/tmp/x",
        "LMCACHE_MODEL_CACHE": "/tmp/y",
        "LMCACHE_LOG_LEVEL": "debug",
    }
    assert LMCacheConfig.load(environ=env).chunk_size == 256


def test_unknown_backend_variable_fails_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    # The default tier is memory://, whose options LMCACHE_MEMORY_* set.
    monkeypatch.setenv("LMCACHE_MEMORY_BOGUS", "1")
    with pytest.raises(ConfigError, match=r"LMCACHE_MEMORY_BOGUS.*LMCACHE_MEMORY_CAPACITY"):
        LMCacheConfig.load()
    monkeypatch.delenv("LMCACHE_MEMORY_BOGUS")
    monkeypatch.setenv("LMCACHE_MEMORY_CAPACTY", "1GiB")
    with pytest.raises(ConfigError, match="did you mean LMCACHE_MEMORY_CAPACITY"):
        LMCacheConfig.load()


def test_tier_urls_are_validated_at_load() -> None:
    for bad in ("memory://?capacity=lots", "memory://?bogus=1", "memory:// nosuch://x", "file://relative/dir"):
        with pytest.raises(ConfigError, match="tier"):
            LMCacheConfig.load(environ={"LMCACHE_TIERS": bad})
    with pytest.raises(ConfigError) as info:
        LMCacheConfig.load(environ={}, tiers=["redis://user:hunter2@127.0.0.1:0/0"])
    assert "hunter2" not in str(info.value)  # the URL is shown redacted
    cfg = LMCacheConfig.load(environ={})
    with pytest.raises(ConfigError, match="capacity"):
        cfg.replace(tiers=["memory://?capacity=lots"])


def test_a_bad_backend_variable_does_not_break_a_url_that_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import lmcache

    monkeypatch.setenv("LMCACHE_MEMORY_CAPACITY", "lots")
    assert lmcache.open_backend("memory://?capacity=1MiB").settings.capacity == 1 << 20
    with pytest.raises(ConfigError, match=r"capacity='lots' \(from environment\)"):
        lmcache.open_backend("memory://")


def test_binary_config_file_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        LMCacheConfig.load(f, environ={})


@pytest.mark.parametrize(
    "text", ["chunk-size: 128\nCHUNK_SIZE: 64\n", "chunk_size: 128\nchunk_size: 64\n", "tags: {a: x, a: y}\n"]
)
def test_one_setting_twice_in_a_file_is_an_error(tmp_path: Path, text: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=r"twice|both set"):
        LMCacheConfig.load(f, environ={})


def test_non_string_keys_in_a_file_are_config_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("1: x\n")
    with pytest.raises(ConfigError, match="must be strings"):
        LMCacheConfig.load(f, environ={})
