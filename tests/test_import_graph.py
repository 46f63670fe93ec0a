"""The import graph of ``lmcache``, read from the source (every module ast-parsed, nothing imported).

Two rules of the house plan that a reviewer cannot see in a diff:

* A name with a leading underscore is private to its package: no module outside a package
  imports one from it (``from pkg.mod import _name``, ``import pkg._mod``, or ``mod._name``
  through an imported module). Checked for the packages in :data:`SEALED`, and for every
  module of ``lmcache.backends`` (the adapter kit and the adapters): an adapter built on
  another (``gds`` and ``nixl+posix`` on ``file``) uses the hooks its base class declares,
  never that module's private names; the kit's names are public, in an ``__all__``.
* No import loop: lmcache's modules never import each other in a cycle at module level, and
  the modules of a sealed package not even from inside a function (a deferred import that
  closes a loop is a loop that waits for run time). Imports under ``if TYPE_CHECKING:`` never
  run and do not count.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Packages whose private names stay inside them.
SEALED = ("lmcache.backends.nixl", "lmcache.bench.baselines")
#: Packages each of whose modules (and subpackages) keeps its private names to itself.
SEALED_MODULES_OF = ("lmcache.backends",)
#: Modules that are a part of another module kept in a file of its own, and share its private
#: names (importer -> module). None is left: such a part lives inside its module's package
#: (``lmcache.backends.file.fsck``) or uses public names (redis+cluster:// on redis://).
COMPANIONS: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Import:
    """One imported module, or one name taken from a module."""

    importer: str
    module: str  # the module imported, or the one a name is taken from
    name: str | None  # the name taken (``from module import name``), if any
    line: int
    deferred: bool  # inside a function: runs when called, not at import
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs


@functools.cache
def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "lmcache").rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import statement of one module, wherever it sits in the module."""
    is_package = path.name == "__init__.py"

    def walk(nodes: list[ast.stmt], deferred: bool, type_only: bool) -> Iterator[Import]:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield Import(name, alias.name, None, node.lineno, deferred, type_only)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    if sub in modules:  # ``from pkg import submodule``: the submodule is what is imported
                        yield Import(name, sub, None, node.lineno, deferred, type_only)
                    else:
                        yield Import(name, source, alias.name, node.lineno, deferred, type_only)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield from walk(node.body, True, type_only)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from walk(node.body, deferred, True)
                yield from walk(node.orelse, deferred, type_only)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        yield from walk([c for c in children if isinstance(c, ast.AST)], deferred, type_only)

    yield from walk(_parse(path).body, False, False)


