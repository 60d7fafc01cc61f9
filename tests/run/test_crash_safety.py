"""Crash safety with real processes: SIGKILL at random moments, and two runs on one workdir.

A killed ``engine run`` must leave nothing that looks finished when it is not, and running
the recipe again must end bit-identical to a run that was never interrupted (training
resumes from its checkpoint; merge and evaluation redo their stage).

Starting a Python process that imports torch and transformers costs about two CPU seconds,
more than a tiny stage. So the kills go to children of a *fork server*: this module, run
as a script (``python tests/run/test_crash_safety.py serve``), imports the engine once and
then forks one child per command; each child runs ``engine.cli.main`` and the server
SIGKILLs it after the delay the test asks for. Each child is a real process killed with
kill -9 mid-write, exactly as an OOM killer or a pre-empted node would.

The moments are drawn uniformly over the duration of an uninterrupted run of the same
scenario (measured first), from a seeded generator: a failing trial names its seed and
delay, and re-running the test repeats it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

SEED = 20261201
#: (scenario, kills): at least 30 in all, most where the most state is (training)
TRIALS = (("train", 12), ("merge", 9), ("evaluate", 9))
STAGES = ("ct", "merged", "scores")


# --- the fork server (this file run as a script) ------------------------------------------------


def serve() -> None:
    """Read JSON commands on stdin, fork a child per command, answer on stdout."""
    import torch

    torch.set_num_threads(1)  # one reduction order; and no OpenMP pool exists at fork time
    import engine.cli.commands
    import engine.run.runner  # noqa: F401 - imported once here, not in every child
    from engine.registry.manager import load_plugins

    load_plugins()
    # transformers imports lazily: touch what the stages use, so that no child pays for it
    import accelerate
    import transformers
    from transformers.models.llama import modeling_llama

    import engine.evaluation.driver
    import engine.merging.execute
    import engine.training.loop

    _ = (transformers.AutoTokenizer, transformers.AutoModelForCausalLM, transformers.LlamaConfig,
         transformers.PreTrainedTokenizerFast, modeling_llama.LlamaForCausalLM,
         accelerate.Accelerator, engine.evaluation, engine.merging.execute, engine.training)

    for line in sys.stdin:
        cmd = json.loads(line)
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the child: run the command, silently
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                rc = engine.cli.main(cmd["argv"])
            except BaseException:  # noqa: BLE001 - reported as its own status
                rc = 99
            os._exit(rc)
        killed = False
        kill_after = cmd.get("kill_after")
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if kill_after is not None and time.perf_counter() - t0 >= kill_after:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                killed = True
                break
            time.sleep(0.002)
        reply = {"rc": os.waitstatus_to_exitcode(status), "killed": killed,
                 "elapsed": time.perf_counter() - t0}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


class ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def run(self, argv: list[str], kill_after: float | None = None) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"argv": argv, "kill_after": kill_after}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the fork server died"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


# --- what "complete" means ----------------------------------------------------------------------


def _tensors(folder: Path) -> dict[str, Any]:
    from helpers import state

    return state(folder)


def assert_same_output(stage: str, got: Path, ref: Path, why: str) -> None:
    """A finished stage folder equals the reference run's: the same tensors bit for bit and
    config (models), the same metrics (evaluation)."""
    import torch

    from engine.run.runner import METRICS_FILE, STAGE_FILE

    assert (got / STAGE_FILE).is_file(), f"{why}: {got} has no completion marker"
    if (ref / METRICS_FILE).is_file():
        assert json.loads((got / METRICS_FILE).read_text()) == \
            json.loads((ref / METRICS_FILE).read_text()), f"{why}: {stage} metrics differ"
        return
    mine, theirs = _tensors(got), _tensors(ref)
    assert mine.keys() == theirs.keys(), f"{why}: {stage} tensor names differ"
    for name, tensor in theirs.items():
        assert torch.equal(mine[name], tensor), f"{why}: {stage} tensor {name!r} differs"
    assert json.loads((got / "config.json").read_text()) == \
        json.loads((ref / "config.json").read_text()), f"{why}: {stage} config.json differs"


def assert_nothing_false(work: Path, ref: Path, why: str) -> bool:
    """After a kill: every visible stage folder is complete (equal to the reference's);
    report.json, when present, is whole JSON. Returns whether a training checkpoint was
    left to resume from."""
    visible = [p for p in work.iterdir() if p.is_dir() and not p.name.startswith(".")
               and p.name not in ("logs", "report")]  # run logs and charts: not stages
    for folder in visible:
        assert folder.name in STAGES, f"{why}: unexpected folder {folder}"
        assert_same_output(folder.name, folder, ref / folder.name, why)
    report = work / "report.json"
    if report.exists():
        json.loads(report.read_text())  # never half-written
    # resumable checkpoints hold only formats that cannot run code (no pickles); an
    # unfinished save (a hidden .tmp-step-* folder, never read) may also hold a writer's
    # scratch file, but never a pickle or a torch.save zip either
    files = [p for p in (work / ".checkpoints").rglob("*") if p.is_file()]
    done = [p for p in files if not any(part.startswith(".tmp-step-") for part in p.parts)]
    kinds = {p.suffix for p in done}
    assert kinds <= {".safetensors", ".json", ".jsonl"}, f"{why}: checkpoint files {kinds}"
    for p in files:
        assert p.suffix not in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}, f"{why}: {p}"
        assert p.read_bytes()[:4] != b"PK\x03\x04", f"{why}: {p} is a torch.save zip"
    return any(p.name == "state.json" for p in files)


# --- the trials ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    s = ForkServer()
    try:
        yield s
    finally:
        s.close()


def _recipe(folder: Path, base: Path, text: Path) -> Path:
    f = folder / "crash.yaml"
    f.write_text(textwrap.dedent(f"""
        name: crash
        runtime: {{device: cpu}}
        models:
          base: {{path: {base}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text}}}
            params: {{steps: 96, batch_size: 2, seq_len: 16, checkpoint_every: 2, log_every: 2}}
          - name: merged
            stage: merge
            plugin: ties
            base: base
            models: [ct]
            params: {{density: 0.5}}
          - name: scores
            stage: evaluate
            plugin: perplexity
            models: [merged]
            data: {{path: {text}}}
            params: {{max_length: 32}}
        """))
    return f


def _pre_state(scenario: str, ref: Path, work: Path) -> None:
    """The workdir as it is when ``scenario``'s stage is about to run."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    done = {"train": (), "merge": ("ct",), "evaluate": ("ct", "merged")}[scenario]
    for name in done:
        shutil.copytree(ref / name, work / name)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_rerun_is_bit_identical(server, tmp_path, tiny_model,
                                                              text_file):
    recipe = _recipe(tmp_path, tiny_model, text_file)
    ref = tmp_path / "ref"
    first = server.run(["run", str(recipe), "--workdir", str(ref)])
    assert first["rc"] == 0, first
    rng = random.Random(SEED)
    #: per scenario: (was it killed, was its own stage's output in place after the kill)
    outcomes: dict[str, list[tuple[bool, bool]]] = {}
    own = dict(zip(("train", "merge", "evaluate"), STAGES))
    resumed = 0  # trials whose re-run continued from a training checkpoint
    work = tmp_path / "work"
    for scenario, kills in TRIALS:
        _pre_state(scenario, ref, work)
        clean = server.run(["run", str(recipe), "--workdir", str(work)])
        assert clean["rc"] == 0, (scenario, clean)
        duration = clean["elapsed"]
        # the window in which the scenario's own stage runs: from the start until it ends
        # (start-up plus the stages before it; nothing before it runs here); every other
        # kill lands there, so that the trials that matter most -- a kill inside a
        # training stage with checkpoints on disk -- do not depend on how long the later
        # stages happen to take on this machine
        stages = json.loads((work / "report.json").read_text())["stages"]
        startup = max(0.0, duration - sum(r["wall_time_s"] for r in stages))
        own_end = startup + next(r["wall_time_s"] for r in stages if r["name"] == own[scenario])
        for trial in range(kills):
            delay = rng.uniform(0.0, own_end if trial % 2 else duration)
            why = f"seed {SEED} {scenario} trial {trial} killed after {delay:.3f}s of {duration:.3f}s"
            _pre_state(scenario, ref, work)
            killed = server.run(["run", str(recipe), "--workdir", str(work)], kill_after=delay)
            assert killed["killed"] or killed["rc"] == 0, (why, killed)
            resumable = assert_nothing_false(work, ref, why)
            outcomes.setdefault(scenario, []).append((killed["killed"],
                                                      (work / own[scenario]).is_dir()))
            resumed += resumable
            again = server.run(["run", str(recipe), "--workdir", str(work)])
            assert again["rc"] == 0, (why, again)
            for stage in STAGES:
                assert_same_output(stage, work / stage, ref / stage, why + ", then re-run")
            assert json.loads((work / "report.json").read_text())["finished"] is True
            leftovers = [p.name for p in work.iterdir() if p.name.startswith(".")]
            # the kept versions and the evaluation cache alone (no temporaries, no checkpoints)
            # (and the workdir's marker of the names the engine claimed)
            assert sorted(leftovers) == [".eval-cache", ".lingoforge-workdir.json", ".stages"], (why, leftovers)
            kept = [p.name for p in (work / ".stages").rglob("*") if p.name.startswith(".")
                    and p.name not in (".lingoforge-stage.json", ".lingoforge-output.json")]
            assert kept == [], (why, kept)
    # the kills were real: most landed while the process ran, and some before the
    # scenario's own stage was in place (a stage that finished first proves nothing)
    for scenario, seen in outcomes.items():
        assert sum(k for k, _ in seen) >= len(seen) // 2, (scenario, seen)
        assert any(k and not done for k, done in seen), (scenario, seen)
    assert resumed >= 3, f"only {resumed} trials resumed from a checkpoint"


