"""Distributed coordination of a run under ``torchrun``/``accelerate launch``.

Every process runs the plan; only the main process (rank 0) writes stage outputs,
checkpoints and the report. Training stages run on every process, data-parallel; other
stages on the main process only. The main process tells the others, by broadcast
(:func:`share`), whether a stage was served from the cache and whether it succeeded
(``None``, or the failure's text); they then read its output from disk.

With ``runtime.fsdp`` a training stage shards its model instead of replicating it
(:func:`shard_model`, torch's FSDP2 ``fully_shard``: each decoder layer and the root,
parameters, gradients and optimizer state split across the processes; it runs on gloo
on the CPU as on NCCL); :func:`gather_model` puts the full trained model back together
on every process at the end, one tensor at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Ranks", "gather_model", "init_process_group", "shard_model", "share"]


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch (``RANK``, ``WORLD_SIZE``; 0 and 1 when alone)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Ranks:
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_process_group(device: str) -> None:
    """Join the launch's process group (gloo on the CPU) before the first stage."""
    from accelerate import PartialState

    from engine.modelio import resolve_device

    PartialState(cpu=resolve_device(device).type == "cpu")


def share(value: Any) -> Any:
    """Broadcast ``value`` from the main process; every process returns the main's value."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_model(model: torch.nn.Module, where: str, mixed_precision: str = "no") -> torch.nn.Module:
    """Shard ``model`` across the process group with FSDP2 (``fully_shard``) in place:
    each repeated block transformers names in ``_no_split_modules`` (the decoder layers),
    then the root. Returns a weightless twin (meta device) that :func:`gather_model` fills.
    ``mixed_precision`` ``bf16``/``fp16`` computes in that dtype and reduces gradients in
    float32 (FSDP's mixed-precision policy; the loop's autocast does not wrap a sharded model).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from engine.errors import TrainingError

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers or not hasattr(type(model), "_from_config"):
        raise TrainingError(f"{where}: runtime.fsdp: {type(model).__name__} names no decoder-layer class to shard "
                            "by (transformers' _no_split_modules; a LoRA-wrapped model has none); "
                            "set runtime.fsdp: false")
    quantised = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if quantised:
        raise TrainingError(f"{where}: runtime.fsdp: the model holds {', '.join(quantised)} (8-bit) weights, "
                            "which FSDP cannot shard; use runtime.fsdp or frozen_8bit/load_in_8bit, not both")
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        twin = type(model)._from_config(model.config, dtype=dtype)
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16,
                                   reduce_dtype=torch.float32)
              if mixed_precision in ("bf16", "fp16") else MixedPrecisionPolicy())
    for layer in layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return twin


def gather_model(model: torch.nn.Module, twin: torch.nn.Module) -> torch.nn.Module:
    """The full model of a sharded ``model``, as ``twin`` (its :func:`shard_model` twin) on
    the CPU: every process gathers each tensor in the same order (peak device memory one
    tensor), and gets the same whole model, ready to save."""
    from torch.distributed.tensor import DTensor

    state: dict[str, torch.Tensor] = {}
    trains: dict[str, bool] = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p
        state[name] = full.detach().to("cpu", copy=True)
        trains[name] = p.requires_grad
    twin.load_state_dict(state, strict=False, assign=True)
    for name, buf in model.named_buffers():  # FSDP does not shard buffers (rotary tables, ...)
        owner, _, key = name.rpartition(".")
        twin.get_submodule(owner)._buffers[key] = buf.detach().to("cpu")
    for name, p in twin.named_parameters():
        p.requires_grad_(trains.get(name, False))
    twin.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        twin.generation_config = model.generation_config
    return twin
