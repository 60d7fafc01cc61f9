"""What a run would do, from fingerprints alone: ``engine status``, ``engine run --dry-run``,
and the stage selection of ``engine run --only`` / ``--from``.

Each stage of a plan is in one of four states:

* ``up to date``: the current version (``<workdir>/<stage>``) has the stage's fingerprint;
* ``available``: another kept version (``<workdir>/.stages/<stage>/<fingerprint>/``) has it:
  the run re-links it, no work;
* ``stale``: versions exist, none with this fingerprint; the reasons compare the current
  version's recorded components with the recipe's (``params.steps 160 -> 10``,
  ``input ct-lum changed``, ``data lum/train.txt changed``);
* ``never run``: no version at all.

and gets one action: ``reuse``, ``run`` or ``skip`` (not selected by ``--only``). Nothing
loads a model: input models are fingerprinted from their files' sizes and mtimes, a
built-in model that is not built yet has no fingerprint (its stages are ``never run``).

Selection semantics (``engine run``):

* ``--from STAGE`` (repeatable): STAGE and every stage downstream of it run even when a
  version is cached; the stages upstream are served from the cache (or run when they
  have no version).
* ``--only STAGE`` (repeatable): only these stages are considered; each is reused when
  its version is kept (add ``--no-cache`` or ``--from`` to re-run it). The stages they
  read must be kept with their current fingerprint, else the run stops before anything
  runs, naming the missing input and the command that produces it. Other stages are
  skipped and absent from report.json.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import stage_cache
from engine.errors import RecipeError
from engine.validate import Plan, PlannedStage, resolve_model_path

__all__ = ["MissingInputs", "RunInterrupted", "Selection", "StageStatus", "describe_changes",
           "format_status", "kept", "model_fingerprints", "plan_status", "prepare",
           "reused_wall_time"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run. ``kept`` (:func:`kept`): ``finished`` (this run's stages: name,
    output, cache) and ``interrupted`` (the stage that was running, its checkpoint folder)."""

    def __init__(self, kept: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.kept = kept


class MissingInputs(RecipeError):
    """``--only`` stages read stages that have no kept version for this recipe."""

    def __init__(self, missing: dict[str, list[str]], reasons: dict[str, str],
                 produce: list[str] | None = None) -> None:
        #: the stages to run (in order) so that every missing input is kept
        self.missing, self.reasons, self.produce = missing, reasons, produce or []
        lines = [f"--only {stage}: input {inp!r} has no cached version for this recipe"
                 f" ({reasons.get(inp, 'never run')})"
                 for stage, inputs in missing.items() for inp in inputs]
        super().__init__("\n".join(lines))

    @property
    def inputs(self) -> list[str]:
        return sorted({i for v in self.missing.values() for i in v})


@dataclass
class Selection:
    """Which stages a run considers (``only``) and re-runs even when cached (``forced``)."""

    plan: Plan
    only: set[str] | None = None
    forced: set[str] = field(default_factory=set)

    @classmethod
    def from_args(cls, plan: Plan, only: Iterable[str] = (), from_stages: Iterable[str] = ()) -> Selection:
        names = [s.name for s in plan.stages]
        for flag, given in (("--only", only), ("--from", from_stages)):
            for name in given:
                if name not in names:
                    raise RecipeError(f"{flag} {name!r}: no stage of that name in {plan.source}; "
                                      f"stages: {', '.join(names)}")
        forced = set(from_stages)
        for stage in plan.stages:  # in dependency order: downstream of a forced stage is forced
            if any(r in forced for refs in stage.spec.references().values() for r in refs):
                forced.add(stage.name)
        return cls(plan, set(only) or None, forced)

    def reuses(self, name: str, cache_on: bool) -> bool:
        """Whether stage ``name`` may be served from a kept version (``cache_on``: the cache
        is on for it): an input of ``--only`` stages always, a forced stage never."""
        return name in self.needed() or (cache_on and name not in self.forced)

    def needed(self) -> set[str]:
        """Stages read by the ``--only`` stages but not selected themselves."""
        if self.only is None:
            return set()
        stage_names = {s.name for s in self.plan.stages}
        return {r for s in self.plan.stages if s.name in self.only
                for refs in s.spec.references().values() for r in refs
                if r in stage_names and r not in self.only}


@dataclass
class StageStatus:
    name: str
    plugin: str
    state: str
    action: str
    fingerprint: str | None
    reasons: list[str] = field(default_factory=list)


def model_fingerprints(plan: Plan) -> dict[str, str | None]:
    """The recipe's input models' fingerprints from their files (None: not there yet)."""
    out: dict[str, str | None] = {}
    for name, spec in plan.recipe.models.items():
        if spec.builtin is not None:
            from engine.world import world_dir

            path = world_dir() / "models" / spec.builtin
        else:
            path = Path(resolve_model_path(spec, plan.recipe_dir))
        out[name] = stage_cache.model_fingerprint(path) if (path / "config.json").is_file() else None
    return out


def fingerprints(plan: Plan, models: Mapping[str, str | None]) -> dict[str, str | None]:
    """Every model's and stage's fingerprint (None where an input has none)."""
    fps: dict[str, str | None] = dict(models)
    for stage in plan.stages:
        refs = [r for v in stage.spec.references().values() for r in v]
        fps[stage.name] = (None if any(fps.get(r) is None for r in refs)
                           else stage_cache.stage_fingerprint(stage, fps))  # type: ignore[arg-type]
    return fps


def plan_status(plan: Plan, workdir: Path, selection: Selection | None = None, *,
                use_cache: bool = True, models: Mapping[str, str | None] | None = None,
                ) -> list[StageStatus]:
    """Per stage, its state and what ``engine run`` with ``selection`` would do."""
    selection = selection or Selection(plan)
    fps = fingerprints(plan, model_fingerprints(plan) if models is None else models)
    needed = selection.needed()
    out = []
    for stage in plan.stages:
        fp = fps[stage.name]
        kept = {v.fingerprint: v for v in stage_cache.versions(workdir, stage.name)}
        current = next((v for v in kept.values() if v.current), None)
        reasons: list[str] = []
        if fp is not None and fp in kept:
            state = "up to date" if kept[fp].current else "available"
        elif kept:
            state = "stale"
            reasons = (describe_changes(current.marker, stage, fps, plan.recipe_dir) if current is not None
                       else ["no version is current"])
        else:
            state = "never run"
        if fp is None:
            missing = [r for v in stage.spec.references().values() for r in v if fps.get(r) is None]
            reasons.append("input " + ", ".join(missing) + " not there yet")
        if selection.only is not None and stage.name not in selection.only:
            action = "skip" if stage.name not in needed else (
                "reuse" if state in ("up to date", "available") else "missing")
        elif stage.name in selection.forced:
            action, reasons = "run", [*reasons, "forced by --from"]
        elif not use_cache or not stage.spec.cache:
            action, reasons = "run", [*reasons, "cache off"]
        else:
            action = "reuse" if state in ("up to date", "available") else "run"
        out.append(StageStatus(stage.name, stage.spec.plugin, state, action, fp, reasons))
    return out


def check_only_inputs(statuses: list[StageStatus], selection: Selection) -> None:
    """Raise :class:`MissingInputs` when an ``--only`` stage reads a stage not kept."""
    by_name = {s.name: s for s in statuses}
    needed = selection.needed()
    missing: dict[str, list[str]] = {}
    for stage in selection.plan.stages:
        if selection.only is None or stage.name not in selection.only:
            continue
        for ref in (r for v in stage.spec.references().values() for r in v):
            if ref in needed and by_name[ref].state not in ("up to date", "available"):
                missing.setdefault(stage.name, []).append(ref)
    if missing:
        reasons = {n: f"{by_name[n].state}: {'; '.join(by_name[n].reasons)}" if by_name[n].reasons
                   else by_name[n].state for n in needed}
        wanted = {i for v in missing.values() for i in v}
        for stage in reversed(selection.plan.stages):  # and what they need that is not kept
            if stage.name in wanted:
                wanted |= {r for v in stage.spec.references().values() for r in v if r in by_name
                           and by_name[r].state not in ("up to date", "available")}
        produce = [s.name for s in selection.plan.stages if s.name in wanted]
        raise MissingInputs(missing, reasons, produce)


# --- why a stage is stale --------------------------------------------------------------------


def _flat(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict) and obj:
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}"))
        return out
    return {prefix: obj}


