"""``retention``: how much of the source language a model kept, against a reference model.

Adapting a model to a new language must not cost its English. This evaluator scores
every model of the stage *and* a reference (usually the base model the others were
trained or merged from) on source-language data, with exactly the metrics of
``perplexity`` and ``task-accuracy`` (the plans in :mod:`engine.evaluation.choices`), and reports
each model's change against the reference, so "English preserved" is one number:

* ``retention_ppl/<label> = ppl_reference / ppl_model`` (likewise ``retention_bpb``):
  **1.0 = kept**, below 1 = the model got worse at the language (0.8: its perplexity is
  25% higher), above 1 = better. A ratio, so it reads the same for any corpus.
* ``delta_acc/<label> = acc_model - acc_reference`` (likewise ``delta_acc_norm``): in
  accuracy points as a fraction; **0.0 = kept**, negative = lost. A difference, since
  accuracies are already on a common 0..1 scale and a ratio of small accuracies lies.

Higher is better for every retention metric. The reference itself gets 1.0 / 0.0. Counts
are those of the underlying metric (tokens, items); the underlying values of every model
go to the stage's ``notes.underlying`` in report.json, their standard errors to
``notes.underlying_stderr``.

Perplexity ratios need a shared tokenizer: a model whose vocabulary or merges differ
from the reference's (:func:`same_tokenization`) gets no ``retention_ppl`` (a warning says so); ask for ``bpb``, which
compares across tokenizers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from engine.api import (
    InputConfigs,
    MetricsArtifact,
    PluginParams,
    StageContext,
    StageInputs,
    hookimpl,
)
from engine.api.errors import DataError, EngineError, RecipeError
from engine.api.evaluation import (
    EvalPlan,
    ModelScores,
    SpanScore,
    as_scores,
    choice_plan,
    evaluate_models,
    load_items,
    plan_perplexity,
    read_documents,
    tokenizer_fingerprint,
)

Metric = Literal["ppl", "bpb", "acc", "acc_norm"]
#: metrics that improve downwards get a ratio reference/model; the others a difference
RATIO_METRICS = ("ppl", "bpb")


class Retention:
    """Source-language metrics of each model relative to a reference (1.0 / 0.0 = kept)."""

    name = "retention"
    data_formats = ("text", "choice")

    class Params(PluginParams):
        reference: str = Field(..., description="Name of the reference model; must be one of "
                                                "the stage's models (usually the base).")
        metrics: list[Metric] = Field(
            ["ppl", "acc"], min_length=1,
            description="Underlying metrics: ppl and bpb read text data, acc and acc_norm "
                        "read choice data.")
        batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
        max_length: int | None = Field(None, ge=2, description="Window length in tokens; "
                                                               "default: the model's context.")
        stride: int | None = Field(None, ge=1, description="Sliding-window stride for long "
                                                           "documents; default max_length // 2.")
        max_documents: int | None = Field(None, ge=1, description="First N documents per text source.")
        max_items: int | None = Field(None, ge=1, description="First N items per choice source.")
        num_fewshot: int = Field(0, ge=0, description="Few-shot examples per choice item.")
        fewshot_seed: int = Field(0, description="Seed of the deterministic few-shot draw.")
        fewshot_separator: str = Field("\n\n", description="Text between few-shot examples.")
        share_prefix: bool = Field(True, description="Reuse an item's context KV cache for "
                                                     "all its choices.")

    def check(self, configs: InputConfigs, params: Params) -> None:
        """Static check for ``engine validate``: the reference is one of the stage's models."""
        names = getattr(configs, "names", {}).get("models")
        if names is not None and params.reference not in names:
            raise ValueError(f"retention: reference {params.reference!r} is not among the "
                             f"stage's models ({', '.join(names)}); add it to 'models'")

    def produces(self, data: list[Any], params: Params) -> list[str]:
        """The metric names it reports per model for ``data`` (a merge search's check):
        ``retention_<m>`` for text metrics, ``delta_<m>`` for accuracies."""
        out = []
        for m in params.metrics:
            fmt, name = ("text", f"retention_{m}") if m in RATIO_METRICS else ("choice", f"delta_{m}")
            out += [f"{name}/{d.label}" for d in data if d.format == fmt]
        return out

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        names = [m.name for m in inputs.models]
        if params.reference not in names:
            raise RecipeError(f"evaluate stage {context.stage_name!r}: reference "
                              f"{params.reference!r} is not among its models ({', '.join(names)})")
        build_plan = _plan_builder(context, inputs, params)
        raw = evaluate_models(context, inputs.models, build_plan, batch_size=params.batch_size,
                              max_length=params.max_length, share_prefix=params.share_prefix,
                              params=params, data=inputs.data)
        if params.reference not in raw.metrics:
            why = raw.errors.get(params.reference, "not scored")
            raise EngineError(f"evaluate stage {context.stage_name!r}: the reference model "
                              f"{params.reference!r} could not be scored, so no retention can be "
                              f"computed ({why})")
        ref_path = next(m.path for m in inputs.models if m.name == params.reference)
        same_tokenizer = {m.name: same_tokenization(ref_path, m.path)
                          for m in inputs.models if m.name in raw.metrics}
        metrics, counts = relative_metrics(raw.metrics, raw.counts, params.reference, same_tokenizer)
        for name, same in same_tokenizer.items():
            if not same and "ppl" in params.metrics and name in raw.metrics:
                context.log(f"[yellow]{name!r} has another tokenizer than {params.reference!r}: "
                            "no retention_ppl (use bpb)[/]")
        context.note("reference", params.reference)
        context.note("underlying", raw.metrics)
        context.note("underlying_stderr", raw.stderr)
        return MetricsArtifact(context.stage_name, metrics, counts, errors=raw.errors)


