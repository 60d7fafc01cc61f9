"""Holding a frozen base model in 4 or 8 bits (bitsandbytes), for QLoRA.

:class:`Quantization` says how a model is loaded (``bits`` 4 or 8; for 4 bits the
``quant_type`` nf4/fp4 and double quantisation); :func:`bnb_config` builds the
transformers :class:`~transformers.BitsAndBytesConfig` for it, with the compute dtype
the stage trains in. Linear layers of the decoder are replaced by bitsandbytes
``Linear4bit``/``Linear8bitLt``; embeddings (not linear layers), norms and the output
head (``lm_head``, in ``llm_int8_skip_modules``) stay in the training dtype.

A 4-bit weight (``Params4bit``) is stored packed, two values per byte, so
``numel()`` undercounts it; :func:`parameter_count` and :func:`held_bytes` count it by
its ``quant_state``.

bitsandbytes is an optional dependency (``lingoforge[8bit]``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Literal

import torch

from engine.core.errors import RecipeError

__all__ = ["BNB_INSTALL_HINT", "Quantization", "bitsandbytes_available", "bnb_config", "check_fsdp",
           "fsdp_conflict", "held_bytes", "parameter_count", "quantized_modules"]

BNB_INSTALL_HINT = "install lingoforge[8bit] (pip install 'lingoforge[8bit]', i.e. bitsandbytes>=0.45)"
#: modules never quantised: the output head (trained heads and logits stay in full precision)
SKIP_MODULES: tuple[str, ...] = ("lm_head",)


def bitsandbytes_available() -> bool:
    """Whether bitsandbytes can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):  # a None entry in sys.modules (tests) or a broken install
        return False


@dataclass(frozen=True)
class Quantization:
    """How a frozen base is held: ``bits`` 4 (``quant_type``, ``double_quant``) or 8 (LLM.int8).

    ``field`` names the recipe setting that asked for it, for error messages.
    """

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    field: str = "lora.quantize"

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (bitsandbytes LLM.int8)"
        dq = ", double quantisation" if self.double_quant else ""
        return f"4-bit {self.quant_type.upper()} (bitsandbytes{dq})"


def fsdp_conflict(quant: Quantization) -> str:
    """Why a base held as ``quant`` cannot train under ``runtime.fsdp``: what the run refuses
    with (:meth:`engine.context.StageContext.load_model`), after ``stage 'NAME': ``."""
    return (f"{quant.field} holds the base in {quant.bits} bits, which runtime.fsdp cannot shard; "
            f"set runtime.fsdp: false or {quant.field}: none")


def check_fsdp(params: Any, runtime: Any) -> None:
    """``engine validate``'s check: a stage whose params hold the base quantised (``lora:
    {quantize: 4bit}``: a param with a ``base_quantization``) under ``runtime.fsdp`` is
    refused before anything runs, with the message the run would stop with."""
    if not getattr(runtime, "fsdp", False):
        return
    for name in type(params).model_fields:
        quant = getattr(params.__dict__.get(name), "base_quantization", None)
        if isinstance(quant, Quantization):
            raise RecipeError(fsdp_conflict(quant))


def bnb_config(quant: Quantization, compute_dtype: torch.dtype,
               skip_modules: tuple[str, ...] | list[str] = SKIP_MODULES) -> Any:
    """The :class:`transformers.BitsAndBytesConfig` that loads a model as ``quant`` says.

    4-bit matmuls dequantise to ``compute_dtype`` (the stage's training dtype), so the
    LoRA branch and the frozen path compute in the same precision.
    """
    from transformers import BitsAndBytesConfig

    skip = sorted({*SKIP_MODULES, *skip_modules})
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant.quant_type, bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=quant.double_quant, llm_int8_skip_modules=skip,
    )


def _logical_numel(p: torch.Tensor) -> int:
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    if shape is not None and type(p).__name__ == "Params4bit":
        return int(torch.Size(shape).numel())
    return p.numel()


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model`` as values of the weights they stand for (a packed 4-bit
    weight counts its unpacked shape)."""
    return sum(_logical_numel(p) for p in model.parameters())


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as held, with the 4-bit weights' scales
    (``absmax``, also the nested ones of double quantisation)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        while state is not None and type(p).__name__ == "Params4bit":
            absmax = getattr(state, "absmax", None)
            if isinstance(absmax, torch.Tensor):
                total += absmax.numel() * absmax.element_size()
            state = getattr(state, "state2", None)
    return total


def quantized_modules(model: torch.nn.Module) -> list[str]:
    """Names of the bitsandbytes-quantised linear layers (``Linear4bit``/``Linear8bitLt``;
    under LoRA the ``base_layer`` that peft's wrapper holds)."""
    if not bitsandbytes_available():
        return []
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]
