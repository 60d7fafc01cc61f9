"""What ``engine validate`` checks of a merge stage's ``search:`` before anything runs.

* every method named (the stage's plugin and ``methods``) is a registered merge method
  that declares its params (:class:`~engine.merging.method.MergeMethod`);
* the space builds: every searched param has a usable range (:mod:`engine.merging.search.space`);
* each evaluator is a registered evaluate plugin whose params validate and whose dev
  data exists and suits it;
* every objective and constraint names a metric the evaluators produce for the candidate
  (evaluators that declare ``produces(data, params)``; the available ones are listed);
* the dev data never overlaps the test data: the data of every evaluate stage that scores
  this merge. The same file with overlapping record ranges, or records (a choice or
  generation item's prompt, a text line) found in both, are refused, naming both files;
* the sampler's own requirements (``cmaes`` needs the ``cmaes`` package).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from engine.core.errors import EngineError, RecipeError
from engine.core.inputs import DataSource, InputConfigs
from engine.data.files import count_records, source_bounds
from engine.data.sources import resolve_data
from engine.merging.search.plan import PlannedEvaluator, PlannedSearch
from engine.merging.search.space import build_space
from engine.recipe.spec import Recipe, StageSpec, format_validation_error
from engine.registry.implementation import data_format_error
from engine.registry.manager import get_implementation

__all__ = ["MAX_OVERLAP_BYTES", "available_metrics", "overlap_problem", "plan_search"]

#: files larger than this are compared by name and record range only, not record by record
MAX_OVERLAP_BYTES = 256 << 20


def available_metrics(impl: Any, data: Sequence[DataSource], params: Any) -> list[str] | None:
    """The metric names an evaluator produces for one model on ``data`` (None: it does not
    say; its metrics are then checked at the first trial)."""
    produces = getattr(impl, "produces", None)
    if produces is None:
        return None
    return list(produces(list(data), params))


def plan_search(spec: StageSpec, recipe: Recipe, recipe_dir: Path, source: str) -> PlannedSearch:
    """The stage's search, resolved; a :class:`RecipeError` (one line per problem) otherwise."""
    search = spec.search
    assert search is not None
    where = f"{source}: stage {spec.name!r} search: "
    problems: list[str] = []
    methods: dict[str, Any] = {}
    for name in dict.fromkeys([spec.plugin, *(search.methods or [])]):
        try:
            impl = get_implementation("merge", name).impl
        except EngineError as exc:
            problems.append(f"{where}methods: {exc}")
            continue
        if not callable(getattr(impl, "tensor_merge", None)):  # a MergeMethod
            problems.append(f"{where}merge plugin {name!r} cannot be searched: it does not declare "
                            "its params as a MergeMethod (engine.api.merging.MergeMethod)")
            continue
        methods[name] = impl
    if problems:
        raise RecipeError("\n".join(problems))
    space = build_space({m: impl.Params for m, impl in methods.items()}, spec.plugin,
                        list(spec.models or []), search.space, search.layer_groups,
                        dict(search.filters), dict(spec.params), where)
    if search.sampler == "cmaes":
        if any(d.choices is not None for d in space.dimensions()):
            problems.append(f"{where}sampler cmaes searches numbers only; this space has choices "
                            f"({', '.join(d.name for d in space.dimensions() if d.choices)}): use tpe")
        if importlib.util.find_spec("cmaes") is None:
            problems.append(f"{where}sampler cmaes needs the 'cmaes' package (pip install cmaes)")
    evaluators: list[PlannedEvaluator] = []
    produced: dict[str, str] = {}
    unknown_metrics = False
    for i, e in enumerate(search.evaluate):
        here = f"{where}evaluate[{i}] ({e.plugin}): "
        try:
            registered = get_implementation("evaluate", e.plugin)
        except EngineError as exc:
            problems.append(f"{here}{exc}")
            continue
        try:
            params = registered.impl.Params.model_validate(e.params, context={"recipe_dir": recipe_dir})
        except ValidationError as exc:
            problems.append(format_validation_error(exc, source, prefix=f"stage {spec.name!r} search."
                                                    f"evaluate[{i}].params.", model=registered.impl.Params))
            continue
        data = []
        try:
            data = [resolve_data(d, recipe_dir) for d in e.data_list()]
        except EngineError as exc:
            problems.append(f"{here}data: {exc}")
            continue
        mismatch = data_format_error(registered.impl, "evaluate", data)
        if mismatch is not None:
            problems.append(f"{here}data: {mismatch}")
            continue
        check = getattr(registered.impl, "check", None)
        if check is not None:
            try:
                check(InputConfigs({"models": []}, {"models": [spec.name, *e.models]}, {"models": []}),
                      params)
            except (ValueError, EngineError) as exc:
                problems.append(f"{here}{exc}")
                continue
        names = available_metrics(registered.impl, data, params)
        if names is None:
            unknown_metrics = True
        else:
            for n in names:
                produced.setdefault(n, e.plugin)
        evaluators.append(PlannedEvaluator(registered.unique_name, registered.impl, params, data, list(e.models)))
    if not problems and not unknown_metrics:
        for kind, metric in [*(("objective", o.metric) for o in search.objectives),
                             *(("constraint", c.metric) for c in search.constraints)]:
            if metric not in produced:
                problems.append(f"{where}{kind} {metric!r}: no evaluator of this search produces it; "
                                f"available: {', '.join(sorted(produced)) or 'none'}")
    warm = None
    if search.warm_start is not None:
        warm = Path(search.warm_start).expanduser()
        warm = warm if warm.is_absolute() else (Path(recipe_dir) / warm).resolve()
        if not warm.exists():
            problems.append(f"{where}warm_start: {warm} does not exist (a workdir that ran this "
                            "search, or its .db file)")
    if problems:
        raise RecipeError("\n".join(problems))
    return PlannedSearch(search, methods, spec.plugin, space, evaluators, warm)


