"""docs/plugins.md and the example plugin keep the promises they make to plugin authors.

Every name the page (or the example plugin it says to copy) imports from lmcache is public, in
its module's ``__all__``; the frame recipe states the key length limit; and the example plugin
carries the ``tests/test_conformance.py`` the page shows.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from lmcache.keys import MAX_KEY_BYTES

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "plugins.md"
PLUGIN = ROOT / "tests" / "plugins" / "lmcache-example-plugin"


def doc_imports(text: str) -> set[tuple[str, str]]:
    """``(module, name)`` for each ``from lmcache… import …`` and ``lmcache.backends.base.NAME`` on the page."""
    found: set[tuple[str, str]] = set()
    for module, names in re.findall(r"from (lmcache[\w.]*) import ([\w ,]+)", text):
        found.update((module, n.strip()) for n in names.split(",") if n.strip())
    found.update(("lmcache.backends.base", n) for n in re.findall(r"`lmcache\.backends\.base\.(\w+)", text))
    return found


def source_imports(path: Path) -> set[tuple[str, str]]:
    """``(module, name)`` for each ``from lmcache… import …`` in a Python file."""
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmcache":
            found.update((node.module, alias.name) for alias in node.names)
    return found


def missing_from_all(imports: set[tuple[str, str]]) -> list[str]:
    missing = []
    for module, name in sorted(imports):
        public = getattr(importlib.import_module(module), "__all__", ())
        if name not in public:
            missing.append(f"{module}.{name}")
    return missing


def test_every_name_the_page_imports_is_in_all() -> None:
    imports = doc_imports(DOC.read_text())
    # The names the hooks need: a regression in the regex must not make this test vacuous.
    for name in ("StorageBackend", "Capabilities", "STORED", "EXISTS", "rejected", "check_dst_size", "run_blocking"):
        assert ("lmcache.backends.base", name) in imports, f"docs/plugins.md no longer imports {name}"
    missing = missing_from_all(imports)
    assert not missing, f"docs/plugins.md tells plugin authors to import names outside __all__: {missing}"


def test_every_name_the_example_plugin_imports_is_in_all() -> None:
    imports: set[tuple[str, str]] = set()
    for path in PLUGIN.rglob("*.py"):
        imports |= source_imports(path)
    assert ("lmcache.backends.base", "StorageBackend") in imports
    missing = missing_from_all(imports)
    assert not missing, f"the example plugin imports names outside __all__: {missing}"


def test_frame_recipe_states_the_key_length_limit() -> None:
    text = DOC.read_text()
    start = text.index("## 4. The value frame")
    section = text[start : text.index("\n## ", start + 1)]
    assert f"{MAX_KEY_BYTES:,} bytes" in section, "the frame recipe must state the key length limit"
    assert "CacheKey.to_string()" in section


def test_example_plugin_carries_the_conformance_test_the_page_shows() -> None:
    text = DOC.read_text()
    assert "tests/test_conformance.py" in text
    path = PLUGIN / "tests" / "test_conformance.py"
    assert path.is_file(), f"docs/plugins.md shows {path.relative_to(ROOT)}, which does not exist"
    classes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)]
    assert any(isinstance(b, ast.Name) and b.id == "BackendTests" for c in classes for b in c.bases), (
        "the example plugin's tests/test_conformance.py must subclass BackendTests"
    )
    for hook in ("backend_url", "secret_url", "corrupt_value"):
        assert f"def {hook}" in path.read_text(), f"the example's conformance test lacks {hook} (the page shows it)"


@pytest.mark.parametrize("module", ["lmcache.backends.base", "lmcache.serde.frame", "lmcache.config"])
def test_all_names_exist(module: str) -> None:
    mod = importlib.import_module(module)
    assert [n for n in mod.__all__ if not hasattr(mod, n)] == []
