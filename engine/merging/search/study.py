"""The study: Optuna trials over a merge's params, kept in a database, run by one or more
worker processes.

* **Storage.** The study is a SQLite file in the workdir (``.search/<stage>.db``), or the
  ``storage`` URL a recipe names (a server database shared by workers on several
  machines). A re-run opens the same study: finished trials count towards the budget and
  are never redone. Trials a killed run left running are marked failed and tried again
  (their params first).
* **Workers.** ``workers: N`` starts N - 1 processes beside the run's own, each with its
  own in-memory candidate, sharing the study through the storage; the budget is counted
  over the study, so together they stop at ``trials``. Each process draws with its own
  seed (``seed + i``); one worker is reproducible run to run, several are not (which
  trial finishes first depends on timing).
* **Budget.** ``trials`` finished trials in the study (completed, pruned, or failed for a
  reason of their own), and/or ``seconds`` of this run's search.
* **Pruning.** With one objective, a candidate is first scored on the first part of the
  dev data and reported to a median pruner, which stops candidates below the median of
  earlier ones at that point.
* **Constraints** go to the sampler (TPE and NSGA-II take them) and decide which trials
  may be chosen.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from engine.core.errors import MergeError, RecipeError
from engine.core.fingerprint import fingerprint_hash
from engine.core.inputs import StageInputs
from engine.merging.overrides import EXECUTION_FIELDS
from engine.merging.search.candidate import InMemoryMerge
from engine.merging.search.front import trial_attrs
from engine.merging.search.scoring import Scorer
from engine.merging.search.space import SearchSpace
from engine.recipe.search import SEARCH_DIR, ConstraintSpec, ObjectiveSpec, SearchSpec
from engine.run.context import StageContext
from engine.run.runtime import Runtime

__all__ = ["SEARCH_DIR", "SearchJob", "TrialFailure", "counted", "open_study", "optimize",
           "storage_url"]



class TrialFailure(Exception):
    """A candidate that cannot be built or scored (its params are invalid, it produced
    NaN): the trial fails with this reason and the search goes on."""


@dataclass
class SearchJob:
    """Everything a worker needs to run trials of one search (picklable)."""

    run_name: str
    stage_name: str
    workdir: Path
    output_dir: Path
    runtime: Runtime
    inputs: StageInputs
    methods: dict[str, Any]  # plugin name -> MergeMethod
    default: str
    stage_params: dict[str, Any]
    space: SearchSpace
    evaluators: list[Any]  # engine.merging.search.scoring.Evaluator
    spec: SearchSpec
    study_name: str
    storage: str
    input_fingerprints: dict[str, str]
    threads: int | None = None
    deadline: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def objectives(self) -> list[ObjectiveSpec]:
        return self.spec.objectives

    @property
    def constraints(self) -> list[ConstraintSpec]:
        return self.spec.constraints

    @property
    def pruning(self) -> bool:
        return self.spec.prune and len(self.spec.objectives) == 1

    def params_for(self, method: str, drawn: dict[str, Any]) -> Any:
        """The method's validated params: the stage's params (those the method declares,
        for a method other than the stage's own), then the drawn values; the drawn
        ``overrides`` (filters) come before the stage's own."""
        impl = self.methods[method]
        declared = {(info.alias or f) for f, info in impl.Params.model_fields.items()}
        base = {k: v for k, v in self.stage_params.items()
                if method == self.default or k in EXECUTION_FIELDS or k in declared}
        values = {**base, **drawn}
        if "overrides" in drawn and base.get("overrides"):
            values["overrides"] = [*drawn["overrides"], *base["overrides"]]
        try:
            return impl.Params.model_validate(values)
        except ValueError as exc:
            raise TrialFailure(f"{method} params {drawn}: {exc}") from None

    def fingerprint(self, method: str, params: Any) -> str:
        """What a candidate is: its inputs, method and params."""
        return fingerprint_hash({"inputs": self.input_fingerprints, "method": method,
                                 "params": params.result_key()})


def storage_url(job_workdir: Path, stage: str, spec: SearchSpec) -> str:
    if spec.storage is not None:
        return spec.storage
    return f"sqlite:///{(Path(job_workdir) / SEARCH_DIR / f'{stage}.db').resolve()}"


def _storage(url: str) -> Any:
    import optuna  # imported here for start-up speed: only a search needs optuna

    if url.startswith("sqlite:"):
        # two local processes write one file: wait for the lock rather than fail; write-ahead
        # logging lets readers and the writer go on together, and commits do not wait for the
        # disk (a killed process loses nothing committed; a power cut may lose the last trials)
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
        engine = getattr(storage, "engine", None)
        if engine is not None:
            from sqlalchemy import event  # imported here for start-up speed: only a search needs it

            event.listen(engine, "connect", _sqlite_pragmas)
            engine.dispose()  # the connection that created the tables goes without them
        return storage
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=30, grace_period=120,
        failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=2))


