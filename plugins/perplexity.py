"""``perplexity``: token-weighted perplexity of each model on each text data source.

For a source with documents ``d_1..d_n`` (lines of a ``.txt``, records of a
``.jsonl``), each document is tokenized on its own and starts with BOS when the
tokenizer has one; every token after the first is predicted from the tokens of its
own document before it (never from another document, so results do not depend on
batching or document order)::

    ppl = exp( sum_docs sum_{t>=1} -log p(x_t | x_<t) / number of predicted tokens )

Long documents are scored with a sliding window (see :mod:`engine.evaluation`).

Metrics per model: ``ppl/<label>``, counted in predicted tokens; ``<label>`` is the
source's language, or its file stem. Perplexities of models with *different
tokenizers* are not comparable (the same text is a different number of tokens), so
``bits_per_byte: true`` adds ``bpb/<label> = total NLL / (ln 2 * UTF-8 bytes)``,
counted in bytes, which is.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

from pydantic import Field, model_validator

from engine.api import (
    DataSource,
    MetricsArtifact,
    PluginParams,
    StageContext,
    StageInputs,
    hookimpl,
)
from engine.data import iter_texts
from engine.errors import DataError
from engine.evaluation import (
    EvalPlan,
    Span,
    SpanScore,
    TokenTotals,
    context_length,
    document_spans,
    encode_document,
    evaluate_models,
    select_sources,
)


class Perplexity:
    """Token-weighted perplexity (and bits per byte) per language."""

    name = "perplexity"

    class Params(PluginParams):
        batch_size: int = Field(8, ge=1, description="Sequences (windows) per forward pass.")
        max_length: int | None = Field(
            None, ge=2,
            description="Window length in tokens; default: the model's context "
                        "(config max_position_embeddings).")
        stride: int | None = Field(
            None, ge=1,
            description="Tokens between window starts for documents longer than max_length "
                        "(must be below max_length); "
                        "each prediction then has at least max_length - stride tokens of "
                        "context. Default: max_length // 2.")
        max_documents: int | None = Field(
            None, ge=1, description="Score only the first N documents of each source.")
        bits_per_byte: bool = Field(
            False, description="Also report bpb/<label>, comparable across tokenizers.")

        @model_validator(mode="after")
        def _stride_fits(self) -> Perplexity.Params:
            if self.stride is not None and self.max_length is not None and self.stride >= self.max_length:
                raise ValueError(f"stride ({self.stride}) must be below max_length ({self.max_length})")
            return self

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check for ``engine validate``: the stride fits every model's window."""
        if params.stride is None:
            return
        for config in configs.get("models", []):
            window = params.max_length or context_length(config)
            if params.stride >= window:
                raise ValueError(f"stride {params.stride} must be below the window of "
                                 f"{window} tokens (max_length or the model's context)")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, "text")
        texts = {s.label: list(islice(iter_texts(s), params.max_documents)) for s in sources}
        empty = [str(s.path) for s in sources if not texts[s.label]]
        if empty:
            raise DataError(f"evaluate stage {context.stage_name!r}: no documents in {', '.join(empty)}")

        def build_plan(tokenizer: Any, max_length: int) -> EvalPlan:
            stride = params.stride or max(1, max_length // 2)
            return plan_perplexity(tokenizer, sources, texts, max_length, stride,
                                   bits_per_byte=params.bits_per_byte)

        return evaluate_models(context, inputs.models, build_plan,
                               batch_size=params.batch_size, max_length=params.max_length)


def plan_perplexity(tokenizer: Any, sources: list[DataSource], texts: dict[str, list[str]],
                    max_length: int, stride: int, *, bits_per_byte: bool = False) -> EvalPlan:
    """Spans for every document of every source, and the per-source aggregation.

    A stride that does not fit the window raises :class:`ValueError`, which the
    driver reports against the model whose window it is.
    """
    spans: list[Span] = []
    owner: list[str] = []
    nbytes: dict[str, int] = {}
    for source in sources:
        label = source.label
        nbytes[label] = 0
        for text in texts[label]:
            doc_spans = document_spans(encode_document(tokenizer, text), max_length, stride)
            if doc_spans:  # a one-token document predicts nothing and adds no bytes
                nbytes[label] += len(text.encode("utf-8"))
            spans.extend(doc_spans)
            owner.extend([label] * len(doc_spans))
        if not nbytes[label]:
            raise DataError(f"{source.path}: no document is two tokens or longer, "
                            "so there is nothing to predict")

    def summarize(scores: list[SpanScore]) -> tuple[dict[str, float], dict[str, int]]:
        totals = {s.label: TokenTotals(nbytes=nbytes[s.label]) for s in sources}
        for label, score in zip(owner, scores, strict=True):
            totals[label].add(score)
        metrics: dict[str, float] = {}
        counts: dict[str, int] = {}
        for label, t in totals.items():
            metrics[f"ppl/{label}"], counts[f"ppl/{label}"] = t.perplexity, t.tokens
            if bits_per_byte:
                metrics[f"bpb/{label}"], counts[f"bpb/{label}"] = t.bits_per_byte, t.nbytes
        return metrics, counts

    return EvalPlan(spans, summarize)


@hookimpl
def register_evaluators(register: Any) -> None:
    register(Perplexity())
