"""Evaluation: plans of spans to score (or prompts to generate from) run over every model,
and the task items the built-in evaluators score.

* :mod:`engine.evaluation.spans` -- spans of token ids to score, documents in windows;
* :mod:`engine.evaluation.scoring` -- batched log-likelihoods with shared prefixes;
* :mod:`engine.evaluation.generation` -- batched greedy generation;
* :mod:`engine.evaluation.cache` -- scores kept per (model, data, plan);
* :mod:`engine.evaluation.driver` -- :func:`evaluate_models`: each model loaded once, one
  model's failure isolated;
* :mod:`engine.evaluation.prompts` -- few-shot prompts, plain or through the chat template;
* :mod:`engine.evaluation.choices` -- documents and multiple-choice items;
* :mod:`engine.evaluation.answers` -- generation items scored by exact match.

Plugins import these names from :mod:`engine.api.evaluation`.
"""

from engine.evaluation.answers import AnswerItem, AnswerMatch, generation_plan, load_answer_items
from engine.evaluation.choices import (
    ChoiceItem,
    ItemPrediction,
    choice_plan,
    load_items,
    plan_perplexity,
    read_documents,
)
from engine.evaluation.driver import (
    EvalPlan,
    GenerationPlan,
    ModelScores,
    SpanScore,
    StopRule,
    as_scores,
    binomial_stderr,
    context_length,
    evaluate_models,
    select_sources,
    tokenizer_fingerprint,
)
from engine.evaluation.prompts import FewShot, render_prompt, use_chat_template

__all__ = [
    "AnswerItem", "AnswerMatch", "ChoiceItem", "EvalPlan", "FewShot", "GenerationPlan",
    "ItemPrediction", "ModelScores", "SpanScore", "StopRule", "as_scores", "binomial_stderr",
    "choice_plan", "context_length", "evaluate_models", "generation_plan", "load_answer_items",
    "load_items", "plan_perplexity", "read_documents", "render_prompt", "select_sources",
    "tokenizer_fingerprint", "use_chat_template",
]
