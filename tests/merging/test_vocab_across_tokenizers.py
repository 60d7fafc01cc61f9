"""Merging models whose tokenizers do not extend one another: the error names both models
and the command that gives one the other's tokenizer; after that transplant they merge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from helpers import write_recipe
from safetensors.torch import load_file

from engine.cli.commands import main
from engine.testing import TINY_TEXT, build_tiny_llama, build_tokenizer

OTHER = ["кошка сидит на ковре", "собака бежит в парке", "лум вела дора сен"] * 6


def test_merging_across_tokenizers_suggests_the_transplant_then_merges(tmp_path, capsys):
    mine = build_tiny_llama(tmp_path / "mine", seed=1)
    theirs = build_tiny_llama(tmp_path / "theirs", seed=2,
                              tokenizer=build_tokenizer(tmp_path / "tok", texts=OTHER + TINY_TEXT))
    out = tmp_path / "merged"
    code = main(["merge", "--method", "linear", "--model", f"mine={mine}", "--model", f"theirs={theirs}",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    line = " ".join(err.split())  # one line, unwrapped
    assert "tokenizers conflict" in line and "theirs" in line and "mine" in line
    command = re.search(r"engine transplant-tokenizer (\S+) --tokenizer (\S+) --output (\S+)", line)
    assert command is not None, line
    assert {command[1], command[2]} == {str(mine), str(theirs)}
    assert not out.exists()

    # the suggested command, as a user runs it (their own --output for the placeholder)
    moved = tmp_path / "moved"
    assert main(["transplant-tokenizer", command[1], "--tokenizer", command[2], "--init", "omp",
                 "--output", str(moved)]) == 0
    target = Path(command[2])
    assert main(["merge", "--method", "linear", "--model", f"moved={moved}", "--model", f"target={target}",
                 "--out", str(out)]) == 0
    merged, a, b = (load_file(f / "model.safetensors") for f in (out, moved, target))
    for name in merged:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((target / "tokenizer.json").read_text())["model"]["vocab"]


def _recipe(tmp_path: Path, mine: Path, theirs: Path, params: dict) -> Path:
    return write_recipe(tmp_path / "merge.yaml", "across", {"mine": mine, "theirs": theirs},
                        [{"name": "merged", "stage": "merge", "plugin": "linear",
                          "models": ["mine", "theirs"], "params": params}])


def test_a_merge_with_params_tokenizer_transplants_first_and_the_result_generates(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mine = build_tiny_llama(tmp_path / "mine", seed=1)
    theirs = build_tiny_llama(tmp_path / "theirs", seed=2,
                              tokenizer=build_tokenizer(tmp_path / "tok", texts=OTHER + TINY_TEXT))
    work = tmp_path / "run"
    # without the param the run is refused before any work, and the error names the param
    code = main(["run", str(_recipe(tmp_path, mine, theirs, {})), "--workdir", str(work)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "tokenizers conflict" in err
    assert re.search(r"params tokenizer: \{model: (mine|theirs), init: omp\}", err), err
    # a model that is not an input of the merge is named at validate time
    code = main(["validate", str(_recipe(tmp_path, mine, theirs, {"tokenizer": {"model": "thiers"}}))])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "'thiers' is not an input of the merge" in err

    recipe = _recipe(tmp_path, mine, theirs, {"tokenizer": {"model": "theirs", "init": "omp"}})
    assert main(["run", str(recipe), "--workdir", str(work)]) == 0, capsys.readouterr().err
    out = work / "merged"
    # the same transplant by hand, then the plain mean: bitwise what the stage wrote
    moved = tmp_path / "moved"
    assert main(["transplant-tokenizer", str(mine), "--tokenizer", str(theirs), "--init", "omp",
                 "--output", str(moved)]) == 0
    merged, a, b = (load_file(f / "model.safetensors") for f in (out, moved, theirs))
    for name in merged:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=0)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((theirs / "tokenizer.json").read_text())["model"]["vocab"]
    # nothing of the transplant is left beside the output; the report says what was moved
    assert not [p for p in work.iterdir() if ".tmp-" in p.name]
    notes = next(s for s in json.loads((work / "report.json").read_text())["stages"]
                 if s["name"] == "merged")["notes"]
    assert notes["tokenizer:mine"]["onto"] == "theirs" and notes["tokenizer:mine"]["rows_made"] > 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("кошка сидит", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 4