def _data_name(path: str, plan_dir: Path) -> str:
    p = Path(path)
    try:
        from engine.world import world_dir

        return str(p.relative_to(world_dir() / "data"))
    except ValueError:
        pass
    try:
        return str(p.relative_to(plan_dir))
    except ValueError:
        return str(p)


def describe_changes(marker: dict[str, Any], stage: PlannedStage,
                     fps: Mapping[str, str | None], base_dir: Path) -> list[str]:
    """What differs between the version a marker describes and ``stage`` as planned now."""
    old = marker.get("components")
    if not isinstance(old, dict) or any(fps.get(r) is None for v in stage.spec.references().values()
                                        for r in v):
        return ["fingerprint differs (the kept version does not record its components)"
                if not isinstance(old, dict) else "an input is not there yet"]
    new = stage_cache.stage_components(stage, fps)  # type: ignore[arg-type]
    reasons = []
    for key in ("stage", "plugin"):
        if old.get(key) != new[key]:
            reasons.append(f"{key} {old.get(key)} -> {new[key]}")
    for part in ("params", "runtime"):
        before, after = _flat(old.get(part) or {}, part), _flat(new[part], part)
        for k in sorted(set(before) | set(after)):
            if before.get(k, "<unset>") != after.get(k, "<unset>"):
                reasons.append(f"{k} {before.get(k, '<unset>')} -> {after.get(k, '<unset>')}")
    names = stage.spec.references()
    old_inputs = old.get("inputs") or {}
    for key, refs in names.items():
        old_fps = old_inputs.get(key) or []
        for i, ref in enumerate(refs):
            if i >= len(old_fps) or old_fps[i] != new["inputs"][key][i]:
                reasons.append(f"input {ref} changed")
    if set(old_inputs) - set(names):
        reasons.append("inputs removed: " + ", ".join(sorted(set(old_inputs) - set(names))))
    old_data = {d.get("path"): d for d in old.get("data") or []}
    new_data = {d["path"]: d for d in new["data"]}
    for path in sorted(set(old_data) | set(new_data), key=str):
        shown = _data_name(str(path), base_dir)
        if path not in old_data:
            reasons.append(f"data {shown} added")
        elif path not in new_data:
            reasons.append(f"data {shown} removed")
        elif old_data[path] != new_data[path]:
            what = [k for k in sorted(set(old_data[path]) | set(new_data[path]))
                    if old_data[path].get(k) != new_data[path].get(k)]
            contents = {"state", "shards"}
            label = "changed" if set(what) <= contents else "changed (" + ", ".join(
                f"{k} {old_data[path].get(k)} -> {new_data[path].get(k)}"
                for k in what if k not in contents) + ")"
            reasons.append(f"data {shown} {label}")
    return reasons or ["fingerprint differs"]


