"""``engine validate`` reports every independent problem, one line each, like a linter."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.cli.commands import main
from engine.core.errors import RecipeError
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe


@pytest.fixture(autouse=True)
def _narrow_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")


def _recipe(tmp_path, body: str):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(body))
    return f


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def test_missing_model_and_unknown_plugin_are_both_reported(tmp_path, tiny_model, text_file):
    recipe = _recipe(tmp_path, f"""
        name: two-problems
        models:
          gone: {{path: {tmp_path / 'no-such-model'}}}
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: no-such-trainer
            model: base
            data: {{path: {text_file}}}
          - name: scores
            stage: evaluate
            plugin: perplexity
            models: [gone]
            data: {{path: {text_file}}}
        """)
    done = subprocess.run([sys.executable, "-m", "engine.cli", "validate", str(recipe)],
                          capture_output=True, text=True, env={"COLUMNS": "80", **_env()})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = _errors(done.stderr)
    assert len(lines) == 2, done.stderr
    assert "models.gone" in lines[0] and "does not exist" in lines[0]
    assert "stage 'ct'" in lines[1] and "no adapt-language plugin named 'no-such-trainer'" in lines[1]


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)


def test_every_stage_problem_is_listed_in_recipe_order(tmp_path, tiny_model, text_file, capsys):
    """Problems in different stages and fields: a bad param, a missing data file, a bad
    reference, a duplicate name, all in one run of validate."""
    recipe = _recipe(tmp_path, f"""
        name: many
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {tmp_path / 'missing.txt'}}}
            params: {{steps: 0}}
          - name: merged
            stage: merge
            plugin: ties
            models: [ct, nowhere]
          - name: merged
            stage: evaluate
            plugin: perplexity
            models: [base]
            data: {{path: {text_file}}}
        """)
    assert main(["validate", str(recipe)]) == 2
    lines = _errors(capsys.readouterr().err)
    text = "\n".join(lines)
    assert any("'merged' is defined twice" in line for line in lines), text
    assert any("unknown reference 'nowhere'" in line for line in lines), text
    assert any("stage 'ct' params.steps" in line for line in lines), text
    assert any("missing.txt does not exist" in line for line in lines), text
    assert len(lines) == len(set(lines)) == 4, text


def test_one_problem_is_still_one_line(tmp_path, tiny_model, text_file):
    recipe = _recipe(tmp_path, f"""
        name: one
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
            params: {{lr: -1}}
        """)
    with pytest.raises(RecipeError) as err:
        plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
    assert len(str(err.value).splitlines()) == 1
    assert "stage 'ct' params.lr" in str(err.value)


def test_a_valid_recipe_still_plans(tmp_path, tiny_model, text_file, capsys):
    recipe = _recipe(tmp_path, f"""
        name: fine
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
        """)
    assert main(["validate", str(recipe)]) == 0
    assert "1 stages in order: ct" in capsys.readouterr().err
