"""The recipe contract: pydantic models of a recipe file and how one is read.

A recipe names its input ``models`` and lists ``stages``; a stage's ``name`` is its
output, which later stages reference. This module only checks the *shape* of a
recipe; :mod:`engine.recipe.validate` checks references, plugins, params, files and model
shapes against each other.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from engine.core.errors import RecipeError
from engine.core.stages import STAGE_KINDS
from engine.core.suggest import did_you_mean, keys_at
from engine.recipe.data import DataSpec
from engine.recipe.runtime import RuntimeSpec, _Strict
from engine.recipe.search import SearchSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
#: a stage's name is a folder name inside the workdir: one path component, short enough
#: for every file system, and never one of the files the engine writes beside stages
MAX_NAME_LENGTH = 100
RESERVED_NAMES = frozenset({"report.json", "report.md", "report", "run.log", "logs"})
#: a recipe is a small hand-written file: larger inputs, or YAML whose aliases expand to
#: more nodes than this (a "billion laughs" file), are refused before they are built
MAX_RECIPE_BYTES = 4 << 20
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64

#: the ``stage:`` values, read from the stage kinds table
StageKind = Literal[tuple(STAGE_KINDS)]  # type: ignore[valid-type]


def check_safe_name(value: Any, what: str = "name") -> str:
    """A run or stage name becomes a folder name: one safe path component, so that no
    output is ever written outside the workdir (``../x``, ``/abs``, ``a/b`` are refused)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string")
    if not re.fullmatch(NAME_PATTERN, value):
        raise ValueError(f"{what} {value!r} is not a safe folder name: use letters, digits, "
                         "'.', '_' and '-', starting with a letter or digit (no '/', no '..')")
    if len(value) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is {len(value)} characters long; at most {MAX_NAME_LENGTH}")
    if value in RESERVED_NAMES:
        raise ValueError(f"{what} {value!r} is the name of a file the engine writes in the workdir")
    return value


class ModelSpec(_Strict):
    """An input model: a Hugging Face folder on disk, or one of the built-in world."""

    path: str | None = Field(None, description="Model folder (relative paths are relative to the recipe file).")
    builtin: str | None = Field(None, description="Name of a built-in model, e.g. 'tiny-base'.")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of 'path' or 'builtin'")
        return self


def resolve_model_path(spec: ModelSpec, recipe_dir: Path) -> Path:
    """The folder of a path model (relative to the recipe file)."""
    assert spec.path is not None
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() else (recipe_dir / path).resolve()


def root_config(ref: str, recipe: Recipe, configs: dict[str, dict | None]) -> dict | None:
    """The config of the input model a reference derives from (stage outputs keep
    their primary input's architecture)."""
    seen = set()
    while ref not in configs and ref not in seen:
        seen.add(ref)
        try:
            spec = recipe.stage(ref)
        except KeyError:
            return None
        ref = spec.model or spec.base or (spec.models[0] if spec.models else ref)
    return configs.get(ref)