def _sqlite_pragmas(connection: Any, record: Any) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sampler(spec: SearchSpec, seed: int) -> Any:
    import optuna  # imported here for start-up speed: only a search needs optuna

    # Optuna 5 reads constraints set on the trial; older releases take a constraints_func
    constraints = _constraint_values if spec.constraints and not _trial_constraints() else None
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.startup_trials,
                                          multivariate=True, constraints_func=constraints)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=constraints)
    if spec.sampler == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=spec.startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def _trial_constraints() -> bool:
    import optuna  # imported here for start-up speed: only a search needs optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _constraint_values(trial: Any) -> Sequence[float]:
    return trial_attrs(trial).get("constraints", [math.inf])


def open_study(job: SearchJob, seed: int) -> Any:
    """The study of ``job`` (created on first use, else loaded with its trials)."""
    import optuna  # imported here for start-up speed: only a search needs optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=max(job.spec.startup_trials, 1))
              if job.pruning else optuna.pruners.NopPruner())
    return optuna.create_study(
        storage=_storage(job.storage), sampler=_sampler(job.spec, seed), pruner=pruner,
        study_name=job.study_name, load_if_exists=True,
        directions=[o.direction for o in job.objectives])


def counted(trial: Any) -> bool:
    """Whether a trial counts towards the budget: completed, pruned, or failed for a
    reason of its own (not killed)."""
    from optuna.trial import (
        TrialState,  # imported here for start-up speed: only a search needs optuna
    )

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and "error" in trial_attrs(trial))


def finished_count(study: Any) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


class _AfterTrial:
    """After each of this process's trials: read the study's trials once, hand them to
    ``on_trial`` (the progress bar) and stop ``study.optimize`` once the study holds
    ``trials`` counted trials."""

    def __init__(self, trials: int | None, on_trial: Callable[[list[Any], Any], None] | None) -> None:
        self.trials, self.on_trial = trials, on_trial

    def __call__(self, study: Any, trial: Any) -> None:
        trials = study.get_trials(deepcopy=False)
        if self.on_trial is not None:
            self.on_trial(trials, trial)
        if self.trials is not None and sum(counted(t) for t in trials) >= self.trials:
            study.stop()


def _objective(job: SearchJob, merger: Any, scorer: Any) -> Callable[[Any], Any]:
    import optuna  # imported here for start-up speed: only a search needs optuna

    def objective(trial: Any) -> Any:
        # what a trial records goes into two user attributes, written once each (every
        # write is a database transaction): "candidate" before the merge, "result" at the end
        t0 = time.perf_counter()
        method, drawn = job.space.suggest(trial)
        candidate = {"method": method, "params": drawn, "worker": os.getpid(), "fingerprint": None}
        result: dict[str, Any] = {}

        def finish(**values: Any) -> None:
            result.update(values, seconds=round(time.perf_counter() - t0, 4))
            trial.set_user_attr("result", result)

        try:
            params = job.params_for(method, drawn)
            candidate["fingerprint"] = fp = job.fingerprint(method, params)
            trial.set_user_attr("candidate", candidate)
            merger.apply(job.methods[method], params)
            result["merge_s"] = round(time.perf_counter() - t0, 4)
            if job.pruning and scorer.rungs is not None:
                rung, _ = scorer.score(fp, rung=True)
                value = _values(job, rung)[0]
                result["rung"] = value
                trial.report(value, 0)
                if trial.should_prune():
                    finish()
                    raise optuna.TrialPruned()
            metrics, stderr = scorer.score(fp)
        except TrialFailure as exc:
            trial.set_user_attr("candidate", candidate)
            finish(error=str(exc))
            raise
        except MergeError as exc:  # params the method refuses, NaN in a merged tensor
            trial.set_user_attr("candidate", candidate)
            finish(error=str(exc))
            raise TrialFailure(str(exc)) from None
        values = _values(job, metrics)
        if job.constraints:
            violations = [c.violation(metrics[c.metric]) for c in job.constraints]
            result["constraints"] = violations
            if hasattr(trial, "set_constraint"):
                for c, v in zip(job.constraints, violations):
                    trial.set_constraint(str(c), v)
        finish(metrics=metrics, stderr=stderr)
        return values[0] if len(values) == 1 else tuple(values)

    return objective


