"""Probe findings, each pinned by a test that failed before its fix:

1. ``engine run --only STAGE`` two stages downstream of what it reads (a KeyError);
2. an evaluate stage whose input model cannot be scored exited 0 and replaced the good version;
3. a NaN or infinite merge param passed ``engine validate``;
4. QLoRA with ``runtime.fsdp`` was refused only at run time;
5. ``engine coverage`` on an empty data file said "ok";
6. ``runtime.threads`` above the machine's cores was accepted without a word.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from pathlib import Path

import pytest
from helpers import ct_stage, line_count_stage, write_recipe

from engine.cli import main


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


def engine(capsys, *args: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


# --- 1. --only two or more stages downstream ---------------------------------------------------


@pytest.fixture
def chain(tmp_path, tiny_model, text_file, test_plugin) -> Path:
    """T: ct, a merge of it, an evaluation of the merge (line-count: reads no weights)."""
    shutil.copy(text_file, tmp_path / "lum.txt")
    merged = {"name": "merged", "stage": "merge", "plugin": "task-arithmetic", "base": "base",
              "models": ["ct"]}
    return write_recipe(tmp_path / "t.yaml", "t", {"base": tiny_model},
                        [ct_stage("lum.txt"), merged, line_count_stage("lum.txt", ["base", "merged"])])


def stages_of(work: Path) -> list[tuple[str, str]]:
    return [(r["name"], r["cache"]) for r in json.loads((work / "report.json").read_text())["stages"]]


def test_only_reads_its_inputs_from_the_cache_however_far_upstream(chain, tmp_path, capsys):
    work = tmp_path / "w"
    assert engine(capsys, "run", chain, "--workdir", work)[0] == 0
    rc, out, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores", "--dry-run")
    assert rc == 0, err
    assert [line.split()[:5] for line in out.splitlines()[1:4]] == [
        ["ct", "up", "to", "date", "skip"], ["merged", "up", "to", "date", "reuse"],
        ["scores", "up", "to", "date", "reuse"]]
    rc, _, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores")
    assert rc == 0, err
    assert stages_of(work) == [("merged", "hit"), ("scores", "hit")]
    rc, _, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores", "--from", "scores")
    assert rc == 0, err
    assert stages_of(work) == [("merged", "hit"), ("scores", "miss")]
    # the stage two up need not even be kept: only what --only reads is
    shutil.rmtree(work / ".stages" / "ct")
    (work / "ct").unlink()
    rc, _, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores", "--no-cache")
    assert rc == 0, err
    assert stages_of(work) == [("merged", "hit"), ("scores", "miss")]


def test_only_with_an_input_never_run_names_it_and_the_command(chain, tmp_path, capsys):
    work = tmp_path / "w"
    rc, _, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores")
    assert rc == 2 and "Traceback" not in err, err
    lines = error_lines(err)
    assert lines[0] == "error: --only scores: input 'merged' has no cached version for this recipe (never run)"
    command = f"engine run {chain} --workdir {work} --only ct --only merged"
    assert lines[1] == f"error: produce it first: {command}"
    assert main(shlex.split(command)[1:]) == 0
    capsys.readouterr()
    rc, _, err = engine(capsys, "run", chain, "--workdir", work, "--only", "scores")
    assert rc == 0, err
    assert stages_of(work) == [("merged", "hit"), ("scores", "miss")]


def test_the_operations_guide_only_scores_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/operations.md's ops-demo: after a run, ``--only scores`` reuses merged and
    neither runs nor loads ct-lum, two stages up (it stopped on a KeyError)."""
    from test_cli_ops import _doc_blocks

    doc = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    (tmp_path / "ops-demo.yaml").write_text(_doc_blocks(doc, "yaml")[0])
    monkeypatch.chdir(tmp_path)
    fast = ["--set", "stages.ct-lum.params.steps=4"]  # the status lines do not show it
    assert main(["run", "ops-demo.yaml", *fast]) == 0
    block = next(b for b in _doc_blocks(doc, "console") if "--only scores --from scores" in b)
    command, *shown = [line.strip() for line in block.strip().splitlines()]
    capsys.readouterr()
    args = shlex.split(command.lstrip("$ "))[1:]
    assert main(args + fast) == 0
    assert capsys.readouterr().out.splitlines() == shown
    args.remove("--dry-run")
    assert main(args + fast) == 0
    assert stages_of(tmp_path / "runs" / "ops-demo") == [("merged", "hit"), ("scores", "miss")]


