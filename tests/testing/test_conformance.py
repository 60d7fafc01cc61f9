"""engine.testing's conformance suite: every built-in plugin passes it, and each property
rejects a deliberately broken toy plugin with a message naming that property.

Built-ins are read from the plugin manager (``engine_plugins.*``); a new built-in is
checked as soon as it registers (give it an entry in OPTIONS if it needs params, data
or variations of its own parameters).
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import write_choice_task
from pydantic import BaseModel, ConfigDict, Field, field_serializer
from safetensors.torch import load_file, save_file

from engine.api import (
    LayerSelection,
    MetricsArtifact,
    ModelArtifact,
    PluginParams,
    StageInputs,
    TrainingParams,
)
from engine.merging import (
    MergeParams,
    Positionwise,
    PositionwiseMerge,
    TaskVectorParams,
    resolve_per_model,
    run_merge,
)
from engine.registry.manager import implementations
from engine.testing import ConformanceError, check_plugin, write_text_file
from engine.testing.conformance import quiet_context

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"

#: per built-in: what check_plugin needs besides the implementation
OPTIONS: dict[str, dict[str, Any]] = {
    "slack-ties": {"params": {"density": 0.5}, "variations": {"slack": 0.0, "protect": "a"}},
    "dare-ties": {"params": {"density": 0.5}, "variations": {"seed": 1}},
    "breadcrumbs": {"params": {"density": 0.5}, "variations": {"gamma": 0.05}},
    "breadcrumbs-ties": {"params": {"density": 0.5}, "variations": {"gamma": 0.05}},
    "della": {"params": {"density": 0.5}, "variations": {"epsilon": 0.05, "seed": 1}},
    "della-linear": {"params": {"density": 0.5}, "variations": {"epsilon": 0.05, "seed": 1}},
    "model-stock": {"variations": {"filter_wise": True}},
    "vocabulary": {"params": {"init": "random", "new_tokens": 200}},  # mean ignores the seed
    "slerp": {"params": {"t": 0.3}, "variations": {"t": 0.7}},
    "passthrough": {"params": {"slices": [{"model": "a", "layers": [0, 2]},
                                          {"model": "b", "layers": [2, 3]},
                                          {"model": "c", "layers": [3, 4]}]},
                    "variations": {"slices": [{"model": "c", "layers": [0, 1]},
                                              {"model": "b", "layers": [1, 2]},
                                              {"model": "a", "layers": [2, 4]}]}},
    "indices": {"params": {"indices": [0, -1]}},
    "layer-importance": {"params": {"batches": 1, "batch_size": 2, "seq_len": 16}},
    "retention": {"params": {"reference": "base"}},
}
#: built-ins that do not pass yet: name -> reason (xfail, strict)
KNOWN_FAILURES: dict[str, str] = {}
#: merge built-ins whose overrides the suite does not check: name -> the start of the reason
#: it gives (report.skipped); every other merge built-in passes the overrides property
OVERRIDES_SKIPPED = {
    "passthrough": "the method refuses overrides: MergeError: passthrough copies tensors and "
                   "takes no overrides",
}


def _builtins() -> list[Any]:
    cases = []
    for kind, impls in implementations().items():
        for name, reg in sorted(impls.items()):
            if not reg.plugin.startswith("engine_plugins."):
                continue
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[name])] \
                if name in KNOWN_FAILURES else []
            cases.append(pytest.param(kind, name, id=f"{kind}/{name}", marks=marks))
    return cases


@pytest.fixture(scope="module")
def elo_submodel(tmp_path_factory, tiny_model_family):
    """An ELO sub-model of the family's base (elo-align's input)."""
    elo = implementations()["adapt-language"]["elo"].impl
    root = tmp_path_factory.mktemp("elo-sub")
    text = write_text_file(root / "text.txt")
    from engine.api import DataSource

    ctx = quiet_context(root, "sub", "adapt-language", "elo")
    params = elo.Params.model_validate({"steps": 2, "batch_size": 2, "seq_len": 32})
    art = elo.run(ctx, StageInputs(model=ModelArtifact("base", tiny_model_family["base"]),
                                   data=[DataSource(text, "text")]), params)
    return art.path, text


@pytest.fixture
def lm_eval_task(tmp_path):
    pytest.importorskip("lm_eval")
    rows = [("question what color is the sky answer", [" blue", " cat"], 0),
            ("the cat sits on the", [" mat", " sky"], 0), ("lum vela dora sen", [" kato", " the"], 0)]
    return write_choice_task(tmp_path, rows, metrics=("acc",))


@pytest.mark.parametrize(("kind", "name"), _builtins())
def test_builtin_conforms(kind, name, tiny_model_family, tmp_path, request):
    impl = implementations()[kind][name].impl
    options = dict(OPTIONS.get(name, {}))
    if kind == "merge":
        options["family"] = tiny_model_family
    if name == "elo-align":
        sub, text = request.getfixturevalue("elo_submodel")
        from engine.api import DataSource

        options.update(model=sub, base=tiny_model_family["base"], params={"steps": 2},
                       data=[DataSource(text, "text")])
    if name == "lm-eval":
        folder = request.getfixturevalue("lm_eval_task")
        options["params"] = {"tasks": ["tiny_mc"], "include_path": str(folder), "batch_size": 2}
    report = check_plugin(impl, kind, workdir=tmp_path, **options)
    assert report.passed and report.plugin == name
    if kind == "merge":
        prop = "overrides change only matching tensors"
        if name in OVERRIDES_SKIPPED:
            assert report.skipped[prop].startswith(OVERRIDES_SKIPPED[name]), report.skipped
            assert "refuses overrides it cannot apply" in report.passed
        else:
            assert prop in report.passed, report.skipped


#: built-ins checked again in other modes: plugin -> variant -> (check options, modules needed)
VARIANTS: dict[str, dict[str, tuple[dict[str, Any], tuple[str, ...]]]] = {
    "ct": {"layers": ({"layers": [1]}, ()),
           "lora": ({"params": {"lora": {"r": 4}}, "layers": [2]}, ("peft",)),
           "frozen_8bit": ({"params": {"frozen_8bit": True}, "layers": [1]}, ("bitsandbytes",))},
    "sft": {"lora-adapter": ({"params": {"lora": {"r": 4, "save": "adapter"}}}, ("peft",))},
    "elo": {"train_embeddings": ({"params": {"train_embeddings": True}}, ())},
}


@pytest.mark.parametrize(("name", "variant"), [
    pytest.param(name, variant, id=f"{name}+{variant}")
    for name, variants in VARIANTS.items() for variant in variants])
def test_builtin_variant_conforms(name, variant, tmp_path):
    options, needs = VARIANTS[name][variant]
    for module in needs:
        pytest.importorskip(module)
    impl = implementations()["adapt-language"][name].impl
    check_plugin(impl, "adapt-language", workdir=tmp_path, **options)


def test_every_builtin_is_checked():
    names = {name for kind, impls in implementations().items() for name, reg in impls.items()
             if reg.plugin.startswith("engine_plugins.")}
    assert {"ct", "sft", "elo", "elo-align", "first-last", "linear", "ties", "perplexity"} <= names


# --- the docs' median example --------------------------------------------------------------


@pytest.fixture
def median_module(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import lingoforge_median

    yield lingoforge_median
    sys.modules.pop("lingoforge_median", None)


def test_docs_median_example_conforms(median_module, tiny_model_family, tmp_path):
    check_plugin(median_module.MedianMerge(), "merge", family=tiny_model_family, workdir=tmp_path)


# --- toy merges ------------------------------------------------------------------------------


def _write_like(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


class ToyMerge:
    """A task-vector merge for the tests: weighted sum of task vectors times lambda."""

    name = "toy"

    class Params(TaskVectorParams):
        pass

    #: what the toy gets wrong, set per test
    flaw: str | None = None

    def __init__(self, flaw: str | None = None, params: type | None = None) -> None:
        self.flaw = flaw
        if params is not None:
            self.Params = params

    def run(self, context, inputs: StageInputs, params):
        flaw = self.flaw
        names = [m.name for m in inputs.models]
        if flaw == "wrong artifact":
            return LayerSelection(context.stage_name, [0], 4, "not a model")
        if flaw == "whole-model loader":
            return _whole_model_merge(context, inputs)
        if flaw == "reads everything first":  # e.g. for global statistics, kept around
            from engine.models.tensorio import ModelReader

            readers = [ModelReader(m.path, m.name) for m in [inputs.base, *inputs.models]]
            self.held = [r.get(name) for r in readers for name in r.infos]
        lam = 1.0 if flaw == "ignores lambda" else params.lambda_
        weights = resolve_per_model(params.weight, names, "weight")
        if flaw == "override everywhere" and params.overrides:
            weights = resolve_per_model(params.overrides[0].values["weight"], names, "weight")
        params.overrides  # noqa: B018 (read: the engine refuses params a plugin never reads)
        gamma = getattr(params, "gamma", None)

        def fn(deltas: torch.Tensor, w: list[float]) -> torch.Tensor:
            out = lam * torch.einsum("m,m...->...", torch.tensor(w, dtype=deltas.dtype), deltas)
            if params.normalize:
                out = out / sum(w)
            if flaw == "identity":
                out = out + 0.01
            if flaw == "nondeterministic":
                out = out * (1 + 0.01 * torch.rand_like(out))
            if flaw == "slice dependent":
                out = out + 1e-3 * deltas.mean()
            if gamma is not None and flaw != "ignores gamma":
                out = out * (1 - gamma)
            return out

        def select(name: str) -> Positionwise:
            w = weights
            if flaw != "override everywhere":
                for ov in params.overrides:
                    import re

                    if re.search(ov.match, name) and "weight" in ov.values and flaw != "ignores overrides":
                        w = resolve_per_model(ov.values["weight"], names, "weight")
                        break
            return Positionwise(lambda deltas: fn(deltas, w))

        run_params = params
        if flaw == "ignores out_dtype":
            run_params = params.model_copy(update={"out_dtype": None})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            art = run_merge(context, inputs, run_params, PositionwiseMerge(select))
        if flaw == "changes dtype":
            tensors = {k: v.half() for k, v in load_file(str(art.path / "model.safetensors")).items()}
            _write_like(art.path, tensors)
        return art


def _whole_model_merge(context, inputs):
    """Averages the models after loading each one whole (what streaming forbids)."""
    for f in inputs.base.path.iterdir():
        if f.is_file():
            shutil.copy2(f, context.output_dir / f.name)
    from safetensors import torch as st

    states = [st.load_file(str(m.path / "model.safetensors")) for m in inputs.models]
    _write_like(context.output_dir, {k: sum(s[k] for s in states) / len(states) for k in states[0]})
    return ModelArtifact(context.stage_name, context.output_dir)


class GammaParams(TaskVectorParams):
    gamma: float = Field(0.0, ge=0, lt=1, description="Shrink the merged delta by this fraction.")


def _fails(impl: Any, prop: str, *, match: str | None = None, family, tmp_path, kind="merge",
           **options: Any) -> ConformanceError:
    with pytest.raises(ConformanceError) as info:
        check_plugin(impl, kind, workdir=tmp_path, **({"family": family} if kind == "merge" else {}),
                     **options)
    err = info.value
    assert err.prop == prop, f"failed {err.prop!r}, expected {prop!r}: {err}"
    assert repr(impl.name) in str(err) and prop in str(err)
    if match is not None:
        assert match in str(err), str(err)
    return err


def test_toy_merge_without_flaws_conforms(tiny_model_family, tmp_path):
    report = check_plugin(ToyMerge(params=GammaParams), "merge", family=tiny_model_family,
                          workdir=tmp_path, variations={"gamma": 0.5})
    assert "honours every parameter" in report.passed
    assert "overrides change only matching tensors" in report.passed


@pytest.mark.parametrize(("flaw", "prop", "match"), [
    ("wrong artifact", "writes a loadable model", "LayerSelection"),
    ("changes dtype", "keeps names, shapes and dtypes", "float16"),
    ("identity", "a model merged with itself is itself", None),
    ("nondeterministic", "deterministic", None),
    ("whole-model loader", "streams", None),
    ("reads everything first", "streams", "bytes of input tensors at once"),
    ("slice dependent", "sliced equals whole", None),
    ("ignores lambda", "honours every parameter", "lambda=0.5"),
    ("ignores out_dtype", "honours every parameter", "out_dtype"),
    ("override everywhere", "overrides change only matching tensors", "does not match"),
    ("ignores overrides", "overrides change only matching tensors", "unchanged"),
])
def test_conformance_rejects_a_broken_merge(flaw, prop, match, tiny_model_family, tmp_path):
    _fails(ToyMerge(flaw), prop, match=match, family=tiny_model_family, tmp_path=tmp_path)


def test_conformance_rejects_a_merge_ignoring_weight_like_the_old_median(tiny_model_family, tmp_path):
    """The median example as docs/plugins.md first had it: weight and overrides unread."""

    class OldMedian:
        """Element-wise median of the task vectors, scaled by lambda."""

        name = "old-median"

        class Params(MergeParams):
            lambda_: float = Field(1.0, alias="lambda", description="Scale of the merged task vector.")

        def run(self, context, inputs, params):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return run_merge(context, inputs, params,
                                 lambda name, deltas: params.lambda_ * deltas.median(dim=0).values)

    _fails(OldMedian(), "honours every parameter", match="weight=", family=tiny_model_family,
           tmp_path=tmp_path)


def test_conformance_rejects_an_ignored_own_param_and_a_missing_variation(tiny_model_family, tmp_path):
    _fails(ToyMerge("ignores gamma", params=GammaParams), "honours every parameter",
           match="gamma=0.5 changed no tensor", family=tiny_model_family, tmp_path=tmp_path,
           variations={"gamma": 0.5})
    _fails(ToyMerge(params=GammaParams), "honours every parameter", match="gamma: no variation given",
           family=tiny_model_family, tmp_path=tmp_path / "2")


# --- toy params --------------------------------------------------------------------------------


class _Opaque:
    pass


class ExtraAllowed(TaskVectorParams):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Undocumented(TaskVectorParams):
    gamma: float = 0.0


class BadRoundTrip(TaskVectorParams):
    gamma: float = Field(0.0, description="Serialised as text that does not validate back.")

    @field_serializer("gamma")
    def _as_text(self, v: float) -> str:
        return f"{v} percent"


class BadDefault(TaskVectorParams):
    gamma: int = Field("many", validate_default=True, description="A default its own type refuses.")


class NoSchema(TaskVectorParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, arbitrary_types_allowed=True)
    gamma: _Opaque = Field(default_factory=_Opaque, description="A type JSON schema cannot describe.")


class NotPluginParams(BaseModel):
    weight: float = 1.0


@pytest.mark.parametrize(("params", "prop"), [
    (ExtraAllowed, "params: unknown keys refused"),
    (Undocumented, "params: documented"),
    (BadRoundTrip, "params: round-trip"),
    (BadDefault, "params: defaults build"),
    (NoSchema, "params: JSON schema"),
    (NotPluginParams, "params: subclass PluginParams"),
])
def test_conformance_rejects_broken_params(params, prop, tiny_model_family, tmp_path):
    _fails(ToyMerge(params=params), prop, family=tiny_model_family, tmp_path=tmp_path)


def test_conformance_rejects_an_undescribed_plugin(tiny_model_family, tmp_path):
    class Bare(ToyMerge):
        pass

    Bare.__doc__ = None
    _fails(Bare(), "declares name, description and data formats", match="description",
           family=tiny_model_family, tmp_path=tmp_path)


# --- toy trainers and aligners -------------------------------------------------------------------


class ToyTrainer:
    """Perturbs the weights of the chosen layers (all without a selection), seeded."""

    name = "toy-trainer"
    data_formats = ("text",)

    class Params(TrainingParams):
        pass

    def __init__(self, flaw: str | None = None) -> None:
        self.flaw = flaw

    def run(self, context, inputs: StageInputs, params):
        from engine.models.arch import layer_of_key

        model = context.load_model(inputs.model, load_in_8bit=False, dtype=torch.float32)
        gen = torch.Generator().manual_seed(0 if self.flaw == "ignores seed" else params.seed)
        chosen = None if inputs.layers is None or self.flaw == "ignores layers" else set(inputs.layers.indices)
        trained = 0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if chosen is not None and layer_of_key(name) not in chosen:
                    continue
                noise = (torch.randn(p.shape) if self.flaw == "nondeterministic"
                         else torch.randn(p.shape, generator=gen))
                p.add_(0.01 * noise)
                trained += p.numel()
        total = sum(p.numel() for p in model.parameters())
        if self.flaw != "no counters":
            context.set_param_counts(trainable=1 if self.flaw == "undercounts" else trained, forward=total)
            context.add_tokens(params.steps * params.batch_size * params.seq_len)
        art = context.save_model(model, context.load_tokenizer(inputs.model))
        if self.flaw == "unloadable":
            for f in art.path.glob("*.safetensors"):
                f.write_bytes(b"not safetensors")
        return art


def test_toy_trainer_without_flaws_conforms(tmp_path):
    report = check_plugin(ToyTrainer(), "adapt-language", workdir=tmp_path, layers=[1])
    assert {"trains only its parameters", "honours seed"} <= set(report.passed)


@pytest.mark.parametrize(("flaw", "prop", "layers"), [
    ("unloadable", "writes a loadable model", None),
    ("no counters", "reports counters", None),
    ("undercounts", "trains only its parameters", None),
    ("ignores layers", "trains only its parameters", [1]),
    ("nondeterministic", "deterministic under a seed", None),
    ("ignores seed", "honours seed", None),
])
def test_conformance_rejects_a_broken_trainer(flaw, prop, layers, tmp_path):
    _fails(ToyTrainer(flaw), prop, family=None, tmp_path=tmp_path, kind="adapt-language",
           layers=layers)


class ToyAligner:
    """Copies the base, adds the trained part's first layer (seeded noise when asked)."""

    name = "toy-aligner"

    class Params(PluginParams):
        pass

    def __init__(self, flaw: str | None = None) -> None:
        self.flaw = flaw

    def run(self, context, inputs: StageInputs, params):
        source = inputs.model if self.flaw == "returns the part" else inputs.base
        model = context.load_model(source, load_in_8bit=False, dtype=torch.float32)
        if self.flaw == "nondeterministic":
            with torch.no_grad():
                next(model.parameters()).add_(torch.rand(1))
        total = sum(p.numel() for p in model.parameters())
        context.set_param_counts(trainable=0, forward=total)
        return context.save_model(model, context.load_tokenizer(source))