class StageSpec(_Strict):
    """One step of a pipeline. Which input keys a stage takes depends on its kind."""

    name: str = Field(..., pattern=NAME_PATTERN,
                      description="Unique name; also the output folder (one safe path component).")
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
    search: SearchSpec | None = Field(
        None, description="Merge stages: search the merge's params on dev data and write the "
                          "chosen candidate (docs/search.md).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_safe_name(v, "stage name")

    @model_validator(mode="after")
    def _search_on_merges(self) -> StageSpec:
        if self.search is not None and self.stage != "merge":
            raise ValueError(f"'search' belongs to merge stages; this is a {self.stage} stage")
        return self

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
        if self.search is not None:
            extra = [m for e in self.search.evaluate for m in e.models]
            if extra:
                refs["search"] = list(dict.fromkeys(extra))
        return refs


class Recipe(_Strict):
    """A pipeline: named input models and the stages that turn them into outputs."""

    name: str = Field(..., pattern=NAME_PATTERN, description="Run name; outputs go to runs/<name>/.")
    description: str = Field("", description="Free text shown in reports.")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Named input models.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    stages: list[StageSpec] = Field(..., min_length=1)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_safe_name(v, "run name")

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


#: Which input keys each stage kind requires and accepts (read from the stage kinds table).
INPUT_RULES: dict[str, tuple[set[str], set[str]]] = {
    k.name: (set(k.required), set(k.optional)) for k in STAGE_KINDS.values()}


# --- reading ---------------------------------------------------------------------------


def read_recipe_data(path: Path) -> dict[str, Any]:
    """Parse YAML with errors that name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size} bytes is too large for a recipe "
                              f"(at most {MAX_RECIPE_BYTES})")
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping with 'name' and 'stages'")
    return data


def parse_yaml(text: str, source: str = "<recipe>") -> Any:
    """``yaml.safe_load`` with a bound on what aliases can expand to.

    PyYAML builds an alias as a shared reference, so a "billion laughs" file loads in
    a moment, and then explodes in whatever walks it (schema validation, the cache
    key's JSON). The composed node graph is measured first, each shared node counted
    as often as it would be copied, and refused past :data:`MAX_YAML_NODES` nodes or
    :data:`MAX_YAML_DEPTH` levels; recursive aliases are refused outright.
    """
    loader: yaml.SafeLoader | None = None
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), 0, source)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{source}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date 2024-13-45
        raise RecipeError(f"{source}: invalid YAML value: {exc}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int], open_: set[int], depth: int,
                   source: str) -> int:
    """Nodes ``node`` stands for once every alias is copied out (memoised per node)."""
    key = id(node)
    if key in memo:
        return memo[key]
    where = f"{source}:{node.start_mark.line + 1}"
    if key in open_:
        raise RecipeError(f"{where}: invalid YAML: a recursive alias (an anchor used inside itself)")
    if depth > MAX_YAML_DEPTH:
        raise RecipeError(f"{where}: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep")
    open_.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, memo, open_, depth + 1, source)
        if total > MAX_YAML_NODES:
            raise RecipeError(f"{where}: YAML aliases expand to more than {MAX_YAML_NODES} nodes; "
                              "a recipe this large is refused (a 'billion laughs' file?)")
    open_.discard(key)
    memo[key] = total
    return total


def apply_overrides(data: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; a stage may be addressed by its name.

    ``stages.ct.params.steps=10`` sets the ``steps`` param of the stage named ``ct``;
    values are parsed as YAML (``true``, ``1e-4``, ``[a, b]``).
    """
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{source} {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        value = parse_yaml(raw, f"{source} {item!r}") if raw else ""
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
        raise RecipeError(format_validation_error(exc, source, data, model=Recipe)) from None


def load_recipe(path: Path, overrides: list[str] | None = None) -> Recipe:
    data = read_recipe_data(Path(path))
    apply_overrides(data, overrides or [])
    return parse_recipe(data, str(path))


def format_validation_error(exc: ValidationError, source: str, data: Any = None,
                            prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """pydantic errors as ``file: stage 'x' field.path: message`` lines; an unknown key
    or choice gets "did you mean" the closest known one (``model``: the validated class,
    whose keys at the error's location are the known ones)."""
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        hint = _suggestion(err, model)
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
        if err["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "string_pattern_mismatch" and loc and loc[-1] == "name":
            msg += (" (a name is one folder name: letters, digits, '.', '_', '-'; "
                    "no '/', no leading '.')")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg += hint
        lines.append(f"{source}: {where}: {msg}" if where else f"{source}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def _suggestion(err: Any, model: type[BaseModel] | None) -> str:
    """``; did you mean 'x'?`` for an unknown key (its siblings in ``model``) or a value
    outside a fixed set of choices (a stage kind), else ``""``."""
    loc = list(err["loc"])
    if err["type"] == "extra_forbidden" and loc:
        return did_you_mean(loc[-1], keys_at(model, loc[:-1]))
    if err["type"] == "literal_error":
        return did_you_mean(err.get("input"), re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", ""))))
    return ""