def _values(job: SearchJob, metrics: dict[str, float]) -> list[float]:
    wanted = [o.metric for o in job.objectives] + [c.metric for c in job.constraints]
    missing = [m for m in wanted if m not in metrics]
    if missing:
        raise RecipeError(f"search: the evaluators produce no metric {missing} for the candidate; "
                          f"they produce: {', '.join(sorted(metrics)) or 'nothing'}")
    return [metrics[o.metric] for o in job.objectives]


def prepare(job: SearchJob, study: Any, warm: Sequence[dict[str, Any]] = ()) -> list[int]:
    """Before the first worker starts: trials a killed run left running are failed and
    their params queued again; a new study queues the warm-start params. Returns the
    numbers of the trials queued again."""
    from optuna.trial import (
        TrialState,  # imported here for start-up speed: only a search needs optuna
    )

    again: list[int] = []
    retried = set(study.user_attrs.get("retried", []))
    local = job.storage.startswith("sqlite:")  # under the workdir lock: no one else runs
    for t in study.get_trials(deepcopy=False):
        stale = t.state == TrialState.RUNNING and local
        interrupted = t.state == TrialState.FAIL and "error" not in trial_attrs(t)
        if stale:  # killed before it drew its params, it has nothing to try again
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if (stale or interrupted) and t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            again.append(t.number)
    if again:
        study.set_user_attr("retried", sorted(retried | set(again)))
    if warm and not study.get_trials(deepcopy=False) and not study.user_attrs.get("warm_started"):
        for params in warm:
            study.enqueue_trial(dict(params), user_attrs={"warm_start": True}, skip_if_exists=True)
        study.set_user_attr("warm_started", len(warm))
    return again


def optimize(job: SearchJob, context: StageContext, seed: int,
             on_trial: Callable[[list[Any], Any], None] | None = None) -> None:
    """Run trials of ``job`` in this process until the budget is spent."""
    import optuna  # imported here for start-up speed: only a search needs optuna

    study = open_study(job, seed)
    if job.spec.trials is not None and finished_count(study) >= job.spec.trials:
        return
    compute = job.stage_params.get("compute_dtype", "float32")
    merger = InMemoryMerge(context, job.inputs, compute)
    reference = job.inputs.base if job.inputs.base is not None else job.inputs.models[0]
    folder = Path(job.workdir) / SEARCH_DIR / f"{job.stage_name}.candidate-{os.getpid()}"
    scorer = Scorer(context, job.evaluators, merger.model, reference, folder,
                    rung_fraction=job.spec.prune_fraction if job.pruning else None)
    callbacks = [_AfterTrial(job.spec.trials, on_trial)]
    timeout = None if job.deadline is None else max(0.0, job.deadline - time.time())
    try:
        if timeout == 0.0:
            return
        study.optimize(_objective(job, merger, scorer), timeout=timeout, callbacks=callbacks,
                       catch=(TrialFailure,), gc_after_trial=False)
    finally:
        _remove_folder(folder)
        del merger
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _remove_folder(folder: Path) -> None:
    if folder.is_dir() and not folder.is_symlink():
        shutil.rmtree(folder, ignore_errors=True)


def worker_main(job: SearchJob, index: int) -> None:
    """A worker process: its own candidate and scorer, the shared study."""
    if job.threads:
        torch.set_num_threads(job.threads)
    context = StageContext(run_name=job.run_name, stage_name=job.stage_name, stage_kind="merge",
                           plugin=job.default, workdir=job.workdir, output_dir=job.output_dir,
                           runtime=job.runtime, console=Console(stderr=True, quiet=True))
    try:
        optimize(job, context, job.spec.seed + index)
    except KeyboardInterrupt:
        pass


def start_workers(job: SearchJob, count: int) -> list[multiprocessing.process.BaseProcess]:
    """``count`` worker processes (spawned: a fresh interpreter each)."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i in range(1, count + 1):
        p = ctx.Process(target=worker_main, args=(job, i), name=f"search-worker-{i}", daemon=True)
        p.start()
        procs.append(p)
    return procs
