"""The parameters of the shared training loop (:func:`engine.training.train`), which
every trainer's ``Params`` extends; re-exported by :mod:`engine.training`."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from engine.core.params import NOT_IN_RESULT, TrainingParams

#: ``checkpoint_every: auto`` saves every quarter of the stage, within these bounds (steps)
AUTO_CHECKPOINT_MIN, AUTO_CHECKPOINT_MAX = 10, 500


class TrainerParams(TrainingParams):
    """Parameters of the shared loop; every trainer's ``Params`` extends this."""

    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warmup from ~0 to `lr`.")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warmup, down to 0 at the last step (or flat).")
    grad_accum: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; `batch_size` must be divisible by it. "
        "Raises it to save memory without changing the effective batch.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 disables clipping.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="Autocast precision via accelerate; `auto` is bf16 on a GPU that supports it, "
        "else off. fp16 needs CUDA.")
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit"] = Field(
        "adamw", description="`adamw-8bit` keeps optimizer state in 8 bits (bitsandbytes), about 4x smaller; "
        "`paged-adamw-8bit` also pages it to host memory when the GPU runs short (CUDA only; on the CPU "
        "it is adamw-8bit, said in report.json).")
    gradient_checkpointing: bool = Field(
        False, json_schema_extra=NOT_IN_RESULT, description="Recompute each decoder layer's activations in the backward pass instead of "
        "holding them (non-reentrant activation checkpointing): activation memory drops to about one "
        "layer's, for roughly one more forward pass of compute per step. Same loss and gradients.")
    packing: Literal["auto", "documents", "stream", "padded"] = Field(
        "auto", description="`documents`: rows packed with position ids restarting at each document, no "
        "attention across documents; `stream` (text): documents attend to earlier ones in a block; `padded` "
        "(instructions): one example per row; `auto`: documents where a probe finds the model supports it.")
    log_every: int = Field(
        10, ge=1, json_schema_extra=NOT_IN_RESULT,
        description="Read losses back from the device every this many steps (writes "
        "train_log.jsonl lines and checks for NaN/inf).")
    checkpoint_every: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", json_schema_extra=NOT_IN_RESULT,
        description="Save a resumable checkpoint every this many steps (0: never). `auto`: about every "
        "quarter of the stage (steps / 4, rounded up), at least every 10 and at most every 500 steps, so "
        "an 80-step stage checkpoints at steps 20, 40 and 60. A killed stage resumes from its last "
        "checkpoint when the recipe runs again; checkpoints are deleted when the stage succeeds.")
    keep_checkpoints: int = Field(1, ge=1, json_schema_extra=NOT_IN_RESULT,
                                  description="How many of the newest checkpoints to keep.")
    eval_fraction: float = Field(
        0.0, ge=0, lt=0.5, description="Hold out this fraction of each data source's documents (text) or "
        "examples (instructions), chosen by `seed` before packing, and never train on them; their mean token "
        "loss is logged as `eval_loss` every `eval_every` steps and at the last step. 0: off.")
    eval_every: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Steps between held-out evaluations (and always the last step). `auto`: the "
        "checkpoint cadence (`checkpoint_every`), or its `auto` value when checkpoints are off.")
    eval_batches: int = Field(
        0, ge=0, description="Evaluate at most this many held-out micro-batches (the same ones each time); "
        "0: the whole held-out set.")
    keep_best: bool = Field(
        False, description="Save the weights of the evaluated step with the lowest `eval_loss` instead of the "
        "last step's (needs `eval_fraction` > 0). The notes in report.json say which step was saved.")

    @model_validator(mode="after")
    def _batch_divisible(self) -> TrainerParams:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.keep_best and self.eval_fraction <= 0:
            raise ValueError("keep_best needs eval_fraction > 0: the best step is chosen by the loss on held-out "
                             "data (set e.g. eval_fraction: 0.05, or remove keep_best)")
        return self

    @property
    def micro_batch_size(self) -> int:
        """Sequences per forward pass."""
        return self.batch_size // self.grad_accum


    @property
    def checkpoint_interval(self) -> int:
        """Steps between checkpoints (0: none): ``checkpoint_every`` with ``auto`` resolved."""
        if self.checkpoint_every == "auto":
            return min(AUTO_CHECKPOINT_MAX, max(AUTO_CHECKPOINT_MIN, math.ceil(self.steps / 4)))
        return int(self.checkpoint_every)

    @property
    def eval_interval(self) -> int:
        """Steps between held-out evaluations: ``eval_every`` with ``auto`` resolved."""
        if self.eval_every != "auto":
            return int(self.eval_every)
        return self.checkpoint_interval or min(AUTO_CHECKPOINT_MAX, max(AUTO_CHECKPOINT_MIN, math.ceil(self.steps / 4)))