@pytest.mark.parametrize(("flaw", "prop"), [
    (None, None),
    ("returns the part", "keeps the base's architecture"),
    ("nondeterministic", "deterministic under a seed"),
])
def test_conformance_of_aligners(flaw, prop, elo_submodel, tiny_model_family, tmp_path):
    options = {"model": elo_submodel[0], "base": tiny_model_family["base"]}
    if prop is None:
        check_plugin(ToyAligner(), "align", workdir=tmp_path, **options)
    else:
        _fails(ToyAligner(flaw), prop, family=None, tmp_path=tmp_path, kind="align", **options)


# --- toy selectors and evaluators ------------------------------------------------------------------


class ToySelector:
    """Selects fixed layers."""

    name = "toy-selector"

    class Params(PluginParams):
        pass

    def __init__(self, indices=(0, 3), explanation="the ends", random=False) -> None:
        self.indices, self.explanation, self.random = list(indices), explanation, random

    def run(self, context, inputs, params):
        idx = sorted(set(torch.randint(0, 4, (2,)).tolist())) if self.random else self.indices
        return LayerSelection(context.stage_name, idx, 4, self.explanation)


@pytest.mark.parametrize(("toy", "prop"), [
    (ToySelector(), None),
    (ToySelector(indices=[0, 9]), "indices in range"),
    (ToySelector(indices=[0, -1]), "indices in range"),
    (ToySelector(indices=[3, 0]), "indices in range"),
    (ToySelector(explanation=""), "explains itself"),
    (ToySelector(random=True), "deterministic"),
])
def test_conformance_of_selectors(toy, prop, tmp_path):
    if prop is None:
        check_plugin(toy, "select-layers", workdir=tmp_path)
    else:
        if toy.random:
            torch.manual_seed(3)  # draws that differ between the two runs
        _fails(toy, prop, family=None, tmp_path=tmp_path, kind="select-layers")


