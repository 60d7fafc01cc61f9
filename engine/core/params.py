"""The base classes of every implementation's ``Params`` (re-exported by :mod:`engine.api`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NOT_IN_RESULT", "PluginParams", "TrainingParams"]


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
