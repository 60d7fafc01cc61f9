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
  naming the base model folder (:data:`engine.modelio.ADAPTER_BASE_KEY`). Loading
  such a folder (:func:`engine.modelio.load_model`) applies the adapter to that base.

peft is an optional dependency (``lingoforge[lora]``); :class:`LoraParams` refuses
to validate without it, so ``engine validate`` reports the missing install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine import modelio
from engine.artifacts import ModelArtifact
from engine.errors import TrainingError

if TYPE_CHECKING:
    from engine.context import StageContext

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
        return self

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
    if lora.save == "merged":
        merged = model.merge_and_unload()
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
