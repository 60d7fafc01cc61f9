"""The per-model driver every evaluator shares, and the scoring helpers re-exported.

An evaluate plugin says *what* to run, built once per distinct tokenizer and window:
an :class:`EvalPlan` (token spans to score, plus how to turn their scores into
metrics), a :class:`~engine.generation.GenerationPlan` (prompts to complete greedily,
plus how to turn the texts into metrics), or a list of both. :func:`evaluate_models`
does the rest for every model of the stage: load one model at a time, run each part
of the plan on it, merge the metrics and counts, keep going when one model fails.
The pieces live in :mod:`engine.spans` (texts to spans, sliding windows),
:mod:`engine.scoring` (batching, shared-prefix KV-cache scoring) and
:mod:`engine.generation` (batched greedy generation); their names are re-exported
here, the documented place plugins import from.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine import modelio
from engine.artifacts import MetricsArtifact, ModelArtifact
from engine.capabilities import Capabilities, probe
from engine.errors import DataError, EngineError, ModelLoadError
from engine.generation import Generation, GenerationPlan, StopRule, generate_greedy
from engine.inputs import DataSource
from engine.scoring import Batch, batch_order, num_batches, plan_batches, score_spans
from engine.spans import (
    DEFAULT_MAX_LENGTH,
    Span,
    SpanScore,
    TokenTotals,
    context_length,
    continuation_span,
    document_spans,
    encode_document,
    encode_pair,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:
    from engine.context import StageContext

__all__ = [
    "DEFAULT_MAX_LENGTH", "Batch", "EvalPlan", "Generation", "GenerationPlan", "Plan", "Span",
    "SpanScore", "StopRule", "TokenTotals", "batch_order", "context_length",
    "continuation_span", "document_spans", "encode_document", "encode_pair",
    "evaluate_models", "generate_greedy", "num_batches", "plan_batches", "score_spans",
    "select_sources", "tokenizer_fingerprint",
]


# --- the per-model driver every evaluator shares -------------------------------------------------


def select_sources(context: StageContext, data: Sequence[DataSource],
                   fmt: str | Collection[str]) -> list[DataSource]:
    """The data sources of format ``fmt`` (one name, or several); the others are
    ignored, as documented.

    Raises :class:`DataError` naming the stage when none match, or when two sources of
    one format share a label (their metric names would collide; a ``choice`` and a
    ``generation`` source may share one: ``acc/en`` and ``exact_match/en``).
    """
    formats = (fmt,) if isinstance(fmt, str) else tuple(fmt)
    chosen = [d for d in data if d.format in formats]
    if not chosen:
        got = ", ".join(f"{d.path.name} ({d.format})" for d in data) or "no data at all"
        wanted = " or ".join(repr(f) for f in formats)
        raise DataError(f"evaluate stage {context.stage_name!r} ({context.plugin}): "
                        f"no data source of format {wanted}; got {got}")
    seen: dict[tuple[str, str], DataSource] = {}
    for d in chosen:
        key = (d.format, d.label)
        if key in seen:
            raise DataError(
                f"evaluate stage {context.stage_name!r}: data sources {seen[key].path} and "
                f"{d.path} share the label {d.label!r}; give them distinct 'language' values")
        seen[key] = d
    return chosen


Result = tuple[dict[str, float], dict[str, int]]


@dataclass
class EvalPlan:
    """Spans to score for one tokenizer and window, and how to turn scores into metrics.

    ``summarize(scores)`` receives one :class:`SpanScore` per span, in order, and
    returns ``(metrics, counts)`` for one model.
    """

    spans: list[Span]
    summarize: Callable[[list[SpanScore]], Result]

    def num_batches(self, batch_size: int, share_prefix: bool = True) -> int:
        """Progress steps :meth:`run` takes (one per batch, shared-prefix ones included)."""
        return len(plan_batches(self.spans, batch_size, share_prefix=share_prefix))

    def run(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int,
            device: torch.device | str, share_prefix: bool = True,
            on_batch: Callable[[int], None] | None = None) -> Result:
        """Score every span with one loaded model and summarise; ``on_batch(fed)``
        after each batch with the positions it fed the model."""
        def advance(batch: Batch, scores: list[SpanScore]) -> None:
            if on_batch is not None:
                on_batch(batch.fed_tokens)

        scores = score_spans(model, self.spans, batch_size=batch_size, device=device,
                             pad_id=tokenizer.pad_token_id, share_prefix=share_prefix,
                             on_batch=advance)
        return self.summarize(scores)


#: one part of what a model is run on; a plan builder returns one part or a list
Plan = EvalPlan | GenerationPlan
PlanBuilder = Callable[[Any, int], Plan | Sequence[Plan]]


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"


def _parts(plan: Plan | Sequence[Plan]) -> tuple[Plan, ...]:
    return (plan,) if isinstance(plan, (EvalPlan, GenerationPlan)) else tuple(plan)


def evaluate_models(
    context: StageContext,
    models: Sequence[ModelArtifact],
    build_plan: PlanBuilder,
    *,
    batch_size: int,
    max_length: int | None = None,
    share_prefix: bool = True,
) -> MetricsArtifact:
    """Run each model on the plan ``build_plan(tokenizer, max_length)`` returns.

    * A plan is an :class:`EvalPlan` (spans to score), a
      :class:`~engine.generation.GenerationPlan` (prompts to complete), or a list of
      them: each part runs on the loaded model in turn and their metrics and counts
      are merged (so a stage with multiple-choice and generation data loads each
      model once). Parts must not produce the same metric name.
    * Tokenizers are loaded first, and a plan is built once per distinct tokenizer and
      window (:func:`tokenizer_fingerprint`), so that the progress bar knows its total
      (models x batches) before the first (slow) model load.
    * ``max_length`` ``None`` means each model's own context (:func:`context_length`).
    * A model or tokenizer that fails to load or run, or whose plan cannot be built
      (an error other than :class:`DataError`), is logged and reported in ``errors``;
      the other models are still scored. Bad data (:class:`DataError`) stops the
      stage, since it would fail every model. When no model at all could be scored
      the stage fails with every model's reason.
    * ``context.add_tokens`` counts the positions fed to models (no padding); with
      ``share_prefix`` a context shared by several spans is fed (and counted) once.
    """
    if not models:
        raise EngineError(f"evaluate stage {context.stage_name!r}: no models to evaluate")
    errors: dict[str, str] = {}
    load_failures: set[str] = set()
    plans: dict[tuple[str, int], tuple[Plan, ...]] = {}
    todo: list[tuple[ModelArtifact, Any, tuple[Plan, ...]]] = []
    for artifact in models:
        try:
            config = modelio.read_config(artifact.path)
            tokenizer = context.load_tokenizer(artifact)
            length = max_length or context_length(config, tokenizer)
            key = (tokenizer_fingerprint(artifact.path), length)
            if key not in plans:
                plans[key] = _parts(build_plan(tokenizer, length))
            todo.append((artifact, tokenizer, plans[key]))
        except DataError:
            raise
        except Exception as exc:
            errors[artifact.name] = _message(exc)
            load_failures.add(artifact.name)
            context.log(f"[red]model {artifact.name!r} skipped:[/] {errors[artifact.name]}")

    metrics: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    n_batches = {id(parts): sum(p.num_batches(batch_size, share_prefix) for p in parts)
                 for _, _, parts in todo}
    total = sum(n_batches[id(parts)] for _, _, parts in todo)
    with context.progress(total, f"{context.stage_name}: {context.plugin}") as bar:
        for artifact, tokenizer, parts in todo:
            done = 0

            def advance(fed: int, name: str = artifact.name) -> None:
                nonlocal done
                done += 1
                context.add_tokens(fed)
                bar.advance(1, model=name)

            model = None
            alive: Callable[[], Any] = _nothing
            try:
                model = context.load_model(artifact)
                alive = weakref.ref(model)
                _report_capabilities(context, artifact.name, probe(model))
                values: dict[str, float] = {}
                numbers: dict[str, int] = {}
                for part in parts:
                    m, c = part.run(model, tokenizer, batch_size=batch_size,
                                    device=context.device, share_prefix=share_prefix,
                                    on_batch=advance)
                    values.update(m)
                    numbers.update(c)
                metrics[artifact.name], counts[artifact.name] = values, numbers
                bar.advance(max(0, n_batches[id(parts)] - done))  # a model without a KV cache
            except DataError:
                raise
            except Exception as exc:
                errors[artifact.name] = _message(exc)
                if model is None:
                    load_failures.add(artifact.name)
                context.log(f"[red]model {artifact.name!r} not scored:[/] {errors[artifact.name]}")
                bar.advance(max(0, n_batches[id(parts)] - done))
            finally:
                del model
                _free_memory(alive)

    if not metrics:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        cls = ModelLoadError if load_failures == set(errors) else EngineError
        raise cls(f"evaluate stage {context.stage_name!r}: no model could be scored ({detail})")
    return MetricsArtifact(name=context.stage_name, metrics=metrics, counts=counts, errors=errors)


def _report_capabilities(context: StageContext, name: str, caps: Capabilities) -> None:
    """Record what fast paths ``name`` has in report.json; say once per stage when a slow
    path will be taken instead."""
    notes = context.stats.notes.setdefault("capabilities", {})
    notes[name] = caps.as_dict()
    if caps.missing:
        slow = context.stats.notes.setdefault("slow_paths", {})
        if not slow:
            context.log(f"[yellow]model {name!r} lacks a fast path, scoring is slower:[/] "
                        + "; ".join(caps.missing))
        slow[name] = list(caps.missing)


def _nothing() -> None:
    return None


def _free_memory(alive: Callable[[], Any]) -> None:
    """Release a model before the next loads: peak memory stays one model.

    A full ``gc.collect`` takes a noticeable fraction of a second in a process
    that imported transformers, so it runs only when reference cycles kept the model.
    """
    if alive() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
