"""Merging models whose tokenizers do not extend one another: the error names both models
and the command that gives one the other's tokenizer; after that transplant they merge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
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
