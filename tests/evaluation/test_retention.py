"""``retention``: source-language metrics relative to a reference model.

The expected values come from running the ``perplexity`` and ``task-accuracy``
plugins (themselves checked against plain transformers in test_evaluate.py) on the
same data and applying the documented definitions by hand.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from engine.api import DataSource, InputConfigs, ModelArtifact, StageInputs
from engine.core.errors import DataError, EngineError, RecipeError
from engine_plugins.perplexity import Perplexity
from engine_plugins.retention import Retention, register_evaluators, relative_metrics
from engine_plugins.task_accuracy import TaskAccuracy


def run(plugin, make_context, models, sources, **params):
    context = make_context("keep", stage_kind="evaluate", plugin=plugin.name)
    inputs = StageInputs(models=[ModelArtifact(n, p) for n, p in models.items()], data=sources)
    return plugin.run(context, inputs, plugin.Params(**params)), context


@pytest.fixture
def sources(text_file, choice_file):
    return [DataSource(text_file, "text", language="en"),
            DataSource(choice_file, "choice", language="en")]


def test_retention_matches_definitions(tiny_model_family, sources, make_context):
    models = {"base": tiny_model_family["base"], "merged": tiny_model_family["a"]}
    art, context = run(Retention(), make_context, models, sources, reference="base",
                       metrics=["ppl", "bpb", "acc", "acc_norm"], batch_size=3)
    ppl, _ = run(Perplexity(), make_context, models, sources[:1], bits_per_byte=True)
    acc, _ = run(TaskAccuracy(), make_context, models, sources[1:])
    p, a = ppl.metrics, acc.metrics
    got = art.metrics["merged"]
    assert got["retention_ppl/en"] == pytest.approx(p["base"]["ppl/en"] / p["merged"]["ppl/en"], rel=1e-5)
    assert got["retention_bpb/en"] == pytest.approx(p["base"]["bpb/en"] / p["merged"]["bpb/en"], rel=1e-5)
    assert got["delta_acc/en"] == pytest.approx(a["merged"]["acc/en"] - a["base"]["acc/en"])
    assert got["delta_acc_norm/en"] == pytest.approx(a["merged"]["acc_norm/en"] - a["base"]["acc_norm/en"])
    assert got["retention_ppl/en"] != 1.0  # different weights, different perplexity
    assert art.metrics["base"] == {"retention_ppl/en": 1.0, "retention_bpb/en": 1.0,
                                   "delta_acc/en": 0.0, "delta_acc_norm/en": 0.0}
    assert art.counts["merged"]["retention_ppl/en"] == ppl.counts["merged"]["ppl/en"]
    assert art.counts["merged"]["delta_acc/en"] == 2
    assert context.stats.notes["underlying"]["merged"]["ppl/en"] == pytest.approx(
        p["merged"]["ppl/en"], rel=1e-5)
    assert set(art.to_json()) == {"base", "merged", "_counts"}


def test_retention_default_metrics_and_only_requested(tiny_model_family, sources, make_context):
    models = {"base": tiny_model_family["base"], "b": tiny_model_family["b"]}
    art, _ = run(Retention(), make_context, models, sources, reference="base")
    assert set(art.metrics["b"]) == {"retention_ppl/en", "delta_acc/en"}
    art, _ = run(Retention(), make_context, models, sources[:1], reference="base", metrics=["ppl"])
    assert set(art.metrics["b"]) == {"retention_ppl/en"}


def test_retention_reference_must_be_a_stage_model(tiny_model_family, sources, make_context):
    with pytest.raises(RecipeError, match="reference 'base' is not among its models"):
        run(Retention(), make_context, {"a": tiny_model_family["a"]}, sources, reference="base")
    configs = InputConfigs({"models": [{}]}, {"models": ["a", "b"]})
    with pytest.raises(ValueError, match="reference 'base' is not among the stage's models"):
        Retention().check(configs, Retention.Params(reference="base"))
    Retention().check(InputConfigs({"models": [{}]}, {"models": ["base"]}),
                      Retention.Params(reference="base"))
    with pytest.raises(ValidationError):
        Retention.Params()  # reference is required
    with pytest.raises(ValidationError):
        Retention.Params(reference="base", metrics=["rouge"])


def test_retention_failures(tiny_model_family, sources, tmp_path, make_context):
    models = {"base": tiny_model_family["base"], "gone": tmp_path / "nope"}
    art, _ = run(Retention(), make_context, models, sources, reference="base")
    assert set(art.metrics) == {"base"} and "nope" in art.errors["gone"]
    models = {"base": tmp_path / "nope", "a": tiny_model_family["a"]}
    with pytest.raises(EngineError, match="reference model 'base' could not be scored"):
        run(Retention(), make_context, models, sources, reference="base")
    with pytest.raises(DataError, match="metrics acc/acc_norm need a data source of format 'choice'"):
        run(Retention(), make_context, {"base": tiny_model_family["base"]}, sources[:1],
            reference="base")


def test_retention_relative_metrics_directions():
    raw = {"ref": {"ppl/en": 10.0, "acc/en": 0.5}, "m": {"ppl/en": 12.5, "acc/en": 0.4},
           "other-tok": {"ppl/en": 5.0, "acc/en": 0.6}}
    counts = {k: {"ppl/en": 100, "acc/en": 10} for k in raw}
    metrics, cnt = relative_metrics(raw, counts, "ref", {"ref": True, "m": True, "other-tok": False})
    assert metrics["m"] == {"retention_ppl/en": 0.8, "delta_acc/en": pytest.approx(-0.1)}
    assert metrics["other-tok"] == {"delta_acc/en": pytest.approx(0.1)}  # no ppl ratio across tokenizers
    assert cnt["m"] == {"retention_ppl/en": 100, "delta_acc/en": 10}
    assert math.isnan(relative_metrics({"r": {"ppl/x": 1.0}, "z": {"ppl/x": 0.0}}, {}, "r")[0]["z"]["retention_ppl/x"])


def test_retention_registration():
    got = []
    register_evaluators(got.append)
    assert [impl.name for impl in got] == ["retention"]


def test_retention_same_tokenization_ignores_config_rewrites(tiny_model, tmp_path):
    from conftest import build_tokenizer

    from engine_plugins.retention import same_tokenization

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "tokenizer.json").write_text((tiny_model / "tokenizer.json").read_text())
    (copy / "tokenizer_config.json").write_text("{}")  # rewritten config, same tokenizer
    assert same_tokenization(tiny_model, copy)
    other = tmp_path / "other"
    other.mkdir()
    build_tokenizer(other, ["entirely different words here", "zyx wvu tsr"] * 3)
    assert not same_tokenization(tiny_model, other)
