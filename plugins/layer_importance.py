"""``layer-importance``: pick the decoder layers that change target-language text the most.

A data-driven alternative to ELO's fixed first/last choice. Every layer ``i`` is scored
on a few blocks of the stage's (target-language) text by how much it transforms its
input, averaged over tokens:

    score(i) = mean_t [ 1 - cos(h_i[t], h_{i+1}[t]) ]

where ``h_i`` is the residual stream entering layer ``i`` (``h_0`` the embeddings). A
layer whose output is almost its input contributes little to how the model reads this
language; the layers that rewrite the residual stream the most are the ones worth
adapting (the "angular distance" criterion of layer-pruning work, used the other way
round). The top ``k`` are selected; the report carries every score and the reason.
Optionally ``always_include`` pins layers (e.g. ``[0, -1]``) and fills the rest by score.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from pydantic import Field

from engine.api import LayerSelection, PluginParams, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError, TrainingError
from engine.api.training import packed_batches, require_format


def _layer_outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The residual stream entering layer 0, then leaving each decoder layer.

    Read with forward hooks rather than ``output_hidden_states``, whose last entry has
    the final norm applied (a per-channel scale that would distort the last layer's score).
    """
    outputs: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        outputs.append(out[0] if isinstance(out, tuple) else out)

    handles = [layer.register_forward_hook(grab) for layer in models.decoder_layers(model)]
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    output_hidden_states=True, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [out.hidden_states[0], *outputs]


def layer_scores(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> dict[int, float]:
    """``1 - cos(input, output)`` per decoder layer, averaged over every scored token."""
    n = models.model_num_layers(model)
    totals = torch.zeros(n, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in batches:
            hidden = _layer_outputs(model, batch)
            mask = batch["attention_mask"].bool()
            for i in range(n):
                cos = torch.nn.functional.cosine_similarity(hidden[i].float(), hidden[i + 1].float(), dim=-1)
                totals[i] += (1 - cos)[mask].double().sum()
            count += int(mask.sum())
    if count == 0:
        raise TrainingError("layer-importance scored no tokens")
    return {i: float(totals[i] / count) for i in range(n)}


def top_layers(scores: dict[int, float], k: int, pinned: list[int]) -> list[int]:
    """``pinned`` plus the highest-scoring other layers, ``k`` in all, sorted."""
    rest = sorted((i for i in scores if i not in pinned), key=lambda i: (-scores[i], i))
    return sorted([*pinned, *rest[: max(0, k - len(pinned))]])


class LayerImportance:
    """Select the k layers that transform target-language text the most (1 - cosine)."""

    name = "layer-importance"
    data_formats = ("text",)

    class Params(PluginParams):
        k: int = Field(2, ge=1, description="How many layers to select.")
        always_include: list[int] = Field(
            default_factory=list, description="Layers selected regardless of score (negative counts from "
            "the end), e.g. [0] to keep ELO's first layer; the rest are filled by score.")
        seq_len: int = Field(128, ge=8, description="Tokens per scored block.")
        batches: int = Field(4, ge=1, description="Blocks of `batch_size` sequences to score on.")
        batch_size: int = Field(4, ge=1, description="Sequences per forward pass.")
        seed: int = Field(0, description="Which blocks of the data are read.")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check: k and the pinned layers fit the model."""
        for cfg in configs.get("model", []):
            try:
                models.check_supported(cfg)
                n = models.num_layers(cfg)
                if params.k > n:
                    raise models.LayerIndexError(f"k={params.k} asks for more layers than the model's {n}")
                pinned = models.resolve_indices(params.always_include, n) if params.always_include else []
                if len(pinned) > params.k:
                    raise models.LayerIndexError(f"always_include has {len(pinned)} layers, more than k={params.k}")
            except TrainingError as exc:
                raise ValueError(f"layer-importance: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> LayerSelection:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: layer-importance needs a 'model' input")
        require_format(inputs.data, "text", "layer-importance")
        model = context.load_model(inputs.model)
        model.eval()
        n = models.model_num_layers(model)
        self.check({"model": [model.config.to_dict()]}, params)
        pinned = models.resolve_indices(params.always_include, n) if params.always_include else []
        tokenizer = context.load_tokenizer(inputs.model)
        stream = packed_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                batch_size=params.batch_size, seed=params.seed)
        batches = [{k: v.to(context.device) for k, v in b.items()} for b in itertools.islice(stream, params.batches)]
        scores = layer_scores(model, batches)
        context.add_tokens(sum(int(b["attention_mask"].sum()) for b in batches))
        indices = top_layers(scores, params.k, pinned)
        ranked = ", ".join(f"{i}: {scores[i]:.3f}" for i in sorted(scores, key=lambda i: -scores[i]))
        langs = ", ".join(s.label for s in inputs.data)
        explanation = (f"layers {indices} of {n} transform {langs} text the most: mean 1 - cos(input, output) "
                       f"of each layer's hidden states over {sum(b['input_ids'].numel() for b in batches)} "
                       f"tokens, ranked {ranked}"
                       + (f"; {pinned} pinned by always_include" if pinned else ""))
        context.note("layers", indices)
        context.note("layer_scores", {str(i): round(v, 6) for i, v in scores.items()})
        return LayerSelection(name=context.stage_name, indices=indices, num_layers=n,
                              explanation=explanation, scores=scores)


@hookimpl
def register_layer_selectors(register):
    register(LayerImportance())
