"""Reading a finished study: every trial as a plain record, the feasible Pareto front, the
chosen candidate, and the best trials a warm start takes from an earlier study."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.core.errors import EngineError
from engine.recipe.search import SEARCH_DIR, ObjectiveSpec

__all__ = ["trial_attrs", "best_so_far", "choose", "feasible", "pareto_front", "trial_records", "warm_params"]


def trial_attrs(trial: Any) -> dict[str, Any]:
    """What a trial recorded: its ``candidate`` (method, params, worker, fingerprint) and
    ``result`` (metrics, standard errors, constraint violations, seconds, the first-rung
    score, an error) attributes, with the others (``retry_of``, ``warm_start``) beside."""
    a = trial.user_attrs
    out = {k: v for k, v in a.items() if k not in ("candidate", "result")}
    for key in ("candidate", "result"):
        if isinstance(a.get(key), dict):
            out.update(a[key])
    return out


def trial_records(trials: Sequence[Any]) -> list[dict[str, Any]]:
    """Each trial (Optuna ``FrozenTrial``) as JSON-ready data, in trial order."""
    out = []
    for t in sorted(trials, key=lambda t: t.number):
        a = trial_attrs(t)
        record: dict[str, Any] = {
            "number": t.number, "state": t.state.name.lower(), "method": a.get("method"),
            "params": a.get("params"), "values": list(t.values) if t.values is not None else None,
            "metrics": a.get("metrics"), "stderr": a.get("stderr"), "seconds": a.get("seconds"),
            "merge_s": a.get("merge_s"), "fingerprint": a.get("fingerprint"),
        }
        for key in ("constraints", "rung", "error", "warm_start", "retry_of", "worker"):
            if key in a:
                record[key] = a[key]
        record["feasible"] = is_feasible(t)
        out.append(record)
    return out


def is_feasible(trial: Any) -> bool:
    """Completed, and every constraint kept (violation <= 0)."""
    from optuna.trial import (
        TrialState,  # imported here for start-up speed: only a search needs optuna
    )

    if trial.state != TrialState.COMPLETE or trial.values is None:
        return False
    if any(not math.isfinite(v) for v in trial.values):
        return False
    return all(v <= 0 for v in trial_attrs(trial).get("constraints", []))


def feasible(trials: Sequence[Any]) -> list[Any]:
    return [t for t in trials if is_feasible(t)]


def _better_or_equal(a: Sequence[float], b: Sequence[float], objectives: Sequence[ObjectiveSpec]) -> bool:
    return all((x >= y) if o.direction == "maximize" else (x <= y) for x, y, o in zip(a, b, objectives))


def pareto_front(trials: Sequence[Any], objectives: Sequence[ObjectiveSpec]) -> list[Any]:
    """The feasible trials no other feasible trial dominates (better or equal on every
    objective, better on one); identical points keep the earliest trial."""
    pool = sorted(feasible(trials), key=lambda t: t.number)
    front = []
    for t in pool:
        dominated = False
        for u in pool:
            if u is t:
                continue
            if _better_or_equal(u.values, t.values, objectives) and (
                    list(u.values) != list(t.values) or u.number < t.number):
                dominated = True
                break
        if not dominated:
            front.append(t)
    return front


def choose(trials: Sequence[Any], objectives: Sequence[ObjectiveSpec], pick: str | None = None) -> Any:
    """The trial to write: the best point of the feasible front on ``pick`` (default: the
    first objective), ties broken by the other objectives in order, then the earliest."""
    front = pareto_front(trials, objectives)
    if not front:
        done = [t for t in trials if t.values is not None]
        why = "no trial finished" if not done else "no finished trial keeps every constraint"
        raise EngineError(f"search: {why}; nothing to write (the study is kept: relax the "
                          "constraints or raise the budget and run again)")
    metrics = [o.metric for o in objectives]
    first = metrics.index(pick) if pick is not None else 0
    order = [first, *[i for i in range(len(objectives)) if i != first]]

    def key(t: Any) -> tuple[Any, ...]:
        signs = [1.0 if objectives[i].direction == "minimize" else -1.0 for i in order]
        return (*[s * t.values[i] for s, i in zip(signs, order)], t.number)

    return min(front, key=key)


def best_so_far(trials: Sequence[Any], objective: ObjectiveSpec) -> float | None:
    """The best feasible value of one objective (the first) among ``trials``."""
    values = [t.values[0] for t in feasible(trials)]
    if not values:
        return None
    return max(values) if objective.direction == "maximize" else min(values)


def warm_params(source: Path, stage: str, objectives: Sequence[ObjectiveSpec], count: int,
                names: set[str]) -> list[dict[str, Any]]:
    """The params of the ``count`` best feasible trials of an earlier study (a workdir, whose
    ``.search/<stage>.db`` is read, or a .db file), best first, limited to the dimensions
    ``names`` of this search (a warm start skips the others; the sampler draws them)."""
    import optuna  # imported here for start-up speed: only a search needs optuna

    source = Path(source)
    db = source / SEARCH_DIR / f"{stage}.db" if source.is_dir() else source
    if not db.is_file():
        raise EngineError(f"search: warm_start: {db} does not exist (a workdir whose stage "
                          f"{stage!r} ran a search, or a study .db file)")
    url = f"sqlite:///{db.resolve()}"
    summaries = optuna.get_all_study_summaries(url)
    if not summaries:
        raise EngineError(f"search: warm_start: {db} holds no study")
    best = max(summaries, key=lambda s: s.n_trials)
    study = optuna.load_study(study_name=best.study_name, storage=url)
    if len(study.directions) != len(objectives):
        raise EngineError(f"search: warm_start: the study in {db} has {len(study.directions)} "
                          f"objective(s), this search {len(objectives)}")
    pool = feasible(study.get_trials(deepcopy=False))
    sign = -1.0 if objectives[0].direction == "maximize" else 1.0
    pool.sort(key=lambda t: (sign * t.values[0], t.number))
    out = []
    for t in pool[:count]:
        kept = {k: v for k, v in t.params.items() if k in names}
        if kept:
            out.append(kept)
    return out
