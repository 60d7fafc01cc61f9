"""Outputs never delete what the engine did not write (engine/core/outputs.py, engine/run/workdir.py).

Each promise keeps a user's file beside (or inside) the output and checks it is still
there, byte for byte, after the command; the property test at the top walks every relation
an output path can have to an input (same, parent, child, sibling, a link to either) and
every state the output can be in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ct_stage, line_count_stage, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli.commands import main as engine_main
from engine.core import outputs
from engine.core.errors import OutputRefused
from engine.run import stage_cache
from engine.run.workdir import WORKDIR_FILE


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file (its bytes) and link (its target) under ``root``."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_bytes()
    return found


def kept(before: dict[str, bytes | str], root: Path) -> None:
    """Everything of ``before`` is still under ``root``, unchanged."""
    after = snapshot(root)
    lost = [k for k in before if after.get(k) != before[k]]
    assert not lost, f"lost or changed: {lost}"


# --- the mechanism, over every path relation ----------------------------------------------------

RELATIONS = ["same", "parent", "child", "sibling", "link-to-input", "link-to-parent", "apart"]
STATES = ["absent", "empty", "user-files", "engine", "engine+user-file", "file"]


def _layout(tmp: Path, relation: str, state: str) -> tuple[Path, Path]:
    """An input folder with a file, and the output path in ``relation`` to it and ``state``."""
    inp = tmp / "inputs" / "model"
    inp.mkdir(parents=True)
    (inp / "weights.bin").write_bytes(b"input")
    (tmp / "inputs" / "NOTES.txt").write_text("a user's notes")
    out = {"same": inp, "parent": inp.parent, "child": inp / "out", "sibling": inp.parent / "out",
           "link-to-input": tmp / "link", "link-to-parent": tmp / "link", "apart": tmp / "elsewhere" / "out"}[relation]
    if relation == "link-to-input":
        out.symlink_to(inp)
    elif relation == "link-to-parent":
        out.symlink_to(inp.parent)
    elif relation in ("child", "sibling", "apart"):
        out.parent.mkdir(parents=True, exist_ok=True)
        if state == "file":
            out.write_text("a user's file")
        elif state != "absent":
            out.mkdir()
            if state in ("user-files", "engine+user-file"):
                (out / "thesis.tex").write_text("a user's thesis")
            if state in ("engine", "engine+user-file"):
                (out / "model.bin").write_bytes(b"old output")
                listed = ["model.bin"] if state == "engine+user-file" else None
                outputs.mark_output(out, "test")
                if listed is not None:  # the user dropped a file in after the engine wrote it
                    owner = json.loads((out / outputs.OWNER_FILE).read_text())
                    owner["entries"] = listed
                    (out / outputs.OWNER_FILE).write_text(json.dumps(owner))
    return inp, out


def write_output(out: Path, inputs: list[tuple[str, Path]], overwrite: bool) -> None:
    """What every writing command does: refuse early, write a temporary folder, publish."""
    outputs.check_disjoint(out, inputs, flag="--out")
    outputs.check_target(out, flag="--out", overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = outputs.temp_dir(f".{out.name}.tmp-", out.parent)
    (tmp / "model.bin").write_bytes(b"new output")
    outputs.mark_output(tmp, "test")
    outputs.publish(tmp, out, flag="--out", overwrite=overwrite)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relation=st.sampled_from(RELATIONS), state=st.sampled_from(STATES), overwrite=st.booleans())
def test_an_output_never_costs_a_file_the_engine_did_not_write(tmp_path_factory, relation, state,
                                                               overwrite):
    tmp = tmp_path_factory.mktemp("rel")
    inp, out = _layout(tmp, relation, state)
    overlapping = relation in ("same", "parent", "child", "link-to-input", "link-to-parent")
    old_output = set()
    if not overlapping and state in ("engine", "engine+user-file"):
        rel = out.relative_to(tmp).as_posix()
        old_output = {f"{rel}/model.bin", f"{rel}/{outputs.OWNER_FILE}"}
    protected = {k: v for k, v in snapshot(tmp).items() if k not in old_output}
    try:
        write_output(out, [("--model model", inp)], overwrite)
        wrote = True
    except OutputRefused as exc:
        wrote = False
        assert str(out) in str(exc)
    allowed = not overlapping and (state in ("absent", "empty") or (state == "engine" and overwrite))
    assert wrote == allowed, (relation, state, overwrite)
    kept(protected, tmp)
    if wrote:
        assert (out / "model.bin").read_bytes() == b"new output"
    if out.parent.exists():
        assert not [p for p in out.parent.iterdir() if outputs.is_engine_temp(p)]  # none left


def test_an_engine_output_without_its_list_is_a_legacy_stage_folder(tmp_path):
    legacy = tmp_path / "old-merge"
    legacy.mkdir()
    (legacy / ".lingoforge-stage.json").write_text("{}")
    assert outputs.is_engine_output(legacy) and outputs.foreign_entries(legacy) == []
    outputs.check_target(legacy, flag="--out", overwrite=True)  # an earlier version's output
    with pytest.raises(OutputRefused, match="pass --overwrite"):
        outputs.check_target(legacy, flag="--out", overwrite=False)


def test_publish_checks_again_under_the_lock(tmp_path):
    """Two writers racing to one output without --overwrite: the second finds the first's
    output at its rename and is refused; the first's output stays."""
    out = tmp_path / "out"
    outputs.check_target(out, flag="--out", overwrite=False)  # both writers pass the early check
    first, second = (outputs.temp_dir(".out.tmp-", tmp_path) for _ in range(2))
    (first / "w").write_text("first")
    (second / "w").write_text("second")
    for tmp in (first, second):
        outputs.mark_output(tmp, "test")
    outputs.publish(first, out, flag="--out", overwrite=False)
    with pytest.raises(OutputRefused, match="exists; pass --overwrite"):
        outputs.publish(second, out, flag="--out", overwrite=False)
    assert (out / "w").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the loser's temporary is gone


