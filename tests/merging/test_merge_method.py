"""MergeMethod: the engine applies merge params, the method writes arithmetic only.

* per-model params resolve to one value per model, in model order; overrides are what
  the arithmetic sees for the tensors they match; zero weight sums are refused;
* a declared param the arithmetic never reads is refused at ``engine validate``;
* every built-in merge reads every param it declares, and streams when position-wise;
* the median example honours ``weight`` (weighted median) and streams;
* compatibility: a plugin written against the API before MergeMethod (today's median
  example, copied here verbatim, and the docs' old ``MyTies``) still merges, with a
  DeprecationWarning naming the replacement; given a param it never reads (``weight``,
  ``overrides``) it is refused with an error naming the param and the plugin.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from pydantic import Field
from test_merge_plugins import assert_same_state, in_memory, inputs, run, state

from engine.core.errors import EngineError, MergeError, RecipeError
from engine.merging import MergeMethod, MergeParams, TiesParams, execute
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.registry import manager as plugin_manager
from engine.registry.manager import implementations, pm
from engine.run.runner import Runner
from engine_plugins.ties import Ties

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"

#: docs/examples/lingoforge_median.py as it was before MergeMethod (verbatim)
LEGACY_MEDIAN = '''
from __future__ import annotations

import torch
from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl
from engine.merging import MergeParams, run_merge


class MedianMerge:
    """Element-wise median of the task vectors, scaled by lambda."""

    name = "median"

    class Params(MergeParams):
        lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged task vector.")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        def merge(tensor_name: str, deltas: torch.Tensor) -> torch.Tensor:
            # deltas: [models, ...] task vectors (model - base) in the compute dtype
            return params.lambda_ * deltas.median(dim=0).values

        return run_merge(context, inputs, params, merge)


@hookimpl
def register_merge_methods(register):
    register(MedianMerge())
'''

#: docs/merging.md's plugin example as it was before MergeMethod (verbatim, plus hookimpl)
LEGACY_MY_TIES = '''
from engine.api import hookimpl
from engine.merging import (Positionwise, PositionwiseMerge, TiesParams, for_tensor,
                            resolve_per_model, run_merge, ties_combine)


class MyTies:
    """TIES with my twist."""

    name = "my-ties"

    class Params(TiesParams):
        """Declared once: these fields are the recipe keys, defaults and docs."""

    def run(self, context, inputs, params):
        names = [m.name for m in inputs.models]

        def build(p):  # once per set of params (the plain ones and each override)
            weights = resolve_per_model(p.weight, names, "weight")
            densities = resolve_per_model(p.density, names, "density")
            return Positionwise(
                lambda trimmed: ties_combine(trimmed, weights, normalize=p.normalize,
                                             lam=p.lambda_),
                densities=tuple(densities))  # the engine trims exactly, whole or sliced

        return run_merge(context, inputs, params, PositionwiseMerge(for_tensor(params, build)))


@hookimpl
def register_merge_methods(register):
    register(MyTies())
'''


def _module(tmp_path: Path, name: str, code: str):
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def register(tmp_path):
    names = []

    def add(name: str, code: str | None = None, module=None):
        module = module if module is not None else _module(tmp_path, name, code)
        pm.register(module, name=name)
        names.append(name)
        return module

    yield add
    for name in names:
        pm.unregister(name=name)
        sys.modules.pop(name, None)
        plugin_manager._broken.pop(name, None)  # a plugin validate marked broken: gone with it


def _recipe(tmp_path: Path, fam, plugin: str, params: str, models: str = "[a, b, c]") -> Path:
    recipe = tmp_path / f"{plugin}.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: method-test
        models:
          base: {{path: {fam['base']}}}
          a: {{path: {fam['a']}}}
          b: {{path: {fam['b']}}}
          c: {{path: {fam['c']}}}
        stages:
          - name: merged
            stage: merge
            plugin: {plugin}
            base: base
            models: {models}
            params: {params}
        """))
    return recipe


def _plan(recipe: Path, tmp_path: Path):
    return plan_recipe(load_recipe(recipe), tmp_path, str(recipe))


@pytest.fixture
def small_slices(monkeypatch):
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 100)


# --- compatibility: plugins written before MergeMethod -----------------------------------------


def test_legacy_median_still_merges_and_warns(register, tiny_model_family, tmp_path):
    register("legacy_median", LEGACY_MEDIAN)
    fam = tiny_model_family
    plan = _plan(_recipe(tmp_path, fam, "median", "{lambda: 0.5}"), tmp_path)
    with pytest.warns(DeprecationWarning, match=r"plugin 'median'.*MergeMethod"):
        Runner(plan, tmp_path / "work").run()
    expected = in_memory(fam, ["a", "b", "c"], lambda b, ms: b + 0.5 * torch.stack(
        [m - b for m in ms]).median(dim=0).values)
    assert_same_state(tmp_path / "work" / "merged", expected)