def _inside(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(package: str, modules: dict[str, Path], *, allowed: tuple[str, ...] = ()) -> list[str]:
    """``file:line: what`` for each private name of ``package`` (or module) used by a module outside it.

    Modules named in ``allowed`` may use them (see :data:`COMPANIONS`).
    """
    found: list[str] = []
    for importer, path in modules.items():
        if _inside(importer, package) or importer in allowed:
            continue
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        aliases: dict[str, str] = {}  # local name -> module of the package it is bound to
        for imp in imports_of(importer, path, modules):
            if not _inside(imp.module, package):
                continue
            if any(_private(part) for part in imp.module[len(package) :].split(".")):
                found.append(f"{where}:{imp.line}: imports the private module {imp.module}")
            if imp.name is not None and _private(imp.name):
                found.append(f"{where}:{imp.line}: imports {imp.name} from {imp.module}")
        tree = _parse(path)
        for node in ast.walk(tree):  # modules of the package bound to a local name
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _inside(alias.name, package) and alias.asname:
                        aliases[alias.asname] = alias.name
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(importer, path.name == "__init__.py", node)
                for alias in node.names:
                    if _inside(f"{source}.{alias.name}", package) and f"{source}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        for node in ast.walk(tree):  # ``module._name`` through such a binding
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                found.append(f"{where}:{node.lineno}: uses {aliases[node.value.id]}.{node.attr}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph`` (one per strongly connected component of two or more, or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def import_graph(modules: dict[str, Path], scope: str, *, deferred: bool) -> dict[str, set[str]]:
    """Edges between the modules of ``scope`` (with or without imports made inside functions)."""
    graph: dict[str, set[str]] = {}
    for importer, path in modules.items():
        if not _inside(importer, scope):
            continue
        edges = graph.setdefault(importer, set())
        for imp in imports_of(importer, path, modules):
            if imp.type_only or (imp.deferred and not deferred) or not _inside(imp.module, scope):
                continue
            if imp.module != importer:
                edges.add(imp.module)
    return graph


@pytest.mark.parametrize("package", SEALED)
def test_no_module_outside_a_sealed_package_uses_its_private_names(package: str) -> None:
    modules = all_modules()
    assert package in modules, f"{package} is not a package of lmcache"
    assert private_uses(package, modules) == []


def sealed_modules(modules: dict[str, Path]) -> list[str]:
    """The modules and subpackages directly inside each package of :data:`SEALED_MODULES_OF`."""
    out: set[str] = set()
    for parent in SEALED_MODULES_OF:
        depth = parent.count(".") + 2
        out.update(".".join(m.split(".")[:depth]) for m in modules if m.startswith(parent + "."))
    return sorted(out)


@pytest.mark.parametrize("module", sealed_modules(all_modules()))
def test_no_backend_module_uses_another_ones_private_names(module: str) -> None:
    modules = all_modules()
    allowed = tuple(importer for importer, owner in COMPANIONS.items() if owner == module)
    assert private_uses(module, modules, allowed=allowed) == []


def test_the_adapter_kit_is_checked_and_companions_exist() -> None:
    checked = sealed_modules(all_modules())
    for module in ("lmcache.backends.base", "lmcache.backends.file", "lmcache.backends.gds", "lmcache.backends.nixl"):
        assert module in checked
    assert set(COMPANIONS) | set(COMPANIONS.values()) <= set(all_modules()), "a companion entry names no module"


@pytest.mark.parametrize(
    ("scope", "deferred"),
    [("lmcache", False), *((package, False) for package in SEALED), *((package, True) for package in SEALED)],
    ids=lambda v: {False: "module-level", True: "with-deferred-imports"}.get(v, v) if isinstance(v, bool) else v,
)
def test_no_import_cycle(scope: str, deferred: bool) -> None:
    modules = all_modules()
    graph = import_graph(modules, scope, deferred=deferred)
    assert len(graph) > 1, f"{scope} is not a package of several modules"
    assert cycles(graph) == []


def test_the_checks_see_what_they_look_for(tmp_path: Path) -> None:
    """On known input: a loop is found, and so is each way of reaching a private name."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    user = tmp_path / "user.py"
    user.write_text(
        "from lmcache.backends.nixl.sdk import _POLL, make_agent\n"
        "from lmcache.backends.nixl import sdk as s\n"
        "def f():\n"
        "    import lmcache.backends.nixl._hidden\n"
        "    return s._hook_poll_timeout, s.__name__, s.address\n"
    )
    uses = private_uses("lmcache.backends.nixl", {**all_modules(), "lmcache.user": user})
    assert [u.split(": ", 1)[1] for u in uses] == [
        "imports _POLL from lmcache.backends.nixl.sdk",
        "imports the private module lmcache.backends.nixl._hidden",
        "uses lmcache.backends.nixl.sdk._hook_poll_timeout",
    ]
    # A single module is sealed the same way; a companion may use its private names.
    sub = tmp_path / "sub.py"
    sub.write_text(
        "from lmcache.backends import file\nfrom lmcache.backends.file import _O_DIRECT, FileBackend\nfile._mapped\n"
    )
    modules = {**all_modules(), "lmcache.backends.sub": sub}
    companions = tuple(COMPANIONS)
    uses = private_uses("lmcache.backends.file", modules, allowed=companions)
    assert [u.split(": ", 1)[1] for u in uses] == [
        "imports _O_DIRECT from lmcache.backends.file",
        "uses lmcache.backends.file._mapped",
    ]
    assert private_uses("lmcache.backends.file", modules, allowed=("lmcache.backends.sub", *companions)) == []
