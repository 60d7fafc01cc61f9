"""LoRA for the ``ct`` and ``sft`` trainers, through peft.

A trainer with ``lora:`` set wraps its loaded model with :func:`peft.get_peft_model`
before handing it to the shared loop (:func:`engine.training.train`): the base weights
are frozen by peft, so the loop trains, clips, checkpoints and counts only the adapter
matrices and needs no LoRA-specific code. Checkpoints hold the adapter tensors under
the wrapped model's parameter names; a resumed run wraps the freshly loaded input the
same way and gets them back, bitwise.

The result is written one of two ways (``save``):

* ``merged`` (default): :meth:`merge_and_unload` folds ``W + scaling * B @ A`` into
  the base weights and an ordinary model folder is saved, so every later stage
  (merges, evaluation, further training) treats it like any trained model;
* ``adapter``: the stage folder is a standard PEFT adapter folder, exactly as
  ``PeftModel.save_pretrained`` writes it (``adapter_config.json``,
  ``adapter_model.safetensors``), plus the tokenizer files and ``lingoforge.json``
  naming the base model folder (:data:`engine.models.modelio.ADAPTER_BASE_KEY`). Loading
  such a folder (:func:`engine.models.modelio.load_model`) applies the adapter to that base.

**QLoRA** (``quantize: 4bit``, or ``8bit``): the frozen base is loaded with its decoder
linear layers in 4-bit NF4/FP4 (bitsandbytes ``Linear4bit``, dequantised to the training
dtype for each matmul; :mod:`engine.models.quantization`) and the adapters train on top in the
training dtype. ``prepare_model_for_kbit_training`` is not called: it would turn on
reentrant gradient checkpointing regardless of ``params.gradient_checkpointing`` (the
loop does non-reentrant checkpointing when asked), and the float32 upcast it does to
non-quantised parameters is what loading in the training dtype (float32 unless
``runtime.dtype`` says otherwise) already gives. A ``merged`` result is never folded
into the quantised weights: the base is re-read in full precision (the training dtype,
on the CPU), the trained adapter tensors are loaded into the same LoRA layout on it and
merged, so the output is ``W + scaling * B @ A`` with ``W`` the input's weights. An
``adapter`` result records the full-precision input folder as its base, and the
quantisation in ``lingoforge.json`` (``quantized_base``).

peft is an optional dependency (``lingoforge[lora]``); :class:`LoraParams` refuses
to validate without it, so ``engine validate`` reports the missing install; with
``quantize`` it also needs bitsandbytes (``lingoforge[8bit]``).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.core.artifacts import ModelArtifact
from engine.core.errors import TrainingError
from engine.models import modelio, quantization
from engine.models.quantization import Quantization
from engine.training.loop import training_dtype

if TYPE_CHECKING:
    from engine.run.context import StageContext

#: attention and MLP projections of Llama-family decoder layers (llama, mistral, qwen, gemma)
LLAMA_PROJECTIONS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
#: lingoforge.json ``kind`` of a LoRA adapter output folder
ADAPTER_KIND = "lora-adapter"
INSTALL_HINT = "install lingoforge[lora] (pip install 'lingoforge[lora]', i.e. peft>=0.18)"


def peft_available() -> bool:
    """Whether peft can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("peft") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules (tests) or a broken install
        return False


