"""The docs that are generated from code stay in step with it."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_reference_is_current():
    from engine.schema import markdown

    current = (ROOT / "docs" / "recipe-reference.md").read_text()
    assert current == markdown(), "regenerate with: engine schema --markdown > docs/recipe-reference.md"


def test_readme_shows_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = 'pip install torch==2.13.0 && pip install -e ".[dev]" && pytest'
    assert test_cmd in readme and test_cmd in ci
    assert "engine run recipes/quickstart.yaml" in readme
