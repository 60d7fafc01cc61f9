"""Runs a validated plan: stages in dependency order, outputs written atomically.

Each stage writes into a temporary folder inside the workdir, which is renamed to
``<workdir>/<stage name>/`` only when the stage succeeded, together with a small
``.lingoforge-stage.json`` holding the stage's fingerprint and report record. A
later run of the same recipe reuses an output whose fingerprint (plugin, params,
inputs, data files, runtime) is unchanged: that is the report's cache hit.

Training checkpoints go to ``<workdir>/.checkpoints/<stage>/<fingerprint>/``, a
place that survives a killed run, so running the recipe again resumes the stage;
they are deleted once the stage's output is in place.

One run at a time holds a workdir (:mod:`engine.workdir_lock`); a second is refused
with the first one's pid. ``runtime.threads`` is applied before each stage that runs
(:mod:`engine.threads`) and recorded in its report record.

Under ``torchrun``/``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs the
plan, but only the main process (rank 0) writes stage outputs, checkpoints and the
report. Training stages (adapt-language, align) run on every process, data-parallel;
other stages run on the main process only. The main process tells the others whether
a stage was cached and whether it succeeded; they then read its output from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from engine import modelio, threads
from engine.artifacts import (
    ARTIFACT_TYPES,
    Artifact,
    LayerSelection,
    MetricsArtifact,
    ModelArtifact,
)
from engine.context import StageContext
from engine.errors import EngineError
from engine.inputs import DataSource, StageInputs
from engine.plugin_manager import call_observers
from engine.stages import STAGE_KINDS, training_kinds
from engine.validate import Plan, PlannedStage, resolve_model_path
from engine.workdir_lock import WorkdirLock

STAGE_FILE = ".lingoforge-stage.json"
LAYERS_FILE = "layers.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.json"
CHECKPOINTS_DIR = ".checkpoints"
#: stage kinds whose implementations train: every process of a distributed launch runs them
TRAINING_KINDS = training_kinds()


class StageFailed(EngineError):
    """A stage raised; the message names it. ``__cause__`` holds the original error."""


class Runner:
    """Executes a :class:`~engine.validate.Plan` into ``workdir``."""

    def __init__(self, plan: Plan, workdir: Path, console: Console | None = None,
                 use_cache: bool = True) -> None:
        self.plan = plan
        self.workdir = Path(workdir)
        self.console = console or Console(stderr=True)
        self.use_cache = use_cache
        self.artifacts: dict[str, Artifact] = {}
        self.fingerprints: dict[str, str] = {}
        self.records: list[dict[str, Any]] = []
        #: the one-time import of the input models' code, done before the first stage that runs
        self.startup: dict[str, Any] = {"architectures_imported": [], "import_s": 0.0}
        self._imported = False
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.main = self.rank == 0

    # -- public -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(self.workdir) if self.main else None
        if lock is not None:
            lock.acquire()  # before anything is written or cleaned up
        intra_before = torch.get_num_threads()
        try:
            with threads.RunRegistration():  # counted by every run's 'auto' threads
                return self._run()
        finally:
            torch.set_num_threads(intra_before)  # in-process callers keep their setting
            if lock is not None:
                lock.release()

    def _run(self) -> dict[str, Any]:
        if self.main:
            _remove_stale_temporaries(self.workdir)
        if self.world > 1:
            _init_process_group(self.plan.recipe.runtime.device)
        started = time.perf_counter()
        for name, spec in self.plan.recipe.models.items():
            self._resolve_input_model(name, spec)
        for stage in self.plan.stages:
            self.records.append(self._run_stage(stage))
            self._write_report(time.perf_counter() - started, finished=False)
        report = self._write_report(time.perf_counter() - started, finished=True)
        if self.world > 1:  # every process returns the main process's report
            report = _share(report if self.main else None)
        if self.main:
            call_observers("run_finished", recipe=self.plan.recipe, workdir=str(self.workdir), report=report)
        return report

    # -- inputs -------------------------------------------------------------------------

    def _resolve_input_model(self, name: str, spec: Any) -> None:
        if spec.builtin is not None:
            from engine import world

            path = world.model_path(spec.builtin)
        else:
            path = resolve_model_path(spec, self.plan.recipe_dir)
        self.artifacts[name] = ModelArtifact(name=name, path=Path(path), meta=modelio.read_meta(path))
        self.fingerprints[name] = _hash({"model": str(path), "files": _files_state(Path(path))})

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

    def _fingerprint(self, stage: PlannedStage) -> str:
        refs = {k: [self.fingerprints[r] for r in v] for k, v in stage.spec.references().items()}
        return _hash({
            "stage": stage.spec.stage,
            "plugin": stage.spec.plugin,
            "params": stage.params.result_key(),
            "inputs": refs,
            "data": [_data_key(d) for d in stage.data],
            # thread counts change speed, not what a stage computes: not part of the key
            "runtime": {k: v for k, v in vars(stage.runtime).items() if k != "threads"},
        })

    # -- one stage ------------------------------------------------------------------------

    def checkpoint_dir(self, name: str, fingerprint: str) -> Path:
        """Where stage ``name`` with ``fingerprint`` keeps its resumable checkpoints."""
        return self.workdir / CHECKPOINTS_DIR / name / fingerprint

    def _import_architectures(self) -> None:
        """Import the input models' modelling code once, before the first stage that runs
        (not for a run served wholly from the cache), so no stage's time includes it."""
        if self._imported:
            return
        self._imported = True
        t0 = time.perf_counter()
        names = {modelio.import_architecture(art.path) for art in self.artifacts.values()
                 if isinstance(art, ModelArtifact)}
        self.startup = {"architectures_imported": sorted(n for n in names if n),
                        "import_s": round(time.perf_counter() - t0, 3)}

    def _run_stage(self, stage: PlannedStage) -> dict[str, Any]:
        if self.world == 1:
            return self._lead_stage(stage)
        if not self.main:
            return self._follow_stage(stage)
        try:
            record = self._lead_stage(stage)
        except BaseException as exc:  # wherever the others wait, they receive the failure
            _share(f"{type(exc).__name__}: {exc}")
            raise
        _share(None)
        return record

    def _follow_stage(self, stage: PlannedStage) -> dict[str, Any]:
        """A non-main process: train alongside the main one, never write outputs."""
        name = stage.name
        fingerprint = self._fingerprint(stage)
        self.fingerprints[name] = fingerprint
        hit = _share(None)
        if isinstance(hit, str):
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed on the main process: {hit}")
        if not hit and stage.spec.stage in TRAINING_KINDS:
            self._import_architectures()
            threads.apply_threads(stage.runtime.threads)
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.rank{self.rank}-", dir=self.workdir))
            context = StageContext(
                run_name=self.plan.recipe.name, stage_name=name, stage_kind=stage.spec.stage,
                plugin=stage.spec.plugin, workdir=self.workdir, output_dir=tmp, runtime=stage.runtime,
                console=Console(stderr=True, quiet=True), checkpoint_dir=self.checkpoint_dir(name, fingerprint))
            try:
                stage.registered.impl.run(context, self._inputs(stage), stage.params)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        failure = _share(None)
        if failure is not None:
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed on the main process: {failure}")
        self.artifacts[name] = _load_artifact(stage.spec.stage, name, self.workdir / name)
        return {"name": name, "stage": stage.spec.stage, "plugin": stage.spec.plugin, "rank": self.rank}

    def _lead_stage(self, stage: PlannedStage) -> dict[str, Any]:
        name = stage.name
        final = self.workdir / name
        if final.parent.resolve() != self.workdir.resolve():  # names are checked; never trust
            raise EngineError(f"stage name {name!r} would write outside the workdir {self.workdir}")
        fingerprint = self._fingerprint(stage)
        self.fingerprints[name] = fingerprint
        cached = self._cached_record(stage, final, fingerprint)
        if self.world > 1:
            _share(cached is not None)
        if cached is not None:
            self.artifacts[name] = _load_artifact(stage.spec.stage, name, final)
            cached["cache"] = "hit"
            _remove_checkpoints(self.workdir, name)  # left if a kill came right after the rename
            self.console.print(f"[cyan]↺[/] {name} [dim]({stage.spec.plugin}) cached[/]")
            return cached
        self._import_architectures()

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.workdir))
        progress = _progress(self.console)
        context = StageContext(
            run_name=self.plan.recipe.name, stage_name=name, stage_kind=stage.spec.stage,
            plugin=stage.spec.plugin, workdir=self.workdir, output_dir=tmp,
            runtime=stage.runtime, console=self.console, progress=progress,
            checkpoint_dir=self.checkpoint_dir(name, fingerprint),
        )
        call_observers("stage_started", context=context, stage=stage.spec)
        thread_plan = threads.apply_threads(stage.runtime.threads)
        sampler = _MemorySampler()
        t0 = time.perf_counter()
        try:
            with sampler, progress:
                artifact = stage.registered.impl.run(context, self._inputs(stage), stage.params)
            _check_artifact(artifact, stage)
            wall = time.perf_counter() - t0
            record = self._record(stage, context, artifact, wall, sampler, fingerprint)
            record["threads"] = (thread_plan.to_json() if thread_plan is not None else
                                 {"setting": None, "intra_op": torch.get_num_threads(),
                                  "inter_op": torch.get_num_interop_threads(),
                                  "reason": "torch's own setting"})
            _persist(artifact, tmp)
            (tmp / STAGE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "record": record},
                                                     indent=2, default=str))
            modelio.replace_dir(tmp, final)
            _remove_checkpoints(self.workdir, name)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                raise
            if isinstance(exc, EngineError):
                raise StageFailed(f"stage {name!r} ({stage.spec.plugin}): {exc}") from exc
            raise StageFailed(f"stage {name!r} ({stage.spec.plugin}) failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        artifact = _relocate(artifact, final)
        self.artifacts[name] = artifact
        record["output"] = str(final)
        call_observers("stage_finished", context=context, stage=stage.spec, artifact=artifact,
                       record=record)
        self.console.print(f"[green]✓[/] {name} [dim]({stage.spec.plugin}) {wall:.1f}s[/]")
        return record

    def _cached_record(self, stage: PlannedStage, final: Path, fingerprint: str) -> dict | None:
        if not (self.use_cache and stage.spec.cache):
            return None
        marker = final / STAGE_FILE
        if not marker.is_file():
            return None
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            return None
        if saved.get("fingerprint") != fingerprint:
            return None
        record = dict(saved["record"])
        record["output"] = str(final)
        return record

    def _record(self, stage: PlannedStage, context: StageContext, artifact: Artifact,
                wall: float, sampler: _MemorySampler, fingerprint: str) -> dict[str, Any]:
        stats = context.stats
        metrics: dict[str, Any] = dict(stats.metrics)
        if isinstance(artifact, MetricsArtifact):
            metrics.update(artifact.metrics)
        record: dict[str, Any] = {
            "name": stage.name,
            "stage": stage.spec.stage,
            "plugin": stage.spec.plugin,
            "wall_time_s": round(wall, 3),
            "tokens": stats.tokens,
            "tokens_per_s": round(stats.tokens / wall, 1) if wall > 0 and stats.tokens else None,
            "trainable_params": stats.trainable_params,
            "forward_params": stats.forward_params,
            "peak_rss_mb": sampler.peak_rss_mb,
            "peak_cuda_mb": sampler.peak_cuda_mb,
            "cache": "miss",
            "fingerprint": fingerprint,
            "metrics": metrics,
            "notes": stats.notes,
        }
        if isinstance(artifact, LayerSelection):
            record["notes"].setdefault("layers", artifact.indices)
            record["notes"].setdefault("explanation", artifact.explanation)
        if isinstance(artifact, MetricsArtifact) and artifact.errors:
            record["errors"] = artifact.errors
        return record

    def _write_report(self, wall: float, *, finished: bool) -> dict[str, Any]:
        """Write report.json (main process only; others return the dict unwritten)."""
        report = {
            "recipe": self.plan.recipe.name,
            "source": self.plan.source,
            "finished": finished,
            "wall_time_s": round(wall, 3),
            "device": str(modelio.resolve_device(self.plan.recipe.runtime.device)),
            "torch": torch.__version__,
            "threads": {"recipe": self.plan.recipe.runtime.threads,
                        "cpus_available": threads.available_cpus()},
            "startup": self.startup,
            "stages": self.records,
        }
        if not self.main:
            return report
        tmp = self.workdir / f".{REPORT_FILE}.tmp"
        tmp.write_text(json.dumps(report, indent=2, default=str))
        os.replace(tmp, self.workdir / REPORT_FILE)
        return report


# --- helpers -------------------------------------------------------------------------------


def _init_process_group(device: str) -> None:
    """Join the launch's process group (gloo on the CPU) before the first stage."""
    from accelerate import PartialState

    PartialState(cpu=modelio.resolve_device(device).type == "cpu")


def _share(value: Any) -> Any:
    """Broadcast ``value`` from the main process; every process returns the main's value."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _remove_checkpoints(workdir: Path, name: str) -> None:
    """Drop a finished stage's checkpoints (every fingerprint: they can no longer be resumed)."""
    shutil.rmtree(workdir / CHECKPOINTS_DIR / name, ignore_errors=True)
    try:
        (workdir / CHECKPOINTS_DIR).rmdir()
    except OSError:
        pass


def _progress(console: Console) -> Progress:
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=console, transient=True,
    )


