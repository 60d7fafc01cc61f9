"""The merge conformance suite and the number of models a method merges: it merges as many
as the method declares (``min_models``/``max_models``), ``models=`` chooses them, a
method is held to its declaration, and overrides are checked for every method (or the
report says why not). docs/plugins.md's two-model example (nearswap), written against
``engine.api`` only, passes the suite."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import state, write_recipe
from pydantic import Field
from test_conformance import ToyMerge, _fails

from engine.api import ModelArtifact, StageInputs
from engine.api.merging import (
    ExecutionParams,
    MergeMethod,
    Positionwise,
    PositionwiseMerge,
    TaskVectorParams,
    for_tensor,
    run_merge,
    task_arithmetic_delta,
)
from engine.registry.manager import implementations
from engine.testing import check_plugin
from engine.testing._merge import COUNTS, OVERRIDES, OVERRIDES_REFUSED
from engine.testing.conformance import quiet_context

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def _merged(report) -> str:
    """The report's note on which models were merged."""
    return next(n for n in report.notes if n.startswith("merged "))


# --- docs/plugins.md's two-model method ------------------------------------------------------


def _nearswap_source() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", GUIDE.read_text(), re.S | re.M)
    return next(b for b in blocks if "class NearSwap" in b)


@pytest.fixture
def nearswap(tmp_path, monkeypatch, lingoforge_register):
    """docs/plugins.md's nearswap, written to a module of its own and registered."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    (folder / "lf_nearswap.py").write_text(_nearswap_source())
    monkeypatch.syspath_prepend(str(folder))
    import lf_nearswap

    lingoforge_register(lf_nearswap, name="lf-nearswap")
    yield lf_nearswap
    import sys

    sys.modules.pop("lf_nearswap", None)


def _nearswap(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's definition, written here independently: weight t / |b - a| (1 where they
    are equal), clamped to [0, 1], then w·b + (1 − w)·a."""
    w = t / (b - a).abs()
    w = torch.where(torch.isfinite(w), w, torch.ones_like(w)).clamp(0.0, 1.0)
    return w * b + (1 - w) * a


def test_the_guides_two_model_plugin_imports_only_the_public_api():
    tree = ast.parse(_nearswap_source())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    engine = {m for m in modules if m.split(".")[0] == "engine"}
    assert engine and all(m == "engine.api" or m.startswith("engine.api.") for m in engine), engine
    assert modules - engine <= {"__future__", "torch", "pydantic"}, modules


def test_the_guides_two_model_plugin_registers_and_conforms_on_two_models(nearswap, tmp_path):
    impl = implementations()["merge"]["nearswap"].impl  # registered, not broken: the probe merges two
    assert isinstance(impl, nearswap.NearSwap)
    report = check_plugin(impl, "merge", variations={"t": 0.05}, workdir=tmp_path / "w")
    assert _merged(report) == "merged 2 models (a, b) onto a base"
    assert {COUNTS, OVERRIDES, "honours every parameter", "sliced equals whole"} <= set(report.passed)
    assert not report.skipped
    assert any(n.startswith("overrides checked with t=0.05") for n in report.notes)


def test_the_guides_two_model_plugin_computes_nearswap(nearswap, tiny_model_family, tmp_path):
    fam = tiny_model_family
    impl = nearswap.NearSwap()
    context = quiet_context(tmp_path, "ns", "merge", "nearswap")
    inputs = StageInputs(base=ModelArtifact("base", fam["base"]),
                         models=[ModelArtifact("a", fam["a"]), ModelArtifact("b", fam["b"])])
    params = impl.Params.model_validate({"t": 0.01, "overrides": [{"match": "mlp", "t": 0.03}]})
    got, a, b = state(impl.run(context, inputs, params).path), state(fam["a"]), state(fam["b"])
    for name, value in got.items():
        want = _nearswap(0.03 if "mlp" in name else 0.01, a[name], b[name])
        torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(got[k], a[k]) and not torch.equal(got[k], b[k]) for k in got)


def test_engine_validate_refuses_the_two_model_plugin_with_three_models(nearswap, tiny_model_family,
                                                                       tmp_path, capsys):
    from engine.cli.commands import main

    recipe = write_recipe(tmp_path / "r.yaml", "ns", tiny_model_family, [
        {"name": "merged", "stage": "merge", "plugin": "nearswap", "models": ["a", "b", "c"]}])
    assert main(["validate", str(recipe)]) != 0
    assert "nearswap merges exactly two models (recipe key 'models'), got 3" in capsys.readouterr().err


# --- the count the suite merges, and models= --------------------------------------------------


class SumOfFour(MergeMethod):
    """Task arithmetic that needs at least four models."""

    name = "sum-of-four"
    min_models = 4

    class Params(TaskVectorParams):
        """Task arithmetic's params."""

    def merge(self, deltas, p, tensor):
        return task_arithmetic_delta(deltas, p.weight, normalize=p.normalize, lam=p.lambda_)


def test_the_suite_builds_as_many_models_as_a_method_needs(tmp_path):
    report = check_plugin(SumOfFour(), "merge", workdir=tmp_path)
    assert _merged(report) == "merged 4 models (a, b, c, d) onto a base"
    assert COUNTS in report.passed  # three models are refused


def test_a_family_too_small_for_the_method_is_named(tiny_model_family, tmp_path):
    with pytest.raises(ValueError, match=r"needs 4: pass a larger family, e\.g\. build_family\(root, "
                                         r"names=family_names\(4\)\)"):
        check_plugin(SumOfFour(), "merge", family=tiny_model_family, workdir=tmp_path)


