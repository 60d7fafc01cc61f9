"""The per-model driver every evaluator shares, and the scoring helpers re-exported.

An evaluate plugin says *what* to run, built once per distinct tokenizer and window:
an :class:`EvalPlan` (token spans to score, plus how to turn their scores into
metrics), a :class:`~engine.evaluation.generation.GenerationPlan` (prompts to complete greedily,
plus how to turn the texts into metrics), or a list of both. :func:`evaluate_models`
does the rest for every model of the stage: load one model at a time, run each part
of the plan on it, merge the metrics and counts, keep going when one model fails.
The pieces live in :mod:`engine.evaluation.spans` (spans, sliding windows), :mod:`engine.evaluation.scoring`
(shared-prefix KV-cache scoring) and :mod:`engine.evaluation.generation` (greedy generation);
their names are re-exported here, the documented place plugins import from.

Long module: the driver (plans per tokenizer, the evaluation cache, failures kept per
model, progress) is one loop every evaluator runs; splitting it would split that loop.
"""

from __future__ import annotations

import gc
import math
import time
import weakref
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.core.artifacts import MetricsArtifact, ModelArtifact
from engine.core.errors import DataError, EngineError, ModelLoadError
from engine.core.inputs import DataSource
from engine.evaluation import cache as eval_cache
from engine.evaluation.generation import Generation, GenerationPlan, StopRule, generate_greedy
from engine.evaluation.scoring import Batch, batch_order, num_batches, plan_batches, score_spans
from engine.evaluation.spans import (
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
from engine.models import modelio
from engine.models.capabilities import Capabilities, probe

if TYPE_CHECKING:
    from engine.run.context import StageContext

__all__ = [
    "DEFAULT_MAX_LENGTH", "PROPORTIONS", "Batch", "EvalPlan", "Generation", "GenerationPlan",
    "ModelScores", "Plan", "Span", "as_scores", "binomial_stderr",
    "SpanScore", "StopRule", "TokenTotals", "batch_order", "context_length",
    "continuation_span", "document_spans", "encode_document", "encode_pair",
    "evaluate_models", "generate_greedy", "num_batches", "plan_batches", "refuse_unscored",
    "score_spans", "select_sources", "tokenizer_fingerprint",
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

#: metric kinds that are a share of items (right or wrong each): their standard error is
#: binomial, ``sqrt(p (1 - p) / n)``, when the plan does not give one
PROPORTIONS = ("acc", "acc_norm", "exact_match")


@dataclass
class ModelScores:
    """One model's results from a plan: metrics, counts, and for a reader of the numbers
    ``stderr`` (``{metric: standard error}``) and ``chance`` (``{metric: the accuracy of
    guessing}``, multiple-choice metrics only). Unpacks as ``metrics, counts``, so a
    ``summarize`` may return either this or that pair."""

    metrics: dict[str, float]
    counts: dict[str, int]
    stderr: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.metrics, self.counts))

    def update(self, other: ModelScores) -> None:
        for mine, theirs in ((self.metrics, other.metrics), (self.counts, other.counts),
                             (self.stderr, other.stderr), (self.chance, other.chance)):
            mine.update(theirs)


def as_scores(result: ModelScores | Result) -> ModelScores:
    """A plan's result as :class:`ModelScores`, binomial standard errors filled in for
    the :data:`PROPORTIONS` metrics that have none."""
    scores = (result if isinstance(result, ModelScores)
              else ModelScores(dict(result[0]), dict(result[1])))
    for name, value in scores.metrics.items():
        n = scores.counts.get(name, 0)
        if name not in scores.stderr and name.split("/", 1)[0] in PROPORTIONS and n > 0:
            scores.stderr[name] = binomial_stderr(value, n)
    return scores