class Killed(BaseException):
    """A kill, as the tests below simulate one."""


class KillAfter:
    """Counts the file-system steps of the wrapped functions: raises :class:`Killed` after
    step ``stop_at`` and makes every later call do nothing (a dead process runs no
    clean-up)."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at, self.steps = stop_at, 0

    def wrap(self, fn):
        def wrapped(*args, **kwargs):
            if self.steps >= self.stop_at:
                return None
            result = fn(*args, **kwargs)
            self.steps += 1
            if self.steps == self.stop_at:
                raise Killed
            return result
        return wrapped


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "plain-renames"])
@pytest.mark.parametrize("before", ["absent", "engine"])
def test_a_kill_at_any_step_of_publish_leaves_only_marked_temporaries(tmp_path, monkeypatch, exchange,
                                                                      before):
    """Stop publish after each of its file-system steps (as a kill would) and look: whatever
    sits under a temporary name carries the engine's marker, so the next run's clean-up
    removes it (a run once left the swapped-out old charts unmarked beside report.json);
    and ``out`` holds a whole output, old or new (where renameat2 swaps them, always)."""
    real = {"rename": os.rename, "rmtree": outputs.shutil.rmtree, "unlink": Path.unlink,
            "write_text": Path.write_text, "renameat2": outputs._renameat2}

    def attempt(stop_at: int) -> bool:
        """Publish, killed after step ``stop_at``; whether publish finished first."""
        root = tmp_path / f"run{stop_at}"
        root.mkdir()
        out = root / "out"
        if before == "engine":
            out.mkdir()
            (out / "w").write_text("old")
            outputs.mark_output(out, "test")
        tmp = outputs.temp_dir(".out.tmp-", root)
        (tmp / "w").write_text("new")
        outputs.mark_output(tmp, "test")
        kill = KillAfter(stop_at)
        with monkeypatch.context() as m:
            m.setattr(outputs.os, "rename", kill.wrap(real["rename"]))
            m.setattr(outputs.shutil, "rmtree", kill.wrap(real["rmtree"]))
            m.setattr(Path, "unlink", kill.wrap(real["unlink"]))
            m.setattr(Path, "write_text", kill.wrap(real["write_text"]))
            m.setattr(outputs, "_renameat2",
                      kill.wrap(real["renameat2"]) if exchange else lambda *a: False)
            try:
                outputs.publish(tmp, out, flag="--out", overwrite=True)
                finished = True
            except Killed:
                finished = False
        if out.exists() or (before == "engine" and exchange):
            assert (out / "w").read_text() in ("old", "new")  # (plain renames: a moment without)
        for item in root.iterdir():
            if item.name.startswith(".") and ".tmp-" in item.name:
                assert outputs.is_engine_temp(item), (stop_at, item.name, sorted(os.listdir(item)))
        stage_cache.remove_stale_temporaries(root)
        assert [p.name for p in root.iterdir()] in ([], ["out"]), (stop_at, os.listdir(root))
        return finished

    stop_at = 1
    while not attempt(stop_at):
        stop_at += 1
    assert stop_at >= 2  # some step was interrupted


# --- engine extend-tokenizer --------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path, tiny_model) -> Path:
    """A copy of the tiny model in DIR/models/base, with a sibling model and a README."""
    import shutil

    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "base")
    shutil.copytree(tiny_model, models / "sibling")
    (models / "README.md").write_text("my models")
    (models / "base" / "NOTES.md").write_text("notes about base")
    return models / "base"


@pytest.fixture
def cyr(tmp_path) -> Path:
    path = tmp_path / "cyr.txt"
    path.write_text("\n".join(["привет мир как дела", "мир добрый и тихий", "дела идут хорошо"] * 30))
    return path


def extend(model: Path, data: Path, output: Path, *extra: str) -> int:
    return engine_main(["extend-tokenizer", str(model), "--data", str(data), "--tokens", "20",
                        "--output", str(output), *extra])


@pytest.mark.parametrize("where", ["parent", "model", "user-folder", "file", "symlink", "dot"])
def test_extend_tokenizer_refuses_outputs_it_did_not_write(tmp_path, model_dir, cyr, capsys, where,
                                                           monkeypatch):
    user = tmp_path / "thesis"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1")
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.chdir(model_dir.parent)
    output = {"parent": model_dir.parent, "model": model_dir, "user-folder": user,
              "file": tmp_path / "file.txt", "symlink": tmp_path / "link", "dot": Path(".")}[where]
    before = snapshot(tmp_path)
    for extra in ((), ("--overwrite",)):
        assert extend(model_dir, cyr, output, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --output") and "Traceback" not in err, err
        kept(before, tmp_path)
        assert not [p for p in tmp_path.rglob(".*tmp*")]


def test_extend_tokenizer_refuses_data_inside_the_output(tmp_path, model_dir, capsys):
    out = tmp_path / "extended"
    out.mkdir()
    data = out / "cyr.txt"
    data.write_text("привет мир\n" * 50)
    assert extend(model_dir, data, out) == 2
    assert "contains the input --data" in capsys.readouterr().err
    assert data.read_text() == "привет мир\n" * 50


def test_extend_tokenizer_replaces_only_its_own_output_and_only_with_overwrite(tmp_path, model_dir, cyr,
                                                                              capsys):
    out = tmp_path / "extended"
    assert extend(model_dir, cyr, out) == 0
    assert outputs.is_engine_output(out) and outputs.foreign_entries(out) == []
    assert extend(model_dir, cyr, out) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert extend(model_dir, cyr, out, "--overwrite") == 0
    (out / "NOTES.md").write_text("my notes on the extension")
    assert extend(model_dir, cyr, out, "--overwrite") == 2
    assert "NOTES.md" in capsys.readouterr().err
    assert (out / "NOTES.md").read_text() == "my notes on the extension"


@pytest.mark.parametrize("flags, message", [
    (["--tokens", "2147483648"], "--tokens must be at least 1 and at most 1000000"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--min-frequency", "-1"], "--min-frequency must be 0 or more"),
])
def test_extend_tokenizer_bad_numbers_are_refused_before_any_work(tmp_path, model_dir, cyr, capsys,
                                                                  flags, message):
    out = tmp_path / "extended"
    rc = engine_main(["extend-tokenizer", str(model_dir), "--data", str(cyr), "--output", str(out),
                      *flags])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".extended*"))


def test_extend_tokenizer_tokens_not_an_integer_is_a_usage_error(tmp_path, model_dir, cyr, capsys):
    with pytest.raises(SystemExit) as exc:
        engine_main(["extend-tokenizer", str(model_dir), "--data", str(cyr), "--tokens", "1e20",
                     "--output", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid int value: '1e20'" in capsys.readouterr().err


def test_two_extensions_to_one_output_at_once_leave_one_whole_output(tmp_path, model_dir, cyr):
    """Each writer has its own temporary folder; without --overwrite the later one is refused
    at its rename, and the output is one writer's whole folder."""
    out = tmp_path / "extended"
    cmd = [sys.executable, "-m", "engine", "extend-tokenizer", str(model_dir), "--data", str(cyr),
           "--tokens", "20", "--output", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "exists; pass --overwrite" in loser and "Traceback" not in loser
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- engine merge ---------------------------------------------------------------------------------


@pytest.fixture
def family_dir(tmp_path, tiny_model_family) -> Path:
    """Copies of the tiny family's base and one fine-tune in DIR, with a user's NOTES.txt."""
    import shutil

    folder = tmp_path / "DIR"
    for name in ("base", "a"):
        shutil.copytree(tiny_model_family[name], folder / name)
    (folder / "NOTES.txt").write_text("a user's notes")
    return folder


def merge(folder: Path, out: Path | str, *extra: str) -> int:
    return engine_main(["merge", "--method", "ties", "--base", str(folder / "base"), "--model",
                        str(folder / "a"), "--out", str(out), *extra])


@pytest.mark.parametrize("where", ["parent", "dot", "base", "model", "link-to-parent", "user-folder"])
def test_merge_out_never_replaces_inputs_or_user_folders(tmp_path, family_dir, capsys, monkeypatch,
                                                         where):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("chapter 1")
    (tmp_path / "link").symlink_to(family_dir)
    monkeypatch.chdir(family_dir)
    out = {"parent": family_dir, "dot": ".", "base": family_dir / "base", "model": family_dir / "a",
           "link-to-parent": tmp_path / "link", "user-folder": user}[where]
    before = snapshot(tmp_path)
    assert merge(family_dir, out, "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out") and "Traceback" not in err, err
    kept(before, tmp_path)


@pytest.mark.parametrize("where", ["report.json", ".eval-cache/0a1b.json"])
def test_a_kill_at_any_step_of_replace_file_leaves_the_file_whole_and_no_loose_temporary(
        tmp_path, monkeypatch, where):
    """report.json, report.md, the workdir's name list and evaluation-cache entries are
    replaced through outputs.replace_file. Stopped after any of its file-system steps (as
    a kill would), the file holds the old text or the new one, and what is left beside it
    is an engine-marked folder the next run's clean-up removes (a loose
    `.report.md.XXXX.tmp` file, which nothing removed, was once left by a kill)."""
    real = {"replace": os.replace, "rmtree": outputs.shutil.rmtree, "write_text": Path.write_text}

    def attempt(stop_at: int) -> bool:
        """replace_file, killed after step ``stop_at``; whether it finished first."""
        root = tmp_path / f"w{stop_at}"
        path = root / where
        path.parent.mkdir(parents=True)
        path.write_text("old")
        kill = KillAfter(stop_at)
        with monkeypatch.context() as m:
            m.setattr(outputs.os, "replace", kill.wrap(real["replace"]))
            m.setattr(outputs.shutil, "rmtree", kill.wrap(real["rmtree"]))
            m.setattr(Path, "write_text", kill.wrap(real["write_text"]))
            try:
                outputs.replace_file(path, "new")
                finished = True
            except Killed:
                finished = False
        assert path.read_text() in ("old", "new"), stop_at
        loose = [p.name for p in path.parent.iterdir()
                 if p.name != path.name and not outputs.is_engine_temp(p)]
        assert not loose, (stop_at, loose)
        stage_cache.remove_stale_temporaries(root)
        assert [p.name for p in path.parent.iterdir()] == [path.name], stop_at
        assert not finished or path.read_text() == "new"
        return finished

    stop_at = 1
    while not attempt(stop_at):
        stop_at += 1
    assert stop_at >= 4  # the marker, the file, the rename and the clean-up were each cut


def test_a_failed_swap_leaves_the_old_output_as_it_was(tmp_path, monkeypatch):
    """The old output is marked before it is swapped out; when the swap itself fails (an
    I/O error), the old output stays in place, whole and unmarked, and the new one's
    temporary is gone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "w").write_text("old")
    outputs.mark_output(out, "test")
    before = snapshot(out)
    tmp = outputs.temp_dir(".out.tmp-", tmp_path)
    (tmp / "w").write_text("new")
    outputs.mark_output(tmp, "test")

    def broken(src, dst, flags):
        raise OSError(5, "Input/output error", str(dst))

    monkeypatch.setattr(outputs, "_renameat2", broken)
    with pytest.raises(OSError, match="Input/output error"):
        outputs.publish(tmp, out, flag="--out", overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_making_and_marking_a_temporary_leaves_nothing_after_the_next_run(tmp_path):
    """The one instant a temporary folder has no marker yet leaves it empty: the clean-up
    removes an empty folder named as the engine names its temporaries, and nothing of a
    user's that merely looks like one."""
    work = tmp_path / "w"
    work.mkdir()
    (work / ".report.json.tmp-k2x_9qaz").mkdir()  # made, not yet marked
    (work / ".draft.tmp-2024").mkdir()  # a user's, empty, not an engine name
    (work / ".notes.tmp-abcdefgh").mkdir()  # a user's look-alike with a file in it
    (work / ".notes.tmp-abcdefgh" / "idea.txt").write_text("keep me")
    stage_cache.remove_stale_temporaries(work)
    assert sorted(p.name for p in work.iterdir()) == [".draft.tmp-2024", ".notes.tmp-abcdefgh"]
    assert (work / ".notes.tmp-abcdefgh" / "idea.txt").read_text() == "keep me"


def test_merge_removes_what_a_killed_merge_left_and_nothing_else(tmp_path, family_dir):
    """A merge SIGKILLed mid-write leaves its temporary beside --out; the next merge to that
    --out removes it. A user's look-alike folder, and the temporary of a writer still alive,
    stay."""
    here = tmp_path / "outs"
    here.mkdir()
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys; from engine.core import outputs; "
         "(outputs.temp_dir('.out.tmp-', sys.argv[1]) / 'model.safetensors').write_bytes(b'half'); "
         "os.kill(os.getpid(), signal.SIGKILL)", str(here)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    [left] = here.glob(".out.tmp-*")
    assert outputs.is_engine_temp(left)
    user = here / ".out.tmp-draft"
    user.mkdir()
    (user / "notes.md").write_text("a user's draft")
    alive = outputs.temp_dir(".out.tmp-", here)  # this process's own: alive
    before = snapshot(user)
    assert merge(family_dir, here / "out") == 0
    assert not left.exists()
    kept(before, user)
    assert alive.is_dir()
    assert sorted(p.name for p in here.iterdir()) == sorted([".out.tmp-draft", alive.name, "out"])


def test_merge_refuses_the_same_model_twice(family_dir, tmp_path, capsys):
    rc = engine_main(["merge", "--method", "task-arithmetic", "--base", str(family_dir / "base"),
                      "--model", str(family_dir / "a"), "--model", f"again={family_dir / 'a'}",
                      "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "is already given as --model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    named = ["--model", f"one={family_dir / 'a'}", "--model", f"two={family_dir / 'a'}"]
    assert engine_main(["merge", "--method", "task-arithmetic", "--base", str(family_dir / "base"),
                        *named, "--out", str(tmp_path / "out")]) == 0  # named both: meant


def test_merge_replaces_its_own_output_but_not_a_file_dropped_into_it(family_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert merge(family_dir, out) == 0
    assert merge(family_dir, out, "--overwrite", "-p", "density=0.5") == 0
    (out / "eval-notes.md").write_text("what I saw")
    assert merge(family_dir, out, "--overwrite", "-p", "density=0.7") == 2
    assert "eval-notes.md" in capsys.readouterr().err
    assert (out / "eval-notes.md").read_text() == "what I saw"


# --- engine run --workdir -------------------------------------------------------------------------


def test_run_refuses_a_workdir_whose_names_hold_user_files(tmp_path, tiny_model, text_file, test_plugin,
                                                           capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "wd", {"base": tiny_model},
                          [line_count_stage(text_file, ["base"], name="merged"),
                           line_count_stage(text_file, ["base"], name="ppl")])
    work = tmp_path / "work"
    (work / "merged").mkdir(parents=True)
    (work / "merged" / "mine.txt").write_text("a user's folder named like a stage")
    (work / "ppl").write_text("a user's file named like a stage")
    (work / ".draft.tmp-2024").mkdir()
    (work / ".draft.tmp-2024" / "draft.md").write_text("draft")
    (work / "report").mkdir()
    (work / "report" / "figure.svg").write_text("<svg/>")
    (work / "report.md").write_text("# my report")
    before = snapshot(work)
    assert engine_main(["run", str(recipe), "--workdir", str(work)]) == 2
    err = capsys.readouterr().err
    for name in ("merged", "ppl", "report.md", "report"):
        assert str(work / name) in err, err
    kept(before, work)
    assert not (work / WORKDIR_FILE).exists() and not (work / ".stages").exists()


def test_run_in_a_folder_with_other_user_files_keeps_them(tmp_path, tiny_model, text_file, test_plugin):
    recipe = write_recipe(tmp_path / "r.yaml", "wd2", {"base": tiny_model},
                          [line_count_stage(text_file, ["base"])])
    work = tmp_path / "work"
    (work / ".draft.tmp-2024").mkdir(parents=True)
    (work / ".draft.tmp-2024" / "draft.md").write_text("draft")
    (work / "thesis.tex").write_text("chapter 1")
    before = snapshot(work)
    for _ in range(2):  # the second run cleans up stale temporaries: only the engine's
        assert engine_main(["run", str(recipe), "--workdir", str(work)]) == 0
        kept(before, work)
    assert (work / "scores").is_symlink()


def test_run_workdir_that_is_a_file_is_refused(tmp_path, tiny_model, text_file, test_plugin, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "wd3", {"base": tiny_model},
                          [line_count_stage(text_file, ["base"])])
    (tmp_path / "work").write_text("a file")
    assert engine_main(["run", str(recipe), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "work").read_text() == "a file"


def test_engine_report_refuses_a_report_folder_of_the_users(tmp_path, tiny_model, text_file, test_plugin,
                                                            capsys):
    recipe = write_recipe(tmp_path / "r.yaml", "wd4", {"base": tiny_model},
                          [line_count_stage(text_file, ["base"])])
    work = tmp_path / "work"
    assert engine_main(["run", str(recipe), "--workdir", str(work)]) == 0
    (work / "report" / "figure.svg").write_text("<svg>mine</svg>")
    capsys.readouterr()
    assert engine_main(["report", str(work)]) == 2
    assert "figure.svg" in capsys.readouterr().err
    assert (work / "report" / "figure.svg").read_text() == "<svg>mine</svg>"


# --- engine cache prune ---------------------------------------------------------------------------


@pytest.fixture
def two_versions(tmp_path, tiny_model, text_file, test_plugin) -> tuple[Path, Path]:
    """A workdir whose stage ``ct`` has two kept versions (steps 2, then 3: current)."""
    recipe = write_recipe(tmp_path / "p.yaml", "prune", {"base": tiny_model}, [ct_stage(text_file)])
    work = tmp_path / "work"
    for steps in ("2", "3"):
        assert engine_main(["run", str(recipe), "--workdir", str(work),
                            "--set", f"stages.ct.params.steps={steps}"]) == 0
    assert len(stage_cache.versions(work, "ct")) == 2
    return recipe, work


def test_prune_keeps_the_versions_status_calls_available(two_versions, capsys):
    recipe, work = two_versions
    capsys.readouterr()
    assert engine_main(["status", str(recipe), "--workdir", str(work),
                        "--set", "stages.ct.params.steps=2"]) == 0
    assert "available" in capsys.readouterr().out
    assert engine_main(["cache", "prune", str(recipe), "--workdir", str(work),
                        "--set", "stages.ct.params.steps=2"]) == 0
    assert "the recipe would reuse it" in capsys.readouterr().out
    assert len(stage_cache.versions(work, "ct")) == 2


def test_prune_keeps_versions_another_recipe_file_made(two_versions, tmp_path, capsys):
    recipe, work = two_versions
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text())  # the same name, another file
    steps = ["--set", "stages.ct.params.steps=5"]  # neither kept version is what it would reuse
    assert engine_main(["cache", "prune", str(other), "--workdir", str(work), *steps]) == 0
    assert "made by another recipe file" in capsys.readouterr().out
    assert len(stage_cache.versions(work, "ct")) == 2
    assert engine_main(["cache", "prune", str(recipe), "--workdir", str(work), *steps]) == 0
    assert len(stage_cache.versions(work, "ct")) == 1


def test_prune_leaves_checkpoint_folders_it_did_not_write(two_versions, capsys):
    _, work = two_versions
    mine = work / ".checkpoints" / "ct" / "my-experiments"
    mine.mkdir(parents=True)
    (mine / "results.csv").write_text("1,2,3")
    assert engine_main(["cache", "prune", "--workdir", str(work)]) == 0
    assert "not a checkpoint folder lingoforge wrote" in capsys.readouterr().out
    assert (mine / "results.csv").read_text() == "1,2,3"


def test_prune_dry_run_works_while_a_run_holds_the_workdir(two_versions, capsys):
    from engine.run.lock import WorkdirLock

    _, work = two_versions
    with WorkdirLock(work):
        assert engine_main(["cache", "prune", "--workdir", str(work), "--dry-run"]) == 0
        assert "would remove ct version" in capsys.readouterr().out
        assert engine_main(["cache", "prune", "--workdir", str(work)]) == 2  # deleting waits its turn
    assert len(stage_cache.versions(work, "ct")) == 2


def test_a_killed_prune_never_leaves_a_version_that_looks_complete(two_versions):
    """SIGKILL a prune at increasing delays: each time, the old version is either whole (every
    file it had) or gone from the list, never a marker over missing files."""
    _, work = two_versions
    old = next(v for v in stage_cache.versions(work, "ct") if not v.current)
    files = snapshot(old.folder)
    for i in range(200):  # many small files make the deletion take a while
        (old.folder / f"extra-{i}.bin").write_bytes(os.urandom(20000))
    files = snapshot(old.folder)
    for delay in (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0):
        proc = subprocess.Popen([sys.executable, "-m", "engine", "cache", "prune", "--workdir", str(work)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listed = [v for v in stage_cache.versions(work, "ct") if v.fingerprint == old.fingerprint]
        if listed:
            assert snapshot(listed[0].folder).keys() >= files.keys() - {outputs.TEMP_FILE}
        else:
            break
    assert engine_main(["cache", "prune", "--workdir", str(work)]) == 0
    assert [v.fingerprint for v in stage_cache.versions(work, "ct")] != [old.fingerprint]
    assert not list((work / ".stages" / "ct").glob(".*"))  # a killed prune's leftovers are gone
