"""lingoforge-extras's tests: engine.testing's fixtures and conformance suite only."""

from __future__ import annotations

import json

import pytest
import torch
from lingoforge_extras import Consensus, NextTokenAccuracy
from safetensors import safe_open

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.testing import check_plugin


def test_consensus_conforms(lingoforge_model_family, tmp_path):
    check_plugin(Consensus(), "merge", variations={"quorum": 0.9}, family=lingoforge_model_family,
                 workdir=tmp_path)


def test_next_token_accuracy_conforms(tmp_path):
    check_plugin(NextTokenAccuracy(), "evaluate", workdir=tmp_path)


def _tensor(folder, name):
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return fh.get_tensor(name)


def test_consensus_with_quorum_zero_is_task_arithmetic(lingoforge_model_family, lingoforge_context):
    fam = lingoforge_model_family
    inputs = StageInputs(base=ModelArtifact("base", fam["base"]),
                         models=[ModelArtifact(m, fam[m]) for m in ("a", "b")])
    out = Consensus().run(lingoforge_context("merged", "merge", "consensus"), inputs,
                          Consensus.Params(quorum=0.0, weight={"a": 0.5}))
    name = "model.layers.1.mlp.up_proj.weight"
    base = _tensor(fam["base"], name)
    want = base + 0.5 * (_tensor(fam["a"], name) - base) + (_tensor(fam["b"], name) - base)
    torch.testing.assert_close(_tensor(out.path, name), want)


def test_next_token_accuracy_counts_predicted_tokens(lingoforge_tiny_model, lingoforge_text_file,
                                                     lingoforge_context):
    art = NextTokenAccuracy().run(
        lingoforge_context("scores", "evaluate", "next-token-accuracy"),
        StageInputs(models=[ModelArtifact("tiny", lingoforge_tiny_model)],
                    data=[DataSource(lingoforge_text_file, "text")]),
        NextTokenAccuracy.Params())
    assert 0.0 <= art.metrics["tiny"]["acc1/text"] <= 1.0
    assert art.counts["tiny"]["acc1/text"] > 0


@pytest.fixture
def registered(lingoforge_register):
    """The package's plugin module, registered with the engine: by its entry point when the
    package is installed, for this test only otherwise."""
    import importlib.metadata

    import lingoforge_extras

    installed = any(ep.value == "lingoforge_extras"
                    for ep in importlib.metadata.entry_points(group="engine.plugins"))
    if not installed:
        lingoforge_register(lingoforge_extras, name="extras-test")
    return lingoforge_extras


def test_a_recipe_merges_and_scores_with_the_extras(registered, lingoforge_model_family,
                                                    lingoforge_text_file, lingoforge_run_recipe):
    fam = lingoforge_model_family
    report = lingoforge_run_recipe({
        "name": "extras-demo",
        "models": {name: {"path": str(path)} for name, path in fam.items()},
        "stages": [
            {"name": "merged", "stage": "merge", "plugin": "consensus", "base": "base",
             "models": ["a", "b", "c"], "params": {"quorum": 0.6, "lambda": 0.5}},
            {"name": "scores", "stage": "evaluate", "plugin": "next-token-accuracy",
             "models": ["base", "merged"], "data": {"path": str(lingoforge_text_file)}},
        ],
    })
    assert [s["name"] for s in report["stages"]] == ["merged", "scores"]
    metrics = report["stages"][1]["metrics"]
    assert set(metrics) >= {"base", "merged"}
    assert json.loads(json.dumps(metrics))