def format_status(statuses: list[StageStatus]) -> list[str]:
    """The lines ``engine status`` and ``engine run --dry-run`` print."""
    width = max((len(s.name) for s in statuses), default=0)
    lines = []
    for s in statuses:
        why = f": {'; '.join(s.reasons)}" if s.reasons else ""
        lines.append(f"{s.name:<{width}}  {s.state:<10}  {s.action:<7}  ({s.plugin}){why}")
    run = [s.name for s in statuses if s.action == "run"]
    lines.append("would run: " + (", ".join(run) if run else "nothing (everything is cached)"))
    return lines


# --- the runner's side -----------------------------------------------------------------------


def prepare(plan: Plan, workdir: Path, selection: Selection, models: Mapping[str, str | None], *,
            use_cache: bool, adopt: bool) -> dict[str, str | None]:
    """Before a run's first stage: adopt older-layout stage folders (``adopt``: the main
    process), refuse ``--only`` stages whose inputs are not kept; returns the stages skipped,
    each with its fingerprint: a kept input of an ``--only`` stage is looked up by a
    fingerprint computed from theirs, however far upstream they are."""
    if adopt:
        for stage in plan.stages:
            stage_cache.adopt_legacy(workdir, stage.name)
    statuses = plan_status(plan, workdir, selection, use_cache=use_cache, models=models)
    check_only_inputs(statuses, selection)
    return {s.name: s.fingerprint for s in statuses if s.action == "skip"}


def reused_wall_time(records: list[dict[str, Any]]) -> float:
    """The saved cost of the stages a run reused: their original wall times, summed."""
    return round(sum(r.get("wall_time_s") or 0.0 for r in records if r.get("cache") == "hit"), 3)


def kept(workdir: Path, records: list[dict[str, Any]],
         active: tuple[str, Path | None, Any] | None) -> dict[str, Any]:
    """What an interrupted run leaves (:class:`RunInterrupted`)."""
    finished = [{"name": r["name"], "output": r.get("output"), "cache": r.get("cache")}
                for r in records if "output" in r]
    running = None
    if active is not None:
        name, ckpt, params = active
        running = {"stage": name, "checkpoint_dir": str(ckpt) if ckpt else None,
                   "steps": getattr(params, "steps", None),
                   "checkpoint_every": getattr(params, "checkpoint_every", None)}
    return {"workdir": str(workdir), "finished": finished, "interrupted": running}
