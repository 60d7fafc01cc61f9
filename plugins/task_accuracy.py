"""``task-accuracy``: multiple-choice accuracy by log-likelihood, per choice data source.

Each item (``{"prompt", "choices", "label"}``) is scored the way
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

Few-shot (``num_fewshot = k``): item ``i``'s context is ``k`` other items of the same
file, each written as its prompt followed by its correct choice, then item ``i``'s
prompt, joined by ``fewshot_separator``. The examples are drawn with
``random.Random(f"{fewshot_seed}:{i}")`` from the items other than ``i``: the same
for every model and run, and an item never sees its own answer.

Every choice of every item is one span (context + choice). The choices of one item
share their context, so by default the context is run once and its KV cache reused for
every choice (``share_prefix``; see :mod:`engine.scoring`). Metrics per model:
``acc/<label>`` and ``acc_norm/<label>``; counts: the number of items. The item logic
lives in :mod:`engine.tasks`, shared with ``retention``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.api import MetricsArtifact, PluginParams, StageContext, StageInputs, hookimpl
from engine.evaluation import EvalPlan, evaluate_models, select_sources
from engine.tasks import (  # noqa: F401  (re-exported: the plugin's public helpers)
    ChoiceItem,
    ItemPrediction,
    choice_plan,
    choose,
    fewshot_indices,
    load_items,
    plan_choices,
    predict,
    summarize_choices,
)


class TaskAccuracy:
    """Multiple-choice accuracy (acc, acc_norm) by log-likelihood of each choice."""

    name = "task-accuracy"

    class Params(PluginParams):
        batch_size: int = Field(8, ge=1, description="Sequences (item x choice) per forward pass.")
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

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> MetricsArtifact:
        sources = select_sources(context, inputs.data, "choice")
        items = [item for source in sources for item in load_items(source, params)]

        def build_plan(tokenizer: Any, max_length: int) -> EvalPlan:
            return choice_plan(tokenizer, items, max_length)

        return evaluate_models(context, inputs.models, build_plan, batch_size=params.batch_size,
                               max_length=params.max_length, share_prefix=params.share_prefix)


@hookimpl
def register_evaluators(register: Any) -> None:
    register(TaskAccuracy())