# --- dev data apart from test data -------------------------------------------------------


def _records(source: DataSource) -> Iterable[str]:
    """What a record is, for overlap: a jsonl item's prompt (its text when it has none), a
    text line; within the source's record range."""
    bounds = source_bounds(source.path, source.records)
    lo, hi = bounds if bounds is not None else (0, None)
    i = 0
    with open(source.path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            if hi is not None and i >= hi:
                break
            if i >= lo:
                key = line.strip()
                if source.path.suffix == ".jsonl":
                    try:
                        item = json.loads(key)
                    except ValueError:
                        item = None
                    if isinstance(item, dict):
                        for field in ("prompt", source.text_field, "text"):
                            if isinstance(item.get(field), str):
                                key = item[field].strip()
                                break
                yield key
            i += 1


def _range(source: DataSource) -> tuple[int, int]:
    bounds = source_bounds(source.path, source.records)
    return bounds if bounds is not None else (0, count_records(source.path))


def overlap_problem(dev: DataSource, test: DataSource) -> str | None:
    """Why ``dev`` and ``test`` overlap (None when they do not)."""
    if dev.shards or test.shards:
        a = {p.resolve() for p in (dev.shards or (dev.path,))}
        b = {p.resolve() for p in (test.shards or (test.path,))}
        common = sorted(a & b)
        return f"both read {common[0]}" if common else None
    if dev.path.resolve() == test.path.resolve():
        (a0, a1), (b0, b1) = _range(dev), _range(test)
        if a0 < b1 and b0 < a1:
            return (f"both read {dev.path}, records {max(a0, b0)}:{min(a1, b1)} in common "
                    f"(dev {a0}:{a1}, test {b0}:{b1})")
        return None
    for s in (dev, test):
        if s.path.suffix == ".parquet" or s.path.stat().st_size > MAX_OVERLAP_BYTES:
            return None
    seen = set(_records(dev))
    for rec in _records(test):
        if rec in seen:
            shown = rec if len(rec) <= 60 else rec[:57] + "..."
            return (f"{dev.path} and {test.path} share records (e.g. {shown!r}); dev data must "
                    "never hold test questions")
    return None


def overlap_problems(recipe: Recipe, planned: Mapping[str, PlannedSearch],
                     test_data: Mapping[str, list[DataSource]], source: str) -> list[str]:
    """One line per (search, evaluate stage scoring its output) whose data overlap.
    ``test_data``: the resolved data of each evaluate stage, by stage name."""
    out = []
    for name, search in planned.items():
        for stage in recipe.stages:
            if stage.stage != "evaluate" or name not in (stage.models or []) or stage.name not in test_data:
                continue
            for e in search.evaluators:
                for dev in e.data:
                    for test in test_data[stage.name]:
                        why = overlap_problem(dev, test)
                        if why is not None:
                            out.append(f"{source}: stage {name!r} search: its dev data overlaps the "
                                       f"test data of evaluate stage {stage.name!r}: {why}")
    return out
