"""Merge search across processes: two worker processes on one study, a search killed
mid-trial and resumed, Ctrl-C, and a second run on the same workdir. Real processes, a real
SQLite study, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine.core.errors import EngineError
from engine.testing.recipes import run_recipe

WORDS = ["cat", "dog", "mat", "park", "sky", "blue", "small", "model", "text", "words"]


def _dev(path: Path, n: int) -> Path:
    rows = [{"prompt": f"question {i} what is the {WORDS[i % 10]} of the {WORDS[(i * 7 + 3) % 10]} answer",
             "choices": [f" {WORDS[(i + k) % 10]}" for k in range(3)], "label": i % 3} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, family: dict[str, Path], *, trials: int, workers: int = 1, items: int = 16) -> Path:
    body = {
        "name": "search-processes",
        "models": {k: {"path": str(v)} for k, v in family.items()},
        "stages": [{"name": "searched", "stage": "merge", "plugin": "task-arithmetic", "base": "base",
                    "models": ["a", "b"],
                    "search": {"space": {"weight": {"a": [0.0, 1.0], "b": [0.0, 1.0]}},
                               "evaluate": [{"plugin": "task-accuracy",
                                             "data": {"path": str(_dev(tmp_path / "dev.jsonl", items)),
                                                      "language": "dev"}}],
                               "objectives": [{"metric": "acc/dev"}], "trials": trials,
                               "workers": workers, "prune": False, "startup_trials": 2}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def _trials(db: Path, *, drawn: bool = False) -> dict[int, str]:
    """Trial number -> state (``drawn``: only trials whose params are drawn)."""
    if not db.is_file():
        return {}
    query = "SELECT number, state FROM trials"
    if drawn:
        query += " WHERE trial_id IN (SELECT trial_id FROM trial_params)"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            return dict(con.execute(query).fetchall())
    except sqlite3.OperationalError:  # the tables are not created yet
        return {}


def _start(recipe: Path, workdir: Path) -> subprocess.Popen:
    # SIGINT back to its default: a pytest-xdist worker ignores it, and a child that starts
    # with SIGINT ignored gets no KeyboardInterrupt from Python
    return subprocess.Popen([sys.executable, "-m", "engine", "run", str(recipe), "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, db: Path, complete: int, timeout: float = 240) -> dict[int, str]:
    """Until the study holds ``complete`` finished trials and one running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = _trials(db, drawn=True)  # a running trial with its params drawn
        if sum(s == "COMPLETE" for s in states.values()) >= complete and "RUNNING" in states.values():
            return states
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended before {complete} trials: {err[-2000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the search did not reach the trials in time")


def _notes(report: dict) -> dict:
    return next(s for s in report["stages"] if s["name"] == "searched")["notes"]["search"]


@pytest.mark.slow
def test_a_search_killed_mid_trial_resumes_without_losing_a_finished_trial(tiny_model_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_family, trials=10, items=64)
    workdir = tmp_path / "w"
    db = workdir / ".search" / "searched.db"
    proc = _start(recipe, workdir)
    _wait_for(proc, db, complete=3)
    # a second run on the same workdir meanwhile: refused by the workdir lock
    with pytest.raises(EngineError, match="(?i)lock|in use|another"):
        run_recipe(recipe, workdir)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _trials(db, drawn=True)
    running = [n for n, s in before.items() if s == "RUNNING"]
    assert running, before  # killed mid-trial
    import optuna

    summaries = optuna.get_all_study_summaries(f"sqlite:///{db}")
    study = optuna.load_study(study_name=summaries[0].study_name, storage=f"sqlite:///{db}")
    finished = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}

    notes = _notes(run_recipe(recipe, workdir))
    by_number = {t["number"]: t for t in notes["trials"]}
    for number, values in finished.items():  # every finished trial kept, with its values
        assert by_number[number]["state"] == "complete" and by_number[number]["values"] == values
    assert notes["reused"] == len(finished)
    retried = [t for t in notes["trials"] if t.get("retry_of") in running]
    assert retried and retried[0]["state"] == "complete"
    counted = [t for t in notes["trials"] if t["state"] in ("complete", "pruned")]
    assert len(counted) == 10


@pytest.mark.slow
def test_ctrl_c_keeps_the_study_and_prints_the_command_that_resumes(tiny_model_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_family, trials=10, items=64)
    workdir = tmp_path / "w"
    db = workdir / ".search" / "searched.db"
    proc = _start(recipe, workdir)
    _wait_for(proc, db, complete=2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "search interrupted: its study is kept" in err and "resume with:" in (out + err)
    done = sum(s == "COMPLETE" for s in _trials(db).values())
    assert done >= 2
    notes = _notes(run_recipe(recipe, workdir))
    assert notes["reused"] >= 2 and len([t for t in notes["trials"] if t["state"] == "complete"]) >= 10


@pytest.mark.slow
def test_two_worker_processes_share_one_study(tiny_model_family, tmp_path):
    recipe = _recipe(tmp_path, tiny_model_family, trials=14, workers=2, items=160)
    notes = _notes(run_recipe(recipe, tmp_path / "w"))
    workers = {t["worker"] for t in notes["trials"]}
    assert len(workers) == 2, notes["trials"]  # the run's own process and one spawned worker
    numbers = [t["number"] for t in notes["trials"]]
    assert sorted(numbers) == list(range(len(numbers)))
    counted = [t for t in notes["trials"] if t["state"] in ("complete", "pruned")]
    assert 14 <= len(counted) <= 15  # the budget, or one over: both may start the last trial
