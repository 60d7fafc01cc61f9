"""The base classes of every implementation's ``Params`` (re-exported by :mod:`engine.api`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NOT_IN_RESULT", "PluginParams", "TrainingParams", "non_finite"]


#: Mark a param that does not change a stage's result (logging, checkpoint cadence,
#: prefetch sizes): ``Field(10, json_schema_extra=NOT_IN_RESULT)``. Changing it does not
#: invalidate the stage's cached output.
NOT_IN_RESULT: dict[str, Any] = {"affects_output": False}


class PluginParams(BaseModel):
    """Base class of every implementation's ``Params``: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    def result_key(self) -> dict[str, Any]:
        """The params that determine the stage's output (the cache key's part)."""
        dumped = self.model_dump(mode="json")
        for name, info in type(self).model_fields.items():
            extra = info.json_schema_extra
            if isinstance(extra, dict) and extra.get("affects_output") is False:
                dumped.pop(name, None)
        return dumped


class TrainingParams(PluginParams):
    """The parameter names every trainer shares, so recipes stay portable."""

    steps: int = Field(100, ge=1, description="Optimizer steps to run.")
    batch_size: int = Field(8, ge=1, description="Sequences per optimizer step.")
    seq_len: int = Field(128, ge=8, description="Tokens per training sequence.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    seed: int = Field(0, description="Seed for data order, dropout and initialisation.")


def non_finite(value: Any, field: str, *, per_model: bool = False) -> str | None:
    """Why ``value`` (a param's value, raw or parsed) is refused when it is or holds a NaN
    or an infinite number, naming ``field`` and, with ``per_model``, the model a dict's key
    names (``weight must be a finite number, got nan for model 'a'``); None when finite.
    NaN passes a range check written as ``not (x < low)`` and inf an open bound; either
    reaches the arithmetic (merge params refuse them: :mod:`engine.merging.params`)."""
    if per_model and isinstance(value, Mapping):
        for model, v in value.items():
            why = non_finite(v, field)
            if why is not None:
                return f"{why} for model {model!r}"
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{field} must be a finite number, got {value}"
    if isinstance(value, list | tuple):
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        for i, v in enumerate(value):
            if numbers and isinstance(v, float) and not math.isfinite(v):  # a gradient anchor
                return f"{field} must be a finite number, got {v} in the layer gradient {list(value)}"
            why = non_finite(v, f"{field}[{i}]")
            if why is not None:
                return why
    elif isinstance(value, Mapping):
        for k, v in value.items():
            why = non_finite(v, f"{field}[{k!r}]")
            if why is not None:
                return why
    elif isinstance(value, BaseModel):
        for k in type(value).model_fields:
            why = non_finite(value.__dict__.get(k), f"{field}.{k}")
            if why is not None:
                return why
    return None
