"""Checkpoints that let a killed training stage continue where it stopped.

The runner writes a stage into a fresh temporary folder and renames it only on
success, so checkpoints live in a stable place it chooses,
``<workdir>/.checkpoints/<stage>/<fingerprint>/`` (``StageContext.checkpoint_dir``):
the same recipe with the same inputs finds them again, a changed recipe does not.

A checkpoint is a folder ``step-<n>/`` holding only formats that cannot execute code:

* ``trainable.safetensors``: the parameters that train (frozen ones are re-read
  from the stage's input model, which the fingerprint pins); for a LoRA run these
  are the adapter matrices, under the peft-wrapped model's parameter names, which
  wrapping the reloaded input the same way reproduces;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state dict, its
  tensors flattened by key and everything else as JSON (AdamW and 8-bit AdamW alike);
* ``rng.safetensors``: the torch CPU (and CUDA) generator states;
* ``state.json``: step, tokens, micro-batches consumed, Python RNG state;
* ``train_log.jsonl``: the log so far, so that the finished stage's log is whole;
* ``best.safetensors`` (``keep_best`` only): the trainable tensors at the step with the
  lowest held-out loss so far (:mod:`engine.training.heldout`), whose step and loss are in
  ``state.json``.

The learning-rate schedule is a pure function of the step and the data a pure
function of the seed, so neither needs more than the step count: the loop rebuilds
the schedule at that step and skips the micro-batches already consumed.

Each checkpoint is written into ``.tmp-step-<n>`` and renamed, so a kill during a save
leaves the previous checkpoint intact; only complete folders are ever loaded.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.core.errors import TrainingError

STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class Checkpoint:
    """A loaded checkpoint: what :func:`engine.training.train` restores."""

    path: Path
    state: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


# --- optimizer state <-> safetensors + json ------------------------------------------------


def _flatten(obj: Any, prefix: str, tensors: dict[str, torch.Tensor],
             seen: dict[int, str] | None = None) -> Any:
    """JSON-able skeleton of ``obj`` with tensors moved into ``tensors`` by path."""
    seen = {} if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:  # one tensor referenced twice (8-bit AdamW's shared qmaps)
            return {"__tensor__": seen[id(obj)]}
        key = prefix.rstrip(".")
        seen[id(obj)] = key
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), _flatten(v, f"{prefix}{k}.", tensors, seen)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_flatten(v, f"{prefix}{i}.", tensors, seen) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TrainingError(f"cannot checkpoint optimizer state value of type {type(obj).__name__} at {prefix!r}")


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TrainingError(f"cannot checkpoint optimizer state key {k!r}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


# --- RNG -------------------------------------------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    """The torch generator states of this process (CPU, and every CUDA device)."""
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def restore_rng(rng: dict[str, torch.Tensor], python_state: Any) -> None:
    torch.set_rng_state(rng["cpu"])
    cuda = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if python_state is not None:
        version, internal, gauss = python_state
        random.setstate((version, tuple(internal), gauss))


# --- the folder ------------------------------------------------------------------------------


class CheckpointDir:
    """The checkpoints of one stage run: save, find the latest, load, clean up."""

    def __init__(self, root: Path, keep: int = 1) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints present, ascending."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, *, step: int, state: dict[str, Any], trainable: dict[str, torch.Tensor],
             optimizer: dict[str, Any], log_file: Path | None = None,
             best: dict[str, torch.Tensor] | None = None) -> Path:
        """Write checkpoint ``step`` atomically and drop all but the newest ``keep``."""
        self.root.mkdir(parents=True, exist_ok=True)
        # unfinished saves of killed runs (any pid: one run holds a workdir at a time); what
        # they hold may include a writer's own scratch file (safetensors >= 0.8 writes
        # beside the destination and renames)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-step-{step}-{os.getpid()}"
        tmp.mkdir()
        save_file({k: v.detach().to("cpu").contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))
        opt_tensors: dict[str, torch.Tensor] = {}
        skeleton = _flatten(optimizer, "", opt_tensors)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(skeleton))
        save_file(rng_tensors(), str(tmp / "rng.safetensors"))
        if best is not None:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in best.items()}, str(tmp / BEST_FILE))
        if log_file is not None and log_file.is_file():
            shutil.copyfile(log_file, tmp / "train_log.jsonl")
        py_version, py_internal, py_gauss = random.getstate()
        full_state = {**state, "step": step, "python_rng": [py_version, list(py_internal), py_gauss]}
        (tmp / STATE_FILE).write_text(json.dumps(full_state))  # last: marks the folder complete
        final = self.path(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.steps()[: -self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return final

    def load_latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or None when there is none."""
        steps = self.steps()
        if not steps:
            return None
        path = self.path(steps[-1])
        try:
            state = json.loads((path / STATE_FILE).read_text())
            skeleton = json.loads((path / "optimizer.json").read_text())
            optimizer = _unflatten(skeleton, load_file(str(path / "optimizer.safetensors")))
            best = load_file(str(path / BEST_FILE)) if (path / BEST_FILE).is_file() else None
            return Checkpoint(path=path, state=state, trainable=load_file(str(path / "trainable.safetensors")),
                              optimizer=optimizer, rng=load_file(str(path / "rng.safetensors")), best=best)
        except (OSError, ValueError, KeyError) as exc:
            raise TrainingError(f"checkpoint {path} is unreadable ({exc}); delete it to start over") from exc

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
