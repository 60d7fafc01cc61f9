"""``lm-eval``: run lm-evaluation-harness tasks on the stage's models (optional extra).

The harness has hundreds of community tasks and is what papers report; this bridge
lets a recipe score its models on any of them *that are available locally*: nothing
is downloaded at run time (the CLI runs with ``HF_HUB_OFFLINE=1``), so use tasks whose
data sit on disk, e.g. a custom task YAML with ``dataset_path: json`` and
``dataset_kwargs: {data_files: {test: /path/items.jsonl}}`` in a folder given as
``include_path`` (relative to the recipe file), or hub tasks whose datasets are already in the local HF cache.

Each model is loaded with the stage's runtime (device, dtype, ``load_in_8bit``)
through :meth:`StageContext.load_model` and handed to the harness as an ``HFLM``, so
the harness's own tokenization and scoring rules apply (they differ from
``task-accuracy`` in details such as BOS handling; compare numbers from one tool).

Metrics per model: ``<metric>/<task>`` (``acc/arc_easy``; a harness filter other than
``none`` is appended: ``exact_match_strict-match/gsm8k``); standard errors go to the
stage's notes. Counts: the task's evaluated samples.

lm-eval is an optional dependency (``pip install 'lingoforge[lm-eval]'``): without it
this plugin still registers (``engine plugins`` lists it, ``engine validate`` accepts
recipes using it) and its run fails with that instruction, instead of the plugin
showing up as broken.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from engine.api import MetricsArtifact, PluginParams, StageContext, StageInputs, hookimpl
from engine.api.errors import EngineError, ModelLoadError

INSTALL_HINT = "pip install 'lingoforge[lm-eval]'"


def lm_eval_available() -> bool:
    """Whether lm-evaluation-harness can be imported (without importing it)."""
    return importlib.util.find_spec("lm_eval") is not None


class LmEval:
    """lm-evaluation-harness tasks (local data only) on every model of the stage."""

    name = "lm-eval"
    requires = ("lm_eval",)  # engine plugins says "needs extra lingoforge[lm-eval]" without it
    extra = "lm-eval"

    class Params(PluginParams):
        tasks: list[str] = Field(..., min_length=1, description="Harness task (or group) names.")
        include_path: str | None = Field(
            None, description="Folder of custom task YAML files (relative paths are relative "
                              "to the recipe file); lets tasks read local jsonl/csv files.")
        num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; default: "
                                                                "the task's own setting.")
        limit: int | None = Field(None, ge=1, description="Score only the first N examples "
                                                          "of each task.")
        batch_size: int = Field(8, ge=1, description="Requests per forward pass.")
        seed: int = Field(0, description="Seed of the harness's few-shot sampling.")

        @field_validator("include_path")
        @classmethod
        def _recipe_relative(cls, value: str | None, info: ValidationInfo) -> str | None:
            # validation passes the recipe's folder as context (engine validate / run)
            return resolve_include_path(value, (info.context or {}).get("recipe_dir"))

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        if not lm_eval_available():
            raise EngineError(f"the lm-eval plugin needs lm-evaluation-harness; install it with "
                              f"{INSTALL_HINT}")
        if not inputs.models:
            raise EngineError(f"evaluate stage {context.stage_name!r}: no models to evaluate")
        from lm_eval.tasks import TaskManager

        include = resolve_include_path(params.include_path, None)
        if include is not None and not Path(include).is_dir():
            raise EngineError(f"lm-eval: include_path {include} is not a folder")
        # indexing the harness's own ~thousands of task files takes seconds: skip it when
        # the custom folder already defines every requested task
        manager = TaskManager(include_path=include, include_defaults=False) if include else None
        if manager is None or any(t not in manager.all_tasks for t in params.tasks):
            manager = TaskManager(include_path=include)
        missing = [t for t in params.tasks if t not in manager.all_tasks]
        if missing:
            raise EngineError(f"lm-eval: unknown task(s) {', '.join(missing)}; give include_path "
                              "for custom task YAML files")
        metrics: dict[str, dict[str, float]] = {}
        counts: dict[str, dict[str, int]] = {}
        stderr: dict[str, dict[str, float]] = {}
        errors: dict[str, str] = {}
        with context.progress(len(inputs.models), f"{context.stage_name}: lm-eval", unit="models") as bar:
            for artifact in inputs.models:
                try:
                    results = _evaluate(context, artifact, params, manager)
                    metrics[artifact.name], counts[artifact.name], stderr[artifact.name] = \
                        flatten_results(results)
                except Exception as exc:
                    errors[artifact.name] = str(exc) if isinstance(exc, EngineError) else \
                        f"{type(exc).__name__}: {exc}"
                    context.log(f"[red]model {artifact.name!r} not scored:[/] {errors[artifact.name]}")
                bar.advance(1, model=artifact.name)
        if not metrics:
            detail = "; ".join(f"{n}: {m}" for n, m in errors.items())
            raise ModelLoadError(f"evaluate stage {context.stage_name!r}: no model could be "
                                 f"scored ({detail})")
        context.note("stderr", stderr)
        return MetricsArtifact(context.stage_name, metrics, counts, errors)


def resolve_include_path(path: str | None, recipe_dir: str | Path | None) -> str | None:
    """``include_path`` as an absolute folder: a relative one is relative to the recipe's
    folder (``recipe_dir``; the working directory when there is no recipe), as every other
    path of a recipe is; ``~`` is expanded. A missing folder is an error when the recipe
    is known (``engine validate`` names it before anything runs)."""
    if path is None:
        return None
    given = Path(path).expanduser()
    base = Path(recipe_dir) if recipe_dir is not None else Path.cwd()
    resolved = given if given.is_absolute() else (base / given).resolve()
    if recipe_dir is not None and not resolved.is_dir():
        raise ValueError(f"{path!r} is not a folder ({resolved}; a relative include_path is "
                         f"relative to the recipe file's folder)")
    return str(resolved)


def _evaluate(context: StageContext, artifact: Any, params: LmEval.Params, manager: Any) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    model = context.load_model(artifact)
    tokenizer = context.load_tokenizer(artifact)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=params.batch_size,
                  device=str(context.device))
        out = simple_evaluate(model=lm, tasks=list(params.tasks), task_manager=manager,
                              num_fewshot=params.num_fewshot, limit=params.limit,
                              log_samples=False, bootstrap_iters=0, random_seed=params.seed,
                              fewshot_random_seed=params.seed)
    finally:
        del model
    if not out or "results" not in out:
        raise EngineError("lm-eval returned no results")
    return {"results": out["results"], "n-samples": out.get("n-samples", {})}


def flatten_results(out: dict[str, Any]) -> tuple[dict[str, float], dict[str, int], dict[str, float]]:
    """Harness results -> ``{metric/task: value}``, counts (samples) and stderrs."""
    metrics: dict[str, float] = {}
    counts: dict[str, int] = {}
    stderr: dict[str, float] = {}
    samples = out.get("n-samples", {})
    for task, values in out["results"].items():
        n = samples.get(task, {}).get("effective")
        for key, value in values.items():
            name, _, filt = key.partition(",")
            if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            base = name if filt == "none" else f"{name}_{filt}"
            if name.endswith("_stderr"):
                if math.isfinite(value):
                    stderr[f"{base.replace('_stderr', '')}/{task}"] = float(value)
                continue
            metrics[f"{base}/{task}"] = float(value)
            if isinstance(n, int):
                counts[f"{base}/{task}"] = n
    return metrics, counts, stderr


@hookimpl
def register_evaluators(register: Any) -> None:
    register(LmEval())
