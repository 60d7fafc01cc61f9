"""``elo``: ELO stage 1, training detached layers (arXiv 2601.03648).

The first and last decoder layers are detached into a standalone sub-model
``embed -> layer[0] -> layer[-1] -> norm -> lm_head``: the middle layers are absent,
not frozen, so each step costs a fraction of a full model's. As in the paper, the
embeddings, norm and head stay frozen by default and only the detached layers learn
the target language (text mixed with some source-language text by data ``weight``,
the paper's 9:1). With ``train_embeddings`` the input embedding and the output head
train too, at little extra cost per step; on the built-in world that is what lets
ELO match full CT (docs/benchmarks.md, "Time to quality"). The sub-model is saved as
an ordinary, smaller model folder whose lingoforge.json says where its layers came
from and which tensors trained, so that ``elo-align`` can put them back.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError, TrainingError
from engine.api.training import (
    TrainerParams,
    attention_path,
    require_format,
    resolve_attention,
    train,
    training_batches,
    training_dtype,
)

SUBMODEL_KIND = "elo-submodel"


def default_layers(n_layers: int) -> list[int]:
    """The paper's choice: the first and the last decoder layer."""
    return sorted({0, n_layers - 1})


def prepare_submodel(source: Path, layers: Sequence[int], *, train_embeddings: bool = False,
                     dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                     attention: str | None = None) -> tuple[torch.nn.Module, list[int], list[str]]:
    """Detach source ``layers`` into a sub-model and set what trains.

    ``attention`` is the ``attn_implementation`` it runs (None: transformers' choice,
    SDPA where the class has it); see ``resolve_attention``.

    The detached layers always train; with ``train_embeddings`` the input embedding
    and the output head do too (one tensor when they are tied). Everything else is
    frozen. Returns the sub-model, the resolved source indices and the names of the
    trained tensors (sub-model names, as saved), which ``elo-align`` reinserts.
    """
    model, indices = models.load_submodel(source, layers, dtype=dtype, device=device)
    if attention is not None and attention != model.config._attn_implementation:
        try:
            model.set_attn_implementation(attention)
        except (ValueError, ImportError) as exc:
            raise TrainingError(f"{source}: runtime.attention {attention!r}: {exc}") from None
    models.train_only_layers(model, range(len(indices)))
    if train_embeddings:
        models.embeddings(model).requires_grad_(True)
        models.lm_head(model).requires_grad_(True)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    return model, indices, trained


class ELO:
    """ELO stage 1: train detached first/last layers as a small standalone model."""

    name = "elo"

    class Params(TrainerParams):
        layers: list[int] | None = Field(
            None, description="Decoder layers to detach and train (negative counts from the end). "
            "Default: a select-layers stage's output if given as 'layers', else the first and last.")
        train_embeddings: bool = Field(
            False, description="Also train the input embedding and the output head (lm_head; one tensor "
            "when tied) in the sub-model; elo-align puts them back with the layers. Off by default, as in the "
            "paper, where only the detached layers train. Little extra cost per step, but vocab x hidden more "
            "trainable parameters per tensor, with their optimizer state. On the built-in world ELO matches "
            "full CT's target-language perplexity only with it (docs/benchmarks.md).")

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check: a supported architecture, and explicit layers that exist."""
        for cfg in configs.get("model", []):
            try:
                models.check_supported(cfg)
                if params.layers is not None:
                    models.resolve_indices(params.layers, models.num_layers(cfg))
            except TrainingError as exc:
                raise ValueError(f"elo: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: elo needs a 'model' input")
        require_format(inputs.data, "text", "elo")
        source = inputs.model.path.resolve()
        config = models.read_config(source)
        models.check_supported(config)
        n = models.num_layers(config)
        chosen = models.choose_layers(params.layers, inputs.layers, n) or default_layers(n)

        tokenizer = context.load_tokenizer(source)
        dtype = training_dtype(context)
        model, indices, trained = prepare_submodel(
            source, chosen, train_embeddings=params.train_embeddings, dtype=dtype, device=context.device,
            attention=resolve_attention(context.runtime.attention, context.device, dtype))
        context.note("attention", {inputs.model.name: model.config._attn_implementation})
        context.slow_path("attention", inputs.model.name, attention_path(model))
        context.note("elo_layers", indices)
        if params.train_embeddings:
            context.note("elo_trained_embeddings", [t for t in trained if models.layer_of_key(t) is None])

        batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                   batch_size=params.micro_batch_size, seed=params.seed, packing=params.packing,
                                   eval_fraction=params.eval_fraction)
        what = f"ELO layers {indices}" + (" + embeddings/head" if params.train_embeddings else "")
        result = train(context, model, batches, params, description=f"{context.stage_name}: {what}")
        meta = {
            "kind": SUBMODEL_KIND,
            "source_model": str(source),
            "layer_indices": indices,
            "source_num_layers": n,
            "trained_tensors": trained,
            "train_embeddings": params.train_embeddings,
        }
        return context.save_model(result.model, tokenizer, meta=meta)


@hookimpl
def register_language_adapters(register):
    register(ELO())
