"""The recipe contract: pydantic models of a recipe file and how one is read.

A recipe names its input ``models`` and lists ``stages``; a stage's ``name`` is its
output, which later stages reference. This module only checks the *shape* of a
recipe; :mod:`engine.validate` checks references, plugins, params, files and model
shapes against each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.api import ADAPT_LANGUAGE, ALIGN, EVALUATE, MERGE, SELECT_LAYERS, STAGE_KINDS
from engine.errors import RecipeError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"

StageKind = Literal["adapt-language", "select-layers", "merge", "align", "evaluate"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Strict):
    """An input model: a Hugging Face folder on disk, or one of the built-in world."""

    path: str | None = Field(None, description="Model folder (relative paths are relative to the recipe file).")
    builtin: str | None = Field(None, description="Name of a built-in model, e.g. 'tiny-base'.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class DataSpec(_Strict):
    """A data file a stage reads; a list of them is mixed by ``weight``."""

    path: str | None = Field(None, description="txt or jsonl file (relative to the recipe file).")
    builtin: str | None = Field(None, description="Built-in world file, e.g. 'lum/train.txt'.")
    format: Literal["auto", "text", "instructions", "choice", "generation"] = Field(
        "auto", description="What the file holds; 'auto' looks at the extension and first record.")
    language: str | None = Field(None, description="Language label used in metrics and mixing.")
    weight: float = Field(1.0, gt=0, description="Mixing weight relative to the other files.")
    text_field: str = Field("text", description="Field holding the text in jsonl text files.")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


class RuntimeSpec(_Strict):
    """Where models run. Set once for the recipe; a stage's ``runtime`` overrides it."""

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on a GPU that supports it, else float32.")
    load_in_8bit: bool = Field(False, description="Load models that are only read in 8 bit (bitsandbytes).")
    trust_remote_code: bool = Field(False, description="Run model code shipped inside model folders.")


class StageSpec(_Strict):
    """One step of a pipeline. Which input keys a stage takes depends on its kind."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Unique name; also the output folder.")
    stage: StageKind = Field(..., description="Stage kind.")
    plugin: str = Field(..., description="Implementation registered for this stage kind.")
    model: str | None = Field(None, description="Input model (recipe model or earlier stage).")
    models: list[str] | None = Field(None, description="Input models (merge, evaluate).")
    base: str | None = Field(None, description="Base model (merge: task vectors are taken against it).")
    layers: str | None = Field(None, description="A select-layers stage whose layers to train.")
    data: DataSpec | list[DataSpec] | None = Field(None, description="Data file(s).")
    params: dict[str, Any] = Field(default_factory=dict, description="The plugin's parameters.")
    runtime: RuntimeSpec | None = Field(None, description="Overrides of the recipe's runtime.")
    cache: bool = Field(True, description="Reuse the output of an identical earlier run.")

    @field_validator("params", mode="before")
    @classmethod
    def _params_mapping(cls, v: Any) -> Any:
        return {} if v is None else v

    def data_list(self) -> list[DataSpec]:
        if self.data is None:
            return []
        return self.data if isinstance(self.data, list) else [self.data]

    def references(self) -> dict[str, list[str]]:
        """Input key -> referenced names."""
        refs: dict[str, list[str]] = {}
        for key in ("model", "base", "layers"):
            value = getattr(self, key)
            if value is not None:
                refs[key] = [value]
        if self.models:
            refs["models"] = list(self.models)
        return refs


class Recipe(_Strict):
    """A pipeline: named input models and the stages that turn them into outputs."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Run name; outputs go to runs/<name>/.")
    description: str = Field("", description="Free text shown in reports.")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Named input models.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    stages: list[StageSpec] = Field(..., min_length=1)

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


#: Which input keys each stage kind requires and accepts.
INPUT_RULES: dict[str, tuple[set[str], set[str]]] = {
    ADAPT_LANGUAGE: ({"model", "data"}, {"layers"}),
    SELECT_LAYERS: ({"model"}, {"data"}),
    MERGE: ({"models"}, {"base"}),
    ALIGN: ({"model"}, {"base", "data"}),
    EVALUATE: ({"models", "data"}, set()),
}
assert set(INPUT_RULES) == set(STAGE_KINDS)


# --- reading ---------------------------------------------------------------------------


def read_recipe_data(path: Path) -> dict[str, Any]:
    """Parse YAML with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with 'name' and 'stages'")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; a stage may be addressed by its name.

    ``stages.ct.params.steps=10`` sets the ``steps`` param of the stage named ``ct``;
    values are parsed as YAML (``true``, ``1e-4``, ``[a, b]``).
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source} {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else ""
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise RecipeError(f"{source} {item!r}: empty key")
        node: Any = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                idx = _list_index(node, part, item, source)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                raise RecipeError(f"{source} {item!r}: {'.'.join(parts[:i])} is not a mapping or list")
    return data


def _list_index(node: list[Any], part: str, item: str, source: str) -> int:
    if re.fullmatch(r"-?\d+", part):
        idx = int(part)
        if -len(node) <= idx < len(node):
            return idx
        raise RecipeError(f"{source} {item!r}: index {idx} out of range")
    for idx, entry in enumerate(node):
        if isinstance(entry, dict) and entry.get("name") == part:
            return idx
    raise RecipeError(f"{source} {item!r}: no stage named {part!r}")


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate the shape of a recipe mapping; errors name the stage and field."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source, data)) from None


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    data = read_recipe_data(Path(path))
    apply_overrides(data, overrides or [])
    return parse_recipe(data, str(path))


def format_validation_error(exc: ValidationError, source: str, data: Any = None,
                            prefix: str = "") -> str:
    """pydantic errors as ``file: stage 'x' field.path: message`` lines."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = prefix
        if data is not None and len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            stages = data.get("stages") if isinstance(data, dict) else None
            name = None
            if isinstance(stages, list) and loc[1] < len(stages) and isinstance(stages[loc[1]], dict):
                name = stages[loc[1]].get("name")
            where += f"stage {name!r}" if name else f"stages[{loc[1]}]"
            loc = loc[2:]
            # drop pydantic's union-branch tags such as 'DataSpec' or 'list[DataSpec]'
            loc = [p for p in loc if not (isinstance(p, str) and ("[" in p or p[:1].isupper()))]
            if loc:
                where += " "
        where += ".".join(str(p) for p in loc)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(dict.fromkeys(lines))
