"""engine's packages in one-way layers (docs/architecture.md): every module has a layer,
no import goes against the order, no import circle, a bounded import chain, a short top
folder, imports inside functions only for start-up speed, and every package naming its
public names. Each check also runs on a made-up module, to show it would fail."""

from __future__ import annotations

import ast
import importlib

import pytest
from layers import (
    ENGINE,
    LAYER_OF,
    MAX_CHAIN,
    MAX_TOP_ENTRIES,
    RANKS,
    ROOT,
    against_the_order,
    all_imports,
    circles,
    current_diagram,
    diagram,
    engine_modules,
    graph,
    layer_of,
    longest_chain,
    read_imports,
    top_entries,
)

MODULES = engine_modules()
IMPORTS = all_imports()


def test_every_engine_module_has_a_layer():
    unmapped = [m for m in MODULES if layer_of(m) is None]
    assert not unmapped, f"modules without a layer (add them to tests/layers.py LAYER_OF): {unmapped}"
    assert set(LAYER_OF.values()) <= set(RANKS)
    stale = [p for p in LAYER_OF if p not in MODULES]
    assert not stale, f"LAYER_OF names modules that do not exist: {stale}"


def test_no_import_goes_against_the_layer_order():
    bad = against_the_order(IMPORTS)
    assert not bad, "imports against the layer order (docs/architecture.md):\n  " + "\n  ".join(bad)


def test_the_order_check_sees_an_import_against_it():
    """A core module importing the runner at the top, the CLI inside a function, the models
    under TYPE_CHECKING and the test kit through importlib: four imports against the order."""
    source = ("from typing import TYPE_CHECKING\n"
              "import importlib\n"
              "from engine.run.runner import Runner\n"
              "if TYPE_CHECKING:\n"
              "    from engine.models import modelio\n"
              "def f():\n"
              "    from engine.cli import main\n"
              "    return importlib.import_module('engine.testing.builders')\n")
    found = read_imports("engine.core.errors", source, MODULES)
    assert [(i.target, i.inside_function, i.type_checking) for i in found] == [
        ("engine.run.runner", False, False), ("engine.models.modelio", False, True),
        ("engine.cli", True, False), ("engine.testing.builders", True, False)]
    bad = against_the_order(found)
    assert len(bad) == 4 and bad[0].startswith("engine.core.errors:3 (core) imports engine.run.runner (run)")
    # a layer of the same rank is not a lower one: merging may not import training
    side = read_imports("engine.merging.method", "from engine.training.loop import train\n", MODULES)
    assert against_the_order(side) == [
        "engine.merging.method:1 (merging) imports engine.training.loop (training)"]
    # the report readers import only core, though their folder is the run's
    up = read_imports("engine.run.report.files", "from engine.run.context import StageContext\n", MODULES)
    assert len(against_the_order(up)) == 1


def test_faces_are_imported_by_nothing_inside_the_engine():
    faces = {"api", "testing"}
    inward = [f"{i.module} imports {i.target}" for i in IMPORTS
              if layer_of(i.target) in faces and layer_of(i.module) != layer_of(i.target)]
    assert not inward, inward


def test_no_import_circles():
    found = circles(graph(IMPORTS, MODULES))
    assert not found, "import circles (function-level and TYPE_CHECKING imports count):\n  " + \
        "\n  ".join(" <-> ".join(c) for c in found)
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_longest_import_chain_is_short():
    chain = longest_chain(graph(IMPORTS, MODULES))
    assert len(chain) <= MAX_CHAIN, (f"the longest import chain is {len(chain)} modules (at most "
                                     f"{MAX_CHAIN}): " + " -> ".join(chain))
    assert longest_chain({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == ["a", "b", "c"]


def test_engine_top_folder_is_short():
    entries = top_entries()
    assert len(entries) <= MAX_TOP_ENTRIES, f"engine/ holds {len(entries)} entries: {entries}"


def test_imports_inside_functions_say_they_are_for_start_up_speed():
    """An import inside a function never hides a circle (there is none to hide); the ones
    left keep a heavy module out of a light command's start-up, and say so."""
    silent = [f"{i.module}:{i.line} imports {i.target}" for i in IMPORTS
              if i.inside_function and "start-up" not in i.comment]
    assert not silent, ("imports inside functions without a '# ... start-up ...' comment "
                        "saying why:\n  " + "\n  ".join(silent))
    found = read_imports("engine.cli.commands", "def f():\n    # start-up speed\n    from engine.run "
                         "import runner\n\ndef g():\n    from engine.run import runner\n", MODULES)
    assert ["start-up" in i.comment for i in found] == [True, False]


def _packages() -> list[str]:
    return sorted(name for name, path in MODULES.items() if path.name == "__init__.py")


@pytest.mark.parametrize("package", _packages())
def test_every_package_lists_its_public_names(package):
    """Private by default: a module is public only through its package's ``__all__``."""
    path = MODULES[package]
    names = None
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            names = ast.literal_eval(node.value)
    if package == "engine":  # the root holds the version and the table of old paths
        assert names is None
        return
    assert names, f"{path.relative_to(ROOT)} has no __all__ listing the package's public names"
    module = importlib.import_module(package)
    for name in names:
        if not hasattr(module, name):  # a public submodule, imported by name
            importlib.import_module(f"{package}.{name}")


def test_every_module_of_the_engine_lives_in_a_package_or_is_underscored():
    loose = [m for m, p in MODULES.items()
             if p.name != "__init__.py" and p.parent == ENGINE and p.stem not in ("__main__",)]
    assert not loose, f"modules at engine/'s top (put them in a package): {loose}"


def test_the_architecture_diagram_is_current():
    assert current_diagram() == diagram(), ("docs/architecture.md's diagram is out of date: "
                                            "run `python tests/layers.py --write`")
