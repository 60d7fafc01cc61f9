"""Runs a validated plan: stages in dependency order, outputs written atomically.

A stage writes into a temporary folder in the workdir, renamed on success to the kept version
``.stages/<stage>/<fingerprint>/`` (with ``.lingoforge-stage.json``) that ``<workdir>/<stage>``
then links to (:mod:`engine.run.stage_cache`). A run reuses any kept version whose fingerprint
matches: a cache hit. ``--only``/``--from`` and Ctrl-C: :mod:`engine.run.status`.

Training checkpoints go to ``<workdir>/.checkpoints/<stage>/<fingerprint>/``, a
place that survives a killed run, so running the recipe again resumes the stage;
they are deleted once the stage's output is in place.

One run at a time holds a workdir (:mod:`engine.run.lock`); a second is refused
with the first one's pid. Before anything is written, the names the run will write there are
claimed (:mod:`engine.run.workdir`): what the engine did not write is never replaced. ``runtime.threads`` is applied before each stage that runs
(:mod:`engine.run.threads`) and recorded in its report record.

Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs the
plan, but only the main process (rank 0) writes stage outputs, checkpoints and the
report. Training stages (adapt-language, align) run on every process, data-parallel;
other stages run on the main process only. The main process tells the others whether
a stage was cached and whether it succeeded; they then read its output from disk.

:func:`run_stage` runs a one-stage plan into a folder of the caller's choosing
(``engine merge``), with the same fingerprint, cache, atomic output and stage record.

This module orchestrates; the pieces live in their own modules: fingerprints, markers and
checkpoint folders in :mod:`engine.run.stage_cache`, broadcasts and ranks in
:mod:`engine.run.distributed`, memory and thread sampling in :mod:`engine.run.resources`,
report.json in :mod:`engine.run.record`, and each artifact saves and loads itself
(:mod:`engine.core.artifacts`).

Long module: a stage's whole life (cache lookup, temporary folder, the plugin's call, marker,
publication, link, records for the main and the other processes) is kept in one place so that
its order can be read top to bottom; every step it calls lives elsewhere.
"""

from __future__ import annotations

import gc
import shutil
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from engine import __version__, world
from engine.core import outputs
from engine.core.artifacts import (  # LAYERS_FILE, METRICS_FILE: re-exported, their home was here
    ARTIFACT_TYPES,
    LAYERS_FILE,
    METRICS_FILE,
    Artifact,
    LayerSelection,
    ModelArtifact,
    load_artifact,
)
from engine.core.console import make_console, make_progress, run_log
from engine.core.errors import EngineError, OutputRefused
from engine.core.inputs import StageInputs
from engine.core.stages import MERGE, STAGE_KINDS, training_kinds
from engine.data import token_cache
from engine.evaluation.driver import refuse_unscored
from engine.merging.search.stage import run_search
from engine.models import card as model_card
from engine.models import modelio
from engine.recipe.plan import Plan, PlannedStage
from engine.recipe.spec import resolve_model_path
from engine.registry.manager import call_observers
from engine.run import record as report
from engine.run import stage_cache, threads
from engine.run import status as run_status
from engine.run import workdir as workdir_names
from engine.run.context import StageContext
from engine.run.distributed import Ranks, init_process_group, share
from engine.run.lock import WorkdirLock
from engine.run.record import REPORT_FILE
from engine.run.resources import MemorySampler, threads_record
from engine.run.stage_cache import CHECKPOINTS_DIR, STAGE_FILE
from engine.run.transplant import onto_one_tokenizer

__all__ = ["CHECKPOINTS_DIR", "LAYERS_FILE", "METRICS_FILE", "REPORT_FILE", "STAGE_FILE",
           "TRAINING_KINDS", "Runner", "StageFailed", "run_stage"]

#: stage kinds whose implementations train: every process of a distributed launch runs them
TRAINING_KINDS = training_kinds()


class StageFailed(EngineError):
    """A stage raised; the message names it. ``__cause__`` holds the original error."""