def same_tokenization(a: Path, b: Path) -> bool:
    """Whether two model folders split text into the same tokens.

    Compares the tokenizer *model* (vocabulary and merges in tokenizer.json) and the
    added tokens, not the files' bytes: saving a model rewrites tokenizer_config.json
    without changing how it tokenizes. Folders without tokenizer.json fall back to
    comparing every tokenizer file (:func:`tokenizer_fingerprint`).
    """
    fa, fb = Path(a) / "tokenizer.json", Path(b) / "tokenizer.json"
    if fa.is_file() and fb.is_file():
        ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
        return (ja.get("model"), ja.get("added_tokens")) == (jb.get("model"), jb.get("added_tokens"))
    return tokenizer_fingerprint(Path(a)) == tokenizer_fingerprint(Path(b))


def _plan_builder(context: StageContext, inputs: StageInputs, params: Retention.Params) -> Any:
    """One plan per tokenizer holding the documents and the choice items together."""
    want_text = any(m in RATIO_METRICS for m in params.metrics)
    want_choice = any(m not in RATIO_METRICS for m in params.metrics)
    text_sources = [d for d in inputs.data if d.format == "text"] if want_text else []
    choice_sources = [d for d in inputs.data if d.format == "choice"] if want_choice else []
    for wanted, found, fmt, which in ((want_text, text_sources, "text", "ppl/bpb"),
                                      (want_choice, choice_sources, "choice", "acc/acc_norm")):
        if wanted and not found:
            raise DataError(f"evaluate stage {context.stage_name!r}: metrics {which} need a data "
                            f"source of format {fmt!r}")
    dupes = {d.label for group in (text_sources, choice_sources) for d in group
             if [x.label for x in group].count(d.label) > 1}
    if dupes:  # the same label for a text and a choice source is fine: ppl/en, acc/en
        raise DataError(f"evaluate stage {context.stage_name!r}: data sources share the label(s) "
                        f"{', '.join(sorted(dupes))}; give them distinct 'language' values")
    texts = read_documents(text_sources, params.max_documents, context.stage_name) if text_sources else {}
    items = [item for s in choice_sources for item in load_items(s, params)]
    keep = set(params.metrics)

    def build_plan(tokenizer: Any, max_length: int) -> EvalPlan:
        parts: list[EvalPlan] = []
        if text_sources:
            stride = params.stride or max(1, max_length // 2)
            parts.append(plan_perplexity(tokenizer, text_sources, texts, max_length, stride,
                                         bits_per_byte="bpb" in keep))
        if items:
            parts.append(choice_plan(tokenizer, items, max_length))
        return _concat(parts, keep)

    return build_plan


def _concat(parts: list[EvalPlan], keep: set[str]) -> EvalPlan:
    """One plan scoring every part's spans; metrics limited to the requested kinds."""
    bounds = []
    spans = []
    for part in parts:
        bounds.append((len(spans), len(spans) + len(part.spans)))
        spans.extend(part.spans)

    def summarize(scores: list[SpanScore]) -> ModelScores:
        out = ModelScores({}, {})
        for part, (lo, hi) in zip(parts, bounds, strict=True):
            got = as_scores(part.summarize(scores[lo:hi]))
            for mine, theirs in ((out.metrics, got.metrics), (out.counts, got.counts),
                                 (out.stderr, got.stderr), (out.chance, got.chance)):
                mine.update({k: v for k, v in theirs.items() if k.split("/", 1)[0] in keep})
        return out

    return EvalPlan(spans, summarize)


def relative_metrics(raw: dict[str, dict[str, float]], raw_counts: dict[str, dict[str, int]],
                     reference: str, same_tokenizer: dict[str, bool] | None = None,
                     ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """``retention_<m>/<label>`` (ratio ref/model) for ppl and bpb, ``delta_<m>/<label>``
    (model - ref) for accuracies, for every model in ``raw``; counts carried over."""
    ref = raw[reference]
    metrics: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    for model, values in raw.items():
        out: dict[str, float] = {}
        cnt: dict[str, int] = {}
        for key, value in values.items():
            kind, _, label = key.partition("/")
            if key not in ref:
                continue
            if kind in RATIO_METRICS:
                if kind == "ppl" and same_tokenizer is not None and not same_tokenizer.get(model, True):
                    continue
                name = f"retention_{kind}/{label}"
                out[name] = ref[key] / value if value else float("nan")
            else:
                name = f"delta_{kind}/{label}"
                out[name] = value - ref[key]
            cnt[name] = raw_counts.get(model, {}).get(key, 0)
        metrics[model], counts[model] = out, cnt
    return metrics, counts


@hookimpl
def register_evaluators(register: Any) -> None:
    register(Retention())
