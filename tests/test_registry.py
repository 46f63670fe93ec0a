from __future__ import annotations

import subprocess
import sys

import pytest

import lmcache
from lmcache.backends import registry
from lmcache.errors import ConfigError, MissingDependencyError, UnknownSchemeError


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(UnknownSchemeError, match=r"known schemes:.*file://.*memory://"):
        lmcache.open_backend("nosuch://host/x")


@pytest.mark.parametrize("url", ["memory", "", "://x", "file:/relative", "redis://host:notaport"])
def test_malformed_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        lmcache.open_backend(url)


def test_importing_lmcache_imports_no_backend_sdk() -> None:
    code = (
        "import sys, lmcache, lmcache.backends.registry;"
        "bad = [m for m in ('redis', 'aioboto3', 'botocore', 'mooncake', 'nixl', 'kvikio', 'infinistore', 'torch')"
        " if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # A built-in whose SDK import fails must say which extra to install.
    pkg = tmp_path / "lmcache_fake_sdk_backend.py"
    pkg.write_text("import fake_sdk_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        registry.BUILTIN_BACKENDS, "fakesdk", registry._Builtin("lmcache_fake_sdk_backend:Backend", "fakesdk")
    )
    with pytest.raises(MissingDependencyError, match=r"lmcache\[fakesdk\]") as info:
        lmcache.open_backend("fakesdk://x")
    assert isinstance(info.value, ImportError)


@pytest.mark.parametrize("url", ["lm://127.0.0.1:0", "lm://127.0.0.1:"])
def test_lm_port_zero_or_empty_is_a_config_error_like_redis(url: str) -> None:
    with pytest.raises(ConfigError, match="port"):
        lmcache.open_backend(url.replace("lm://", "redis://"))
    with pytest.raises(ConfigError, match="port"):
        lmcache.open_backend(url)


def test_a_required_option_missing_from_a_url_is_a_config_error() -> None:
    import dataclasses

    from lmcache.backends.base import parse_backend_url
    from lmcache.config import setting

    @dataclasses.dataclass(frozen=True)
    class NeedsBucket:
        bucket: str = setting(doc="required")
        region: str = setting("here", doc="optional")

    with pytest.raises(ConfigError, match="required option 'bucket' is missing"):
        parse_backend_url("plug://?region=x", ["plug"], NeedsBucket, {}, {})
    assert parse_backend_url("plug://?bucket=b", ["plug"], NeedsBucket, {}, {}).bucket == "b"


def test_unknown_backend_variable_is_refused_with_its_close_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LMCACHE_MEMORY_CAPACTY", "1GiB")
    with pytest.raises(ConfigError, match="LMCACHE_MEMORY_CAPACTY; did you mean LMCACHE_MEMORY_CAPACITY"):
        lmcache.open_backend("memory://")


def test_variables_of_a_longer_scheme_are_not_the_shorter_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    # LMCACHE_REDIS_CLUSTER_* belong to redis+cluster://, LMCACHE_LM_UNIX_* to lm+unix://.
    monkeypatch.setenv("LMCACHE_REDIS_CLUSTER_NODES", "127.0.0.1:7000")
    monkeypatch.setenv("LMCACHE_LM_UNIX_PATH", "/tmp/x.sock")
    lmcache.open_backend("redis://127.0.0.1:6379/0")
    lmcache.open_backend("lm://127.0.0.1:8198")
    monkeypatch.setenv("LMCACHE_REDIS_TIMEOT", "1")
    with pytest.raises(ConfigError, match="did you mean LMCACHE_REDIS_TIMEOUT"):
        lmcache.open_backend("redis://127.0.0.1:6379/0")
