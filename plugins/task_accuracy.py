"""``task-accuracy``: multiple-choice accuracy by log-likelihood and exact match of greedy
generations, per data source.

A stage reads ``choice`` sources, ``generation`` sources, or both (each model is
loaded once for all of them); sources of other formats are ignored.

**Multiple choice** (``{"prompt", "choices", "label"}``) is scored the way
lm-evaluation-harness scores multiple-choice tasks: the context is the prompt
(preceded by few-shot examples when asked), each choice is a continuation of it,
and ``LL_i = sum log p(choice_i tokens | context)``. Then::

    acc      = mean over items of [argmax_i LL_i == label]
    acc_norm = mean over items of [argmax_i LL_i / len(choice_i) == label]

``len`` counts the *characters* of the choice as written in the file (leading space
included), as the harness does: dividing by characters rather than tokens removes
the bias towards short answers without depending on the tokenizer, so ``acc_norm``
stays comparable between models with different vocabularies. Ties go to the first
choice. Choices are appended to the context as written (no delimiter is inserted),
so a file whose prompts end in ``"Answer:"`` writes its choices as ``" blue"``.
Every choice of every item is one span (context + choice). The choices of one item
share their context, so by default the context is run once and its KV cache reused for
every choice (``share_prefix``; see :mod:`engine.evaluation.scoring`).

**Generation** (``{"prompt", "answer"}`` or ``{"prompt", "answers": [...]}``): the model
continues the prompt greedily (:mod:`engine.evaluation.generation`) until EOS, ``max_new_tokens``
or the first ``stop`` string (searched after the output's leading whitespace; the text
is cut before it). The output and each accepted answer are normalised alike (surrounding
whitespace stripped; punctuation dropped with ``ignore_punctuation``; case-folded with
``ignore_case``) and ``exact_match`` is the share of items whose output equals one of
their answers. A prompt too long for the window keeps its end, leaving
``max_new_tokens`` positions for the answer.

Few-shot (``num_fewshot = k``), for both kinds: item ``i``'s context is ``k`` other
items of the same file, each written as its prompt followed by its answer (the correct
choice; the first accepted answer), then item ``i``'s prompt, joined by
``fewshot_separator``. The examples are drawn with ``random.Random(f"{fewshot_seed}:{i}")``
from the items other than ``i``: the same for every model and run, and an item never
sees its own answer.

Chat template (``chat_template``; ``null``, the default, applies it when the model's
tokenizer has one): each few-shot example becomes a user turn (its prompt) and an
assistant turn (its answer, stripped), the item's prompt the last user turn; the
conversation is rendered with ``add_generation_prompt=True`` and the choice (or the
generation) follows. The rendered text is tokenized as is (the template writes BOS
when the model wants one: none is added); ``fewshot_separator`` is then unused.

Whether the template was applied to each model is in report.json under the stage's
``notes.chat_template``. Metrics per model: ``acc/<label>`` and ``acc_norm/<label>`` per choice source,
``exact_match/<label>`` per generation source; counts: the number of items. The item
logic lives in :mod:`engine.evaluation.choices`, shared with ``retention``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from engine.api import MetricsArtifact, PluginParams, StageContext, StageInputs, hookimpl
from engine.api.evaluation import (  # noqa: F401  (re-exported: the plugin's public helpers)
    AnswerItem,
    AnswerMatch,
    ChoiceItem,
    EvalPlan,
    GenerationPlan,
    ItemPrediction,
    StopRule,
    choice_plan,
    choose,
    evaluate_models,
    fewshot_indices,
    generate_answers,
    generation_plan,
    load_answer_items,
    load_items,
    plan_choices,
    plan_generation,
    predict,
    render_prompt,
    select_sources,
    summarize_choices,
    summarize_exact_match,
    use_chat_template,
)

FORMATS = ("choice", "generation")


class TaskAccuracy:
    """Multiple-choice accuracy by log-likelihood; exact match of greedy generations."""

    name = "task-accuracy"
    data_formats = FORMATS

    class Params(PluginParams):
        batch_size: int = Field(8, ge=1, description="Sequences (item x choice) per forward pass; "
                                                      "prompts per generation batch.")
        num_fewshot: int = Field(0, ge=0, description="Solved examples from the same file put "
                                                      "before each item's prompt.")
        fewshot_seed: int = Field(0, description="Seed of the deterministic few-shot draw.")
        fewshot_separator: str = Field("\n\n", description="Text between few-shot examples "
                                                           "and before the item's prompt.")
        max_items: int | None = Field(None, ge=1, description="Score only the first N items "
                                                              "of each source.")
        max_length: int | None = Field(
            None, ge=2, description="Longest input in tokens; longer contexts lose their start. "
                                    "Default: the model's context.")
        share_prefix: bool = Field(
            True, description="Run an item's context once and reuse its KV cache for every "
                              "choice (same scores, fewer forwarded tokens).")
        chat_template: bool | None = Field(
            None, description="Render prompts (few-shot examples as earlier turns) with the "
                              "tokenizer's chat template; null: when it has one.")
        max_new_tokens: int = Field(32, ge=1, description="Generation: most tokens generated "
                                                          "per item.")
        stop: list[str] = Field(["\n"], description="Generation: the output ends before the "
                                                    "first of these strings (searched after "
                                                    "its leading whitespace).")
        ignore_case: bool = Field(False, description="Generation: compare case-folded.")
        ignore_punctuation: bool = Field(False, description="Generation: drop Unicode "
                                                            "punctuation before comparing.")

        @field_validator("stop")
        @classmethod
        def _no_empty_stop(cls, value: list[str]) -> list[str]:
            if any(s == "" for s in value):
                raise ValueError("an empty stop string would stop every generation at once")
            return value

    def produces(self, data: list[Any], params: Params) -> list[str]:
        """The metric names it reports per model for ``data`` (a merge search's check)."""
        kinds = {"choice": ("acc", "acc_norm"), "generation": ("exact_match",)}
        return [f"{k}/{d.label}" for d in data for k in kinds.get(d.format, ())]

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, FORMATS)
        match = AnswerMatch(params.ignore_case, params.ignore_punctuation)
        rule = StopRule(params.max_new_tokens, tuple(params.stop))
        choices = [item for s in sources if s.format == "choice" for item in load_items(s, params)]
        answers = [item for s in sources if s.format == "generation"
                   for item in load_answer_items(s, params, match)]

        def build_plan(tokenizer: Any, max_length: int) -> list[EvalPlan | GenerationPlan]:
            parts: list[EvalPlan | GenerationPlan] = []
            if choices:
                parts.append(choice_plan(tokenizer, choices, max_length,
                                         chat_template=params.chat_template))
            if answers:
                parts.append(generation_plan(tokenizer, answers, max_length, rule, match,
                                             chat_template=params.chat_template))
            return parts

        art = evaluate_models(context, inputs.models, build_plan, batch_size=params.batch_size,
                              max_length=params.max_length, share_prefix=params.share_prefix,
                              params=params, data=inputs.data)
        context.note("chat_template", {
            m.name: (params.chat_template if params.chat_template is not None
                     else use_chat_template(context.load_tokenizer(m), None))
            for m in inputs.models if m.name in art.metrics})
        return art


@hookimpl
def register_evaluators(register: Any) -> None:
    register(TaskAccuracy())