def _check_artifact(artifact: Any, stage: PlannedStage) -> None:
    expected = ARTIFACT_TYPES[STAGE_KINDS[stage.spec.stage].artifact]
    if not isinstance(artifact, expected):
        raise EngineError(f"plugin {stage.spec.plugin!r} returned {type(artifact).__name__}, "
                          f"a {stage.spec.stage} stage must return {expected.__name__}")
    if isinstance(artifact, ModelArtifact):
        modelio.check_model_folder(artifact.path)


def _persist(artifact: Artifact, folder: Path) -> None:
    """Write non-model artifacts into the stage folder (models are written by plugins)."""
    if isinstance(artifact, LayerSelection):
        (folder / LAYERS_FILE).write_text(json.dumps(artifact.to_json(), indent=2))
    elif isinstance(artifact, MetricsArtifact):
        (folder / METRICS_FILE).write_text(json.dumps(artifact.to_json(), indent=2))
    elif isinstance(artifact, ModelArtifact) and artifact.path.resolve() != folder.resolve():
        # a plugin that wrote its model elsewhere: bring it into the stage folder
        for item in artifact.path.iterdir():
            shutil.move(str(item), folder / item.name)


def _relocate(artifact: Artifact, final: Path) -> Artifact:
    if isinstance(artifact, ModelArtifact):
        return ModelArtifact(name=artifact.name, path=final, meta=modelio.read_meta(final) or artifact.meta)
    return artifact


