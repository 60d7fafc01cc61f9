"""Experiment trackers of a training stage (``runtime.log_with``), through accelerate.

Every line :func:`engine.training.train` writes to ``train_log.jsonl`` also goes to
the trackers the recipe names, built from accelerate's tracker classes
(:mod:`accelerate.tracking`), so tensorboard, wandb, mlflow and trackio get what
peers' trainers send them: ``train/loss``, ``train/lr``, ``train/tok_s``,
``train/grad_norm`` and ``train/tokens`` at each optimizer step, and ``eval/loss`` (the
held-out loss, ``eval_loss`` in the log) at the steps that evaluate it.

Names and places: the project (experiment) is the recipe's ``name``, the run is the
stage's name; local files go under ``<workdir>/trackers/<tracker>/``
(tensorboard: one event folder per stage, ``tensorboard --logdir <workdir>/trackers/tensorboard``).
Nothing here forces a network: wandb honours ``WANDB_MODE=offline``, mlflow logs to
``<workdir>/trackers/mlflow`` unless ``MLFLOW_TRACKING_URI`` is set, trackio writes
its local store (``TRACKIO_DIR``). Only the main process opens trackers; they are
closed when the stage's loop ends, also when it fails.

A tracker's package that is not installed is a recipe problem ``engine validate``
reports (:func:`check_log_with`), naming ``runtime.log_with`` and what to install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from engine.core.errors import RecipeError

if TYPE_CHECKING:
    from engine.run.context import StageContext

__all__ = ["PACKAGES", "StageTrackers", "check_log_with", "open_trackers"]

#: tracker name -> (import names any of which serves it, what to install)
PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    # accelerate writes through torch.utils.tensorboard (needs tensorboard) or tensorboardX
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'lingoforge[tracking]' (tensorboardX)"),
    "wandb": (("wandb",), "pip install wandb"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "trackio": (("trackio",), "pip install trackio"),
}
#: the train_log.jsonl fields sent to trackers (prefixed "train/")
LOGGED = ("loss", "lr", "tok_s", "grad_norm", "tokens", "elapsed_s")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_log_with(names: list[str]) -> None:
    """Raise :class:`RecipeError` naming ``runtime.log_with`` when a tracker's package is missing."""
    for name in names:
        if name not in PACKAGES:
            raise RecipeError(f"runtime.log_with: unknown tracker {name!r}; use one of {sorted(PACKAGES)}")
        modules, install = PACKAGES[name]
        if not any(_installed(m) for m in modules):
            raise RecipeError(f"runtime.log_with: {name!r} needs the {' or '.join(modules)} package, which is "
                              f"not installed; {install}, or remove it from log_with")


def _make(name: str, project: str, run: str, root: Path) -> Any:
    """The accelerate tracker object for ``name`` (not started)."""
    from accelerate import tracking

    if name == "tensorboard":
        return tracking.TensorBoardTracker(run, root / "tensorboard")
    if name == "wandb":
        (root / "wandb").mkdir(parents=True, exist_ok=True)
        return tracking.WandBTracker(project, name=run, dir=str(root / "wandb"))
    if name == "mlflow":
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            import mlflow

            mlflow.set_tracking_uri((root / "mlflow").resolve().as_uri())
        return tracking.MLflowTracker(experiment_name=project, run_name=run)
    if name == "trackio":
        return tracking.TrackioTracker(project, name=run)
    raise RecipeError(f"runtime.log_with: unknown tracker {name!r}; use one of {sorted(PACKAGES)}")


class StageTrackers:
    """The open trackers of one stage; a context manager that closes them on exit."""

    def __init__(self, trackers: list[Any]) -> None:
        self.trackers = trackers

    def log(self, record: dict[str, Any]) -> None:
        """Send one train_log.jsonl record (its ``step`` is the tracker step)."""
        if not self.trackers:
            return
        values = {f"train/{k}": float(record[k]) for k in LOGGED if record.get(k) is not None}
        if record.get("eval_loss") is not None:
            values["eval/loss"] = float(record["eval_loss"])
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def close(self) -> None:
        """Finish every tracker (each once; an error in one still closes the others)."""
        trackers, self.trackers = self.trackers, []
        errors = []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - closing must reach every tracker
                errors.append(f"{tracker.name}: {exc}")
        if errors:
            raise RecipeError(f"runtime.log_with: closing trackers failed: {'; '.join(errors)}")

    def __enter__(self) -> StageTrackers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the stage's own error is the one to see
            self.close()
        except RecipeError:
            pass


def open_trackers(context: StageContext, main: bool = True) -> StageTrackers:
    """Start the trackers ``context.runtime.log_with`` names (none off the main process)."""
    names = list(getattr(context.runtime, "log_with", None) or [])
    if not names or not main:
        return StageTrackers([])
    check_log_with(names)
    root = context.workdir / "trackers"
    root.mkdir(parents=True, exist_ok=True)
    opened = StageTrackers([])
    try:
        for name in names:
            tracker = _make(name, context.run_name, context.stage_name, root)
            tracker.start()
            opened.trackers.append(tracker)
    except BaseException:
        opened.__exit__(RuntimeError, None, None)
        raise
    return opened
