"""What a trainer (adapt-language, align) uses: the shared training loop, batching of
text and instruction data, LoRA adapters, and training only the embedding and head (or
only the rows a tokenizer change made)."""

from engine.core.params import NOT_IN_RESULT, TrainingParams
from engine.models.attention import resolve_attention
from engine.models.slow_paths import attention_path
from engine.training.batching import (
    instruction_batches,
    pack,
    packed_batches,
    require_format,
    training_batches,
)
from engine.training.levers import new_rows_of, train_only_embeddings
from engine.training.loop import TrainerParams, TrainResult, train, training_dtype
from engine.training.lora import LoraParams, apply_lora, peft_available, save_lora_result

__all__ = [
    "NOT_IN_RESULT", "LoraParams", "TrainResult", "TrainerParams", "TrainingParams", "apply_lora",
    "attention_path", "instruction_batches", "new_rows_of", "pack", "packed_batches", "peft_available",
    "require_format", "resolve_attention", "save_lora_result", "train", "train_only_embeddings",
    "training_batches", "training_dtype",
]
