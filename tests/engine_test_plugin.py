"""A small, real plugin used by the engine's own tests (registered in fixtures).

``copy-model`` copies its input model folder (an honest, trivial adapter), and
``line-count`` scores each model by the number of lines of its data: enough to
exercise the runner, the cache and the report without training anything.
"""

from __future__ import annotations

import shutil

from pydantic import Field

from engine.api import (
    LayerSelection,
    MetricsArtifact,
    ModelArtifact,
    PluginParams,
    StageInputs,
    hookimpl,
)
from engine.models.modelio import read_config


class CopyModel:
    """Copy the input model unchanged."""

    name = "copy-model"

    class Params(PluginParams):
        fail: bool = Field(False, description="Raise after writing part of the output.")

    def run(self, context, inputs: StageInputs, params) -> ModelArtifact:
        for item in inputs.model.path.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, context.output_dir / item.name)
        if params.fail:
            raise RuntimeError("asked to fail")
        context.add_tokens(7)
        return ModelArtifact(context.stage_name, context.output_dir)


class AllLayers:
    """Select every layer."""

    name = "all-layers"
    Params = PluginParams

    def run(self, context, inputs: StageInputs, params) -> LayerSelection:
        n = read_config(inputs.model.path)["num_hidden_layers"]
        return LayerSelection(context.stage_name, list(range(n)), n, "every layer")


class LineCount:
    """Count data lines per model."""

    name = "line-count"
    Params = PluginParams

    def run(self, context, inputs: StageInputs, params) -> MetricsArtifact:
        lines = sum(len(d.path.read_text().splitlines()) for d in inputs.data)
        return MetricsArtifact(context.stage_name, {m.name: {"lines": float(lines)} for m in inputs.models},
                               {m.name: {"lines": lines} for m in inputs.models})


class Observer:
    """Records lifecycle calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    @hookimpl
    def stage_started(self, context, stage):
        self.events.append(f"started:{stage.name}")

    @hookimpl
    def stage_finished(self, stage, record):
        self.events.append(f"finished:{stage.name}:{record['cache']}")

    @hookimpl
    def run_finished(self, report):
        self.events.append(f"run:{len(report['stages'])}")


@hookimpl
def register_language_adapters(register):
    register(CopyModel())


@hookimpl
def register_layer_selectors(register):
    register(AllLayers())


@hookimpl
def register_evaluators(register):
    register(LineCount())
