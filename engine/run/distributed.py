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
on every process at the end, one tensor at a time. Its resumable checkpoints are the
unsharded format every run writes (:mod:`engine.training.checkpoint`): :func:`full_train_state`
gathers the trainable tensors and optimizer state whole onto the main process, and
:func:`load_full_train_state` hands each process its shards of them on resume.
:func:`no_sync` skips the gradient reduce-scatter of the micro-batches before a step's last.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from engine.core.errors import TrainingError
from engine.models.modelio import resolve_device

__all__ = ["Ranks", "full_train_state", "gather_model", "init_process_group", "load_full_train_state",
           "no_sync", "shard_model", "share"]


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


def _reshard(model: torch.nn.Module) -> None:
    """Put every FSDP module's sharded parameters back in place: a forward without a
    backward (the packing probe, a held-out evaluation) leaves the root's whole ones
    registered, and a checkpoint would read them, or load into them, instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate the gradients of a :func:`shard_model` model locally, without the
    reduce-scatter (FSDP2's ``set_requires_gradient_sync``; FSDP1's and DDP's ``no_sync``):
    the backward passes inside keep whole (unsharded) gradients, which the next synced
    backward reduces once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors and optimizer state of a :func:`shard_model` model, whole,
    on the main process's CPU, as an unsharded run has them: ``(name -> tensor,
    optimizer.state_dict())``, so a checkpoint holding them is the one any run writes.
    Each tensor is gathered in turn (``DTensor.full_tensor``, as :func:`gather_model`
    does), so every process must call it, in step; the others get two empty dicts."""
    import torch.distributed as dist

    _reshard(model)
    main = dist.get_rank() == 0

    def whole(t: torch.Tensor) -> torch.Tensor:
        full = _full(t)  # a collective: every process gathers (one tensor at a time on the device)
        return full.detach().to("cpu", copy=True) if main else t  # only the main one keeps a copy

    weights = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    state = optimizer.state_dict()  # tensors are the live ones (DTensor shards); gathered below
    state["state"] = {i: {k: whole(v) if torch.is_tensor(v) else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return (weights, state) if main else ({}, {})


def load_full_train_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Load :func:`full_train_state`'s whole tensors (or an unsharded run's checkpoint of
    the same parameters) into a :func:`shard_model` model and its optimizer: every
    process reads the same whole tensors and keeps its shards of them (no communication)."""
    _reshard(model)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(_shard_like(t, params[name]))
    by_position = [p for g in optimizer.param_groups for p in g["params"]]
    state = {int(i): {k: _shard_like(v, by_position[int(i)]) if torch.is_tensor(v) else v for k, v in s.items()}
             for i, s in optim_state["state"].items()}
    optimizer.load_state_dict({**optim_state, "state": state})


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _shard_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Whole tensor ``t`` sharded as sharded parameter ``param`` is (its optimizer moments
    too); scalars (AdamW's step) and unsharded parameters' tensors unchanged."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor) or t.shape != param.shape:
        return t
    return distribute_tensor(t.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
