"""Recipe validation: good recipes plan, bad ones fail with a message naming the culprit."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.core.errors import RecipeError
from engine.recipe.spec import apply_overrides, load_recipe, parse_recipe
from engine.recipe.validate import plan_recipe


def write(tmp_path: Path, body: str) -> Path:
    f = tmp_path / "recipe.yaml"
    f.write_text(textwrap.dedent(body))
    return f


@pytest.fixture
def good(tmp_path, tiny_model, text_file, test_plugin) -> Path:
    return write(tmp_path, f"""
        name: demo
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: scores
            stage: evaluate
            plugin: line-count
            models: [base, adapted]
            data: {{path: {text_file.name}}}
          - name: adapted
            stage: adapt-language
            plugin: copy-model
            model: base
            layers: picked
            data: {{path: {text_file}}}
          - name: picked
            stage: select-layers
            plugin: all-layers
            model: base
        """)


def plan(path: Path, overrides=()):
    return plan_recipe(load_recipe(path, list(overrides)), path.parent, str(path))


def test_good_recipe_plans_in_dependency_order(good):
    p = plan(good)
    assert [s.name for s in p.stages] == ["picked", "adapted", "scores"]
    scores = p.stages[-1]
    assert scores.depends_on == ["adapted"]
    assert scores.data[0].format == "text"
    assert scores.data[0].path.is_absolute()


def test_overrides_address_stages_by_name(good):
    p = plan(good, ["stages.adapted.params.fail=true", "runtime.device=cpu"])
    assert p.stages[1].params.fail is True
    assert p.stages[1].runtime.device == "cpu"


def test_stage_runtime_overrides_only_what_it_sets(good):
    data = {"name": "x", "runtime": {"dtype": "bfloat16"}, "stages": [
        {"name": "s", "stage": "select-layers", "plugin": "all-layers", "model": "m",
         "runtime": {"device": "cpu"}}]}
    from engine.recipe.validate import effective_runtime

    recipe = parse_recipe(data)
    rt = effective_runtime(recipe.runtime, recipe.stages[0].runtime)
    assert (rt.device, rt.dtype) == ("cpu", "bfloat16")


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d["stages"].append(dict(d["stages"][0])), "stage 'scores' is defined twice"),
    (lambda d: d["stages"][1].update(model="nowhere"), "stage 'adapted' (adapt-language): model: unknown reference 'nowhere'"),
    (lambda d: d["stages"][1].update(plugin="nope"), "stage 'adapted': no adapt-language plugin named 'nope'"),
    (lambda d: d["stages"][1].update(params={"fail": "maybe"}), "stage 'adapted' params.fail"),
    (lambda d: d["stages"][1].update(params={"stepz": 3}), "stage 'adapted' params.stepz: unknown key"),
    (lambda d: d["stages"][1].update(layers="adapted"), "refers to the stage itself"),
    (lambda d: d["stages"][1].update(layers="base"), "'base' is a model, not a select-layers stage"),
    (lambda d: d["stages"][1].update(layers="scores"), "is a evaluate stage, not select-layers"),
    (lambda d: d["stages"][0].update(models=["picked"]), "'picked' is a select-layers stage and produces no model"),
    (lambda d: d["stages"][1].pop("data"), "stage 'adapted' (adapt-language): missing input 'data'"),
    (lambda d: d["stages"][2].update(base="base"), "'base' is not an input of this stage kind"),
    (lambda d: d["stages"][0].update(data={"path": "missing.txt"}), "missing.txt does not exist"),
    (lambda d: d["stages"][0].update(stage="finetune"), "stage 'scores' stage: Input should be"),
    (lambda d: d["stages"][0].update(name="bad name"), "stage 'bad name' name: String should match"),
    (lambda d: d["models"]["base"].update(path="/no/such/model"), "models.base: model folder /no/such/model does not exist"),
    (lambda d: d.update(stages=[]), "stages: List should have at least 1 item"),
    (lambda d: d.update(extra=1), "extra: unknown key"),
])
def test_bad_recipes_name_the_culprit(good, edit, message):
    import yaml

    data = yaml.safe_load(good.read_text())
    edit(data)
    good.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        plan(good)
    assert message in str(err.value)
    assert str(good) in str(err.value)


def test_cycle_is_reported_with_its_stages(good, test_plugin):
    import yaml

    data = yaml.safe_load(good.read_text())
    data["stages"].append({"name": "m1", "stage": "merge", "plugin": "x", "models": ["m2"]})
    data["stages"].append({"name": "m2", "stage": "merge", "plugin": "x", "models": ["m1"]})
    good.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="cycle: m1, m2"):
        plan(good)


def test_invalid_yaml_names_file_and_line(tmp_path):
    f = write(tmp_path, "name: x\nstages: [\n  - a: b\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:\d+:\d+: invalid YAML"):
        load_recipe(f)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_empty_data_file_is_an_error(good, tmp_path):
    (tmp_path / "text.txt").write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        plan(good)


@pytest.mark.parametrize(("override", "message"), [
    ("stages.nosuch.params.x=1", "no stage named 'nosuch'"),
    ("noequals", "expected key.path=value"),
    ("stages.9.name=x", "index 9 out of range"),
])
def test_bad_overrides(override, message):
    with pytest.raises(RecipeError, match=message):
        apply_overrides({"stages": [{"name": "a"}]}, [override])


def test_pickle_only_model_folder_is_refused(good, tmp_path):
    import yaml

    bad = tmp_path / "pickled"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    data = yaml.safe_load(good.read_text())
    data["models"]["base"]["path"] = str(bad)
    good.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match="safetensors only"):
        plan(good)


@pytest.mark.parametrize(("params", "message"), [
    ({"weight": {"a": 1.0, "typo": 2.0}}, "params.weight names model(s) ['typo']"),
    ({"protect": "nobody"}, "params.protect names 'nobody'"),
    ({"weight": {"a": 1.0, "b": -1.0}, "normalize": True}, "sum to zero"),
])
def test_merge_params_naming_models_are_checked_before_running(tmp_path, tiny_model_family, params,
                                                               message):
    import yaml

    fam = tiny_model_family
    f = tmp_path / "m.yaml"
    f.write_text(yaml.safe_dump({
        "name": "m", "models": {k: {"path": str(v)} for k, v in fam.items()},
        "stages": [{"name": "merged", "stage": "merge", "plugin": "slack-ties", "base": "base",
                    "models": ["a", "b"], "params": params}],
    }))
    with pytest.raises(RecipeError, match=r"stage 'merged': .*" + __import__("re").escape(message)):
        plan(f)


@pytest.mark.parametrize(("stage", "plugin", "data", "message"), [
    ("adapt-language", "sft", "text.txt", r"text.txt: sft reads 'instructions' data, this file is 'text'"),
    ("adapt-language", "ct", "sft.jsonl", r"sft.jsonl: ct reads 'text' data, this file is 'instructions'"),
    ("evaluate", "task-accuracy", "text.txt",
     r"task-accuracy reads 'choice' or 'generation' data; got text.txt \(text\)"),
])
def test_data_format_mismatch_is_caught_by_validate(tmp_path, tiny_model, text_file,
                                                    instructions_file, stage, plugin, data, message):
    key = "model: base" if stage == "adapt-language" else "models: [base]"
    recipe = write(tmp_path, f"""
        name: formats
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: s
            stage: {stage}
            plugin: {plugin}
            {key}
            data: {{path: {data}}}
        """)
    with pytest.raises(RecipeError, match=rf"stage 's': data: .*{message}"):
        plan(recipe)


def test_evaluator_with_one_matching_source_validates(tmp_path, tiny_model, text_file, choice_file):
    recipe = write(tmp_path, f"""
        name: formats
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: s
            stage: evaluate
            plugin: task-accuracy
            models: [base]
            data: [{{path: {text_file.name}}}, {{path: {choice_file.name}, format: choice}}]
        """)
    assert plan(recipe).stages[0].spec.name == "s"