# --- 2. an evaluate stage with a model it cannot score ------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def scored_chain(tmp_path, tiny_model, text_file) -> Path:
    """T: ct, a merge of it, perplexity of the base and the merge."""
    shutil.copy(text_file, tmp_path / "lum.txt")
    merged = {"name": "merged", "stage": "merge", "plugin": "task-arithmetic", "base": "base",
              "models": ["ct"]}
    scores = {"name": "scores", "stage": "evaluate", "plugin": "perplexity", "models": ["base", "merged"],
              "data": {"path": "lum.txt"}, "params": {"max_documents": 4}}
    return write_recipe(tmp_path / "t.yaml", "t", {"base": tiny_model},
                        [ct_stage("lum.txt"), merged, scores])


def test_a_model_that_cannot_be_scored_fails_the_stage_and_keeps_the_good_version(
        scored_chain, tmp_path, capsys):
    work = tmp_path / "w"
    assert engine(capsys, "run", scored_chain, "--workdir", work)[0] == 0
    good_link = os.readlink(work / "scores")
    good = (work / "scores" / "metrics.json").read_text()
    assert set(json.loads(good)) >= {"base", "merged"}
    versions = sorted((work / ".stages" / "scores").iterdir())
    weights = work / "merged" / "model.safetensors"
    truncate(weights)
    rc, _, err = engine(capsys, "run", scored_chain, "--workdir", work, "--from", "scores")
    assert rc != 0 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith("error: stage 'scores' (perplexity): a model could not be scored"), line
    assert "model 'merged'" in line and str(weights) in line and "truncated" in line, line
    # nothing partial was kept: the good version is still current, no other version appeared
    assert os.readlink(work / "scores") == good_link
    assert (work / "scores" / "metrics.json").read_text() == good
    assert sorted((work / ".stages" / "scores").iterdir()) == versions
    st = json.loads(engine(capsys, "status", scored_chain, "--workdir", work, "--json")[1])
    assert [s["state"] for s in st["stages"]] == ["up to date"] * 3
    # the failure was not cached: asked again, the stage runs again and fails again
    rc, _, err = engine(capsys, "run", scored_chain, "--workdir", work, "--from", "scores")
    assert rc != 0 and "model 'merged'" in error_lines(err)[0]
    assert os.readlink(work / "scores") == good_link


def test_partial_metrics_from_any_evaluator_are_refused():
    from engine.api import MetricsArtifact
    from engine.core.errors import EngineError
    from engine.evaluation.driver import refuse_unscored

    refuse_unscored(MetricsArtifact("s", {"a": {"ppl": 2.0}}, {"a": {"ppl": 10}}))
    refuse_unscored(object())
    with pytest.raises(EngineError, match=r"^2 models could not be scored.*model 'b': gone; "
                                          r"model 'c': /x/model.safetensors: truncated"):
        refuse_unscored(MetricsArtifact("s", {"a": {"ppl": 2.0}}, errors={
            "b": "gone", "c": "/x/model.safetensors: truncated"}))


# --- 3. NaN and infinite merge params ------------------------------------------------------------


MERGES = {"task-arithmetic": ("base", ["a", "b"]), "ties": ("base", ["a", "b"]),
          "della": ("base", ["a", "b"]), "slack-ties": ("base", ["a", "b"]),
          "slerp": (None, ["a", "b"]), "passthrough": (None, ["a"])}


