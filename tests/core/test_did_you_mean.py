"""``engine validate`` suggests the closest known name for a mistyped one (engine/core/suggest.py):
recipe keys, stage kinds, plugin names, plugin params and stage references."""

from __future__ import annotations

import pytest

from engine.cli.commands import main
from engine.core.suggest import did_you_mean, keys_at


@pytest.fixture
def validate(tmp_path, tiny_model, capsys):
    def run(stage: str, top: str = "models") -> list[str]:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"name: r\n{top}:\n  base: {{path: {tiny_model}}}\n"
                          f"  other: {{path: {tiny_model}}}\nstages:\n  - {stage}\n")
        capsys.readouterr()
        assert main(["validate", str(recipe)]) == 2
        return [line.removeprefix(f"error: {recipe}: ") for line in capsys.readouterr().err.splitlines()
                if line.startswith("error:")]
    return run


MERGE = "name: merge-ta, stage: merge, plugin: ties, base: base, models: [other]"


@pytest.mark.parametrize(("stage", "expected"), [
    ("{" + MERGE + ", params: {densty: 0.2}}",
     "stage 'merge-ta' params.densty: unknown key; did you mean 'density'?"),
    ("{name: merge-ta, stage: merge, plugin: task-arithmetc, base: base, models: [other]}",
     "; did you mean 'task-arithmetic'?"),
    ("{name: merge-ta, stage: merg, plugin: ties, base: base, models: [other]}",
     "stage 'merge-ta' stage: Input should be 'adapt-language', 'select-layers', 'merge', 'align' "
     "or 'evaluate'; did you mean 'merge'?"),
    ("{name: merge-ta, stage: merge, plugin: ties, base: base, models: [othr]}",
     "stage 'merge-ta' (merge): models: unknown reference 'othr' (known: base, merge-ta, other); "
     "did you mean 'other'?"),
    ("{name: merge-ta, stage: merge, plugin: ties, base: base, modles: [other]}",
     "stage 'merge-ta' modles: unknown key; did you mean 'models'?"),
    ("{" + MERGE + ", runtime: {devic: cpu}}",
     "stage 'merge-ta' runtime.devic: unknown key; did you mean 'device'?"),
])
def test_validate_suggests_the_close_name(validate, stage, expected):
    errors = validate(stage)
    assert len(errors) == 1, errors
    assert errors[0].endswith(expected), errors[0]


def test_unknown_plugin_names_the_alternatives_and_the_closest(validate):
    (error,) = validate("{name: merge-ta, stage: merge, plugin: tis, base: base, models: [other]}")
    assert error.startswith("stage 'merge-ta': no merge plugin named 'tis'; available: breadcrumbs")
    assert error.endswith("; did you mean 'ties'?")


def test_unknown_top_level_key(validate):
    assert validate(MERGE.join("{}"), top="modls") == ["modls: unknown key; did you mean 'models'?"]


def test_nothing_close_gets_no_suggestion(validate):
    (error,) = validate("{" + MERGE + ", params: {zzzzzz: 1}}")
    assert error == "stage 'merge-ta' params.zzzzzz: unknown key"


def test_did_you_mean_and_keys_at():
    from engine.recipe.spec import Recipe

    assert did_you_mean("densty", ["density", "weight"]) == "; did you mean 'density'?"
    assert did_you_mean("Density", ["density"]) == "; did you mean 'density'?"
    assert did_you_mean("xyz", ["density"]) == ""
    assert did_you_mean(3, ["density"]) == ""
    assert {"name", "models", "stages"} <= set(keys_at(Recipe, []))
    assert {"plugin", "params", "runtime"} <= set(keys_at(Recipe, ["stages", 0]))
    assert "device" in keys_at(Recipe, ["stages", 0, "runtime"])
    assert "path" in keys_at(Recipe, ["models", "base"])
    assert keys_at(Recipe, ["nope"]) == [] and keys_at(None, []) == []
