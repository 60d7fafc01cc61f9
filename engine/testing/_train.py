"""Conformance of trainers (adapt-language) and aligners (called through
:mod:`engine.testing.conformance`)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from engine.core.artifacts import LayerSelection, ModelArtifact
from engine.core.inputs import DataSource, InputConfigs, StageInputs
from engine.core.stages import ADAPT_LANGUAGE, ALIGN
from engine.models import modelio
from engine.models.arch import layer_of_key
from engine.testing._checks import (
    Checker,
    ConformanceReport,
    changed_tensors,
    check_params_contract,
    loads_as_model,
    model_state,
    output_state,
    quiet_context,
    single_thread,
)
from engine.testing._instrument import _same_layout
from engine.testing.builders import shared_family, write_instructions_file, write_text_file

#: a few tiny steps: enough to change weights, fast on a CPU
FAST = {"steps": 2, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "log_every": 1,
        "checkpoint_every": 0, "warmup_steps": 0}


def default_data(impl: Any, workdir: Path) -> list[DataSource]:
    """A data file of the first format the implementation reads (text when it says none)."""
    formats = tuple(getattr(impl, "data_formats", None) or ("text",))
    if formats[0] == "instructions":
        return [DataSource(write_instructions_file(workdir / "sft.jsonl"), "instructions")]
    return [DataSource(write_text_file(workdir / "text.txt"), "text")]


def fast_params(impl: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    fields = {f.alias or n for n, f in impl.Params.model_fields.items()}
    return {**{k: v for k, v in FAST.items() if k in fields}, **params}


def check_trainer(impl: Any, *, params: Mapping[str, Any] | None = None,
                  data: Sequence[DataSource] | None = None, layers: Sequence[int] | None = None,
                  model: Path | None = None, workdir: Path | None = None) -> ConformanceReport:
    """Check an adapt-language trainer on the tiny model (``model`` to use another).

    ``params`` are merged over a few fast steps (``steps: 2, batch_size: 2, seq_len: 32``);
    ``data`` defaults to a file of the first of the implementation's ``data_formats``;
    ``layers`` hands a layer selection as the stage's ``layers`` input. Properties:

    * the params contract; the static ``check`` (if any) accepts the tiny model;
    * **writes a loadable model** into ``context.output_dir`` (a LoRA adapter folder
      loads through the engine);
    * **reports counters**: tokens processed, trainable and forward parameter counts;
    * **trains only its parameters**: some tensor changed; the elements that changed
      are at most the trainable parameters it reported (not with ``lora``, whose merged
      low-rank update changes whole matrices); with ``layers``, every tensor
      outside those decoder layers is bit-identical and some inside changed;
    * **deterministic under a seed**: two runs give bitwise the same tensors;
    * **honours seed**: another ``seed`` gives other tensors (when Params has one).
    """
    return _run(impl, ADAPT_LANGUAGE, params, data, layers, model, None, workdir)


def check_aligner(impl: Any, *, model: ModelArtifact | Path, base: ModelArtifact | Path,
                  params: Mapping[str, Any] | None = None, data: Sequence[DataSource] | None = None,
                  workdir: Path | None = None) -> ConformanceReport:
    """Check an aligner that puts ``model`` (a trained part, e.g. an ELO sub-model) back
    into ``base``. Properties: the params contract; **writes a loadable model**;
    **reports counters** (forward parameters); **keeps the base's architecture** (its
    tensor names, shapes and dtypes); **deterministic under a seed**; **honours seed**
    when it fine-tunes on ``data``."""
    return _run(impl, ALIGN, params, data, None, model, base, workdir)


def _artifact(x: ModelArtifact | Path, name: str) -> ModelArtifact:
    return x if isinstance(x, ModelArtifact) else ModelArtifact(name, Path(x))


def _run(impl: Any, kind: str, params: Mapping[str, Any] | None, data: Any, layers: Any,
         model: Any, base: Any, workdir: Path | None) -> ConformanceReport:
    c = Checker(impl, kind)
    with ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lf-train-")))
        workdir = Path(workdir)
        given = dict(params or {})
        check_params_contract(c, given)
        p = fast_params(impl, given)
        src = _artifact(model if model is not None else shared_family()["base"], "model")
        base_art = _artifact(base, "base") if base is not None else None
        sources = list(data) if data is not None else (
            default_data(impl, workdir) if kind == ADAPT_LANGUAGE else [])
        config = modelio.read_config(src.path)
        selection = None
        if layers is not None:
            selection = LayerSelection("layers", list(layers), int(config["num_hidden_layers"]),
                                       "conformance check")
        runs = [0]

        def run(params: Mapping[str, Any]) -> tuple[ModelArtifact, Any]:
            runs[0] += 1
            context = quiet_context(workdir, f"{kind}-{runs[0]}", kind, c.name)
            inputs = StageInputs(model=src, base=base_art, layers=selection, data=list(sources))
            with single_thread():
                return impl.run(context, inputs, impl.Params.model_validate(dict(params))), context

        if callable(getattr(impl, "check", None)):
            with c.prop("static check accepts valid inputs"):
                configs: dict[str, list[dict[str, Any]]] = {"model": [config]}
                names: dict[str, list[str]] = {"model": [src.name]}
                paths: dict[str, list[Path | None]] = {"model": [src.path]}
                if base_art is not None:
                    configs["base"] = [modelio.read_config(base_art.path)]
                    names["base"], paths["base"] = [base_art.name], [base_art.path]
                impl.check(InputConfigs(configs, names, paths), impl.Params.model_validate(p))
        with c.prop("writes a loadable model"):
            artifact, context = run(p)
            assert isinstance(artifact, ModelArtifact), f"run returned {type(artifact).__name__}, not ModelArtifact"
            assert Path(artifact.path).resolve() == context.output_dir.resolve(), \
                f"the artifact's path {artifact.path} is not context.output_dir {context.output_dir}"
            loads_as_model(artifact.path)
            out = output_state(artifact.path)
        stats = context.stats
        with c.prop("reports counters"):
            assert stats.forward_params and stats.forward_params > 0, \
                "no forward parameter count: call context.set_param_counts(trainable=..., forward=...)"
            assert stats.trainable_params is not None, "no trainable parameter count (set_param_counts)"
            if kind == ADAPT_LANGUAGE:
                assert stats.tokens > 0, "no tokens counted: call context.add_tokens(n) (train() does)"
                assert 0 < stats.trainable_params <= stats.forward_params, (
                    f"trainable {stats.trainable_params} not in (0, forward {stats.forward_params}]")
        before = model_state((base_art or src).path)
        if kind == ADAPT_LANGUAGE:
            with c.prop("trains only its parameters"):
                bound = stats.trainable_params
                if getattr(impl.Params.model_validate(p), "lora", None) is not None:
                    bound = None  # merged low-rank updates change whole matrices
                    c.note("LoRA: changed elements not bounded by the trainable count")
                _trains_only(before, out, bound, selection)
        else:
            with c.prop("keeps the base's architecture"):
                _same_layout(before, out)
        with c.prop("deterministic under a seed"):
            again, _ = run(p)
            diff = changed_tensors(out, output_state(again.path))
            assert not diff, f"two runs with the same params and seed differ in {len(diff)} tensors: {diff[:4]}"
        fields = {f.alias or n for n, f in impl.Params.model_fields.items()}
        trains = kind == ADAPT_LANGUAGE or (sources and p.get("steps", 1))
        if "seed" in fields and trains:
            with c.prop("honours seed"):
                seed = impl.Params.model_validate(p).seed
                other, _ = run({**p, "seed": seed + 1})
                diff = changed_tensors(out, output_state(other.path))
                assert diff, f"seed {seed} and seed {seed + 1} gave bitwise the same model"
    return c.report


def _trains_only(before: dict[str, Any], after: dict[str, Any], trainable: int | None,
                 selection: LayerSelection | None) -> None:
    import torch

    changed = changed_tensors(before, after)
    assert changed, "no tensor of the output differs from the input model: nothing trained"
    elements = sum(int((before[k] != after[k]).sum()) for k in changed
                   if before[k].shape == after[k].shape)
    assert trainable is None or elements <= trainable, (
        f"{elements} elements changed, more than the {trainable} trainable parameters reported "
        f"(changed: {changed[:4]})")
    if selection is not None:
        chosen = set(selection.indices)
        outside = [k for k in changed if layer_of_key(k) not in chosen]
        assert not outside, (f"with layers {sorted(chosen)} selected, tensors outside them changed: "
                             f"{outside[:4]} ({len(outside)})")
        inside = [k for k in after if layer_of_key(k) in chosen]
        assert any(not torch.equal(before[k], after[k]) for k in inside if k in before), \
            f"no tensor of the selected layers {sorted(chosen)} changed"
