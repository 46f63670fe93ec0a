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
