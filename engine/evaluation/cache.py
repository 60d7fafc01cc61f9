"""The evaluation cache: one saved result per (model content, evaluation), so that an
evaluate stage re-run because one of its models changed scores only that model.

An evaluate stage's fingerprint covers all its models, so changing one re-runs the
stage. :func:`engine.evaluation.evaluate_models` then looks each model up here first:
a model whose *content fingerprint* and *evaluation key* are both unchanged reuses its
saved metrics, counts, standard errors and chance levels without being loaded.

* **Content fingerprint** (:func:`model_content`): the fingerprint in the folder's stage
  marker (``.lingoforge-stage.json``) for a stage output of the run's workdir, else
  :func:`engine.core.fingerprint.model_fingerprint` (path, size and mtime of its files) for
  an input model folder; plus the hash of its tokenizer files.
* **Evaluation key** (:func:`evaluation_key`): the scoring version
  (:data:`SCORING_VERSION`, raised whenever scoring or generation changes a number),
  the torch and transformers versions, the plugin name, its params' ``result_key()``,
  every data source's key (:func:`engine.core.fingerprint.data_key`: path, format, language,
  size, mtime, ...), the batch size (padding changes float rounding), ``share_prefix``,
  the window (``max_length``, resolved per model) and the runtime settings that change
  numbers (device and dtype as resolved, 8-bit loading, attention kernel, remote code).

An entry is ``<workdir>/.eval-cache/<hash>.json`` holding the full key it was written
for; a read whose file is unreadable, is not the expected shape or holds another key is
ignored (and rewritten after scoring), never trusted. Entries are written to a temporary
file and renamed. Only models scored without error are saved. Nothing is cached when the
stage runs with ``--no-cache`` (``StageContext.use_cache`` false, also the default outside
the runner) or when the evaluator did not hand ``evaluate_models`` its ``params`` and
``data`` (an evaluator whose inputs cannot be keyed is never served a wrong hit).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core import outputs
from engine.core.fingerprint import STAGE_FILE, data_key, fingerprint_hash, model_fingerprint
from engine.evaluation.spans import tokenizer_fingerprint

if TYPE_CHECKING:
    from engine.core.inputs import DataSource
    from engine.run.context import StageContext

__all__ = ["CACHE_DIR", "SCORING_VERSION", "CachedResult", "EvalCache", "evaluation_key",
           "model_content"]

#: where entries live, inside the run's workdir
CACHE_DIR = ".eval-cache"
#: raise whenever a change to scoring, generation or a built-in metric changes a number
SCORING_VERSION = 2
#: runtime settings that change speed or logging, not what is scored
_NOT_RESULTS = frozenset({"threads", "log_with", "memory_gb", "fsdp"})


@dataclass
class CachedResult:
    """What one model's evaluation produced, as saved: metrics, counts, standard errors,
    chance levels, and its cost (``wall_s`` to load and score it, ``tokens`` fed)."""

    metrics: dict[str, float]
    counts: dict[str, int]
    stderr: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "counts": self.counts, "stderr": self.stderr,
                "chance": self.chance, "cost": self.cost}

    @classmethod
    def from_json(cls, data: Any) -> CachedResult | None:
        """The result in ``data``, or None when any part is not of the saved shape."""
        if not isinstance(data, dict):
            return None
        parts = {}
        for name, kind in (("metrics", float), ("counts", int), ("stderr", float),
                           ("chance", float), ("cost", float)):
            value = data.get(name, {})
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and _is(v, kind) for k, v in value.items()):
                return None
            parts[name] = {k: kind(v) for k, v in value.items()}
        if not parts["metrics"] or set(parts["counts"]) != set(parts["metrics"]):
            return None
        return cls(**parts)


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, (int, float)) and (math.isfinite(value) or math.isnan(value))


def model_content(path: Path, workdir: Path | None = None) -> str:
    """What a model folder holds, as a fingerprint, plus its tokenizer files' hash.

    A stage output of this run's ``workdir`` (its folder resolves inside it) is named by
    its stage marker's fingerprint, which the runner writes with the folder; any other
    folder (an input model, even one copied from a stage output with its marker) by
    :func:`~engine.core.fingerprint.model_fingerprint`: path, size and mtime of its files.
    """
    path = Path(path)
    fingerprint = None
    resolved = path.resolve()
    if workdir is not None and resolved.is_relative_to(Path(workdir).resolve()):
        try:
            saved = json.loads((path / STAGE_FILE).read_text())
            if isinstance(saved, dict) and isinstance(saved.get("fingerprint"), str):
                fingerprint = "stage:" + saved["fingerprint"]
        except (OSError, ValueError):
            pass
    if fingerprint is None:
        fingerprint = "folder:" + model_fingerprint(resolved)
    return f"{fingerprint}/{tokenizer_fingerprint(path)[:16]}"


def evaluation_key(context: StageContext, params: Any, data: Sequence[DataSource] | None, *,
                   batch_size: int, share_prefix: bool) -> dict[str, Any] | None:
    """The key of what a stage computes for any one model (the model and its window are
    added per model), or None when nothing may be cached: caching off for the stage, or
    params / data not given, or params without ``result_key``."""
    if not getattr(context, "use_cache", False) or params is None or data is None:
        return None
    result_key = getattr(params, "result_key", None)
    if not callable(result_key):
        return None
    import torch
    import transformers

    runtime = {k: v for k, v in vars(context.runtime).items() if k not in _NOT_RESULTS}
    return {
        "version": SCORING_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "plugin": context.plugin,
        "params": result_key(),
        "data": [data_key(d) for d in data],
        "batch_size": batch_size,
        "share_prefix": share_prefix,
        "runtime": runtime,
        "device": context.device.type,
        "dtype": str(context.dtype),
    }


class EvalCache:
    """The entries of one workdir; ``get`` and ``put`` by the full key object."""

    def __init__(self, workdir: Path) -> None:
        self.folder = Path(workdir) / CACHE_DIR
        #: entries found unreadable or of another key (ignored, rewritten after scoring)
        self.rejected: list[str] = []

    def _path(self, key: dict[str, Any]) -> Path:
        return self.folder / f"{fingerprint_hash(key)}.json"

    def get(self, key: dict[str, Any]) -> CachedResult | None:
        """The saved result for ``key``; None when absent, unreadable or not for ``key``."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = None
        same_key = isinstance(saved, dict) and saved.get("key") == json.loads(
            json.dumps(key, sort_keys=True, default=str))
        result = CachedResult.from_json(saved.get("result")) if same_key else None
        if result is None:
            self.rejected.append(path.name)
        return result

    def put(self, key: dict[str, Any], result: CachedResult) -> None:
        """Save ``result`` for ``key``: a temporary file renamed over the entry."""
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"key": key, "result": result.to_json()}, indent=1, sort_keys=True,
                          default=str)
        outputs.replace_file(self._path(key), text)


