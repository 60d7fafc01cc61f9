"""``ct``: continual pretraining of a model on raw text.

The plain way to teach a model a language: next-token prediction on target-language
text, optionally restricted to some decoder layers (from a select-layers stage or the
``layers`` param) while the rest of the model stays frozen and bit-identical.

Two ways to make it cheaper:

* ``lora``: train low-rank adapters (peft) instead of the weights; with a layer
  selection, only those layers get adapters (peft ``layers_to_transform``). Saved
  merged (an ordinary model folder) or as a PEFT adapter folder.
* ``frozen_8bit`` (needs a layer selection): the frozen layers are held in 8 bits
  (bitsandbytes LLM.int8) while the chosen layers train in full precision. The output
  is written from the input folder with only the trained layers replaced, so the
  frozen weights are the input's, bit for bit, never a dequantised copy.
* ``train_only``: only the input embedding and the output head learn (``embeddings``), or
  only the rows a tokenizer change made (``new-rows``, read from the model's
  lingoforge.json); every other weight stays the input's, bit for bit. What a model with
  a new tokenizer needs first (docs/extend-tokenizer.md).
"""

from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from engine.api import ModelArtifact, StageContext, StageInputs, hookimpl, models
from engine.api.errors import RecipeError, TrainingError
from engine.api.training import (
    LoraParams,
    TrainerParams,
    apply_lora,
    new_rows_of,
    require_format,
    save_lora_result,
    train,
    train_only_embeddings,
    training_batches,
    training_dtype,
)

_MB = 2 ** 20


def _bitsandbytes_available() -> bool:
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        return False


def _memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers as held (8-bit weights count one byte each)."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


