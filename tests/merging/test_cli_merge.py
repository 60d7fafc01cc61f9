"""``engine merge`` (engine/cli/merge.py) on real tiny model folders."""

from __future__ import annotations

import argparse
import json

import pytest
from safetensors.torch import save_file
from test_merge_plugins import assert_same_state, edited_copy, in_memory, state

from engine.cli.merge import add_parser, build_recipe, main
from engine.merging import arithmetic
from engine.recipe.spec import parse_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import Runner
from engine.run.stage_cache import STAGE_FILE


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


# --- engine merge runs through the runner (engine.run.runner.run_stage) -----------------------------


def test_cli_merge_output_carries_the_stage_marker_and_record(tiny_model_family, tmp_path):
    out = tmp_path / "merged"
    assert main(args(tiny_model_family, out)) == 0
    saved = json.loads((out / STAGE_FILE).read_text())
    record = saved["record"]
    assert record["fingerprint"] == saved["fingerprint"] and record["cache"] == "miss"
    assert (record["stage"], record["plugin"]) == ("merge", "ties")
    assert record["notes"]["merge"]["tensors"] > 0 and record["wall_time_s"] >= 0
    assert "threads" in record and "peak_rss_mb" in record  # the runner's record, as in engine run


def test_cli_merge_identical_rerun_with_overwrite_is_a_cache_hit(tiny_model_family, tmp_path, capsys):
    fam = tiny_model_family
    out = tmp_path / "merged"
    assert main(args(fam, out)) == 0
    before = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args(fam, out, "--overwrite")) == 0
    assert "already holds this merge" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before  # nothing rewritten
    assert main(args(fam, out, "--overwrite", "--no-cache")) == 0
    assert "merged 2 model(s) with ties" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_cli_merge_changed_input_file_merges_again(tiny_model_family, tmp_path, capsys):
    fam = tiny_model_family
    a = edited_copy(fam["a"], tmp_path / "a")
    out = tmp_path / "merged"
    base = ["--method", "linear", "--model", str(a), "--model", str(fam["c"]), "--out", str(out)]
    assert main(base) == 0

    def bump(t):
        name = sorted(t)[0]
        t[name] = t[name] + 1.0

    save_state = state(a)
    bump(save_state)
    save_file(save_state, str(a / "model.safetensors"), metadata={"format": "pt"})
    capsys.readouterr()
    assert main([*base, "--overwrite"]) == 0
    assert "already holds" not in capsys.readouterr().err
    c = state(fam["c"])
    assert_same_state(out, {k: arithmetic.linear([save_state[k], c[k]], [1, 1]) for k in c})


def test_cli_merge_fingerprint_is_the_recipe_stage_fingerprint(tiny_model_family, tmp_path):
    """engine merge and engine run of the recipe it builds compute the same stage."""
    fam = tiny_model_family
    out = tmp_path / "merged"
    assert main(args(fam, out)) == 0
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["merge", *args(fam, out)])
    recipe = parse_recipe(build_recipe(ns), "engine merge")
    report = Runner(plan_recipe(recipe, tmp_path, "engine merge"), tmp_path / "run").run()
    merged_by_cli = json.loads((out / STAGE_FILE).read_text())["fingerprint"]
    assert report["stages"][0]["fingerprint"] == merged_by_cli
    assert_same_state(tmp_path / "run" / "merged", state(out))


# --- errors speak in the command's terms (--base, --model, -p, --method), not recipe keys ------


def _error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "recipe key" not in err and "'merged'" not in err and "models." not in err, err
    return err.strip()


def test_cli_merge_missing_or_invalid_base_names_the_flag(tiny_model_family, tmp_path, capsys):
    fam = tiny_model_family
    out = ["--model", str(fam["a"]), "--out", str(tmp_path / "o")]
    gone = tmp_path / "nope"
    assert _error(capsys, ["--method", "ties", "--base", str(gone), *out]) == \
        f"error: --base {gone}: no such folder"
    config = fam["a"] / "config.json"
    assert _error(capsys, ["--method", "ties", "--base", str(config), *out]) == \
        f"error: --base {config}: is a file, not a model folder"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _error(capsys, ["--method", "ties", "--base", str(empty), *out]).startswith(
        "error: engine merge: --base empty: ")
    assert _error(capsys, ["--method", "ties", "--base", str(fam["base"]), "--model",
                           f"x={gone}", "--out", str(tmp_path / "o")]) == \
        f"error: --model {gone}: no such folder"
    assert "needs a base model (--base)" in _error(capsys, ["--method", "ties", *out])
    assert not (tmp_path / "o").exists()


def test_cli_merge_invalid_method_param_names_the_p_flag(tiny_model_family, tmp_path, capsys):
    base = args(tiny_model_family, tmp_path / "o")[:-4]
    assert _error(capsys, [*base, "-p", "density=2"]) == \
        "error: engine merge: -p density: density must be in (0, 1] (the kept fraction), got 2.0"
    assert _error(capsys, [*base, "-p", "densty=0.2"]) == \
        "error: engine merge: -p densty: unknown key; did you mean 'density'?"
    assert _error(capsys, [*base, "-p", "weight={zz: 1}"]).startswith(
        "error: engine merge: -p weight names model(s) ['zz'] that are not merged here")
    method = _error(capsys, ["--method", "tis", *base[2:]])
    assert method.startswith("error: engine merge: --method tis: no merge method of that name; "
                             "available: ") and method.endswith("did you mean 'ties'?")


def test_cli_merge_mismatched_shapes_name_the_models_as_given(tiny_model_family, tmp_path, capsys):
    from engine.testing.builders import build_tiny_llama

    big = build_tiny_llama(tmp_path / "big", hidden=64)
    fam = tiny_model_family
    assert _error(capsys, ["--method", "ties", "--base", str(fam["base"]), "--model", str(big),
                           "--out", str(tmp_path / "o")]) == (
        "error: engine merge: tensor 'lm_head.weight' has shape [320, 64] in --model big but "
        "[320, 32] in --base base")
    assert "in --model wide but [320, 32] in first --model a" in _error(
        capsys, ["--method", "linear", "--model", str(fam["a"]), "--model", f"wide={big}",
                 "--out", str(tmp_path / "o")])
