"""Parameter declarations shared by merge methods, and their per-model resolution.

A merge plugin's ``Params`` subclasses one of these (mergekit's idea: each method
declares its parameters once, with defaults and descriptions, and the recipe schema
and the docs are built from that declaration). Per-model parameters are written in a
recipe either as one number for every model or as ``{model name: number}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.core.errors import MergeError
from engine.core.params import NOT_IN_RESULT, PluginParams, non_finite
from engine.merging.declared import Bounds, PerModel, SearchRange
from engine.merging.gradients import (
    Gradient,
    refuse_gradient,
)
from engine.merging.overrides import TensorOverride, resolve_overrides
from engine.merging.reads import note_read, start_tracking, tracked_fields
from engine.models.tensorio import parse_size

__all__ = [
    "Bounds", "ExecutionParams", "OntoTokenizer", "SearchRange", "MergeParams", "PerModel", "PerModelDensity", "PerModelFloat",
    "Layered", "TaskVectorParams", "TiesParams", "check_weight_sum", "layered_range", "per_model_fields",
    "per_model_range", "resolve_per_model",
]


#: a number, or a layer gradient: a list of numbers spread over the decoder layers
Layered = float | list[float]


def _range_check(field: str, low: float | None, high: float | None, low_open: bool,
                 high_open: bool, meaning: str) -> Any:
    if low is None or high is None:
        bounds = ""
    else:
        bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    why = f" ({meaning})" if meaning else ""

    def check(value: Any) -> Any:
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for model, v in items:
            where = f" for model {model!r}" if model is not None else ""
            if isinstance(v, list) and not v:
                raise ValueError(f"{field}: an empty list{where}; a layer gradient needs at "
                                 "least one number")
            for x in (v if isinstance(v, list) else [v]):
                if not math.isfinite(x):  # NaN fails every comparison; inf passes open bounds
                    raise ValueError(f"{non_finite(v, field)}{where}")
                if not bounds:
                    continue
                above = x > low if low_open else x >= low
                below = x < high if high_open else x <= high
                if not (above and below):
                    raise ValueError(f"{field} must be in {bounds}{why}, got {x}{where}")
        return value

    return check


def per_model_range(field: str, low: float, high: float, *, low_open: bool = False,
                    high_open: bool = False, meaning: str = "") -> Any:
    """A per-model number type checked to lie in a range, for a merge method's ``Params``:
    ``density: per_model_range("density", 0, 1, low_open=True, meaning="the kept
    fraction")`` accepts ``0.5``, ``{model name: 0.5}`` or a layer gradient in either
    place (``[0.2, 0.8]``, :mod:`engine.merging.gradients`), and rejects a value outside
    ``(0, 1]`` with one error naming the field, the range, the value and the model."""
    check = _range_check(field, low, high, low_open, high_open, meaning)
    return Annotated[Layered | dict[str, Layered], AfterValidator(check), PerModel(), Gradient(),
                     Bounds(low, high, low_open, high_open)]


def layered_range(field: str, low: float, high: float, *, low_open: bool = False,
                  high_open: bool = False, meaning: str = "") -> Any:
    """One number (the same for every model) in a range, or a layer gradient of such
    numbers, for a merge method's ``Params``: ``t: layered_range("t", 0, 1, meaning="0 is
    the first model") = Field(0.5, description="Interpolation factor.")`` accepts ``0.3``
    or ``[0, 0.5, 1]`` (a gradient over the decoder layers) and rejects ``1.5`` with an
    error naming the field, the range and the value; ``Field(..., description=...)`` makes
    it required (slerp's ``t``). ``p.t`` in ``merge`` is the number at the tensor's layer."""
    check = _range_check(field, low, high, low_open, high_open, meaning)
    return Annotated[Layered, AfterValidator(check), Gradient(), Bounds(low, high, low_open, high_open)]


#: a number for all models or ``{model name: number}``, either of them a layer gradient
#: (searched in [0, 2] unless a recipe says otherwise)
PerModelFloat = Annotated[Layered | dict[str, Layered],
                          AfterValidator(_range_check("weight", None, None, False, False, "")),
                          PerModel(), Gradient(), SearchRange(0.0, 2.0)]
#: a kept fraction in (0, 1], for all models or ``{model name: fraction}``
PerModelDensity = per_model_range("density", 0, 1, low_open=True, meaning="the kept fraction")


def per_model_fields(params_type: type[PluginParams]) -> list[str]:
    """The names of the fields of ``params_type`` declared per-model (:class:`PerModel`)."""
    return [name for name, info in params_type.model_fields.items()
            if any(isinstance(m, PerModel) for m in info.metadata)]


DtypeName = Literal["float32", "bfloat16", "float16"]
ComputeDtypeName = Literal["float32", "float64", "bfloat16", "float16"]


class OntoTokenizer(PluginParams):
    """``tokenizer:`` of a merge: every input whose tokenizer differs from one input's is
    given that tokenizer first (the runner does it: :mod:`engine.run.transplant`)."""

    model: str = Field(..., description="The input model (the base or a merged model) whose tokenizer "
                       "every input takes.")
    init: str = Field("mean", description="Init method of the rows a transplanted model gains: mean, "
                      "random, omp (fitted in the tokenizer model's own embedding), or a plugin's; focus "
                      "needs target text, which a merge does not read.")
    init_params: dict[str, Any] = Field({}, description="The init method's options, e.g. {k: 8}.")
    seed: int = Field(0, description="Seed of the init method.")


class ExecutionParams(PluginParams):
    """What every merge method takes: how the merge is executed, and per-tensor
    ``overrides``. A method without model weights declares its ``Params`` on this class
    (a recipe that sets ``weight`` is then refused by the schema); most use
    :class:`MergeParams`."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    out_dtype: DtypeName | None = Field(
        None, description="dtype of the written tensors; default: each tensor's dtype in the "
                          "base (the first model when there is no base).")
    compute_dtype: ComputeDtypeName = Field(
        "float32", description="dtype the arithmetic runs in.")
    device: Literal["auto", "cpu", "cuda"] | None = Field(
        None, description="Where the arithmetic runs; default: the stage's runtime device.")
    shard_size: int | str = Field(
        "2GB", description="Largest output shard, in bytes or as '2GB' / '500MB' / '512MiB'.")

    prefetch: int | str = Field(
        0, json_schema_extra=NOT_IN_RESULT,
        description="Read ahead: a reader thread loads the next tensors (of every model) while "
                    "the current one merges, up to this many bytes of raw tensors in flight, "
                    "e.g. '64MB'; 0 (the default) reads and merges in turn (leaner; no clear "
                    "speed difference measured on 2 cores).")
    tokenizer: OntoTokenizer | None = Field(
        None, description="Merge models whose tokenizers do not extend one another: every input "
                          "with another tokenizer is first given the tokenizer of input `model` (shared "
                          "tokens keep their rows, the others are made by `init`), e.g. "
                          "{model: ct-lum, init: omp} (docs/extend-tokenizer.md, 'Merging across "
                          "tokenizers').")
    overrides: list[TensorOverride] = Field(
        default_factory=list,
        description="Per-tensor params: [{match: REGEX, <param>: value, ...}]; match is searched "
                    "(re.search) in the tensor name and the first override that matches wins.")

    @field_validator("shard_size")
    @classmethod
    def _readable_size(cls, v: int | str) -> int | str:
        parse_size(v)  # raises ValueError with a readable message
        return v

    @field_validator("prefetch")
    @classmethod
    def _readable_prefetch(cls, v: int | str) -> int | str:
        if v not in (0, "0"):
            parse_size(v)
        return v

    @field_validator("*", mode="before")
    @classmethod
    def _finite_given(cls, v: Any, info: ValidationInfo) -> Any:
        return cls._finite(v, info)  # before a range (slack: le=1) gives a vaguer message

    @field_validator("*", mode="after")
    @classmethod
    def _finite_parsed(cls, v: Any, info: ValidationInfo) -> Any:
        return cls._finite(v, info)  # a number parsed from text ('nan', '1e999')

    @classmethod
    def _finite(cls, v: Any, info: ValidationInfo) -> Any:
        """Every number of a merge param (weight, lambda, density, t, a gradient's anchors,
        per-model values, a plugin's own floats) is finite; overrides are checked as the
        params each produces."""
        name = info.field_name or ""
        field = cls.model_fields.get(name)
        if field is None or name == "overrides":
            return v
        per_model = any(isinstance(m, PerModel) for m in field.metadata)
        why = non_finite(v, field.alias or name, per_model=per_model)
        if why is not None:
            raise ValueError(why)
        return v

    @model_validator(mode="after")
    def _valid_overrides(self) -> ExecutionParams:
        resolve_overrides(self)  # each override must produce valid params of this method
        start_tracking(self)
        return self

    def __getattribute__(self, name: str) -> Any:
        # which method params a plugin reads, so that run_merge can refuse a recipe value
        # a plugin written before MergeMethod never looked at (see fields_read)
        if name in tracked_fields(type(self)):
            note_read(self, name)
        return super().__getattribute__(name)

    @property
    def prefetch_bytes(self) -> int:
        return 0 if self.prefetch in (0, "0") else parse_size(self.prefetch)


class MergeParams(ExecutionParams):
    """What most merge methods take: model weights, and how the merge is executed."""

    weight: PerModelFloat = Field(
        1.0, description="Weight of each model: one number for all, or {model name: weight} "
                         "(models not named get 1.0); a list of numbers is a gradient over "
                         "the layers.")


class TaskVectorParams(MergeParams):
    """Methods that merge task vectors (model minus base)."""

    lambda_: Annotated[float, SearchRange(0.5, 2.0)] = Field(
        1.0, alias="lambda", description="Scale of the merged task vector before it is added "
                                         "to the base.")
    normalize: bool = Field(
        False, description="Divide the weighted sum of task vectors by the sum of the weights.")


class TiesParams(TaskVectorParams):
    """The TIES family: trim (or drop), elect sign, disjoint merge."""

    density: PerModelDensity = Field(
        1.0, description="Fraction of each task vector kept, per tensor, in (0, 1]: one number "
                         "or {model name: density} (models not named get 1.0); a list of "
                         "numbers is a gradient over the layers.")
    normalize: bool = Field(
        True, description="Divide each position's merged delta by the sum of the weights of "
                          "the models that agree with the elected sign (mergekit's default).")


def resolve_per_model(value: float | dict[str, float], names: Sequence[str], field: str,
                      default: float = 1.0) -> list[float]:
    """One value per model, in ``names`` order.

    A dict must only name models of this merge (a typo would otherwise silently fall
    back to the default); models it does not name get ``default``.
    """
    refuse_gradient(value, field)
    if not isinstance(value, dict):
        return [float(value)] * len(names)
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise MergeError(f"params.{field} names model(s) {unknown} that are not merged here; "
                         f"the models of this merge are {list(names)}")
    return [float(value.get(n, default)) for n in names]


def check_weight_sum(weights: Sequence[float], names: Sequence[str], *, normalize: bool) -> None:
    """With ``normalize`` the weights are a divisor: their sum must not be zero."""
    if normalize and abs(sum(weights)) < 1e-12:
        pairs = ", ".join(f"{n}={w:g}" for n, w in zip(names, weights))
        raise MergeError(f"params.weight sum to zero ({pairs}) but normalize is on, which divides "
                         "by that sum; change the weights or set normalize: false")
