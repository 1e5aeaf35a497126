"""effsam.analysis is the measurements alone: it depends on nothing of the toolkit
(effsam.train), which builds on it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import effsam.analysis

PACKAGE = Path(effsam.analysis.__file__).parent


def _imported_modules(path: Path, package: str) -> list[tuple[str, int, str | None]]:
    """(absolute module name, line, enclosing function) of each import statement of the
    module at ``path``, which is in ``package``."""
    package_parts = package.split(".")
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int, str | None]] = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if function is None else function)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, child.lineno, function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package_parts[: len(package_parts) - child.level + 1]
                    name = ".".join(base + ([child.module] if child.module else []))
                else:
                    name = child.module or ""
                found.append((name, child.lineno, function))
                if not child.module:  # "from . import x": x may be a module
                    found.extend(
                        (f"{name}.{alias.name}", child.lineno, function) for alias in child.names
                    )
            visit(child, function)

    visit(tree, None)
    return found


def _is_toolkit(name: str) -> bool:
    return name == "effsam.train" or name.startswith("effsam.train.")


def test_no_analysis_module_imports_the_toolkit() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 6  # the scan sees the package
    offending = []
    for path in files:
        package = ".".join(["effsam", *path.relative_to(PACKAGE.parent).parent.parts])
        for name, line, function in _imported_modules(path, package):
            if not _is_toolkit(name):
                continue
            # the one exception: the deprecated name kept from 0.2, resolved on first use
            if path.name == "__init__.py" and path.parent == PACKAGE and function == "__getattr__":
                continue
            offending.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not offending, "\n".join(offending)


def test_the_scan_resolves_relative_imports(tmp_path: Path) -> None:
    module = tmp_path / "mod.py"
    module.write_text("from ..train import config\nfrom .hessian import x\nimport effsam.train\n")
    names = [name for name, _, _ in _imported_modules(module, "effsam.analysis")]
    assert names == ["effsam.train", "effsam.analysis.hessian", "effsam.train"]


def test_importing_every_analysis_module_loads_nothing_of_the_toolkit() -> None:
    code = (
        "import importlib, pkgutil, sys\n"
        "import effsam.analysis as a\n"
        "names = [m.name for m in pkgutil.walk_packages(a.__path__, 'effsam.analysis.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['effsam', 'train']))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr
    count, loaded = proc.stdout.strip().splitlines()
    assert int(count) >= 5 and loaded == "[]"


def test_the_name_kept_from_0_2_is_the_toolkits_function() -> None:
    from effsam.train import analyze_run

    with pytest.warns(DeprecationWarning, match="effsam.train.analyze_run"):
        assert effsam.analysis.analyze_run is analyze_run
    assert "analyze_run" not in effsam.analysis.__all__


# ------------------------------------------------------------------ no import cycle
def _module_level_graph() -> dict[str, set[str]]:
    """effsam's modules and the effsam modules each imports at import time (module level,
    ``if TYPE_CHECKING:`` blocks left out: they never run)."""
    root = Path(effsam.analysis.__file__).parents[1]  # src/effsam
    modules: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = ["effsam", *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:  # "from m import attr": the module m
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = (name if path.name == "__init__.py" else name.rpartition(".")[0]).split(".")
        deps: set[str | None] = set()

        def visit(node: ast.AST) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    continue  # runs later, not at import
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue  # never runs
                if isinstance(child, ast.Import):
                    deps.update(resolve(a.name) for a in child.names)
                elif isinstance(child, ast.ImportFrom):
                    base = package[: len(package) - child.level + 1] if child.level else []
                    mod = ".".join(base + ([child.module] if child.module else []))
                    for a in child.names:  # "from p import m": the module p.m if it is one
                        sub = f"{mod}.{a.name}"
                        deps.add(sub if sub in modules else resolve(mod))
                visit(child)

        visit(ast.parse(path.read_text()))
        graph[name] = {d for d in deps if d and d != name and d.startswith("effsam")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_module_of_effsam_imports_one_that_imports_it_back() -> None:
    """A submodule importing its own package (``from . import x`` in effsam/optim/y.py
    while effsam/optim/__init__.py imports y) counts: the package is half-initialised then."""
    graph = _module_level_graph()
    assert len(graph) >= 80 and "effsam.optim.sharpness_aware" in graph
    assert not _cycles(graph), _cycles(graph)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