@pytest.mark.parametrize("params, field", [
    ("{weight: {a: 2.0}}", "weight"),
    ("{lambda: 0.5, overrides: [{match: mlp, lambda: 2.0}]}", "overrides"),
])
def test_legacy_median_given_a_param_it_ignores_is_refused(register, tiny_model_family, tmp_path,
                                                           params, field):
    register("legacy_median", LEGACY_MEDIAN)
    plan = _plan(_recipe(tmp_path, tiny_model_family, "median", params), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(EngineError) as info:
            Runner(plan, tmp_path / "work").run()
    message = str(info.value)
    assert f"plugin 'median' does not honour params {field}" in message, message
    assert "silently ignored" in message and "MergeMethod" in message
    assert not (tmp_path / "work" / "merged").exists() or not any(
        (tmp_path / "work" / "merged").glob("*.safetensors"))


def test_legacy_plugin_that_reads_its_params_keeps_working(register, tiny_model_family, tmp_path,
                                                          make_context, small_slices):
    module = register("legacy_my_ties", LEGACY_MY_TIES)
    fam = tiny_model_family
    params = {"density": 0.4, "weight": {"a": 0.5},
              "overrides": [{"match": "mlp", "density": 0.9, "weight": {"b": 2.0}}]}
    with pytest.warns(DeprecationWarning, match="MergeMethod"):
        got = run(module.MyTies(), make_context, inputs(fam, "a", "b"), name="legacy", **params)
    want = run(Ties(), make_context, inputs(fam, "a", "b"), name="ties", **params)
    assert_same_state(got.path, state(want.path))


# --- the median example, on MergeMethod ---------------------------------------------------------


def _weighted_median_reference(values: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Position by position: the smallest value whose cumulative weight reaches half."""
    flat = values.reshape(values.shape[0], -1)
    out = torch.empty(flat.shape[1])
    for j in range(flat.shape[1]):
        pairs = sorted(zip(flat[:, j].tolist(), weights))
        total, acc = sum(weights), 0.0
        for v, w in pairs:
            acc += w
            if acc >= total / 2:
                out[j] = v
                break
    return out.view(values.shape[1:])


@pytest.fixture
def median():
    sys.path.insert(0, str(EXAMPLES))
    import lingoforge_median

    yield lingoforge_median
    sys.path.remove(str(EXAMPLES))
    sys.modules.pop("lingoforge_median", None)


def test_median_example_honours_weight_and_streams(median, tiny_model_family, make_context,
                                                  monkeypatch):
    fam = tiny_model_family
    impl = median.MedianMerge()
    params = {"weight": {"a": 3.0, "b": 1.0, "c": 1.0}, "lambda": 0.5}
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 100)
    context = make_context("sliced", stage_kind="merge", plugin="median")
    sliced = impl.run(context, inputs(fam, "a", "b", "c"), impl.Params.model_validate(params))
    assert context.stats.notes["merge"]["sliced_count"] > 0  # it streamed in row slices
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", 10**9)
    whole = run(impl, make_context, inputs(fam, "a", "b", "c"), name="whole", **params)
    assert_same_state(sliced.path, state(whole.path))
    b, ms = state(fam["base"]), [state(fam[m]) for m in "abc"]
    name = "model.layers.1.mlp.up_proj.weight"
    deltas = torch.stack([m[name] - b[name] for m in ms])
    expected = b[name] + 0.5 * _weighted_median_reference(deltas, [3.0, 1.0, 1.0])
    torch.testing.assert_close(state(whole.path)[name], expected, rtol=0, atol=0)
    # weight 3 of 5 is a majority: the median is model a's delta everywhere
    torch.testing.assert_close(state(whole.path)[name], b[name] + 0.5 * deltas[0], rtol=0, atol=0)
    plain = run(impl, make_context, inputs(fam, "a", "b", "c"), name="plain")
    assert not torch.equal(state(plain.path)[name], state(whole.path)[name])


def test_median_example_refuses_negative_weights_at_validate(register, median, tiny_model_family,
                                                             tmp_path):
    register("median_example", module=median)
    with pytest.raises(RecipeError, match=r"params.weight must be >= 0.*'b': -1.0"):
        _plan(_recipe(tmp_path, tiny_model_family, "median", "{weight: {b: -1.0}}"), tmp_path)


# --- what the engine does for a method -----------------------------------------------------------


class Recording(MergeMethod):
    """Task arithmetic that records the params it saw per tensor."""

    name = "recording"

    class Params(TiesParams):
        pass

    def __init__(self):
        self.seen: dict[str, tuple] = {}

    def merge(self, deltas, p, tensor):
        self.seen[tensor.name] = (p.weight, p.density, p.lambda_, p.normalize, p.names)
        return deltas.sum(dim=0) * p.lambda_


def test_per_model_values_and_overrides_are_what_the_arithmetic_sees(tiny_model_family,
                                                                     make_context):
    impl = Recording()
    params = {"weight": {"c": 2.0}, "density": 0.5, "lambda": 0.5,
              "overrides": [{"match": r"mlp\.", "weight": 3.0, "density": {"a": 0.1}}]}
    run(impl, make_context, inputs(tiny_model_family, "a", "b", "c"), **params)
    names = ("a", "b", "c")
    assert impl.seen["model.layers.0.self_attn.q_proj.weight"] == (
        (1.0, 1.0, 2.0), (0.5, 0.5, 0.5), 0.5, True, names)
    assert impl.seen["model.layers.0.mlp.up_proj.weight"] == (
        (3.0, 3.0, 3.0), (0.1, 1.0, 1.0), 0.5, True, names)


def test_resolution_errors_name_the_field_the_model_and_the_override(tiny_model_family, make_context):
    impl = Recording()
    with pytest.raises(MergeError, match=r"params.density names model\(s\) \['z'\]"):
        run(impl, make_context, inputs(tiny_model_family, "a", "b"), density={"z": 0.5})
    with pytest.raises(MergeError, match=r"overrides\[0\] \(match 'mlp'\): params.weight sum to "
                                         r"zero \(a=1, b=-1\)"):
        run(impl, make_context, inputs(tiny_model_family, "a", "b"),
            overrides=[{"match": "mlp", "weight": {"b": -1.0}}])


class Forgetful(MergeMethod):
    """Declares ``boost`` and never reads it: a parameter it would silently drop."""

    name = "forgetful"

    class Params(MergeParams):
        boost: float = Field(1.0, description="Declared but never used.")

    def merge(self, deltas, p, tensor):
        return deltas.mul_(torch.tensor(p.weight).view(-1, *[1] * (deltas.dim() - 1))).sum(dim=0)


def test_a_declared_param_the_arithmetic_never_reads_is_refused_at_validate(register, tmp_path,
                                                                            tiny_model_family):
    class Plugin:
        from engine.api import hookimpl

        @hookimpl
        def register_merge_methods(self, register):
            register(Forgetful())

    register("forgetful", module=Plugin())
    recipe = _recipe(tmp_path, tiny_model_family, "forgetful", "{weight: 2.0}")
    with pytest.raises(RecipeError, match=r"merge method 'forgetful' declares params.boost but its "
                                          r"arithmetic \(bands\(\) and merge\(\)\) never reads it"):
        _plan(recipe, tmp_path)


def test_every_builtin_merge_reads_every_param_it_declares(tiny_model_family):
    """The probe that ``engine validate`` runs passes for every built-in (plain params and an
    override), and each says whether it streams."""
    merges = implementations()["merge"]
    builtin = {"linear", "task-arithmetic", "ties", "slack-ties", "dare-ties", "breadcrumbs",
               "breadcrumbs-ties"}
    assert builtin <= set(merges)
    for name in sorted(builtin):
        impl = merges[name].impl
        assert isinstance(impl, MergeMethod), name
        params = impl.Params.model_validate({"overrides": [{"match": "mlp", "weight": 2.0}]})
        variants = impl._variants(params, ["a", "b"])
        assert len(variants) == 2
        assert impl.positionwise == (name != "dare-ties"), name


def test_tally_adds_up_over_slices(tiny_model_family, make_context, small_slices):
    """What a method counts per call is one run-wide tally (slack-ties reports from it)."""

    class Counting(MergeMethod):
        name = "counting"

        class Params(MergeParams):
            pass

        def merge(self, deltas, p, tensor):
            tensor.tally["rows"] += tensor.stop - tensor.start
            tensor.tally["calls"] += 1
            return deltas.mul_(p.weight[0]).sum(dim=0)

        def report(self, context, params, names, tally):
            self.final = Counter(tally)
            return {"counting": dict(tally)}

    impl = Counting()
    out = run(impl, make_context, inputs(tiny_model_family, "a", "b"))
    rows = sum(t.shape[0] if t.dim() else 1 for t in state(tiny_model_family["base"]).values()
               if t.is_floating_point())
    assert impl.final["rows"] == rows and impl.final["calls"] > len(state(out.path))
    assert out.meta["merge"]["counting"]["rows"] == rows
