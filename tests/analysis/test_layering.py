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