@pytest.mark.parametrize(("plugin", "params", "message"), [
    ("task-arithmetic", {"weight": float("nan")}, "params.weight: weight must be a finite number, got nan"),
    ("task-arithmetic", {"weight": float("-inf")}, "params.weight: weight must be a finite number, got -inf"),
    ("task-arithmetic", {"weight": [float("nan"), 1]},
     "params.weight: weight must be a finite number, got nan in the layer gradient [nan, 1]"),
    ("task-arithmetic", {"weight": {"a": 1, "b": float("inf")}},
     "params.weight: weight must be a finite number, got inf for model 'b'"),
    ("task-arithmetic", {"weight": {"b": [0.5, float("nan")]}},
     "weight must be a finite number, got nan in the layer gradient [0.5, nan] for model 'b'"),
    ("task-arithmetic", {"lambda": float("inf")}, "params.lambda: lambda must be a finite number, got inf"),
    ("ties", {"density": float("nan")}, "params.density: density must be a finite number, got nan"),
    ("ties", {"density": {"a": float("inf")}}, "density must be a finite number, got inf for model 'a'"),
    ("della", {"density": 0.5, "epsilon": [float("nan"), 0.1]},
     "params.epsilon: epsilon must be a finite number, got nan in the layer gradient [nan, 0.1]"),
    ("slack-ties", {"slack": float("nan")}, "params.slack: slack must be a finite number, got nan"),
    ("slerp", {"t": float("-inf")}, "params.t: t must be a finite number, got -inf"),
    ("task-arithmetic", {"overrides": [{"match": "mlp", "weight": {"a": float("nan")}}]},
     "overrides[0] (match 'mlp'): weight: weight must be a finite number, got nan for model 'a'"),
    ("ties", {"overrides": [{"match": "mlp", "lambda": float("inf")}]},
     "overrides[0] (match 'mlp'): lambda: lambda must be a finite number, got inf"),
    ("passthrough", {"slices": [{"model": "a", "layers": [0, 2], "scale": {"o_proj": float("inf")}}]},
     "slices[0]['scale']['o_proj'] must be a finite number, got inf"),
])
def test_nan_and_inf_merge_params_are_refused_by_validate(plugin, params, message, tmp_path,
                                                         tiny_model_family, capsys):
    base, models = MERGES[plugin]
    stage = {"name": "m", "stage": "merge", "plugin": plugin, "models": models, "params": params}
    if base:
        stage["base"] = base
    recipe = write_recipe(tmp_path / "r.yaml", "r", tiny_model_family, [stage])
    rc, _, err = engine(capsys, "validate", recipe)
    assert rc == 2, err
    (line,) = error_lines(err)
    assert line.startswith(f"error: {recipe}: stage 'm' params.") and message in line, line


def test_finite_merge_params_still_validate_and_a_number_given_as_text_is_checked(
        tmp_path, tiny_model_family, capsys):
    stage = {"name": "m", "stage": "merge", "plugin": "ties", "base": "base", "models": ["a", "b"],
             "params": {"weight": {"a": [0, 1], "b": 0.5}, "density": 0.5, "lambda": 1e30,
                        "overrides": [{"match": "mlp", "weight": -2.0}]}}
    recipe = write_recipe(tmp_path / "r.yaml", "r", tiny_model_family, [stage])
    assert engine(capsys, "validate", recipe)[0] == 0
    for value, shown in (("nan", "nan"), ("1e999", "inf"), ("-Infinity", "-inf")):
        rc, _, err = engine(capsys, "validate", recipe, "--set", f"stages.m.params.lambda={value}")
        assert rc == 2 and f"lambda must be a finite number, got {shown}" in err, err


# --- 4. QLoRA with runtime.fsdp -----------------------------------------------------------------


@pytest.mark.parametrize("where", ["recipe", "stage"])
def test_qlora_with_fsdp_is_refused_by_validate_as_the_run_refuses_it(
        where, tmp_path, tiny_model, text_file, make_context, capsys):
    pytest.importorskip("bitsandbytes", reason="lora.quantize needs bitsandbytes (lingoforge[8bit])")
    from engine.api import DataSource, ModelArtifact, StageInputs
    from engine.core.errors import TrainingError
    from engine_plugins.ct import CT

    lora = {"r": 4, "quantize": "4bit"}
    stage = ct_stage(text_file, lora=lora)
    if where == "stage":
        stage["runtime"] = {"fsdp": True}
    recipe = write_recipe(tmp_path / "r.yaml", "r", {"base": tiny_model}, [stage])
    if where == "recipe":
        import yaml

        body = yaml.safe_load(recipe.read_text())
        recipe.write_text(yaml.safe_dump({**body, "runtime": {"fsdp": True}}, sort_keys=False))
    rc, _, err = engine(capsys, "validate", recipe)
    assert rc == 2, err
    (line,) = error_lines(err)
    with pytest.raises(TrainingError) as refused:  # what the run said, only once it ran
        CT().run(make_context("ct", fsdp=True),
                 StageInputs(model=ModelArtifact("base", tiny_model), data=[DataSource(text_file)]),
                 CT.Params(steps=1, batch_size=2, seq_len=16, lora=lora))
    assert line == f"error: {recipe}: {refused.value}"
    assert "lora.quantize holds the base in 4 bits, which runtime.fsdp cannot shard" in line
    # without fsdp, or without quantize, it validates
    stage.pop("runtime", None)
    write_recipe(tmp_path / "ok.yaml", "ok", {"base": tiny_model}, [stage])
    assert engine(capsys, "validate", tmp_path / "ok.yaml")[0] == 0
    plain = ct_stage(text_file, lora={"r": 4})
    plain["runtime"] = {"fsdp": True}
    write_recipe(tmp_path / "plain.yaml", "plain", {"base": tiny_model}, [plain])
    assert engine(capsys, "validate", tmp_path / "plain.yaml")[0] == 0


