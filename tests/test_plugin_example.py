"""The plugin mechanism end to end, with a real third-party distribution.

``tests/plugins/lmcache-example-plugin`` is a separate distribution that registers ``example://``
through the ``lmcache.backends`` entry-point group. These tests check that lmcache finds it, that
it passes the conformance suite (as a subclass and in zero-code mode), and that scheme conflicts
and unknown schemes are loud, using real ``importlib.metadata`` discovery: throw-away
distributions are ``.dist-info`` folders on a temporary ``sys.path`` entry.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import lmcache
from lmcache.errors import ConfigError, PluginConflictError, UnknownSchemeError
from lmcache.keys import CacheKey

DIST = "lmcache-example-plugin"
PLUGIN_DIR = Path(__file__).parent / "plugins" / DIST

try:
    importlib.metadata.distribution(DIST)
    INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    INSTALLED = False

requires_plugin = pytest.mark.skipif(
    not INSTALLED,
    reason=f"the example plugin {DIST} is not installed: pip install -e tests/plugins/{DIST} (make setup does it)",
)


def make_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    """Write a minimal installed distribution (``.dist-info``) registering ``entry_points``."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = ["[lmcache.backends]"] + [f"{scheme} = {target}" for scheme, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Discovery


@requires_plugin
def test_entry_point_is_found_by_scheme() -> None:
    from lmcache_example_plugin.backend import ExampleBackend

    assert lmcache.backend_class("example") is ExampleBackend
    assert lmcache.known_schemes()["example"] == f"plugin {DIST}"


@requires_plugin
async def test_open_backend_builds_the_plugin_backend() -> None:
    from lmcache_example_plugin.backend import ExampleBackend

    b = lmcache.open_backend("example://discovery?yield_every=1MiB", token="from-kwargs")
    try:
        assert type(b) is ExampleBackend
        assert b.settings.name == "discovery"
        assert b.settings.yield_every == 1 << 20
        assert b.settings.token == "from-kwargs"
        assert not b.is_open  # no I/O until first use
        key = CacheKey("m", 1, 0, bytes(32), "float16")
        assert await b.contains([key]) == [False]
        assert b.is_open
    finally:
        await b.aclose()


@requires_plugin
async def test_backends_with_one_name_share_values() -> None:
    name = f"shared-{uuid.uuid4().hex}"
    key = CacheKey("m", 1, 0, uuid.uuid4().bytes * 2, "float16")
    async with (
        lmcache.open_backend(f"example://{name}") as a,
        lmcache.open_backend(f"example://{name}") as b,
        lmcache.open_backend(f"example://other-{name}") as other,
    ):
        assert [r.status.value for r in await a.put([key], [b"shared value"])] == ["stored"]
        dst = bytearray(32)
        assert await b.get_into([key], [dst]) == [12]
        assert bytes(dst[:12]) == b"shared value"
        assert await other.contains([key]) == [False]
        assert b.stats()["entries"] >= 1


@requires_plugin
def test_plugin_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="no_such_option"):
        lmcache.open_backend("example://x?no_such_option=1")
    with pytest.raises(ConfigError, match="yield_every"):
        lmcache.open_backend("example://x?yield_every=lots")


@requires_plugin
def test_plugin_module_loads_only_when_its_scheme_is_opened() -> None:
    code = (
        "import sys, lmcache\n"
        "assert 'example' in lmcache.known_schemes()\n"
        "lmcache.open_backend('memory://?capacity=1MiB')\n"
        "print('lmcache_example_plugin.backend' in sys.modules)\n"
        "lmcache.open_backend('example://lazy')\n"
        "print('lmcache_example_plugin.backend' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_two_distributions_claiming_one_scheme_conflict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scheme = f"dup{uuid.uuid4().hex[:8]}"
    make_distribution(tmp_path, "lmcache-dup-one", {scheme: "dup_one.backend:Backend"})
    make_distribution(tmp_path, "lmcache-dup-two", {scheme: "dup_two.backend:Backend"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginConflictError) as info:
        lmcache.backend_class(scheme)
    message = str(info.value)
    assert "lmcache-dup-one" in message and "lmcache-dup-two" in message
    with pytest.raises(PluginConflictError):
        lmcache.open_backend(f"{scheme}://host")
    assert isinstance(info.value, ConfigError)


@requires_plugin
def test_second_distribution_claiming_example_conflicts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_distribution(tmp_path, "lmcache-impostor", {"example": "impostor.backend:ImpostorBackend"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginConflictError, match=rf"{DIST}.*lmcache-impostor|lmcache-impostor.*{DIST}"):
        lmcache.open_backend("example://x")


def test_plugin_claiming_a_builtin_scheme_conflicts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    make_distribution(tmp_path, "lmcache-memory-thief", {"memory": "thief.backend:Backend"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginConflictError, match="lmcache-memory-thief"):
        lmcache.open_backend("memory://?capacity=1MiB")


def test_unknown_scheme_lists_known_schemes() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        lmcache.open_backend("nosuchscheme://host/x")
    message = str(info.value)
    assert "nosuchscheme" in message
    assert "memory://" in message
    if INSTALLED:
        assert "example://" in message


def test_unknown_scheme_lists_plugins_found_on_sys_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scheme = f"extra{uuid.uuid4().hex[:8]}"
    make_distribution(tmp_path, "lmcache-extra-plugin", {scheme: "extra_plugin:Backend"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownSchemeError, match=rf"{scheme}://"):
        lmcache.open_backend("nosuchscheme://host/x")


def test_plugin_that_is_not_a_backend_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    scheme = f"notabackend{uuid.uuid4().hex[:8]}"
    (tmp_path / "not_a_backend_mod.py").write_text("class Thing:\n    pass\n")
    make_distribution(tmp_path, "lmcache-not-a-backend", {scheme: "not_a_backend_mod:Thing"})
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UnknownSchemeError, match="not a StorageBackend"):
        lmcache.open_backend(f"{scheme}://x")


# ---------------------------------------------------------------------------------------------
# The conformance suite, as a subclass (with bypass hooks) and in zero-code mode


# The subclass form is the plugin's own tests/test_conformance.py (as docs/plugins.md shows it),
# which this run collects from tests/plugins/lmcache-example-plugin/tests/.


@requires_plugin
def test_zero_code_suite_passes_against_the_plugin(tmp_path: Path) -> None:
    # Run from an empty folder: no pyproject, so pytest-asyncio is in strict mode and the suite
    # must mark its async tests and fixtures itself, as in a third party's project.
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "--pyargs",
        "lmcache_conformance",
        "--lmcache-backend-url=example://zero-code",
        "-q",
        "-p",
        "no:cacheprovider",
        "-W",
        "error::pytest.PytestUnraisableExceptionWarning",
        "-o",
        "asyncio_default_fixture_loop_scope=function",
    ]
    out = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    tail = out.stdout[-4000:] + out.stderr[-2000:]
    assert out.returncode == 0, tail
    passed = re.search(r"(\d+) passed", out.stdout)
    assert passed is not None, tail
    assert int(passed.group(1)) >= 80, tail
    assert not re.search(r"\d+ (failed|errors?)\b", out.stdout), tail
    assert [p.name for p in tmp_path.iterdir()] == [], "the suite left files (.hypothesis/?) behind"


def test_zero_code_suite_skips_without_a_url(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "lmcache_conformance", "-q", "-p", "no:cacheprovider", "-rs"]
    out = subprocess.run(cmd, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:]
    assert "passed" not in out.stdout
    assert "--lmcache-backend-url" in out.stdout