class ToyEvaluator:
    """Scores each model by the sum of its weights."""

    name = "toy-eval"
    data_formats = ("text",)

    class Params(PluginParams):
        pass

    def __init__(self, flaw: str | None = None) -> None:
        self.flaw = flaw

    def run(self, context, inputs, params):
        metrics, counts = {}, {}
        for m in inputs.models:
            value = float(sum(t.double().sum() for t in load_file(str(m.path / "model.safetensors")).values()))
            if self.flaw == "nan":
                value = float("nan")
            if self.flaw == "nondeterministic":
                value += float(torch.rand(1))
            if self.flaw == "depends on others":
                value += len(inputs.models)
            metrics[m.name] = {"weight_sum": value}
            counts[m.name] = {} if self.flaw == "no counts" else {"weight_sum": 1}
        if self.flaw == "drops a model":
            metrics.pop(inputs.models[-1].name)
        return MetricsArtifact(context.stage_name, metrics, counts)


@pytest.mark.parametrize(("flaw", "prop"), [
    (None, None),
    ("nan", "metrics for every model"),
    ("drops a model", "metrics for every model"),
    ("no counts", "counts every metric"),
    ("nondeterministic", "deterministic"),
    ("depends on others", "a model's metrics do not depend on the other models"),
])
def test_conformance_of_evaluators(flaw, prop, tmp_path):
    if prop is None:
        check_plugin(ToyEvaluator(), "evaluate", workdir=tmp_path)
    else:
        _fails(ToyEvaluator(flaw), prop, family=None, tmp_path=tmp_path, kind="evaluate")