# --- 5. coverage of a file without text ----------------------------------------------------------


@pytest.mark.parametrize("content", ["", "\n\n   \n"])
def test_coverage_of_a_file_without_text_says_so(content, tmp_path, tiny_model, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text(content)
    rc, out, err = engine(capsys, "coverage", "--tokenizer", tiny_model, "--data", empty)
    assert rc == 0 and "no poorly covered text" not in err, err
    assert f"warning: {empty}: holds no text" in err
    rc, out, _ = engine(capsys, "coverage", "--tokenizer", tiny_model, "--data", empty, "--json")
    assert json.loads(out)["warnings"] == [f"{empty}: holds no text (no words to measure the "
                                           "tokenizer's coverage on)"]


@pytest.mark.parametrize("name, content", [("blank.txt", "\n  \n\n"),
                                           ("empty.jsonl", '{"text": ""}\n{"text": "   "}\n')])
def test_validate_and_coverage_say_a_training_file_holds_no_text(name, content, tmp_path, tiny_model,
                                                                 text_file, capsys):
    (tmp_path / name).write_text(content)
    shutil.copy(text_file, tmp_path / "en.txt")
    ct = ct_stage(name)
    ct["data"] = [{"path": name, "language": "xx"}, {"path": "en.txt", "language": "en"}]
    recipe = write_recipe(tmp_path / "r.yaml", "r", {"base": tiny_model}, [ct])
    expected = f"stage 'ct': data {tmp_path / name} holds no text"
    for command in ("validate", "coverage"):
        rc, _, err = engine(capsys, command, recipe)
        assert rc == 0, err
        assert [line for line in err.splitlines() if "holds no text" in line] == \
            [f"warning: {expected} (no words to measure the tokenizer's coverage on)"], err
        assert "ok no poorly covered text" not in err


def test_no_text_is_never_the_reference_language(tmp_path, tiny_model, capsys):
    from engine.models.tokenizer import coverage

    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "ru.txt").write_text("Привет мир это проверка текста\nЕщё одна строка текста\n" * 5)
    ct = ct_stage("ru.txt")
    ct["data"] = [{"path": "blank.txt", "language": "xx"}, {"path": "ru.txt", "language": "ru"}]
    recipe = write_recipe(tmp_path / "r.yaml", "r", {"base": tiny_model}, [ct])
    rc, _, err = engine(capsys, "validate", recipe)  # a ZeroDivisionError before
    assert rc == 0, err
    assert "blank.txt holds no text" in err and "covers 'ru'" in err and "your xx data" not in err
    empty = coverage.Coverage(0, 0, 0, 0, 0, 0, 0)
    assert coverage.no_text(empty) and coverage.poor_coverage(empty) == [coverage.NO_TEXT]
    some = coverage.Coverage(1, 10, 20, 50, 15, 0, 1)  # 75% single bytes: poor
    assert coverage.poor_coverage(some, empty) == coverage.poor_coverage(some)


# --- 6. more threads than cores ------------------------------------------------------------------


def test_threads_above_the_cores_are_capped_with_a_warning(tmp_path, tiny_model, text_file, capsys,
                                                          monkeypatch):
    import torch
    import yaml

    from engine.run import threads

    monkeypatch.setattr(threads, "available_cpus", lambda: 2)
    stage = ct_stage(text_file)
    stage["runtime"] = {"threads": 3}
    recipe = write_recipe(tmp_path / "r.yaml", "r", {"base": tiny_model}, [stage])
    body = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump({**body, "runtime": {"threads": 4096}}, sort_keys=False))
    rc, _, err = engine(capsys, "validate", recipe)
    assert rc == 0, err
    assert [line for line in err.splitlines() if "runtime.threads" in line] == [
        f"warning: {recipe}: runtime.threads: 4096 is more than the 2 cores this process may use "
        "(os.sched_getaffinity); 2 threads are used instead",
        f"warning: {recipe}: stage 'ct': runtime.threads: 3 is more than the 2 cores this process "
        "may use (os.sched_getaffinity); 2 threads are used instead"]
    before = torch.get_num_threads()
    rc, _, err = engine(capsys, "run", recipe, "--workdir", tmp_path / "w")
    assert rc == 0, err
    record = json.loads((tmp_path / "w" / "report.json").read_text())["stages"][0]["threads"]
    assert record["setting"] == 3 and record["intra_op"] == 2
    assert record["reason"] == "set in the recipe to 3, capped at the 2 cores available"
    assert torch.get_num_threads() == before
    assert threads.capped_threads(2, 2) == (2, "set in the recipe")
