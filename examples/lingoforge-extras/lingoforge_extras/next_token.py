"""``next-token-accuracy``: how often a model's greedy next-token guess is the text's token.

Each document of each ``text`` source is tokenized on its own (BOS first when the
tokenizer has one) and cut to ``max_length`` tokens; every token after the first is
predicted from the tokens before it. ``acc1/<label>`` is the share of predicted tokens
whose argmax is the actual token, counted in predicted tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from engine.api import MetricsArtifact, PluginParams, StageContext, StageInputs
from engine.api.evaluation import read_documents, select_sources


class NextTokenAccuracy:
    """Greedy next-token accuracy of each model on each text source."""

    name = "next-token-accuracy"
    data_formats = ("text",)

    class Params(PluginParams):
        max_length: int = Field(128, ge=2, description="Tokens per document scored (its start).")
        max_documents: int | None = Field(None, ge=1, description="Score only the first N "
                                                                  "documents of each source.")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, "text")
        texts = read_documents(sources, params.max_documents, context.stage_name)
        metrics: dict[str, dict[str, float]] = {}
        counts: dict[str, dict[str, int]] = {}
        errors: dict[str, str] = {}
        for art in inputs.models:
            try:
                model = context.load_model(art)
                tokenizer = context.load_tokenizer(art)
            except Exception as exc:  # one broken model must not lose the others' scores
                errors[art.name] = f"{type(exc).__name__}: {exc}"
                continue
            model.eval()
            metrics[art.name], counts[art.name] = {}, {}
            for label, docs in texts.items():
                right, total = self._score(model, tokenizer, docs, params.max_length, context)
                if total:
                    metrics[art.name][f"acc1/{label}"] = right / total
                    counts[art.name][f"acc1/{label}"] = total
        return MetricsArtifact(context.stage_name, metrics, counts, errors)

    @staticmethod
    def _score(model: Any, tokenizer: Any, docs: list[str], max_length: int,
               context: StageContext) -> tuple[int, int]:
        right = total = 0
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        with torch.no_grad():
            for doc in docs:
                ids = (bos + tokenizer(doc, add_special_tokens=False)["input_ids"])[:max_length]
                if len(ids) < 2:
                    continue
                x = torch.tensor([ids], device=context.device)
                guess = model(input_ids=x).logits[0, :-1].argmax(dim=-1)
                right += int((guess == x[0, 1:]).sum())
                total += len(ids) - 1
                context.add_tokens(len(ids))
        return right, total
