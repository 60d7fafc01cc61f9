"""Training: the one loop every trainer plugin shares, and what feeds it.

* :mod:`engine.training.params` -- :class:`TrainerParams`, every trainer's params;
* :mod:`engine.training.examples` -- examples as token ids, shared by the two below;
* :mod:`engine.training.packing` -- documents packed into rows without attention across them;
* :mod:`engine.training.heldout` -- held-out data, its loss, and the best checkpoint;
* :mod:`engine.training.batching` -- data sources into endless, deterministic batches;
* :mod:`engine.training.levers` -- memory levers: checkpointing, bf16, 8-bit optimizers;
* :mod:`engine.training.tracking` -- experiment trackers;
* :mod:`engine.training.checkpoint` -- checkpoints and exact resume;
* :mod:`engine.training.loop` -- :func:`train`, the accelerate loop;
* :mod:`engine.training.lora` -- LoRA adapters through the optional peft extra.

Plugins import these names from :mod:`engine.api.training`.
"""

from engine.training.batching import (
    instruction_batches,
    pack,
    packed_batches,
    require_format,
    training_batches,
)
from engine.training.examples import IGNORE_INDEX, Batch, collate
from engine.training.loop import TrainResult, TrainState, train, training_dtype
from engine.training.lora import LoraParams, apply_lora, peft_available, save_lora_result
from engine.training.params import TrainerParams

__all__ = ["IGNORE_INDEX", "Batch", "LoraParams", "TrainResult", "TrainState", "TrainerParams",
           "apply_lora", "collate", "instruction_batches", "pack", "packed_batches",
           "peft_available", "require_format", "save_lora_result", "train", "training_batches",
           "training_dtype"]
