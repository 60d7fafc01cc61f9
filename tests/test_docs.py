"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    from engine.recipe.schema import markdown

    current = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert current == markdown(), "regenerate with: engine schema --markdown > docs/recipe-reference.md"


def test_readme_shows_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev]" && pytest'
    assert test_cmd in readme and test_cmd in ci
    assert "engine run recipes/quickstart.yaml" in readme


def test_constraints_pin_every_direct_dependency():
    """CI and the README install with -c constraints.txt: every dependency the project
    names (torch aside, installed first on its own) has an exact version there."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    wanted = {re.split(r"[<>=!~ ;\[]", n, maxsplit=1)[0].lower().replace("_", "-") for n in names}
    pinned = {line.split("==")[0].lower().replace("_", "-")
              for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert wanted - {"torch"} <= pinned, wanted - {"torch"} - pinned


def test_api_reference_is_current():
    from engine.cli.api_reference import markdown

    current = (ROOT / "docs" / "api-reference.md").read_text()
    assert current == markdown(), "regenerate with: engine schema --api > docs/api-reference.md"


def test_api_reference_covers_every_public_name():
    import importlib

    from engine.cli.api_reference import MODULES

    text = (ROOT / "docs" / "api-reference.md").read_text()
    for module in MODULES:
        for name in importlib.import_module(module).__all__:
            assert f"**`{name}" in text, f"{module}.{name} missing from docs/api-reference.md"


def test_plugin_guide_shows_the_example_and_the_stage_kinds_as_they_are():
    from engine.recipe.schema import stage_kinds_table

    guide = (ROOT / "docs" / "plugins.md").read_text()
    example = (ROOT / "docs" / "examples" / "lingoforge_median.py").read_text()
    assert example.rstrip() in guide, "docs/plugins.md must show docs/examples/lingoforge_median.py verbatim"
    assert "\n".join(stage_kinds_table()) in guide
    assert "tests/conftest.py" not in guide  # the test kit is engine.testing, installed


def test_every_engine_package_is_installed():
    """A wheel holds only the packages pyproject.toml lists: every folder of engine/ with
    an __init__.py must be there (an editable install would hide a missing one)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "engine").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
