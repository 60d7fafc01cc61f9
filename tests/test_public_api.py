"""The public API is the whole plugin surface: built-in plugins import nothing else of
the engine, and no engine module imports the API back."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API_MODULES = ("engine.api", "engine.api.training", "engine.api.merging", "engine.api.evaluation",
               "engine.api.models", "engine.api.errors")


def _engine_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of an ``engine`` module in ``path``, nested ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "engine":
                found += [(node.lineno, f"engine.{a.name}") for a in node.names]
            elif node.module.startswith("engine."):
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "engine"]
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "plugins").glob("*.py")), ids=lambda p: p.name)
def test_built_in_plugins_import_only_the_public_api(path: Path) -> None:
    outside = [f"{path.name}:{line} imports {mod}" for line, mod in _engine_imports(path)
               if mod not in API_MODULES]
    assert not outside, "built-in plugins may import only engine.api*: " + "; ".join(outside)


def test_no_engine_module_imports_the_api() -> None:
    back = []
    for path in sorted((ROOT / "engine").rglob("*.py")):
        if (ROOT / "engine" / "api") in path.parents:
            continue
        back += [f"{path.relative_to(ROOT)}:{line}" for line, mod in _engine_imports(path)
                 if mod in API_MODULES]
    assert not back, "engine internals must not import engine.api (it only re-exports): " + ", ".join(back)


@pytest.mark.parametrize("module", API_MODULES)
def test_every_public_name_resolves(module: str) -> None:
    mod = importlib.import_module(module)
    assert mod.__all__, module
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ lists names it does not define: {missing}"


def test_the_test_itself_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("from engine import arch\nfrom engine.api import hookimpl\n"
                   "def f():\n    from engine.training.batching import pack\n")
    assert [m for _, m in _engine_imports(bad)] == ["engine.arch", "engine.api", "engine.training.batching"]


def test_loading_the_pytest_plugin_imports_no_torch():
    """pytest loads engine.testing's plugin in every project with lingoforge installed."""
    import subprocess
    import sys

    code = ("import sys, engine.testing.pytest_plugin, engine.testing as t; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(t.check_plugin) and callable(t.build_family)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