class Runner:
    """Executes a :class:`~engine.recipe.plan.Plan` into ``workdir``.

    ``outputs`` maps a stage name to the folder its output goes to instead of
    ``<workdir>/<name>`` (:func:`run_stage`); its temporary folder is made beside it.
    """

    def __init__(self, plan: Plan, workdir: Path, console: Console | None = None,
                 use_cache: bool = True, outputs: Mapping[str, Path] | None = None,
                 selection: run_status.Selection | None = None) -> None:
        self.plan = plan
        self.selection = selection or run_status.Selection(plan)
        self._active: tuple[str, Path | None, Any] | None = None  # running: for a Ctrl-C
        self.workdir = Path(workdir)
        self.console = console or make_console()
        self.use_cache = use_cache
        self.outputs = {name: Path(path) for name, path in (outputs or {}).items()}
        #: print a line per stage (✓ ran, ↺ cached); off for callers that report themselves
        self.announce = True
        #: for a stage written to a folder of ``outputs``: how errors name it, and whether an
        #: earlier engine output there may be replaced (``engine merge --out/--overwrite``)
        self.output_flag = "--out"
        self.overwrite = False
        self.artifacts: dict[str, Artifact] = {}
        self.fingerprints: dict[str, str] = {}
        self.records: list[dict[str, Any]] = []
        #: the one-time import of the input models' code, done before the first stage that runs
        self.startup: dict[str, Any] = {"architectures_imported": [], "import_s": 0.0}
        self._imported = False
        #: whether this run froze the garbage collector (None: outside a run's session)
        self._froze_gc: bool | None = None
        #: keep checkpoints under <workdir>/.checkpoints (off: no checkpoint folder, no clean-up)
        self._checkpoints = True
        ranks = Ranks.from_env()
        self.rank, self.world, self.main = ranks.rank, ranks.world, ranks.main

    # -- public -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run every stage of the plan; write and return report.json."""
        if self.workdir.exists() and not self.workdir.is_dir():
            raise OutputRefused(f"--workdir {self.workdir}: is a file, not a folder")
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(self.workdir) if self.main else None
        if lock is not None:
            lock.acquire()  # before anything is written or cleaned up
        try:
            if self.main:  # every name the run writes: the engine's own, or refused now
                workdir_names.claim(self.workdir, [s.name for s in self.plan.stages])
            with self._session(), run_log(self.console, self.workdir, recipe=self.plan.recipe.name,
                                          enabled=self.main):
                return self._run()
        finally:
            if lock is not None:
                lock.release()

    def run_one(self) -> dict[str, Any]:
        """Run the plan's only stage and return its record: no workdir lock, no clean-up
        of other runs' temporaries, no report.json, no ``run_finished`` (see :func:`run_stage`)."""
        if len(self.plan.stages) != 1:
            raise EngineError(f"run_one runs a one-stage plan; this one has {len(self.plan.stages)}")
        self._imported = True  # one stage: no later stage's time to keep clean of the import
        # the workdir may be the caller's own folder: touch .checkpoints only for training
        self._checkpoints = STAGE_KINDS[self.plan.stages[0].spec.stage].trains
        with self._session():
            if self.world > 1:
                init_process_group(self.plan.recipe.runtime.device)
            self._resolve_inputs()
            return self._run_stage(self.plan.stages[0])

    def checkpoint_dir(self, name: str, fingerprint: str) -> Path:
        """Where stage ``name`` with ``fingerprint`` keeps its resumable checkpoints."""
        return stage_cache.checkpoint_dir(self.workdir, name, fingerprint)

    # -- the run ------------------------------------------------------------------------

    @contextmanager
    def _session(self) -> Iterator[None]:
        intra_before = torch.get_num_threads()
        self._froze_gc = False
        try:
            with threads.RunRegistration():  # counted by every run's 'auto' threads
                yield
        finally:
            torch.set_num_threads(intra_before)  # in-process callers keep their setting
            if self._froze_gc:
                gc.unfreeze()  # what existed before the run is collectable again
            self._froze_gc = None

    def _freeze_gc(self) -> None:
        """Exempt every object that exists now (torch's, transformers' and the modelling
        code's, some 370,000) from the cyclic garbage collector for the rest of the run: a
        full collection, which every training stage's clean-up runs and Python runs now and
        then, took 0.25-0.3 s on 2 cores walking them, and now walks only what the run
        made. Undone when the run ends, so an in-process caller's garbage is collected as
        before; a run inside a run leaves the outer one's freeze alone."""
        if self._froze_gc is False and gc.get_freeze_count() == 0:
            gc.freeze()
            self._froze_gc = True

    def _run(self) -> dict[str, Any]:
        if self.main:
            stage_cache.remove_stale_temporaries(self.workdir)
        if self.world > 1:
            init_process_group(self.plan.recipe.runtime.device)
        started = time.perf_counter()
        self._resolve_inputs()
        skip = run_status.prepare(self.plan, self.workdir, self.selection, self.fingerprints,
                                  use_cache=self.use_cache, adopt=self.main)
        # a skipped stage is not run, but the stages reused downstream are fingerprinted from it
        self.fingerprints.update({name: fp for name, fp in skip.items() if fp is not None})
        try:
            for stage in self.plan.stages:
                if stage.name not in skip:
                    self.records.append(self._run_stage(stage))
                    self._write_report(time.perf_counter() - started, finished=False)
        except KeyboardInterrupt as exc:
            raise run_status.RunInterrupted(run_status.kept(self.workdir, self.records, self._active)) from exc
        result = self._write_report(time.perf_counter() - started, finished=True)
        if self.world > 1:  # every process returns the main process's report
            result = share(result if self.main else None)
        if self.main:
            call_observers("run_finished", recipe=self.plan.recipe, workdir=str(self.workdir),
                           report=result)
        return result

    def _write_report(self, wall: float, *, finished: bool) -> dict[str, Any]:
        """Write report.json (main process only; others return the dict unwritten)."""
        result = report.run_report(self.plan, self.records, self.startup, wall, finished=finished)
        result["reused_wall_time_s"] = run_status.reused_wall_time(self.records)
        if self.main:
            report.write_report(self.workdir, result)
        return result

    # -- inputs -------------------------------------------------------------------------

    def _resolve_inputs(self) -> None:
        """The recipe's input models as artifacts, each with its fingerprint."""
        for name, spec in self.plan.recipe.models.items():
            if spec.builtin is not None:
                path = world.model_path(spec.builtin)
            else:
                path = resolve_model_path(spec, self.plan.recipe_dir)
            self.artifacts[name] = ModelArtifact.load(name, Path(path))
            self.fingerprints[name] = stage_cache.model_fingerprint(Path(path))

    def _inputs(self, stage: PlannedStage) -> StageInputs:
        spec = stage.spec

        def model(ref: str) -> ModelArtifact:
            art = self.artifacts[ref]
            assert isinstance(art, ModelArtifact)
            return art

        layers = self.artifacts[spec.layers] if spec.layers else None
        assert layers is None or isinstance(layers, LayerSelection)
        return StageInputs(
            model=model(spec.model) if spec.model else None,
            models=[model(r) for r in spec.models or []],
            base=model(spec.base) if spec.base else None,
            layers=layers,
            data=list(stage.data),
        )

    def _final(self, name: str) -> Path:
        """The folder stage ``name``'s output is renamed to."""
        if name in self.outputs:
            return self.outputs[name]
        final = self.workdir / name
        if final.parent.resolve() != self.workdir.resolve():  # names are checked; never trust
            raise EngineError(f"stage name {name!r} would write outside the workdir {self.workdir}")
        return final

    def _import_architectures(self) -> None:
        """Import the input models' modelling code once, before the first stage that runs
        and loads models (not for a run served wholly from the cache, nor for merges, which
        stream tensors), so no stage's time includes it."""
        if self._imported:
            return
        self._imported = True
        t0 = time.perf_counter()
        names = {modelio.import_architecture(art.path) for art in self.artifacts.values()
                 if isinstance(art, ModelArtifact)}
        self._freeze_gc()
        self.startup = {"architectures_imported": sorted(n for n in names if n),
                        "import_s": round(time.perf_counter() - t0, 3)}

    def _remove_checkpoints(self, name: str) -> None:
        if self._checkpoints:
            stage_cache.remove_checkpoints(self.workdir, name)

    def _card(self, folder: Path, stage: PlannedStage, record: dict[str, Any]) -> None:
        inputs = {n: (str(getattr(self.artifacts.get(n), "path", "-")), self.fingerprints.get(n, "-"))
                  for names in stage.spec.references().values() for n in names}
        model_card.write_card(folder, recipe=self.plan.recipe.name, stage=stage, record=record,
                              inputs=inputs, version=__version__)

    def _recipe_file(self) -> str | None:
        source = Path(self.plan.source)
        return str(source.resolve()) if source.is_file() else None

    def _say(self, text: str) -> None:
        if self.announce:
            self.console.print(text)

    # -- one stage ------------------------------------------------------------------------

    def _run_stage(self, stage: PlannedStage) -> dict[str, Any]:
        if self.world == 1:
            return self._lead_stage(stage)
        if not self.main:
            return self._follow_stage(stage)
        try:
            record = self._lead_stage(stage)
        except BaseException as exc:  # wherever the others wait, they receive the failure
            share(f"{type(exc).__name__}: {exc}")
            raise
        share(None)
        return record

    def _follow_stage(self, stage: PlannedStage) -> dict[str, Any]:
        """A non-main process: train alongside the main one, never write outputs."""
        name = stage.name
        fingerprint = stage_cache.stage_fingerprint(stage, self.fingerprints)
        self.fingerprints[name] = fingerprint
        hit = share(None)
        if isinstance(hit, str):
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed on the main process: {hit}")
        if not hit and stage.spec.stage in TRAINING_KINDS:
            if STAGE_KINDS[stage.spec.stage].loads_models:
                self._import_architectures()
            threads.apply_threads(stage.runtime.threads)
            tmp = Path(outputs.temp_dir(f".{name}.tmp-rank{self.rank}-", self.workdir))
            context = StageContext(
                run_name=self.plan.recipe.name, stage_name=name, stage_kind=stage.spec.stage,
                plugin=stage.spec.plugin, workdir=self.workdir, output_dir=tmp, runtime=stage.runtime,
                console=Console(stderr=True, quiet=True), checkpoint_dir=self.checkpoint_dir(name, fingerprint))
            try:
                stage.registered.impl.run(context, self._inputs(stage), stage.params)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        failure = share(None)
        if failure is not None:
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed on the main process: {failure}")
        self.artifacts[name] = load_artifact(STAGE_KINDS[stage.spec.stage].artifact, name,
                                             self._final(name))
        return {"name": name, "stage": stage.spec.stage, "plugin": stage.spec.plugin, "rank": self.rank}

    def _lead_stage(self, stage: PlannedStage) -> dict[str, Any]:
        name = stage.name
        final = self._final(name)
        components = stage_cache.stage_components(stage, self.fingerprints)
        fingerprint = stage_cache.fingerprint_hash(components)
        self.fingerprints[name] = fingerprint
        versioned = name not in self.outputs  # a workdir stage: every version kept
        reuse = self.selection.reuses(name, self.use_cache and stage.spec.cache)
        cached = stage_cache.lookup(self.workdir, name, fingerprint, final, versioned) if reuse else None
        if self.world > 1:
            share(cached is not None)
        artifact_type = STAGE_KINDS[stage.spec.stage].artifact
        if cached is not None:
            self.artifacts[name] = load_artifact(artifact_type, name, final)
            cached["cache"] = "hit"
            self._remove_checkpoints(name)  # left if a kill came right after the rename
            self._say(f"[cyan]↺[/] {name} [dim]({stage.spec.plugin}) cached[/]")
            return cached
        if STAGE_KINDS[stage.spec.stage].loads_models:
            self._import_architectures()

        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(outputs.temp_dir(f".{final.name}.tmp-", final.parent))
        progress = make_progress(self.console)
        context = StageContext(
            run_name=self.plan.recipe.name, stage_name=name, stage_kind=stage.spec.stage,
            plugin=stage.spec.plugin, workdir=self.workdir, output_dir=tmp,
            runtime=stage.runtime, console=self.console, progress=progress,
            checkpoint_dir=self.checkpoint_dir(name, fingerprint) if self._checkpoints else None,
            use_cache=reuse,
        )
        call_observers("stage_started", context=context, stage=stage.spec)
        self._active = (name, context.checkpoint_dir, stage.params)
        thread_plan = threads.apply_threads(stage.runtime.threads)
        sampler = MemorySampler()
        t0 = time.perf_counter()
        try:
            onto = stage.spec.params.get("tokenizer") if stage.spec.stage == MERGE else None
            with sampler, progress, token_cache.reporting_to(context), \
                    onto_one_tokenizer(context, self._inputs(stage), onto) as given:
                if getattr(stage, "search", None) is not None:
                    artifact = run_search(context, given, stage.search, stage.spec.params,
                                          self.artifacts, self.fingerprints)
                else:
                    artifact = stage.registered.impl.run(context, given, stage.params)
            _check_artifact(artifact, stage)
            wall = time.perf_counter() - t0
            record = report.stage_record(stage, context, artifact, wall, sampler, fingerprint)
            record["threads"] = threads_record(thread_plan)
            artifact.save(tmp)
            if isinstance(artifact, ModelArtifact):
                self._card(tmp, stage, record)
            stage_cache.write_marker(tmp, fingerprint, record, components, stage.spec.references(),
                                     recipe=self._recipe_file())
            outputs.settle_modes(tmp)  # copied inputs keep their modes; plugins' files alike
            outputs.mark_output(tmp, "stage", stage=name, fingerprint=fingerprint)
            stage_cache.commit(tmp, final, self.workdir if versioned else None, fingerprint,
                               flag=self.output_flag, overwrite=self.overwrite)
            self._remove_checkpoints(name)
            self._active = None
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, EngineError):
                raise StageFailed(f"stage {name!r} ({stage.spec.plugin}): {exc}") from exc
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        artifact = artifact.relocated(final)
        self.artifacts[name] = artifact
        record["output"] = str(final)
        call_observers("stage_finished", context=context, stage=stage.spec, artifact=artifact,
                       record=record)
        self._say(f"[green]✓[/] {name} [dim]({stage.spec.plugin}) {wall:.1f}s[/]")
        return record


