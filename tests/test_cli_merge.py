"""``engine merge`` (engine/cli_merge.py) on real tiny model folders."""

from __future__ import annotations

import json

import pytest
from test_merge_plugins import assert_same_state, edited_copy, in_memory, state

from engine.cli_merge import main
from engine.merging import arithmetic


def args(fam, out, *extra: str) -> list[str]:
    return ["--method", "ties", "--base", str(fam["base"]), "--model", str(fam["a"]),
            "--model", f"bee={fam['b']}", "--out", str(out), "-p", "density=0.3",
            "-p", "weight={a: 1.0, bee: 0.5}", *extra]


def test_ties_cli_merge_writes_the_merge_and_refuses_an_existing_folder(tiny_model_family, tmp_path,
                                                                        capsys):
    fam = tiny_model_family
    out = tmp_path / "merged"
    assert main(args(fam, out)) == 0
    assert_same_state(out, in_memory(fam, ["a", "b"], lambda b, ms: arithmetic.ties(
        b, ms, [1.0, 0.5], [0.3, 0.3])))
    meta = json.loads((out / "lingoforge.json").read_text())["merge"]
    assert meta["models"] == ["a", "bee"] and meta["params"]["density"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no report, no temp folder

    before = (out / "model.safetensors").stat().st_mtime_ns
    assert main(args(fam, out)) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert main(args(fam, out, "--overwrite", "-p", "density=0.6")) == 0
    assert json.loads((out / "lingoforge.json").read_text())["merge"]["params"]["density"] == 0.6


def test_ties_cli_merge_failure_leaves_existing_output_untouched(tiny_model_family, tmp_path, capsys):
    fam = tiny_model_family
    out = tmp_path / "merged"
    assert main(args(fam, out)) == 0
    kept = state(out)
    names = list(kept)

    def poison(t):
        t[names[-1]] = t[names[-1]].clone().fill_(float("nan"))

    bad = edited_copy(fam["b"], tmp_path / "b-nan", poison)
    assert main(["--method", "ties", "--base", str(fam["base"]), "--model", str(bad),
                 "--out", str(out), "--overwrite"]) == 2
    assert "contains NaN or inf" in capsys.readouterr().err
    assert_same_state(out, kept)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left over


@pytest.mark.parametrize("extra, message", [
    (["-p", "density=0"], r"density must be in \(0, 1\]"),
    (["-p", "density"], "write KEY=VALUE"),
    (["-p", "weight={a: 2, bee: -2}", "-p", "normalize=true"], "sum to zero"),
])
def test_ties_cli_merge_bad_params_exit_2_before_writing(tiny_model_family, tmp_path, capsys,
                                                          extra, message):
    out = tmp_path / "merged"
    assert main(args(tiny_model_family, out)[:-4] + extra) == 2
    assert pytest.importorskip("re").search(message, capsys.readouterr().err)
    assert not out.exists()


def test_linear_cli_merge_without_base(tiny_model_family, tmp_path):
    fam = tiny_model_family
    out = tmp_path / "soup"
    assert main(["--method", "linear", "--model", str(fam["a"]), "--model", str(fam["c"]),
                 "--out", str(out)]) == 0
    a, c = state(fam["a"]), state(fam["c"])
    assert_same_state(out, {k: arithmetic.linear([a[k], c[k]], [1, 1]) for k in a})
