"""What an evaluator uses: evaluation plans run over every model (loading each once,
batching, isolating failures), task items and their scoring."""

from engine.evaluation.answers import (
    AnswerItem,
    AnswerMatch,
    generate_answers,
    generation_plan,
    load_answer_items,
    plan_generation,
    summarize_exact_match,
)
from engine.evaluation.choices import (
    ChoiceItem,
    ItemPrediction,
    choice_plan,
    choose,
    load_items,
    plan_choices,
    plan_perplexity,
    predict,
    read_documents,
    summarize_choices,
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
from engine.evaluation.prompts import fewshot_indices, render_prompt, use_chat_template

__all__ = [
    "AnswerItem", "AnswerMatch", "ChoiceItem", "EvalPlan", "GenerationPlan", "ItemPrediction",
    "ModelScores", "SpanScore", "StopRule", "as_scores", "binomial_stderr", "choice_plan", "choose",
    "context_length", "evaluate_models",
    "fewshot_indices", "generate_answers", "generation_plan", "load_answer_items", "load_items",
    "plan_choices", "plan_generation", "plan_perplexity", "predict", "read_documents",
    "render_prompt", "select_sources", "summarize_choices", "summarize_exact_match",
    "tokenizer_fingerprint", "use_chat_template",
]