# --- two runs, one workdir ----------------------------------------------------------------------


def _slow_recipe(folder: Path, base: Path, text: Path) -> Path:
    f = folder / "slow.yaml"
    f.write_text(textwrap.dedent(f"""
        name: slow
        models:
          base: {{path: {base}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {text}}}
            params: {{steps: 100000, batch_size: 1, seq_len: 8, checkpoint_every: 0}}
        """))
    return f


def _engine(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "80"})


@pytest.mark.slow
def test_second_run_on_a_busy_workdir_is_refused_with_the_holders_pid(tmp_path, tiny_model,
                                                                       text_file):
    from engine.run.lock import LOCK_FILE

    recipe = _slow_recipe(tmp_path, tiny_model, text_file)
    work = tmp_path / "w"
    first = _engine("run", str(recipe), "--workdir", str(work))
    try:
        deadline = time.monotonic() + 60
        while not [p for p in work.glob(".ct.tmp-*")]:  # the first run is inside its stage
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first run never started its stage"
            time.sleep(0.05)
        temporaries = sorted(p.name for p in work.glob(".ct.tmp-*"))
        second = _engine("run", str(recipe), "--workdir", str(work))
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert errors == [f"error: workdir {work} is in use by pid {first.pid} (another engine "
                          "run); wait for it to finish or pass another --workdir"], err
        assert "Traceback" not in err
        # the refused run touched nothing: the first one's temporary folder is still there
        assert sorted(p.name for p in work.glob(".ct.tmp-*")) == temporaries
        assert (work / LOCK_FILE).read_text().strip() == str(first.pid)
    finally:
        first.kill()  # SIGKILL: the kernel releases the flock with the process
        first.communicate()
    # a run after the holder was killed takes the workdir (no stale lock), and cleans up
    quick = tmp_path / "quick.yaml"
    quick.write_text(textwrap.dedent(f"""
        name: quick
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: picked
            stage: select-layers
            plugin: first-last
            model: base
        """))
    third = _engine("run", str(quick), "--workdir", str(work))
    _, err = third.communicate(timeout=60)
    assert third.returncode == 0, err
    assert not list(work.glob(".ct.tmp-*")) and not (work / LOCK_FILE).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    from engine.core.errors import WorkdirBusy
    from engine.run.lock import LOCK_FILE, WorkdirLock

    with WorkdirLock(tmp_path):
        with pytest.raises(WorkdirBusy, match=f"in use by pid {os.getpid()}"):
            WorkdirLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with WorkdirLock(tmp_path):  # free again
        pass


if __name__ == "__main__" and sys.argv[1:] == ["serve"]:
    serve()