def test_check_plugin_finds_the_kind_of_a_registered_plugin_or_asks_for_it():
    impl = implementations()["select-layers"]["first-last"].impl
    assert check_plugin(impl).kind == "select-layers"
    with pytest.raises(TypeError, match="pass its stage kind"):
        check_plugin(ToySelector())


# --- the kit itself ---------------------------------------------------------------------------


def test_run_recipe_runs_a_mapping_and_a_file_through_the_runner(lingoforge_model_family, tmp_path,
                                                                   lingoforge_run_recipe):
    from engine.testing import run_recipe

    fam = lingoforge_model_family
    recipe = {"name": "kit", "models": {n: {"path": str(p)} for n, p in fam.items()},
              "stages": [{"name": "merged", "stage": "merge", "plugin": "linear",
                          "models": ["a", "b"]}]}
    report = lingoforge_run_recipe(recipe, overrides=["stages.merged.params.weight=0.5"])
    assert report["finished"] and report["stages"][0]["cache"] == "miss"
    assert (tmp_path / "work" / "merged" / "config.json").is_file()
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    again = run_recipe(path, tmp_path / "work", overrides=["stages.merged.params.weight=0.5"])
    assert again["stages"][0]["cache"] == "hit"


def test_fixtures_build_what_conftest_names(lingoforge_tiny_model, tiny_model, lingoforge_context,
                                            lingoforge_register, tmp_path):
    assert tiny_model == lingoforge_tiny_model and (tiny_model / "config.json").is_file()
    ctx = lingoforge_context("s", "merge", "x")
    assert ctx.output_dir == tmp_path / "out-s" and ctx.output_dir.is_dir() and ctx.stage_kind == "merge"

    class Plugin:
        from engine.api import hookimpl

        @hookimpl
        def register_layer_selectors(self, register):
            register(ToySelector())

    lingoforge_register(Plugin(), name="kit-selector")
    assert "toy-selector" in implementations()["select-layers"]


def test_the_nox_matrix_has_a_session_for_every_builtin_and_its_variants():
    import importlib.util

    pytest.importorskip("nox")
    spec = importlib.util.spec_from_file_location(
        "noxfile_under_test", Path(__file__).resolve().parents[2] / "noxfile.py")
    noxfile = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = noxfile  # dataclasses look their module up
    try:
        spec.loader.exec_module(noxfile)
    finally:
        sys.modules.pop(spec.name, None)
    kinds = {name: kind for kind, impls in implementations().items()
             for name, reg in impls.items() if reg.plugin.startswith("engine_plugins.")}
    assert {n: p.kind for n, p in noxfile.PLUGINS.items()} == kinds
    for name, plugin in noxfile.PLUGINS.items():
        assert set(plugin.variants) == set(VARIANTS.get(name, {})), name
        ids = noxfile.plugin_tests(name)
        assert len(ids) >= 2, f"{name}: no unit tests selected"