def _load_artifact(kind: str, name: str, folder: Path) -> Artifact:
    artifact = STAGE_KINDS[kind].artifact
    if artifact == "layers":
        return LayerSelection.from_json(name, json.loads((folder / LAYERS_FILE).read_text()))
    if artifact == "metrics":
        data = json.loads((folder / METRICS_FILE).read_text())
        metrics = {k: v for k, v in data.items() if not k.startswith("_")}
        return MetricsArtifact(name, metrics, data.get("_counts", {}), data.get("_errors", {}))
    return ModelArtifact(name=name, path=folder, meta=modelio.read_meta(folder))


def _remove_stale_temporaries(workdir: Path) -> None:
    """Delete the temporary stage folders a hard-killed earlier run left behind.

    They are never mistaken for outputs (their names start with a dot and carry no
    stage marker), but they take disk space. One run per workdir at a time.
    """
    for item in workdir.glob(".*.tmp-*"):
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)


def _data_key(d: DataSource) -> dict[str, Any]:
    """What a data source contributes to a stage's fingerprint. ``records`` joins the key
    only when set, so fingerprints of recipes that do not slice stay as they were."""
    key = {"path": str(d.path), "format": d.format, "language": d.language,
           "weight": d.weight, "field": d.text_field, "state": _file_state(d.path)}
    if d.records is not None:
        key["records"] = d.records
    return key


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_state(path: Path) -> list[Any]:
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def _files_state(folder: Path) -> dict[str, list[Any]]:
    return {p.name: _file_state(p) for p in sorted(folder.iterdir()) if p.is_file()}


class _MemorySampler:
    """Peak resident memory of this process while a stage runs (and CUDA peak)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak = 0

    def __enter__(self) -> _MemorySampler:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._peak = _rss_bytes()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_rss_mb = round(self._peak / 2**20, 1) if self._peak else None
        if torch.cuda.is_available():
            self.peak_cuda_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
