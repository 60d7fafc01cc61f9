"""Parameter declarations shared by merge methods, and their per-model resolution.

A merge plugin's ``Params`` subclasses one of these (mergekit's idea: each method
declares its parameters once, with defaults and descriptions, and the recipe schema
and the docs are built from that declaration). Per-model parameters are written in a
recipe either as one number for every model or as ``{model name: number}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from engine.errors import MergeError
from engine.merging.overrides import TensorOverride, resolve_overrides
from engine.merging.tensorio import parse_size
from engine.params import NOT_IN_RESULT, PluginParams

__all__ = [
    "MergeParams", "PerModelDensity", "PerModelFloat", "TaskVectorParams",
    "TiesParams", "check_weight_sum", "resolve_per_model",
]

def _check_density(value: float | dict[str, float]) -> float | dict[str, float]:
    """One readable error for a density out of (0, 1], naming the model when per-model."""
    items = value.items() if isinstance(value, dict) else [(None, value)]
    for model, d in items:
        if not 0 < d <= 1:
            where = f" for model {model!r}" if model is not None else ""
            raise ValueError(f"density must be in (0, 1] (the kept fraction), got {d}{where}")
    return value


PerModelFloat = float | dict[str, float]
#: a kept fraction in (0, 1], for all models or ``{model name: fraction}``
PerModelDensity = Annotated[float | dict[str, float], AfterValidator(_check_density)]

DtypeName = Literal["float32", "bfloat16", "float16"]
ComputeDtypeName = Literal["float32", "float64", "bfloat16", "float16"]


class MergeParams(PluginParams):
    """What every merge method takes: model weights and how the merge is executed."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    weight: PerModelFloat = Field(
        1.0, description="Weight of each model: one number for all, or {model name: weight} "
                         "(models not named get 1.0).")
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

    @model_validator(mode="after")
    def _valid_overrides(self) -> MergeParams:
        resolve_overrides(self)  # each override must produce valid params of this method
        return self

    @property
    def prefetch_bytes(self) -> int:
        return 0 if self.prefetch in (0, "0") else parse_size(self.prefetch)


class TaskVectorParams(MergeParams):
    """Methods that merge task vectors (model minus base)."""

    lambda_: float = Field(
        1.0, alias="lambda", description="Scale of the merged task vector before it is added "
                                         "to the base.")
    normalize: bool = Field(
        False, description="Divide the weighted sum of task vectors by the sum of the weights.")


class TiesParams(TaskVectorParams):
    """The TIES family: trim (or drop), elect sign, disjoint merge."""

    density: PerModelDensity = Field(
        1.0, description="Fraction of each task vector kept, per tensor, in (0, 1]: one number "
                         "or {model name: density} (models not named get 1.0).")
    normalize: bool = Field(
        True, description="Divide each position's merged delta by the sum of the weights of "
                          "the models that agree with the elected sign (mergekit's default).")


def resolve_per_model(value: float | dict[str, float], names: Sequence[str], field: str,
                      default: float = 1.0) -> list[float]:
    """One value per model, in ``names`` order.

    A dict must only name models of this merge (a typo would otherwise silently fall
    back to the default); models it does not name get ``default``.
    """
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


def _check_headers(configs: Mapping[str, Any]) -> None:
    """With folder paths (``InputConfigs.paths``), run the full header pre-flight on the
    inputs that exist already: missing/extra tensors, shapes, dtypes, truncated shards,
    tokenizers -- everything :func:`~engine.merging.preflight.check_merge_inputs`
    checks, without reading tensor data."""
    from engine.merging.preflight import check_merge_paths

    paths = getattr(configs, "paths", None) or {}
    names = getattr(configs, "names", None) or {}
    if not paths.get("models"):
        return
    base = None
    if names.get("base"):
        base = (names["base"][0], (paths.get("base") or [None])[0])
    check_merge_paths(base, list(zip(names.get("models", []), paths["models"])))


def check_static(configs: Mapping[str, Any], params: MergeParams) -> list[str]:
    """``engine validate``'s check for a merge: architectures agree (config.json only),
    per-model params name only merged models, normalised weights do not sum to zero.

    ``configs`` is the :class:`engine.api.InputConfigs` the validator passes; returns the
    names of the merged models (empty when unknown).
    """
    from engine.merging.preflight import check_configs

    check_configs(configs)
    _check_headers(configs)
    names = list(getattr(configs, "names", {}).get("models", []))
    if not names:
        return names
    for p in [params, *(p for _, p in resolve_overrides(params))]:
        weights = resolve_per_model(p.weight, names, "weight")
        if hasattr(p, "density"):
            resolve_per_model(p.density, names, "density")
        check_weight_sum(weights, names, normalize=bool(getattr(p, "normalize", False)))
    return names
