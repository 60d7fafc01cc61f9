"""engine status, engine cache ls/prune, engine run --dry-run/--only/--from, and Ctrl-C."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import ct_stage, line_count_stage, write_recipe

from engine.cli.commands import main


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def recipe(tmp_path, tiny_model, text_file, test_plugin) -> Path:
    data = tmp_path / "lum.txt"
    data.write_text(text_file.read_text())
    return write_recipe(tmp_path / "ops.yaml", "ops", {"base": tiny_model},
                        [ct_stage("lum.txt"), line_count_stage("lum.txt", ["base", "ct"])])


def status(capsys, recipe: Path, work: Path, *sets: str) -> dict:
    args = ["status", str(recipe), "--workdir", str(work), "--json"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    out["by"] = {s["name"]: s for s in out["stages"]}
    return out


def engine_run(capsys, recipe: Path, work: Path, *extra: str) -> tuple[int, str, str]:
    rc = main(["run", str(recipe), "--workdir", str(work), *extra])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_status_never_run_up_to_date_available_and_why_stale(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    st = status(capsys, recipe, work)
    assert [s["state"] for s in st["stages"]] == ["never run", "never run"]
    assert st["would_run"] == ["ct", "scores"]
    assert engine_run(capsys, recipe, work)[0] == 0
    st = status(capsys, recipe, work)
    assert [s["state"] for s in st["stages"]] == ["up to date", "up to date"] and st["would_run"] == []
    st = status(capsys, recipe, work, "stages.ct.params.steps=3", "stages.ct.params.lr=0.01")
    assert st["by"]["ct"]["state"] == "stale"
    assert st["by"]["ct"]["reasons"] == ["params.lr 0.001 -> 0.01", "params.steps 2 -> 3"]
    assert st["by"]["scores"]["reasons"] == ["input ct changed"]
    assert st["would_run"] == ["ct", "scores"]
    assert engine_run(capsys, recipe, work, "--set", "stages.ct.params.steps=3")[0] == 0
    st = status(capsys, recipe, work)  # the first version is kept: it would be reused
    assert [(s["state"], s["action"]) for s in st["stages"]] == [("available", "reuse")] * 2
    (tmp_path / "lum.txt").write_text((tmp_path / "lum.txt").read_text() + "one more line\n")
    st = status(capsys, recipe, work, "stages.ct.params.steps=3")
    assert st["by"]["ct"]["reasons"] == ["data lum.txt changed"]
    assert st["by"]["scores"]["reasons"] == ["input ct changed", "data lum.txt changed"]
    st = status(capsys, recipe, work, "stages.ct.params.steps=3", "stages.scores.data.weight=2")
    assert st["by"]["scores"]["reasons"][-1] == "data lum.txt changed (weight 1.0 -> 2.0)"
    assert main(["status", str(recipe), "--workdir", str(work)]) == 0
    text = capsys.readouterr().out
    assert "ct      stale       run      (ct): params.steps 3 -> 2; data lum.txt changed" in text
    assert text.strip().endswith("would run: ct, scores")


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.lstat().st_mtime_ns, p.lstat().st_size)
            for p in sorted(folder.rglob("*"))}


def test_dry_run_prints_the_status_and_writes_nothing(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    rc, out, _ = engine_run(capsys, recipe, work, "--dry-run")
    assert rc == 0 and out.strip().endswith("would run: ct, scores")
    assert not work.exists()
    assert engine_run(capsys, recipe, work)[0] == 0
    before = _tree(work)
    rc, out, _ = engine_run(capsys, recipe, work, "--dry-run", "--set", "stages.ct.params.steps=3")
    assert rc == 0 and "params.steps 2 -> 3" in out and "would run: ct, scores" in out
    rc, out, _ = engine_run(capsys, recipe, work, "--dry-run", "--from", "scores")
    assert "scores  up to date  run      (line-count): forced by --from" in out
    assert out.strip().endswith("would run: scores")
    assert _tree(work) == before


def test_only_with_a_missing_input_names_it_and_the_command(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    rc, _, err = engine_run(capsys, recipe, work, "--only", "scores")
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines[0] == "error: --only scores: input 'ct' has no cached version for this recipe (never run)"
    command = f"engine run {recipe} --workdir {work} --only ct"
    assert lines[1] == f"error: produce it first: {command}"
    assert not (work / "scores").exists()
    assert main(shlex.split(command)[1:]) == 0  # the command it gave produces the input
    report = json.loads((work / "report.json").read_text())
    assert [r["name"] for r in report["stages"]] == ["ct"]
    capsys.readouterr()
    rc, _, err = engine_run(capsys, recipe, work, "--only", "scores")
    assert rc == 0, err
    report = json.loads((work / "report.json").read_text())
    assert [(r["name"], r["cache"]) for r in report["stages"]] == [("ct", "hit"), ("scores", "miss")]


def test_from_reruns_downstream_from_the_cli(recipe, tmp_path, capsys):
    work = tmp_path / "w"
    assert engine_run(capsys, recipe, work)[0] == 0
    assert engine_run(capsys, recipe, work, "--from", "ct")[0] == 0
    report = json.loads((work / "report.json").read_text())
    assert [r["cache"] for r in report["stages"]] == ["miss", "miss"]
    assert report["reused_wall_time_s"] == 0


def test_cache_ls_and_prune_free_the_old_versions(recipe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    work = tmp_path / "w"
    for steps in (2, 3, 4):
        assert engine_run(capsys, recipe, work, "--set", f"stages.ct.params.steps={steps}")[0] == 0
    assert main(["cache", "ls", str(recipe), "--workdir", str(work), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["versions"]
    ct = [r for r in rows if r["stage"] == "ct"]
    assert len(ct) == 3 and [r["current"] for r in ct] == [False, False, True]
    assert all(r["size_bytes"] > 0 and r["wall_time_s"] > 0 for r in ct)
    assert main(["cache", "ls", "--workdir", str(work)]) == 0
    assert "6 kept version(s)" in capsys.readouterr().out
    # a leftover checkpoint of a finished version is orphaned
    orphan = work / ".checkpoints" / "ct" / ct[-1]["fingerprint"] / "step-1"
    orphan.mkdir(parents=True)
    (orphan / "state.json").write_text("{}")
    assert main(["cache", "prune", "--workdir", str(work), "--keep", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("would remove") == 3 and orphan.is_dir()  # ct and scores oldest, checkpoint
    old = [r for r in rows if not r["current"]]
    assert all(Path(r["path"]).is_dir() for r in old)
    assert main(["cache", "prune", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    freed = sum(r["size_bytes"] for r in old) + len("{}")
    assert out.strip().splitlines()[-1].startswith(f"freed {freed} bytes")
    assert not any(Path(r["path"]).exists() for r in old) and not orphan.exists()
    assert main(["cache", "ls", "--workdir", str(work), "--json"]) == 0
    left = json.loads(capsys.readouterr().out)["versions"]
    assert [(r["stage"], r["current"]) for r in left] == [("ct", True), ("scores", True)]
    AutoModelForCausalLM.from_pretrained(work / "ct")  # the current one is whole


def test_ctrl_c_during_training_says_what_was_kept_and_how_to_resume(tmp_path, tiny_model, text_file):
    recipe = tmp_path / "sigint.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: sigint
        models:
          base: {{path: {tiny_model}}}
        stages:
          - {{name: picked, stage: select-layers, plugin: first-last, model: base}}
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text_file}}}
            params: {{steps: 100, batch_size: 1, seq_len: 8, checkpoint_every: 3}}
        """))
    work = tmp_path / "w"
    argv = ["run", str(recipe), "--workdir", str(work), "--set", "stages.ct.params.steps=400"]
    env = {**os.environ, "COLUMNS": "250", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(work.glob(".checkpoints/ct/*/step-*/state.json")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.splitlines()
    assert "interrupted" in lines
    assert f"kept: picked (finished) in {work / 'picked'}" in lines
    [ckpt] = [line for line in lines if line.startswith("kept: ct checkpoint at step ")]
    step = int(ckpt.split("step ")[1].split()[0])
    assert step % 3 == 0 and " of 400 in " in ckpt and ckpt.endswith("the next run resumes from it")
    assert (work / ".checkpoints").is_dir() and not (work / "ct").exists()
    [resume] = [line for line in lines if line.startswith("resume with: ")]
    command = shlex.split(resume.removeprefix("resume with: "))
    assert command == ["engine", *argv]
    # the command resumes from that checkpoint: only the rest of the steps run
    again = subprocess.run([sys.executable, "-m", "engine.cli", *command[1:]], capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode == 0, again.stderr
    report = json.loads((work / "report.json").read_text())
    ct = report["stages"][1]
    assert report["stages"][0]["cache"] == "hit" and ct["cache"] == "miss"
    assert ct["notes"]["resumed_from_step"] == step


def _doc_blocks(text: str, lang: str) -> list[str]:
    parts = text.split(f"```{lang}\n")[1:]
    return [p.split("```", 1)[0] for p in parts]


def test_the_operations_guide_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/operations.md's example: its recipe and commands, with their printed status lines."""
    doc = (Path(__file__).parent.parent.parent / "docs" / "operations.md").read_text()
    (tmp_path / "ops-demo.yaml").write_text(_doc_blocks(doc, "yaml")[0])
    monkeypatch.chdir(tmp_path)
    session = _doc_blocks(doc, "console")[0].splitlines()
    commands = [(i, line[2:].split("#")[0].strip()) for i, line in enumerate(session)
                if line.startswith("$ ")]
    for n, (i, command) in enumerate(commands):
        end = commands[n + 1][0] if n + 1 < len(commands) else len(session)
        shown = session[i + 1:end]
        assert main(shlex.split(command)[1:]) == 0, command
        out = capsys.readouterr().out.splitlines()
        if not shown:  # engine run: its tables are not shown
            continue
        if "..." not in shown:
            assert out == shown, command
        else:  # fingerprints, dates and sizes vary by machine: the lines' shape
            assert len(out) >= len(shown) - 1, command
            assert out[0].split()[:2] == shown[0].split()[:2], command
            if shown[-1] != "...":
                assert out[-1].split()[0] == shown[-1].split()[0], command
    assert out[-1].startswith("freed ") and int(out[-1].split()[1]) > 0
    assert "6 kept version(s)" in "\n".join(session)
    # the --only refusal, as the guide shows it
    only = next(b for b in _doc_blocks(doc, "console") if "--only scores" in b).strip().splitlines()
    assert main(shlex.split(only[0].lstrip("$ "))[1:]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err == [line.strip() for line in only[1:]]
