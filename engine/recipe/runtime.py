"""The recipe's ``runtime:`` section: where and how models run.

Set once for a recipe; a stage's ``runtime`` overrides single keys
(:func:`engine.recipe.validate.effective_runtime`). Kept apart from :mod:`engine.recipe` because
it is the part that grows with each device-level lever (attention kernels, FSDP,
trackers, memory checks).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _threads_setting(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ValueError(f"threads must be 'auto' or an integer from 1 to 4096, got {value!r}")
    return value


class RuntimeSpec(_Strict):
    """Where models run. Set once for the recipe; a stage's ``runtime`` overrides it."""

    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' is bfloat16 on a GPU that supports it, else float32.")
    load_in_8bit: bool = Field(False, description="Load models that are only read in 8 bit (bitsandbytes).")
    trust_remote_code: bool = Field(False, description="Run model code shipped inside model folders.")
    threads: int | Literal["auto"] | None = Field(
        "auto", description="CPU threads torch uses: an integer (one above the cores this process may "
        "use is capped at them, with a warning), or 'auto' (torch's default capped at "
        "the cores this process may use, divided among the engine runs alive on this machine); "
        "null leaves torch's own setting as it is. Recorded per stage in report.json.")
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel models load with: 'auto' is flash_attention_2 on a CUDA "
        "device when the flash-attn package is installed and the dtype is 16-bit, else sdpa (eager only "
        "where a model has no sdpa path, said in report.json).")
    log_with: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list, description="Experiment trackers (through accelerate) that training "
        "losses, learning rate and throughput go to, alongside train_log.jsonl; their files are "
        "written under <workdir>/trackers/. Each needs its package installed.")
    memory_gb: float | None = Field(
        None, gt=0, description="Memory of the device a run will use, in GiB (GPU memory for CUDA); "
        "default: what this machine has. `engine validate` warns when a stage's estimated peak "
        "exceeds it, so a recipe for an 80 GB GPU can be checked on a laptop.")
    fsdp: bool = Field(
        False, description="Under several processes (torchrun/accelerate launch), shard a trained model's "
        "parameters, gradients and optimizer state across them (torch FSDP2, each decoder layer and the "
        "root) instead of giving every process a whole copy, for models that do not fit one device; "
        "the result matches one process. Resumable checkpoints work as without it; not with lora. "
        "Ignored by one process.")

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, v: Any) -> Any:
        return _threads_setting(v)