def run_stage(plan: Plan, out: Path, *, console: Console | None = None, use_cache: bool = True,
              announce: bool = True, overwrite: bool = False, flag: str = "--out") -> dict[str, Any]:
    """Run the one stage of ``plan`` into the folder ``out`` and return its record.

    The stage is fingerprinted, served from the cache and written exactly as in a run of
    the plan (:meth:`Runner.run`): into a temporary folder beside ``out``, renamed into
    place with its marker (fingerprint and record, ``.lingoforge-stage.json``) only when
    complete, so a second call with the same inputs, params and runtime is a cache hit
    that writes nothing. Unlike a full run there is no workdir lock, report.json,
    clean-up of other temporaries or ``run_finished`` call: ``out``'s parent is anybody's
    folder, so a stage that does not train gets no checkpoint folder there either. The
    input models' code is not imported ahead of the stage. ``out`` is written only when it
    is absent or empty, or, with ``overwrite``, an earlier output the engine wrote that holds
    nothing else (checked again under a lock just before the rename; ``flag`` names it in
    errors).
    """
    out = Path(out)
    runner = Runner(plan, out.parent, console=console, use_cache=use_cache,
                    outputs={plan.stages[0].name: out} if plan.stages else None)
    runner.announce = announce
    runner.overwrite, runner.output_flag = overwrite, flag
    return runner.run_one()


# --- helpers -------------------------------------------------------------------------------


def _check_artifact(artifact: Any, stage: PlannedStage) -> None:
    expected = ARTIFACT_TYPES[STAGE_KINDS[stage.spec.stage].artifact]
    if not isinstance(artifact, expected):
        raise EngineError(f"plugin {stage.spec.plugin!r} returned {type(artifact).__name__}, "
                          f"a {stage.spec.stage} stage must return {expected.__name__}")
    if isinstance(artifact, ModelArtifact):
        modelio.check_model_folder(artifact.path)
    refuse_unscored(artifact)  # partial metrics: the stage fails, nothing is kept
