"""The command line: exit codes and one-line error messages a user can act on."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from engine.cli.commands import main


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def recipe(tmp_path, tiny_model, text_file, test_plugin):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: cli-demo
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: adapted
            stage: adapt-language
            plugin: copy-model
            model: base
            data: {{path: {text_file}}}
          - name: scores
            stage: evaluate
            plugin: line-count
            models: [base, adapted]
            data: {{path: {text_file}}}
        """))
    return f


def test_validate_ok(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    assert "2 stages in order: adapted -> scores" in capsys.readouterr().err


def test_run_prints_tables_and_writes_report(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(["run", str(recipe), "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    assert "stages" in out and "metrics" in out and "copy-model" in out
    assert json.loads((work / "report.json").read_text())["finished"]
    log = (work / "run.log").read_text()
    assert log.startswith("=== ") and "\nNext\n" in log  # the run log ends with the summary
    assert f"engine report {work}" in log.rsplit("\nNext\n", 1)[1]


@pytest.mark.parametrize(("body", "message"), [
    ("name: x\nstages: [\n", "invalid YAML"),
    ("name: x\nstages:\n  - {name: a, stage: merge, plugin: nope, models: [m]}\n", "unknown reference 'm'"),
    ("- just a list\n", "a recipe must be a YAML mapping"),
])
def test_user_errors_are_one_short_message(tmp_path, capsys, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(f) in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_unknown_plugin_and_bad_param_messages(recipe, capsys):
    assert main(["validate", str(recipe), "--set", "stages.adapted.plugin=nope"]) == 2
    assert "stage 'adapted': no adapt-language plugin named 'nope'" in capsys.readouterr().err
    assert main(["validate", str(recipe), "--set", "stages.adapted.params.fail=maybe"]) == 2
    assert "stage 'adapted' params.fail" in capsys.readouterr().err


def test_missing_file_message(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_stage_failure_exit_code_and_debug_traceback(recipe, tmp_path, capsys):
    args = ["run", str(recipe), "--workdir", str(tmp_path / "w"), "--set", "stages.adapted.params.fail=true"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stage 'adapted' (copy-model) failed: RuntimeError: asked to fail" in err
    assert "Traceback" not in err
    assert main(["--debug", *args]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_plugins_json_lists_builtins_and_test_plugin(test_plugin, capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["engine-test-plugin"]["registers"]["adapt-language"][0]["name"] == "copy-model"
    assert "engine_plugins.ties" in rows


def test_schema_includes_plugin_params(test_plugin, capsys):
    assert main(["schema"]) == 0
    text = capsys.readouterr().out
    schema = json.loads(text)
    assert schema["title"] == "lingoforge recipe"
    assert "AdaptLanguageCopyModelStage" in schema["$defs"]
    ref = schema["$defs"]["AdaptLanguageCopyModelStage"]["properties"]["params"]["$ref"]
    params = schema["$defs"][ref.rsplit("/", 1)[-1]]
    assert params["properties"]["fail"]["type"] == "boolean"
    assert params["additionalProperties"] is False


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "engine", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("lingoforge ")


def test_cache_commands_need_a_workdir_and_name_it(tmp_path, capsys):
    assert main(["cache", "ls"]) == 2
    assert "engine cache ls: name a RECIPE or --workdir" in capsys.readouterr().err
    assert main(["cache", "prune", "--workdir", str(tmp_path / "nope")]) == 2
    assert f"workdir {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_run_refuses_an_unknown_stage_for_only_and_from(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    assert main(["run", str(recipe), "--workdir", str(work), "--only", "scoers"]) == 2
    err = capsys.readouterr().err
    assert "--only 'scoers': no stage of that name" in err and "stages: adapted, scores" in err
    assert not work.exists()