class LoraParams(BaseModel):
    """The ``lora:`` block of the ``ct`` and ``sft`` params."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, description="Rank of the update matrices A (r x in) and B (out x r).")
    alpha: float = Field(32, gt=0, description="Scaling numerator: the update is (alpha / r) * B @ A "
                         "(alpha / sqrt(r) with use_rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        list(LLAMA_PROJECTIONS), description="Module names (suffixes) that get an adapter: by default "
        "the attention and MLP projections of Llama-family models; 'all-linear' for every linear layer "
        "but the output head.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    save: Literal["merged", "adapter"] = Field(
        "merged", description="'merged': fold the update into the weights and save an ordinary model "
        "folder; 'adapter': save a standard PEFT adapter folder (adapter_config.json + "
        "adapter_model.safetensors) that records its base model.")

    quantize: Literal["none", "4bit", "8bit"] = Field(
        "none", description="Hold the frozen base in 4 bits (QLoRA: bitsandbytes NF4/FP4, computing in the "
        "training dtype) or 8 bits (LLM.int8) while the adapters train; a merged result is merged into "
        "the full-precision input weights. Needs lingoforge[8bit]; not with runtime.fsdp.")
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="With quantize 4bit: the 4-bit data type (nf4: NormalFloat4, fp4: 4-bit float).")
    double_quant: bool = Field(
        True, description="With quantize 4bit: quantise the per-block scales too (about 0.4 bits per "
        "weight saved).")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
            raise ValueError("target_modules must name at least one module (or be 'all-linear')")
        return value

    @model_validator(mode="after")
    def _peft_installed(self) -> LoraParams:
        if not peft_available():
            raise ValueError(f"lora needs peft, which is not installed: {INSTALL_HINT}")
        if self.quantize != "none" and not quantization.bitsandbytes_available():
            raise ValueError(f"lora.quantize: {self.quantize} needs bitsandbytes, which is not installed: "
                             f"{quantization.BNB_INSTALL_HINT}")
        # a non-default 4-bit setting without 4 bits (defaults pass: params round-trip whole)
        set_4bit = sorted(f for f in {"quant_type", "double_quant"} & self.model_fields_set
                          if getattr(self, f) != type(self).model_fields[f].default)
        if set_4bit and self.quantize != "4bit":
            raise ValueError(f"lora.{' and lora.'.join(set_4bit)} only apply with lora.quantize: 4bit "
                             f"(it is {self.quantize!r})")
        return self

    @property
    def base_quantization(self) -> Quantization | None:
        """How the frozen base is held (None: in the training dtype, as loaded)."""
        if self.quantize == "none":
            return None
        return Quantization(bits=4 if self.quantize == "4bit" else 8, quant_type=self.quant_type,
                            double_quant=self.double_quant)

    @property
    def scaling(self) -> float:
        """The factor peft multiplies ``B @ A`` by."""
        return self.alpha / (self.r ** 0.5 if self.use_rslora else self.r)

    def summary(self) -> dict[str, Any]:
        """The settings for lingoforge.json and the report."""
        return self.model_dump(mode="json")


def lora_config(lora: LoraParams, layers: list[int] | None = None) -> Any:
    """The :class:`peft.LoraConfig` for ``lora``; ``layers`` restricts it to those decoder layers."""
    from peft import LoraConfig

    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(
        r=lora.r, lora_alpha=alpha, lora_dropout=lora.dropout, target_modules=targets,
        use_rslora=lora.use_rslora, bias="none", task_type="CAUSAL_LM",
        layers_to_transform=list(layers) if layers is not None else None,
        layers_pattern="layers" if layers is not None else None,
    )


def apply_lora(model: torch.nn.Module, lora: LoraParams, *, layers: list[int] | None = None,
               seed: int = 0) -> torch.nn.Module:
    """Wrap ``model`` with LoRA adapters; only the adapter matrices require grad.

    A is initialised from a generator seeded with ``seed`` (B starts at zero, so the
    wrapped model computes exactly what ``model`` did); the global RNG is left as it was.
    """
    from peft import get_peft_model

    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        torch.manual_seed(seed)
        try:
            wrapped = get_peft_model(model, lora_config(lora, layers))
        except ValueError as exc:
            raise TrainingError(f"lora: {exc} (check lora.target_modules: {lora.target_modules!r})") from None
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError(f"lora: no module matched target_modules {lora.target_modules!r}")
    return wrapped


def save_lora_result(context: StageContext, model: torch.nn.Module, tokenizer: Any, lora: LoraParams,
                     *, base: Path, meta: dict[str, Any]) -> ModelArtifact:
    """Write a trained LoRA model as ``lora.save`` says; return the stage's artifact.

    ``base`` is the folder the adapter was trained on (recorded for ``adapter``).
    """
    meta = {**meta, "lora": lora.summary()}
    quant = lora.base_quantization
    if quant is not None:
        meta["quantized_base"] = _record_quantized(context, model, quant)
    if lora.save == "merged":
        merged = model.merge_and_unload() if quant is None else _merge_full_precision(context, model, base)
        return context.save_model(merged, tokenizer, meta=meta)
    base = Path(base).resolve()
    out = Path(context.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for cfg in model.peft_config.values():  # the loader and other tools find the base from here too
        cfg.base_model_name_or_path = str(base)
    model.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    meta = {**meta, "kind": ADAPTER_KIND, "trained_by": meta.get("kind"), modelio.ADAPTER_BASE_KEY: str(base)}
    modelio.write_meta(out, meta)
    modelio.check_adapter_folder(out)
    return ModelArtifact(name=context.stage_name, path=out, meta=meta)


def _record_quantized(context: StageContext, model: torch.nn.Module, quant: Quantization) -> dict[str, Any]:
    """Note how the base was held (report ``notes.quantized_base``, lingoforge.json) and
    count the 4-bit weights by their unpacked size in ``forward_params``."""
    modules = quantization.quantized_modules(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    forward = quantization.parameter_count(model)
    full = forward * torch.empty((), dtype=dtype).element_size() + sum(
        b.numel() * b.element_size() for b in model.buffers())
    record = {"bits": quant.bits, "quant_type": quant.quant_type if quant.bits == 4 else None,
              "double_quant": quant.double_quant if quant.bits == 4 else None,
              "compute_dtype": str(dtype).removeprefix("torch."), "quantized_modules": len(modules),
              "model_mb": round(quantization.held_bytes(model) / 2 ** 20, 3),
              "full_precision_model_mb": round(full / 2 ** 20, 3)}
    if context.stats.trainable_params is not None:
        context.set_param_counts(trainable=context.stats.trainable_params, forward=forward)
    context.note("quantized_base", record)
    return {k: record[k] for k in ("bits", "quant_type", "double_quant", "compute_dtype")}


def _merge_full_precision(context: StageContext, model: torch.nn.Module, base: Path) -> torch.nn.Module:
    """The trained adapter of ``model`` (whose base is quantised) merged into ``base``
    re-read in full precision: ``W + scaling * B @ A`` with the input's ``W``, never a
    dequantised copy. The base is read on the CPU in the training dtype."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    adapter = {k: v.detach().to("cpu") for k, v in get_peft_model_state_dict(model).items()}
    config = copy.deepcopy(model.peft_config["default"])
    config.init_lora_weights = False  # every adapter tensor is overwritten below
    full = modelio.load_model(base, dtype=training_dtype(context), device="cpu",
                              trust_remote_code=context.runtime.trust_remote_code)
    wrapped = get_peft_model(full, config)
    result = set_peft_model_state_dict(wrapped, adapter)
    loaded = {k for k in get_peft_model_state_dict(wrapped)}
    if result.unexpected_keys or loaded != set(adapter):
        raise TrainingError(f"stage {context.stage_name!r}: the trained adapter does not fit the full-precision "
                            f"base {base} (unexpected {sorted(result.unexpected_keys)[:4]}, missing "
                            f"{sorted(loaded - set(adapter))[:4]})")
    return wrapped.merge_and_unload()
