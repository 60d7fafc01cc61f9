"""The ``passthrough`` merge method: layer stacking (mergekit's ``passthrough`` with
``slices``), what depth up-scaling and ELO-style depth surgery need.

The output is built from ranges of layers of one or more models, in order, renumbered
from 0: it may have more or fewer layers than its inputs, and config.json says how many.
Nothing is averaged; each tensor is copied (optionally scaled) from the model its slice
names, streamed tensor by tensor. docs/merging.md states the rules and where they
differ from mergekit.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.api import hookimpl
from engine.api.errors import MergeError
from engine.api.merging import ExecutionParams, MergeMethod, plan_layer_stack, run_layer_stack


class LayerSlice(BaseModel):
    """Layers ``[start, stop)`` of one model (mergekit's ``layer_range``)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="Recipe name of the model (one of the stage's 'models').")
    layers: tuple[int, int] = Field(
        ..., description="[start, stop): the layers taken, start included, stop excluded "
                         "(mergekit's layer_range).")
    scale: float | dict[str, float] = Field(
        1.0, description="Multiply the slice's tensors by this; or {REGEX: factor}, searched in "
                         "the output tensor name, the first match wins, 1 where none matches "
                         "(e.g. {'o_proj|down_proj': 0.0} makes duplicated layers start as the "
                         "identity).")

    @field_validator("layers")
    @classmethod
    def _ordered(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= v[0] < v[1]:
            raise ValueError(f"layers must be [start, stop) with 0 <= start < stop, got {list(v)}")
        return v


def _slices(p) -> list[dict]:
    out = []
    for s in p.slices:
        scale = s.scale if isinstance(s.scale, int | float) else list(s.scale.items())
        out.append({"model": s.model, "start": s.layers[0], "stop": s.layers[1], "scale": scale})
    return out


class Passthrough(MergeMethod):
    """Layer stacking: a model made of layer ranges of other models, copied, not averaged."""

    name = "passthrough"
    task_vectors = False

    class Params(ExecutionParams):
        """Passthrough's parameters: the slices, in output order. With a ``base``, the
        tensors outside the layers (embeddings, final norm, LM head), config and tokenizer
        are the base's; without, the embeddings are the first slice's model's and the rest
        the last slice's (mergekit's rule)."""

        slices: list[LayerSlice] = Field(
            ..., min_length=1, description="Layer ranges in output order: [{model: NAME, "
                                           "layers: [start, stop], scale: 1.0}, ...].")

    def _refuse_overrides(self, params) -> None:
        if params.overrides:
            raise MergeError("passthrough copies tensors and takes no overrides; scale tensors "
                             "with a slice's 'scale' ({REGEX: factor})")

    def check(self, configs, params):
        self._refuse_overrides(params)
        names = list(getattr(configs, "names", {}).get("models", []))
        paths = getattr(configs, "paths", {}) or {}
        if names:
            for i, s in enumerate(params.slices):
                if s.model not in names:
                    raise MergeError(f"params.slices[{i}]: model {s.model!r} is not one of this "
                                     f"stage's models {names} (recipe key 'models')")
        folders = paths.get("models") or []
        if names and folders and all(f is not None for f in folders):
            from engine.api import ModelArtifact

            base = None
            base_path = (paths.get("base") or [None])[0]
            if configs.names.get("base") and base_path is not None:
                base = ModelArtifact(configs.names["base"][0], base_path)
            plan_layer_stack(base, [ModelArtifact(n, f) for n, f in zip(names, folders)],
                             _slices(params))

    def run(self, context, inputs, params):
        self._refuse_overrides(params)
        if not inputs.models:
            raise MergeError("passthrough needs at least one model (recipe key 'models')")
        return run_layer_stack(context, inputs, params, _slices(params))


@hookimpl
def register_merge_methods(register):
    register(Passthrough())
