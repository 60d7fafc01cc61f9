"""What a trainer (adapt-language, align) uses: the shared training loop, batching of
text and instruction data, and LoRA adapters."""

from engine.batching import (
    instruction_batches,
    pack,
    packed_batches,
    require_format,
    training_batches,
)
from engine.levers import resolve_attention
from engine.lora_training import LoraParams, apply_lora, peft_available, save_lora_result
from engine.params import NOT_IN_RESULT, TrainingParams
from engine.slow_paths import attention_path
from engine.training import TrainerParams, TrainResult, train, training_dtype

__all__ = [
    "NOT_IN_RESULT", "LoraParams", "TrainResult", "TrainerParams", "TrainingParams", "apply_lora",
    "attention_path", "instruction_batches", "pack", "packed_batches", "peft_available",
    "require_format", "resolve_attention", "save_lora_result", "train", "training_batches", "training_dtype",
]