def binomial_stderr(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of a share ``p`` of ``n`` items."""
    return math.sqrt(max(0.0, p * (1.0 - p)) / n) if n > 0 else float("nan")


@dataclass
class EvalPlan:
    """Spans to score for one tokenizer and window, and how to turn scores into metrics.

    ``summarize(scores)`` receives one :class:`SpanScore` per span, in order, and
    returns :class:`ModelScores` or ``(metrics, counts)`` for one model. ``max_tokens``
    lets a plain batch of short spans hold more than ``batch_size`` of them, up to that
    many padded positions (:func:`~engine.evaluation.scoring.score_spans`).
    """

    spans: list[Span]
    summarize: Callable[[list[SpanScore]], ModelScores | Result]
    max_tokens: int | None = None

    def num_steps(self) -> int:
        """Progress units :meth:`run` reports: one per span, whichever path scores it."""
        return len(self.spans)

    def num_batches(self, batch_size: int, share_prefix: bool = True) -> int:
        """Batches :meth:`run` takes for a model with a KV cache (shared-prefix ones
        included); a model without one runs every span in plain batches."""
        return len(plan_batches(self.spans, batch_size, share_prefix=share_prefix,
                                max_tokens=self.max_tokens))

    def run(self, model: torch.nn.Module, tokenizer: Any, *, batch_size: int,
            device: torch.device | str, share_prefix: bool = True,
            on_batch: Callable[[int, int], None] | None = None) -> ModelScores | Result:
        """Score every span with one loaded model and summarise; ``on_batch(fed, n)``
        after each batch with the positions it fed the model and the spans it scored."""
        def advance(batch: Batch, scores: list[SpanScore]) -> None:
            if on_batch is not None:
                on_batch(batch.fed_tokens, len(batch.indices))

        scores = score_spans(model, self.spans, batch_size=batch_size, device=device,
                             pad_id=tokenizer.pad_token_id, share_prefix=share_prefix,
                             on_batch=advance, max_tokens=self.max_tokens)
        return self.summarize(scores)


#: one part of what a model is run on; a plan builder returns one part or a list
Plan = EvalPlan | GenerationPlan
PlanBuilder = Callable[[Any, int], Plan | Sequence[Plan]]


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"


def _parts(plan: Plan | Sequence[Plan]) -> tuple[Plan, ...]:
    return (plan,) if isinstance(plan, (EvalPlan, GenerationPlan)) else tuple(plan)


@dataclass
class _Todo:
    artifact: ModelArtifact
    tokenizer: Any
    parts: tuple[Plan, ...]
    key: dict[str, Any] | None  # its evaluation cache entry's key

    @property
    def steps(self) -> int:
        return sum(p.num_steps() for p in self.parts)


def evaluate_models(
    context: StageContext,
    models: Sequence[ModelArtifact],
    build_plan: PlanBuilder,
    *,
    batch_size: int,
    max_length: int | None = None,
    share_prefix: bool = True,
    params: Any = None,
    data: Sequence[DataSource] | None = None,
) -> MetricsArtifact:
    """Run each model on the plan ``build_plan(tokenizer, max_length)`` returns.

    * A plan is an :class:`EvalPlan` (spans to score), a
      :class:`~engine.evaluation.generation.GenerationPlan` (prompts to complete), or a list of
      them: each part runs on the loaded model in turn and their metrics and counts
      are merged (so a stage with multiple-choice and generation data loads each
      model once). Parts must not produce the same metric name.
    * ``params`` (the plugin's params) and ``data`` (the stage's data sources) key the
      evaluation cache (:mod:`engine.evaluation.cache`): a model whose content and evaluation
      are unchanged since a saved result is not loaded, its result is reused. Without
      them nothing is cached. The stage notes ``eval_cache`` say which models were scored
      and which reused, and the reused ones' saved cost.
    * Tokenizers are loaded first, and a plan is built once per distinct tokenizer and
      window (:func:`tokenizer_fingerprint`), so that the progress bar knows its total
      before the first (slow) model load: one step per span and per prompt of every model
      to score, whichever path (shared prefix or plain) scores it; it shows the model,
      the fed tokens per second and (the runner's bar) the time remaining.
    * ``max_length`` ``None`` means each model's own context (:func:`context_length`).
    * A model or tokenizer that fails to load or run, or whose plan cannot be built
      (an error other than :class:`DataError`), is logged and reported in ``errors``;
      the other models are still scored (and saved in the evaluation cache, when it is
      on). The runner then fails the stage (:func:`refuse_unscored`): metrics with a
      model missing never become the stage's version. Bad data (:class:`DataError`)
      stops the stage at once, since it would fail every model. When no model at all
      could be scored this function raises with every model's reason.
    * ``context.add_tokens`` counts the positions fed to models (no padding); with
      ``share_prefix`` a context shared by several spans is fed (and counted) once.
    """
    if not models:
        raise EngineError(f"evaluate stage {context.stage_name!r}: no models to evaluate")
    stage_key = eval_cache.evaluation_key(context, params, data, batch_size=batch_size,
                                          share_prefix=share_prefix)
    cache = eval_cache.EvalCache(context.workdir) if stage_key is not None else None
    errors: dict[str, str] = {}
    load_failures: set[str] = set()
    results: dict[str, ModelScores] = {}
    reused: dict[str, dict[str, float]] = {}
    plans: dict[tuple[str, int], tuple[Plan, ...]] = {}
    todo: list[_Todo] = []
    for artifact in models:
        try:
            config = modelio.read_config(artifact.path)
            tokenizer = context.load_tokenizer(artifact)
            length = max_length or context_length(config, tokenizer)
            key = None
            if cache is not None and stage_key is not None:
                key = {**stage_key, "max_length": length,
                       "model": eval_cache.model_content(artifact.path, context.workdir)}
                hit = cache.get(key)
                if hit is not None:
                    results[artifact.name] = ModelScores(hit.metrics, hit.counts, hit.stderr,
                                                         hit.chance)
                    reused[artifact.name] = hit.cost
                    continue
            plan_key = (tokenizer_fingerprint(artifact.path), length)
            if plan_key not in plans:
                # a merge search scores the same plan on every trial: its context keeps plans
                kept = getattr(context, "plan_cache", None) if stage_key is not None else None
                where = (repr(sorted(stage_key.items())), plan_key) if kept is not None else None
                plans[plan_key] = (kept.get(where) if kept is not None else None) or \
                    _parts(build_plan(tokenizer, length))
                if kept is not None:
                    kept[where] = plans[plan_key]
            todo.append(_Todo(artifact, tokenizer, plans[plan_key], key))
        except DataError:
            raise
        except Exception as exc:
            errors[artifact.name] = _message(exc)
            load_failures.add(artifact.name)
            context.log(f"[red]model {artifact.name!r} skipped:[/] {errors[artifact.name]}")

    total = sum(t.steps for t in todo)
    with context.progress(total, f"{context.stage_name}: {context.plugin}", unit="items") as bar:
        for k, item in enumerate(todo, 1):
            scores = _score_one(context, item, bar, f"{item.artifact.name} {k}/{len(todo)}",
                                batch_size=batch_size, share_prefix=share_prefix,
                                errors=errors, load_failures=load_failures)
            if scores is None:
                continue
            results[item.artifact.name] = scores[0]
            if cache is not None and item.key is not None:
                cache.put(item.key, eval_cache.CachedResult(
                    scores[0].metrics, scores[0].counts, scores[0].stderr, scores[0].chance,
                    scores[1]))

    if cache is not None:
        _note_cache(context, cache, [t.artifact.name for t in todo if t.artifact.name in results],
                    reused)
    if not results:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        cls = ModelLoadError if load_failures == set(errors) else EngineError
        raise cls(f"evaluate stage {context.stage_name!r}: no model could be scored ({detail})")
    order = [m.name for m in models if m.name in results]
    chance: dict[str, float] = {}
    for name in order:
        chance.update(results[name].chance)
    return MetricsArtifact(name=context.stage_name,
                           metrics={n: results[n].metrics for n in order},
                           counts={n: results[n].counts for n in order}, errors=errors,
                           chance=chance, stderr={n: results[n].stderr for n in order})


def refuse_unscored(artifact: object) -> None:
    """Raise :class:`EngineError` naming each model of metrics ``artifact`` that could not be
    scored (its ``errors``: why, e.g. the truncated file). The runner calls it before it keeps
    a stage's output: partial metrics never replace a version nor are cached as one."""
    errors = artifact.errors if isinstance(artifact, MetricsArtifact) else None
    if errors:
        detail = "; ".join(f"model {name!r}: {why}" for name, why in errors.items())
        what = "a model" if len(errors) == 1 else f"{len(errors)} models"
        raise EngineError(f"{what} could not be scored, so the stage keeps no result ({detail})")


def _score_one(context: StageContext, item: _Todo, bar: Any, label: str, *, batch_size: int,
               share_prefix: bool, errors: dict[str, str], load_failures: set[str],
               ) -> tuple[ModelScores, dict[str, float]] | None:
    """Load and score one model: its scores and cost, or None (its error recorded). The
    bar advances by exactly the model's steps, whether it is scored or fails."""
    name = item.artifact.name
    done = fed_total = 0
    t0 = time.perf_counter()

    def advance(fed: int, n: int) -> None:
        nonlocal done, fed_total
        n = min(n, item.steps - done)  # never past this model's share of the total
        done += n
        fed_total += fed
        context.add_tokens(fed)
        rate = fed_total / max(time.perf_counter() - t0, 1e-9)
        bar.advance(n, model=label, tok_s=f"{rate:,.0f}")

    model = None
    alive: Callable[[], Any] = _nothing
    try:
        model = context.load_model(item.artifact)
        alive = _nothing if context.keeps(model) else weakref.ref(model)  # a search's candidate stays
        _report_capabilities(context, name, probe(model))
        scores = ModelScores({}, {})
        for part in item.parts:
            scores.update(as_scores(part.run(model, item.tokenizer, batch_size=batch_size,
                                             device=context.device, share_prefix=share_prefix,
                                             on_batch=advance)))
        return scores, {"wall_s": round(time.perf_counter() - t0, 3), "tokens": fed_total}
    except DataError:
        raise
    except Exception as exc:
        errors[name] = _message(exc)
        if model is None:
            load_failures.add(name)
        context.log(f"[red]model {name!r} not scored:[/] {errors[name]}")
        return None
    finally:
        if done < item.steps:  # a failed model: its remaining share, so the bar completes
            bar.advance(item.steps - done)
        del model
        _free_memory(alive)


def _note_cache(context: StageContext, cache: eval_cache.EvalCache, scored: list[str],
                reused: dict[str, dict[str, float]]) -> None:
    """``notes.eval_cache``: models scored, models reused and what reusing them saved."""
    note: dict[str, Any] = {
        "scored": scored, "reused": list(reused), "saved": reused,
        "saved_wall_s": round(sum(c.get("wall_s", 0.0) for c in reused.values()), 3),
        "saved_tokens": int(sum(c.get("tokens", 0) for c in reused.values())),
    }
    if cache.rejected:
        note["rejected_entries"] = list(cache.rejected)
    context.note("eval_cache", note)
    if reused:
        context.log(f"evaluation cache: reused {len(reused)} model(s) "
                    f"({', '.join(reused)}), scored {len(scored)}")


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
