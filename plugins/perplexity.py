"""``perplexity``: token-weighted perplexity of each model on each text data source.

For a source with documents ``d_1..d_n`` (lines of a ``.txt``, records of a
``.jsonl``), each document is tokenized on its own and starts with BOS when the
tokenizer has one; every token after the first is predicted from the tokens of its
own document before it (never from another document, so results do not depend on
batching or document order)::

    ppl = exp( sum_docs sum_{t>=1} -log p(x_t | x_<t) / number of predicted tokens )

Long documents are scored with a sliding window (see :mod:`engine.evaluation.spans`). The plan
itself lives in :mod:`engine.evaluation.choices` (``plan_perplexity``), shared with ``retention``.

Metrics per model: ``ppl/<label>``, counted in predicted tokens; ``<label>`` is the
source's language, or its file stem. Perplexities of models with *different
tokenizers* are not comparable (the same text is a different number of tokens), so
``bits_per_byte: true`` adds ``bpb/<label> = total NLL / (ln 2 * UTF-8 bytes)``,
counted in bytes, which is.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from engine.api import MetricsArtifact, PluginParams, StageContext, StageInputs, hookimpl
from engine.api.evaluation import (
    EvalPlan,
    context_length,
    evaluate_models,
    plan_perplexity,
    read_documents,
    select_sources,
)

__all__ = ["Perplexity", "plan_perplexity"]


class Perplexity:
    """Token-weighted perplexity (and bits per byte) per language."""

    name = "perplexity"
    data_formats = ("text",)

    class Params(PluginParams):
        batch_size: int = Field(8, ge=1, description="Sequences (windows) per forward pass.")
        batch_tokens: int | None = Field(
            2048, ge=1,
            description="Padded positions a forward pass may fill with short windows: a "
                        "batch holds batch_size windows, or more short ones while they fit "
                        "in batch_tokens positions. Results do not depend on it. None: "
                        "always batch_size windows.")
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

    def produces(self, data: list[Any], params: Params) -> list[str]:
        """The metric names it reports per model for ``data`` (a merge search's check)."""
        kinds = ("ppl", "bpb") if params.bits_per_byte else ("ppl",)
        return [f"{k}/{d.label}" for d in data if d.format == "text" for k in kinds]

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, "text")
        texts = read_documents(sources, params.max_documents, context.stage_name)

        def build_plan(tokenizer: Any, max_length: int) -> EvalPlan:
            stride = params.stride or max(1, max_length // 2)
            return plan_perplexity(tokenizer, sources, texts, max_length, stride,
                                   bits_per_byte=params.bits_per_byte,
                                   max_tokens=params.batch_tokens)

        return evaluate_models(context, inputs.models, build_plan,
                               batch_size=params.batch_size, max_length=params.max_length,
                               params=params, data=inputs.data)


@hookimpl
def register_evaluators(register: Any) -> None:
    register(Perplexity())
