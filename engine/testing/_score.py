"""Conformance of layer selectors and evaluators (called through
:mod:`engine.testing.conformance`)."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from engine.core.artifacts import LayerSelection, MetricsArtifact, ModelArtifact
from engine.core.inputs import DataSource, InputConfigs, StageInputs
from engine.core.stages import EVALUATE, SELECT_LAYERS
from engine.models import modelio
from engine.testing._checks import (
    Checker,
    ConformanceReport,
    check_params_contract,
    quiet_context,
    single_thread,
)
from engine.testing.builders import shared_family, write_choice_file, write_text_file


def _data_for(impl: Any, workdir: Path, *, needed: bool) -> list[DataSource]:
    formats = tuple(getattr(impl, "data_formats", None) or (("text",) if needed else ()))
    out = []
    for fmt in formats[:1] if not needed else formats:
        if fmt == "text":
            out.append(DataSource(write_text_file(workdir / "text.txt"), "text"))
        elif fmt == "choice":
            out.append(DataSource(write_choice_file(workdir / "choice.jsonl"), "choice"))
    return out


def _static_check(c: Checker, configs: dict[str, list[dict[str, Any]]],
                  names: dict[str, list[str]], paths: dict[str, list[Path | None]],
                  params: Any) -> None:
    if callable(getattr(c.impl, "check", None)):
        with c.prop("static check accepts valid inputs"):
            c.impl.check(InputConfigs(configs, names, paths), params)


def check_layer_selector(impl: Any, *, params: Mapping[str, Any] | None = None,
                         data: Sequence[DataSource] | None = None, model: Path | None = None,
                         workdir: Path | None = None) -> ConformanceReport:
    """Check a select-layers implementation on the tiny model (``model`` to use another).

    ``data`` defaults to a text file when the implementation declares ``data_formats``.
    Properties: the params contract; the static ``check`` accepts the model; **returns a
    LayerSelection** named after the stage; **indices in range** (non-empty, sorted, unique,
    within the model's ``num_hidden_layers``, which ``num_layers`` states); **explains
    itself** (a non-empty explanation; scores, if any, are finite and keyed by layer);
    **round-trips** through its JSON; **deterministic**.
    """
    c = Checker(impl, SELECT_LAYERS)
    given = dict(params or {})
    check_params_contract(c, given)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-select-")))
        workdir = Path(workdir)
        src = ModelArtifact("model", Path(model) if model is not None else shared_family()["base"])
        sources = list(data) if data is not None else _data_for(impl, workdir, needed=False)
        config = modelio.read_config(src.path)
        n = int(config["num_hidden_layers"])
        p = impl.Params.model_validate(given)
        _static_check(c, {"model": [config]}, {"model": [src.name]}, {"model": [src.path]}, p)
        runs = [0]

        def run() -> tuple[Any, Any]:
            runs[0] += 1
            context = quiet_context(workdir, f"select-{runs[0]}", SELECT_LAYERS, c.name)
            with single_thread():
                return impl.run(context, StageInputs(model=src, data=list(sources)), p), context

        with c.prop("returns a LayerSelection"):
            sel, context = run()
            assert isinstance(sel, LayerSelection), f"run returned {type(sel).__name__}, not LayerSelection"
            assert sel.name == context.stage_name, \
                f"the selection is named {sel.name!r}, not after the stage {context.stage_name!r}"
        with c.prop("indices in range"):
            idx = list(sel.indices)
            assert idx, "no layer selected"
            assert all(isinstance(i, int) and not isinstance(i, bool) for i in idx), f"indices {idx} are not ints"
            assert all(0 <= i < n for i in idx), f"indices {idx} outside 0..{n - 1} (negative ones must be resolved)"
            assert idx == sorted(set(idx)), f"indices {idx} are not sorted and unique"
            assert sel.num_layers == n, f"num_layers {sel.num_layers}, the model has {n}"
        with c.prop("explains itself"):
            assert isinstance(sel.explanation, str) and sel.explanation.strip(), \
                "empty explanation: say why these layers (report.json shows it)"
            for k, v in sel.scores.items():
                assert 0 <= int(k) < n and math.isfinite(float(v)), f"score {k}: {v} out of range or not finite"
        with c.prop("round-trips through JSON"):
            data_json = json.loads(json.dumps(sel.to_json()))
            back = LayerSelection.from_json(sel.name, data_json)
            assert back == sel, f"{sel!r} came back from layers.json as {back!r}"
        with c.prop("deterministic"):
            again, _ = run()
            assert (again.indices, again.explanation, again.scores) == (sel.indices, sel.explanation, sel.scores), \
                f"two runs selected {sel.indices} and {again.indices} (or explained differently)"
    return c.report


def check_evaluator(impl: Any, *, params: Mapping[str, Any] | None = None,
                    data: Sequence[DataSource] | None = None,
                    models: Mapping[str, Path] | None = None,
                    workdir: Path | None = None) -> ConformanceReport:
    """Check an evaluator on two tiny models (``models``: ``{name: folder}``, default the
    family's ``base`` and ``a``). ``data`` defaults to one file per declared format (text,
    choice). Properties: the params contract; the static ``check`` accepts the models;
    **returns MetricsArtifact** named after the stage; **metrics for every model**
    (finite numbers, no errors for valid models); **counts every metric** (same models and
    metric names, positive integers); **metrics.json shape** (``to_json`` is JSON with
    the models and ``_counts``); **deterministic**; **a model's metrics do not depend on
    the other models** (the first model scored alone scores the same).
    """
    c = Checker(impl, EVALUATE)
    given = dict(params or {})
    check_params_contract(c, given)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-eval-")))
        workdir = Path(workdir)
        if models is None:
            fam = shared_family()
            models = {"base": fam["base"], "a": fam["a"]}
        arts = [ModelArtifact(k, Path(v)) for k, v in models.items()]
        sources = list(data) if data is not None else _data_for(impl, workdir, needed=True)
        p = impl.Params.model_validate(given)
        _static_check(c, {"models": [modelio.read_config(a.path) for a in arts]},
                      {"models": [a.name for a in arts]}, {"models": [a.path for a in arts]}, p)
        runs = [0]

        def run(which: list[ModelArtifact]) -> tuple[Any, Any]:
            runs[0] += 1
            context = quiet_context(workdir, f"evaluate-{runs[0]}", EVALUATE, c.name)
            with single_thread():
                return impl.run(context, StageInputs(models=which, data=list(sources)), p), context

        with c.prop("returns MetricsArtifact"):
            art, context = run(arts)
            assert isinstance(art, MetricsArtifact), f"run returned {type(art).__name__}, not MetricsArtifact"
            assert art.name == context.stage_name, \
                f"the artifact is named {art.name!r}, not after the stage {context.stage_name!r}"
        names = [a.name for a in arts]
        with c.prop("metrics for every model"):
            assert not art.errors, f"valid models failed: {art.errors}"
            assert sorted(art.metrics) == sorted(names), f"metrics for {sorted(art.metrics)}, models {names}"
            for m, values in art.metrics.items():
                assert values, f"no metric for model {m!r}"
                for k, v in values.items():
                    assert isinstance(k, str) and not k.startswith("_"), f"metric name {k!r}"
                    assert isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), \
                        f"model {m!r} metric {k!r} = {v!r} is not a finite number"
        with c.prop("counts every metric"):
            for m, values in art.metrics.items():
                counts = art.counts.get(m, {})
                missing = sorted(set(values) - set(counts))
                assert not missing, f"model {m!r}: no count for metrics {missing} (tokens or items behind each)"
                for k in values:
                    assert isinstance(counts[k], int) and counts[k] > 0, \
                        f"model {m!r} metric {k!r}: count {counts[k]!r} is not a positive int"
        with c.prop("metrics.json shape"):
            doc = json.loads(json.dumps(art.to_json()))
            assert "_counts" in doc and all(m in doc for m in names), f"metrics.json keys {sorted(doc)}"
        with c.prop("deterministic"):
            again, _ = run(arts)
            assert again.metrics == art.metrics, f"two runs scored {art.metrics} and {again.metrics}"
        with c.prop("a model's metrics do not depend on the other models"):
            alone, _ = run(arts[:1])
            first = names[0]
            got, want = alone.metrics.get(first, {}), art.metrics[first]
            assert set(got) == set(want) and all(
                math.isclose(got[k], want[k], rel_tol=1e-5, abs_tol=1e-7) for k in want), \
                f"{first!r} scored alone: {got}; beside {names[1:]}: {want}"
    return c.report