def test_models_chooses_the_merged_models_by_count_name_or_folder(tiny_model_family, tmp_path):
    fam = tiny_model_family
    by_count = check_plugin(ToyMerge(), "merge", family=fam, models=2, workdir=tmp_path / "1")
    assert _merged(by_count) == "merged 2 models (a, b) onto a base"
    by_name = check_plugin(ToyMerge(), "merge", family=fam, models=["c", "b"], workdir=tmp_path / "2")
    assert _merged(by_name) == "merged 2 models (c, b) onto a base"
    by_folder = check_plugin(ToyMerge(), "merge", models={"x": fam["a"], "y": fam["c"]},
                             workdir=tmp_path / "3")
    assert _merged(by_folder) == "merged 2 models (x, y) onto a base"
    assert "honours every parameter" in by_folder.passed


@pytest.mark.parametrize(("models", "error", "match"), [
    (3, ValueError, r"models=3 gives 3 model\(s\) but merge plugin 'slerp' \(min_models=2, max_models=2\)"),
    (["a"], ValueError, "gives 1 model"),
    (["a", "z"], ValueError, r"names \['z'\]"),
    ("ab", TypeError, "give a count"),
])
def test_models_outside_what_the_method_takes_is_refused(models, error, match, tiny_model_family,
                                                         tmp_path):
    slerp = implementations()["merge"]["slerp"].impl
    with pytest.raises(error, match=match):
        check_plugin(slerp, "merge", params={"t": 0.3}, family=tiny_model_family, models=models,
                     workdir=tmp_path)


# --- a method is held to its declared count ------------------------------------------------------


class TwoOnlyByWord(ToyMerge):
    """Declares two models but merges any number (the flaw the suite catches)."""

    max_models = 2


class NoModels(ToyMerge):
    """Declares a count below one."""

    min_models = 0


def test_a_plugin_merging_a_count_it_declares_it_does_not_take_is_rejected(tiny_model_family, tmp_path):
    err = _fails(TwoOnlyByWord(), COUNTS, match="merged 3 models although it declares min_models=1, "
                 "max_models=2", family=tiny_model_family, tmp_path=tmp_path)
    assert "refuse other counts" in str(err)


def test_a_count_that_is_no_range_is_rejected(tiny_model_family, tmp_path):
    _fails(NoModels(), "declares how many models it merges", match="min_models must be an integer >= 1",
           family=tiny_model_family, tmp_path=tmp_path)


def test_a_method_taking_any_count_says_so(tiny_model_family, tmp_path):
    report = check_plugin(ToyMerge(), "merge", family=tiny_model_family, workdir=tmp_path)
    assert report.skipped[COUNTS] == "it merges any number of models (min_models=1, max_models=None)"
    assert COUNTS not in report.passed


# --- overrides, for every method ------------------------------------------------------------------


class ScaleParams(ExecutionParams):
    scale: float = Field(1.0, description="Scale of the mean task vector.")


class MeanScale:
    """Mean task vector times scale, an own param (no weight, lambda, density, normalize)."""

    name = "mean-scale"
    Params = ScaleParams

    def __init__(self, flaw: str | None = None) -> None:
        self.flaw = flaw

    def run(self, context, inputs, params):
        if self.flaw == "refuses without saying why" and params.overrides:
            raise ValueError("cannot do that")
        if self.flaw == "ignores overrides":
            params.overrides  # noqa: B018 (read, then ignored)
            select = lambda name: params.scale  # noqa: E731
        else:
            select = for_tensor(params, lambda p: p.scale)
        merge = PositionwiseMerge(lambda name: Positionwise(lambda d, s=select(name): d.mean(dim=0) * s))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return run_merge(context, inputs, params, merge)


def test_overrides_of_an_own_param_are_checked(tiny_model_family, tmp_path):
    report = check_plugin(MeanScale(), "merge", family=tiny_model_family, workdir=tmp_path,
                          variations={"scale": 0.5})
    assert OVERRIDES in report.passed and OVERRIDES not in report.skipped
    assert "overrides checked with scale=0.5 for tensors matching '\\\\.mlp\\\\.'" in report.notes


@pytest.mark.parametrize(("flaw", "match"), [
    ("ignores overrides", "matching tensors unchanged"),
    ("refuses without saying why", "must refuse them with an error that names 'overrides'"),
])
def test_overrides_of_an_own_param_that_do_nothing_are_rejected(flaw, match, tiny_model_family, tmp_path):
    _fails(MeanScale(flaw), OVERRIDES, match=match, family=tiny_model_family, tmp_path=tmp_path,
           variations={"scale": 0.5})


class Average(MergeMethod):
    """The plain average of the models: no param of its own, nothing an override can set."""

    name = "plain-average"
    task_vectors = False

    class Params(ExecutionParams):
        """Only how the merge runs."""

    def merge(self, stacked, p, tensor):
        return stacked.mean(dim=0)


def test_a_method_with_nothing_to_override_says_why(tiny_model_family, tmp_path):
    report = check_plugin(Average(), "merge", family=tiny_model_family, workdir=tmp_path)
    assert report.skipped[OVERRIDES].startswith("nothing to override: every param of Params is an "
                                                "execution param")
    assert OVERRIDES not in report.passed and OVERRIDES_REFUSED not in report.passed
