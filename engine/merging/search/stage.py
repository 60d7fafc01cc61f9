"""A merge stage with ``search:``: run the study, write the chosen candidate as the stage's
ordinary merge output, and record every trial in the stage's report.

The runner calls :func:`run_search` in place of the merge method's ``run``. The output is
the stream-merged model of the chosen params (its scores on the dev data are those of the
chosen trial: one per-tensor merge serves both). The stage's notes hold ``search``: the
study, every trial, the front and the choice; its wall time includes the search, so the
report's cost table counts the trials in the cost of the merge they chose.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from engine.core.artifacts import ModelArtifact
from engine.core.errors import EngineError
from engine.core.inputs import StageInputs
from engine.merging.search import front, study
from engine.merging.search.plan import PlannedSearch
from engine.merging.search.scoring import Evaluator
from engine.merging.search.space import SearchSpace
from engine.run.context import StageContext

__all__ = ["run_search"]


def _clip(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    dims = {d.name: d for d in space.dimensions()}
    out = {}
    for k, v in params.items():
        d = dims[k]
        if d.choices is not None:
            if v in d.choices:
                out[k] = v
        elif isinstance(v, int | float) and d.low is not None and d.high is not None:
            out[k] = min(max(v, d.low), d.high)
    return out


def run_search(context: StageContext, inputs: StageInputs, planned: PlannedSearch,
               stage_params: Mapping[str, Any], artifacts: Mapping[str, Any],
               fingerprints: Mapping[str, str]) -> ModelArtifact:
    """Search, then write the chosen candidate (the stage's output)."""
    spec = planned.spec
    started = time.perf_counter()
    inputs_fp = {k: fingerprints.get(k, "") for k in
                 [*([inputs.base.name] if inputs.base else []), *(m.name for m in inputs.models)]}
    evaluators = []
    for e in planned.evaluators:
        extra = []
        for name in e.models:
            art = artifacts.get(name)
            if not isinstance(art, ModelArtifact):
                raise EngineError(f"search: evaluator {e.plugin!r}: {name!r} is not a model")
            extra.append(art)
        evaluators.append(Evaluator(e.plugin, e.impl, e.params, list(e.data), extra))
    (Path(context.workdir) / study.SEARCH_DIR).mkdir(exist_ok=True)
    threads = max(1, torch.get_num_threads() // spec.workers)
    job = study.SearchJob(
        run_name=context.run_name, stage_name=context.stage_name, workdir=Path(context.workdir),
        output_dir=Path(context.output_dir), runtime=context.runtime, inputs=inputs,
        methods=dict(planned.methods), default=planned.default, stage_params=dict(stage_params),
        space=planned.space, evaluators=evaluators, spec=spec,
        study_name=spec.study or planned.study_key(stage_params, inputs_fp),
        storage=study.storage_url(Path(context.workdir), context.stage_name, spec),
        input_fingerprints=inputs_fp, threads=threads,
        deadline=(time.time() + spec.seconds) if spec.seconds is not None else None)
    first = study.open_study(job, spec.seed)
    names = {d.name for d in planned.space.dimensions()}
    warm: list[dict[str, Any]] = []
    if planned.warm_start is not None and not first.get_trials(deepcopy=False):
        warm = [_clip(p, planned.space) for p in
                front.warm_params(planned.warm_start, context.stage_name, spec.objectives,
                                  spec.warm_start_trials, names)]
        context.log(f"warm start: {len(warm)} trial(s) of {planned.warm_start} queued first")
    again = study.prepare(job, first, warm)
    if again:
        context.log(f"search: trial(s) {again} of the interrupted run are tried again")
    before = study.finished_count(first)
    if before:
        context.log(f"search: {before} finished trial(s) kept in the study are reused")
    total = spec.trials
    objective = spec.objectives[0]
    procs = study.start_workers(job, spec.workers - 1) if spec.workers > 1 else []
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with context.progress(total, f"{context.stage_name}: search", unit="trials") as bar:
            shown = [min(before, total) if total else before]
            bar.advance(shown[0])

            def on_trial(trials: list[Any], trial: Any) -> None:
                done = sum(study.counted(t) for t in trials)
                step = (min(done, total) if total else done) - shown[0]
                shown[0] += step
                best = front.best_so_far(trials, objective)
                bar.advance(step, best=f"{best:.4g}" if best is not None else "-",
                            last=trial.state.name.lower())

            study.optimize(job, context, spec.seed, on_trial=on_trial)
            for p in procs:
                p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        context.log(f"search interrupted: its study is kept in {job.storage}; the next run of "
                    "this recipe on this workdir resumes it")
        raise
    finally:
        torch.set_num_threads(old_threads)
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    final = study.open_study(job, spec.seed)
    trials = final.get_trials(deepcopy=False)
    records = front.trial_records(trials)
    chosen = front.choose(trials, spec.objectives, spec.choose)
    pareto = [t.number for t in front.pareto_front(trials, spec.objectives)]
    search_s = time.perf_counter() - started
    got = front.trial_attrs(chosen)
    method = got["method"]
    params = job.params_for(method, got["params"])
    counts = {s: sum(r["state"] == s for r in records) for s in ("complete", "pruned", "fail")}
    context.log(f"search: {len(records)} trial(s) ({counts['complete']} complete, {counts['pruned']} "
                f"pruned, {counts['fail']} failed) in {search_s:.1f}s; chose trial {chosen.number} "
                f"({method}, {', '.join(f'{o.metric}={v:.4g}' for o, v in zip(spec.objectives, chosen.values))})")
    if failed:
        context.log(f"[yellow]search: {len(failed)} worker process(es) ended with an error "
                    f"(exit codes {failed}); their finished trials are kept[/]")
    t1 = time.perf_counter()
    impl = planned.methods[method]
    artifact = impl.run(context, inputs, params)
    summary = {
        "study": job.study_name,
        "storage": job.storage if spec.storage is None else "(the recipe's storage)",
        "sampler": spec.sampler, "seed": spec.seed, "workers": spec.workers,
        "objectives": [o.model_dump() for o in spec.objectives],
        "constraints": [str(c) for c in spec.constraints],
        "space": [d.describe() for d in planned.space.dimensions()],
        "trials": records, "counts": counts, "reused": before, "pareto": pareto,
        "chosen": {"number": chosen.number, "method": method, "params": got["params"],
                   "metrics": got.get("metrics"),
                   "values": list(chosen.values)},
        "search_s": round(search_s, 3), "write_s": round(time.perf_counter() - t1, 3),
    }
    context.note("search", summary)
    artifact.meta["search"] = {k: summary[k] for k in ("study", "chosen", "counts", "search_s")}
    artifact.meta["search"]["trials"] = len(records)
    return artifact