class CT:
    """Continual pretraining of a model on raw text."""

    name = "ct"
    data_formats = ("text",)

    class Params(TrainerParams):
        layers: list[int] | None = Field(
            None, description="Train only these decoder layers (negative counts from the end); "
            "the rest stay frozen. Alternatively give a select-layers stage as the 'layers' input.")
        lora: LoraParams | None = Field(
            None, description="Train LoRA adapters (peft) instead of the weights: "
            "{r: 16, alpha: 32, dropout: 0.0, target_modules: [q_proj, ..., down_proj] or 'all-linear', "
            "use_rslora: false, save: merged|adapter, quantize: none|4bit|8bit (QLoRA: the frozen base "
            "held in 4 or 8 bits, needs lingoforge[8bit]), quant_type: nf4|fp4, double_quant: true}. "
            "With a layer selection only those layers get adapters. Needs lingoforge[lora].")
        frozen_8bit: bool = Field(
            False, description="With a layer selection: hold the frozen layers in 8 bits (bitsandbytes "
            "LLM.int8) while the chosen layers train in full precision; the output's frozen tensors are "
            "copied from the input unchanged. Needs lingoforge[8bit]; not with lora.")
        train_only: Literal["embeddings", "new-rows"] | None = Field(
            None, description="Train only the input embedding and the output head (`embeddings`), or only "
            "their rows of the tokens a tokenizer change added (`new-rows`: the rows engine extend-tokenizer "
            "or transplant-tokenizer made, from the model's lingoforge.json); every other weight stays the "
            "input's. Not with layers, lora or frozen_8bit.")

        @model_validator(mode="after")
        def _frozen_8bit_usable(self) -> CT.Params:
            if self.frozen_8bit and self.lora is not None:
                raise ValueError("frozen_8bit and lora cannot be combined: frozen_8bit trains chosen layers "
                                 "in full precision; with lora the base is frozen already")
            if self.train_only is not None and (self.layers is not None or self.lora is not None
                                                or self.frozen_8bit):
                raise ValueError("train_only trains the embedding and head alone; it cannot be combined "
                                 "with layers, lora or frozen_8bit")
            if self.frozen_8bit and not _bitsandbytes_available():
                raise ValueError("frozen_8bit needs bitsandbytes, which is not installed: "
                                 "install lingoforge[8bit]")
            return self

    def check(self, configs: dict[str, list[dict[str, Any]]], params: Params) -> None:
        """Static check before anything runs: the explicit layers exist in the model."""
        if params.layers is None:
            return
        for cfg in configs.get("model", []):
            try:
                models.check_supported(cfg)
                models.resolve_indices(params.layers, models.num_layers(cfg))
            except TrainingError as exc:
                raise ValueError(f"ct params.layers: {exc}") from None

    def run(self, context: StageContext, inputs: StageInputs, params: Params) -> ModelArtifact:
        if inputs.model is None:
            raise RecipeError(f"stage {context.stage_name!r}: ct needs a 'model' input")
        require_format(inputs.data, "text", "ct")
        source = inputs.model.path.resolve()
        config = models.read_config(source)
        chosen = models.choose_layers(params.layers, inputs.layers, models.num_layers(config))
        if chosen is not None:
            models.check_supported(config)
        if params.frozen_8bit:
            if chosen is None:
                raise TrainingError(f"stage {context.stage_name!r}: frozen_8bit needs a layer selection "
                                    "(params.layers or a select-layers stage as 'layers'); without one "
                                    "every layer trains and nothing is frozen")
            if models.is_adapter_folder(source):
                raise TrainingError(f"stage {context.stage_name!r}: frozen_8bit copies the frozen weights "
                                    f"from the input folder, but {source} is a LoRA adapter folder; "
                                    "give a model folder with full weights")

        tokenizer = context.load_tokenizer(source)
        batches = training_batches(tokenizer, inputs.data, seq_len=params.seq_len,
                                   batch_size=params.micro_batch_size, seed=params.seed, packing=params.packing,
                                   eval_fraction=params.eval_fraction)
        meta: dict[str, Any] = {"kind": "ct", "source_model": str(source)}
        if chosen is not None:
            meta["trained_layers"] = chosen
            context.note("trained_layers", chosen)

        if params.frozen_8bit:
            assert chosen is not None
            return self._run_frozen_8bit(context, source, tokenizer, batches, params, chosen, meta)

        if chosen is not None and params.train_only is not None:
            raise TrainingError(f"stage {context.stage_name!r}: train_only trains the embedding and head "
                                "alone; it cannot be combined with a layer selection")
        rows = (new_rows_of(models.read_meta(source), f"stage {context.stage_name!r}: {source}")
                if params.train_only == "new-rows" else None)
        model = context.load_model(source, load_in_8bit=False, dtype=training_dtype(context),
                                   quantize=params.lora.base_quantization if params.lora else None)
        learning = None
        if params.lora is not None:
            model = apply_lora(model, params.lora, layers=chosen, seed=params.seed)
        elif chosen is not None:
            models.train_only_layers(model, chosen)
        elif params.train_only is not None:
            learning = train_only_embeddings(model, rows)
            meta["train_only"] = params.train_only
            context.note("train_only", {"what": params.train_only, "learning_params": learning,
                                        **({"rows": len(rows)} if rows is not None else {})})
        result = train(context, model, batches, params)
        if learning is not None:  # the loop counted whole tensors; only these rows learned
            context.set_param_counts(trainable=learning,
                                     forward=sum(p.numel() for p in result.model.parameters()))
        if params.lora is not None:
            return save_lora_result(context, result.model, tokenizer, params.lora, base=source, meta=meta)
        return context.save_model(result.model, tokenizer, meta=meta)

    def _run_frozen_8bit(self, context: StageContext, source: Any, tokenizer: Any, batches: Any,
                         params: Params, chosen: list[int], meta: dict[str, Any]) -> ModelArtifact:
        dtype = training_dtype(context)
        model = context.load_model(source, load_in_8bit=True, dtype=dtype,
                                   int8_skip_modules=models.layer_module_names(chosen))
        quantised = models.check_int8_split(model, chosen)
        models.train_only_layers(model, chosen)
        held = _memory_bytes(model)
        full = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size() + sum(
            b.numel() * b.element_size() for b in model.buffers())
        memory = {"model_mb": round(held / _MB, 3), "full_precision_model_mb": round(full / _MB, 3),
                  "int8_modules": quantised}
        context.note("frozen_8bit", memory)
        context.log(f"frozen layers in 8 bits: model {memory['model_mb']} MB "
                    f"(full precision {memory['full_precision_model_mb']} MB)")
        with warnings.catch_warnings():
            # bitsandbytes warns on every int8 matmul that float32 inputs are cast to float16
            warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")
            result = train(context, model, batches, params)
        trained = {name: p for name, p in result.model.named_parameters() if models.layer_of_key(name) in chosen}
        meta = {**meta, "frozen_8bit": True}
        models.save_updated_copy(source, context.output_dir, trained, tokenizer=tokenizer, meta=meta)
        return ModelArtifact(name=context.stage_name, path=context.output_dir, meta=meta)


@hookimpl
def register_language_adapters(register):
    register(CT())
