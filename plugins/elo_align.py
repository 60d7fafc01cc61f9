"""``elo-align``: ELO stage 2, layer alignment (arXiv 2601.03648).

The layers trained in a detached ELO sub-model are copied back into the full model
at their original indices (with ``elo``'s ``train_embeddings``, the input embedding and
the head too); the full model is then briefly fine-tuned so that the untouched middle
layers and the retrained ends agree again. With ``steps: 0`` or no data it only
reinserts.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl, models
from engine.api.errors import ModelLoadError, RecipeError, TrainingError
from engine.api.training import TrainerParams, train, training_batches, training_dtype

SUBMODEL_KIND = "elo-submodel"


def read_submodel_meta(folder: Path) -> dict:
    """The sub-model's lingoforge.json, checked: it must come from the ``elo`` trainer."""
    meta = models.read_meta(folder)
    if meta.get("kind") != SUBMODEL_KIND:
        found = f"kind {meta['kind']!r}" if "kind" in meta else f"no {models.META_FILE}"
        raise TrainingError(f"{folder}: not an ELO sub-model ({found}); elo-align expects "
                            "the output of an 'elo' stage as its 'model' input")
    for key in ("source_model", "layer_indices", "source_num_layers"):
        if key not in meta:
            raise TrainingError(f"{folder}/{models.META_FILE}: missing {key!r}")
    return meta


def reinsert(model: torch.nn.Module, submodel: Path, meta: dict) -> list[str]:
    """Copy the sub-model's trained tensors into ``model`` at their source layer indices.

    Trained tensors are those listed in meta ``trained_tensors``, else every layer
    tensor. Layer tensors are renamed to their source layer; tensors outside the
    layers (the embedding and head, when ``elo`` trained them) keep their names.
    Returns the full-model names written. Shapes must match.
    """
    from safetensors import safe_open

    n = models.model_num_layers(model)
    if n != meta["source_num_layers"]:
        raise TrainingError(f"the sub-model in {submodel} was cut from a {meta['source_num_layers']}-layer "
                            f"model; the base has {n} layers")
    indices = models.resolve_indices(meta["layer_indices"], n)
    mapping = dict(enumerate(indices))
    trained = set(meta.get("trained_tensors") or [])
    targets = dict(model.named_parameters())
    written: list[str] = []
    with torch.no_grad():
        for file in models.weight_files(submodel):
            with safe_open(str(file), framework="pt", device="cpu") as fh:
                for key in fh.keys():
                    was_trained = key in trained if trained else models.layer_of_key(key) is not None
                    if not was_trained:
                        continue
                    name = models.rename_layer_key(key, mapping)
                    if name not in targets:
                        raise TrainingError(f"{file}: tensor {key!r} has no counterpart {name!r} in the base model")
                    tensor = fh.get_tensor(key)
                    if tuple(tensor.shape) != tuple(targets[name].shape):
                        raise TrainingError(f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                                            f"base {name!r} has {tuple(targets[name].shape)}")
                    targets[name].copy_(tensor)
                    written.append(name)
    if not written:
        raise TrainingError(f"{submodel}: no trained tensors found to reinsert")
    return written


class ELOAlign:
    """ELO stage 2: put trained layers back into the full model, then fine-tune briefly."""

    name = "elo-align"

    class Params(TrainerParams):
        steps: int = Field(20, ge=0, description="Full fine-tuning steps after reinsertion; 0 only reinserts.")
        lr: float = Field(1e-4, gt=0, description="Peak learning rate of the brief full fine-tune.")

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: elo-align needs the ELO sub-model as 'model'")
        sub = inputs.model.path.resolve()
        meta = read_submodel_meta(sub)
        base = inputs.base.path.resolve() if inputs.base is not None else Path(meta["source_model"])
        if not base.is_dir():
            raise ModelLoadError(f"base model {base} (from {sub}/{models.META_FILE} 'source_model') "
                                 "does not exist; give it as the 'base' input")
        models.check_supported(models.read_config(base))

        tokenizer = context.load_tokenizer(sub)
        model = context.load_model(base, load_in_8bit=False, dtype=training_dtype(context))
        written = reinsert(model, sub, meta)
        context.note("reinserted_tensors", len(written))
        context.note("reinserted_layers", meta["layer_indices"])

        if params.steps > 0 and not inputs.data:
            context.log("no data given: layers reinserted without the alignment fine-tune")
        if params.steps > 0 and inputs.data:
            model.requires_grad_(True)
            batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                       batch_size=params.micro_batch_size, seed=params.seed, packing=params.packing,
                                       eval_fraction=params.eval_fraction)
            model = train(context, model, batches, params, description=f"{context.stage_name}: alignment").model
        else:
            context.set_param_counts(trainable=0, forward=sum(p.numel() for p in model.parameters()))
        out_meta = {"kind": "elo-aligned", "source_model": str(base), "submodel": str(sub),
                    "layer_indices": meta["layer_indices"], "alignment_steps": params.steps if inputs.data else 0}
        return context.save_model(model, tokenizer, meta=out_meta)


@hookimpl
def register_aligners(register):
    register(ELOAlign())
