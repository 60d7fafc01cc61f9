"""The one training loop every trainer plugin shares (ct, sft, elo, elo-align).

It is built on :class:`accelerate.Accelerator`, so the same code runs on the CPU, one
GPU or several processes, and mixed precision (bf16/fp16 autocast, fp16 loss scaling)
comes from accelerate rather than from hand-written casts. A plugin prepares the
model (which parameters require grad) and an iterator of micro-batches
(:mod:`engine.training.batching`); :func:`train` does the rest: AdamW (or 8-bit AdamW),
warmup + decay schedule, gradient accumulation, clipping, seeding, logging to
``train_log.jsonl``, progress, and the report counters.

The loop avoids per-step host syncs: losses stay on the device and are read every
``log_every`` steps, when a line per step is written and non-finite losses are
checked (the error names the first bad step). Everything it needs to continue lives
in :class:`TrainState`, which a checkpointing layer can save and hand back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import TrainingError
from engine.models.slow_paths import auto_precision_path, loss_scaling_path
from engine.run import distributed
from engine.training import levers, tracking
from engine.training.checkpoint import Checkpoint, CheckpointDir, restore_rng
from engine.training.examples import IGNORE_INDEX, Batch
from engine.training.heldout import Evaluator
from engine.training.levers import make_optimizer, resolve_mixed_precision
from engine.training.packing import fit_packing, model_inputs
from engine.training.params import TrainerParams

if TYPE_CHECKING:
    from engine.run.context import StageContext

LOG_FILE = "train_log.jsonl"
#: ``<workdir>/logs/<stage>/train_log.jsonl``: the live log of a running stage
LOGS_DIR = "logs"
#: fault injection for tests of resume: the process SIGKILLs itself after this step
KILL_ENV = "LINGOFORGE_KILL_AT_STEP"


@dataclass
class TrainState:
    """Progress of a run: what a checkpoint needs besides model and optimizer tensors."""

    step: int = 0
    tokens: int = 0
    last_loss: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


@dataclass
class TrainResult:
    """What :func:`train` returns: the unwrapped model, the final state, per-step losses."""

    model: torch.nn.Module
    state: TrainState
    losses: list[float]
    seconds: float


# --- pieces ----------------------------------------------------------------------------------


def training_dtype(context: StageContext) -> torch.dtype:
    """dtype to load trained weights in: float32 master weights unless the recipe set
    ``runtime.dtype`` explicitly (low-precision optimizer updates lose small steps)."""
    return torch.float32 if context.runtime.dtype == "auto" else context.dtype


def lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier for 0-based ``step``: linear warmup, then decay."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _accelerator(mixed_precision: str, device: torch.device) -> Any:
    """An Accelerator for this stage.

    accelerate keeps one process-wide state and refuses a second Accelerator with a
    different precision; stages of one recipe may differ, so the precision part of
    that state is reset (the process group, if any, is kept).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")


def _count(batch: Batch) -> tuple[int, int]:
    """(tokens in the batch, tokens whose next-token prediction is in the loss)."""
    mask = batch.get("attention_mask")  # none in document-packed batches: every position is a token
    tokens = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return tokens, targets


def _shard(batch: Batch, rank: int, world: int) -> Batch:
    """Rows ``rank::world`` slice of a micro-batch: every process sees the same global
    batch (so a run on N processes matches one process) and trains on its share."""
    if world == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    if rows % world:
        raise TrainingError(f"a micro-batch of {rows} rows (batch_size / grad_accum) cannot be split "
                            f"over {world} processes; make it a multiple of {world}")
    per = rows // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def _restore(checkpoint: Checkpoint, named: list[tuple[str, torch.nn.Parameter]],
             optimizer: torch.optim.Optimizer, hp: TrainerParams,
             sharded: torch.nn.Module | None = None) -> None:
    """Load a checkpoint's trainable tensors and optimizer state (before ``prepare``);
    ``sharded``: the :func:`~engine.run.distributed.shard_model` model ``named`` belongs to,
    whose processes each keep their shards of the whole tensors."""
    names = {n for n, _ in named}
    if set(checkpoint.trainable) != names:
        diff = sorted(set(checkpoint.trainable) ^ names)[:6]
        raise TrainingError(f"checkpoint {checkpoint.path} does not match the parameters being trained "
                            f"(differ: {diff}); delete it to start over")
    with torch.no_grad():
        for name, p in named:
            t = checkpoint.trainable[name]
            if t.shape != p.shape:
                raise TrainingError(f"checkpoint {checkpoint.path}: tensor {name!r} has shape "
                                    f"{tuple(t.shape)}, the model's is {tuple(p.shape)}")
            if sharded is None:
                p.copy_(t)
    if sharded is not None:
        distributed.load_full_train_state(sharded, optimizer, checkpoint.trainable, checkpoint.optimizer)
    else:
        optimizer.load_state_dict(checkpoint.optimizer)
    for group in optimizer.param_groups:  # the schedule is rebuilt from the step
        group["lr"] = hp.lr
        group.pop("initial_lr", None)


def live_log_path(context: StageContext) -> Path:
    """Where a running stage's train_log.jsonl is written as it trains:
    ``<workdir>/logs/<stage>/train_log.jsonl`` for a stage the runner runs (it has a
    checkpoint folder); the stage output folder otherwise. The finished stage's output
    gets a copy either way."""
    if getattr(context, "checkpoint_dir", None) is None:
        return Path(context.output_dir) / LOG_FILE
    return Path(context.workdir) / LOGS_DIR / context.stage_name / LOG_FILE


def _kill_step() -> int | None:
    value = os.environ.get(KILL_ENV)
    return int(value) if value else None


# --- the loop --------------------------------------------------------------------------------


def train(context: StageContext, model: torch.nn.Module, batches: Iterator[Batch], params: TrainerParams,
          *, state: TrainState | None = None, description: str | None = None,
          eval_batches: Iterable[Batch] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad for ``params.steps`` steps.

    ``batches`` yields micro-batches of ``params.micro_batch_size`` rows (CPU tensors
    ``input_ids``, ``attention_mask``, ``labels``); each optimizer step takes
    ``params.grad_accum`` of them. The loss of a step is the mean over all its target
    tokens (``num_items_in_batch``), so accumulation matches one large batch exactly.
    Under several processes (``torchrun``/``accelerate launch``) every process reads
    the same micro-batches and trains on its slice of rows; gradients are averaged,
    so the result matches one process with the same ``batch_size``; only the main
    process writes the log and checkpoints.

    With ``context.checkpoint_dir`` set and ``params.checkpoint_interval`` > 0, a
    checkpoint is saved every that many steps and a run finding one resumes from it
    (weights, optimizer, schedule, data position, RNG): the result is the same as an
    uninterrupted run's. ``state`` continues a run from ``state.step``.
    With ``params.eval_fraction`` (batches from ``training_batches(..., eval_fraction=)``)
    or explicit ``eval_batches`` (a finite held-out set), the held-out loss is logged as
    ``eval_loss`` every ``params.eval_every`` steps and at the last (:mod:`engine.training.heldout`).
    Raises :class:`TrainingError` on a non-finite loss; checkpoints saved before it
    (all verified finite) are kept.
    """
    from accelerate.utils import set_seed

    state = state or TrainState()
    set_seed(params.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named]
    if not trainable:
        raise TrainingError("no parameter requires grad: nothing to train")
    context.set_param_counts(trainable=sum(p.numel() for p in trainable),
                             forward=sum(p.numel() for p in model.parameters()))

    device = context.device
    if params.mixed_precision == "auto":
        context.slow_path("mixed_precision", "auto", auto_precision_path(device))
    accelerator = _accelerator(resolve_mixed_precision(params.mixed_precision, device), device)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    twin = None  # runtime.fsdp: the model is sharded, and gathered whole into its twin at the end
    if getattr(context.runtime, "fsdp", False) and world > 1:
        twin = distributed.shard_model(model, f"stage {context.stage_name!r}", accelerator.mixed_precision)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        trainable = [p for _, p in named]
        context.note("fsdp_processes", world)
    if params.grad_accum > 1 or world > 1:  # one micro-batch on one process: the same either way
        context.slow_path("num_items_in_batch", type(model).__name__, loss_scaling_path(model, device))
    if params.optimizer == "paged-adamw-8bit":
        context.slow_path("optimizer", params.optimizer, levers.paged_optimizer_path(device))
    if params.gradient_checkpointing:
        levers.enable_checkpointing(model, f"stage {context.stage_name!r}")
    optimizer = make_optimizer(trainable, params)
    context.slow_path("optimizer", "adamw", levers.adamw_kernel(trainable)[1] if params.optimizer == "adamw" else None)
    flat = fit_packing(batches, model, context)  # probes the model before the first batch
    evaluator = Evaluator.build(context, params, batches, eval_batches, flat, sharded=twin is not None)
    log_path = live_log_path(context)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    if main:
        log_path.write_bytes(b"")  # a fresh run starts a fresh live log

    ckpt_root = getattr(context, "checkpoint_dir", None)
    checkpoints = (CheckpointDir(ckpt_root, keep=params.keep_checkpoints)
                   if ckpt_root is not None and params.checkpoint_interval > 0 else None)
    resumed = checkpoints.load_latest() if checkpoints is not None else None
    if resumed is not None:
        _restore(resumed, named, optimizer, params, sharded=model if twin is not None else None)
        state = TrainState(step=resumed.step, tokens=int(resumed.state["tokens"]),
                           last_loss=resumed.state.get("last_loss"))
        context.add_tokens(state.tokens)  # the record counts the whole stage's tokens
        earlier_s = float(resumed.state.get("train_seconds", 0.0))
        for _ in range(int(resumed.state["micro_batches"])):  # the data position
            next(batches)
        if main and (resumed.path / LOG_FILE).is_file():
            log_path.write_bytes((resumed.path / LOG_FILE).read_bytes())
        if evaluator is not None:
            evaluator.restore(resumed.state.get("eval"), resumed.best)
        context.note("resumed_from_step", resumed.step)
        context.log(f"resuming from checkpoint step {resumed.step} ({resumed.path})")

    else:
        earlier_s = 0.0
    start = state.step
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
        start + i, total=params.steps, warmup=params.warmup_steps, schedule=params.schedule))
    plain_optimizer = optimizer  # what a sharded model's checkpoints gather the state of
    if twin is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        skip_sync = accelerator.no_sync  # DDP's no_sync (nothing to skip on one process)
    else:  # sharded already (accelerate would add DDP on top)
        optimizer = accelerator.prepare(optimizer)
        skip_sync = distributed.no_sync  # accelerate's no_sync knows FSDP2 only as its own back-end
    model.train()
    if resumed is not None:
        restore_rng(resumed.rng, resumed.state.get("python_rng"))

    losses: list[float] = []
    # (step, loss, grad norm, lr, tokens so far, seconds of the whole stage so far)
    pending: list[tuple[int, torch.Tensor, torch.Tensor | None, float, int, float]] = []
    window_tokens, window_start, began = 0, time.perf_counter(), time.perf_counter()
    shown: dict[str, Any] = {}
    last_good: list[int] = [resumed.step] if resumed is not None else []
    kill_at = _kill_step()

    def flush() -> None:
        nonlocal window_tokens, window_start
        stacked = torch.stack([p[1] for p in pending])
        if world > 1:
            stacked = accelerator.reduce(stacked, reduction="mean")
        values = stacked.tolist()  # the one sync
        norms = [None if p[2] is None else float(p[2]) for p in pending]
        now = time.perf_counter()
        tok_s = window_tokens / max(now - window_start, 1e-9)
        for (step, _, _, lr, _, _), value in zip(pending, values):
            if not math.isfinite(value):
                kept = (f"; the last good checkpoint (step {last_good[-1]}) is kept in "
                        f"{checkpoints.path(last_good[-1])}" if last_good and checkpoints else "")
                raise TrainingError(
                    f"loss became {value} at step {step + 1} of {params.steps} "
                    f"(lr {lr:.3g}); lower lr, enable max_grad_norm, or check the data{kept}")
        if main:
            with open(log_path, "a", encoding="utf-8") as fh:
                for (step, _, _, lr, tokens, elapsed), value, norm in zip(pending, values, norms):
                    record = {"step": step + 1, "loss": value, "lr": lr, "tokens": tokens,
                              "tok_s": tok_s, "elapsed_s": round(elapsed, 3)}
                    if norm is not None:
                        record["grad_norm"] = norm
                    if evaluator is not None and step + 1 in evaluator.rows:
                        record["eval_loss"] = evaluator.rows[step + 1]
                    fh.write(json.dumps(record) + "\n")
                    trackers.log(record)
        context.add_tokens(window_tokens)
        losses.extend(values)
        state.last_loss = values[-1]
        shown.update(loss=values[-1], tok_s=round(tok_s))
        pending.clear()
        window_tokens, window_start = 0, now

    def save_checkpoint() -> None:
        if pending:
            flush()  # a checkpoint is saved only after its losses were checked finite
        if twin is not None:  # every process takes part in gathering the shards, the main one saves
            whole, optimizer_state = distributed.full_train_state(model, plain_optimizer)
        if main:
            if twin is None:
                whole, optimizer_state = {n: p for n, p in named}, optimizer.state_dict()
            checkpoints.save(step=state.step, trainable=whole,
                             optimizer=optimizer_state, log_file=log_path,
                             state={"tokens": state.tokens, "last_loss": state.last_loss,
                                    "micro_batches": state.step * params.grad_accum,
                                    "train_seconds": earlier_s + time.perf_counter() - began,
                                    "world_size": world,
                                    **({"eval": evaluator.state_dict()} if evaluator is not None else {})},
                             best=evaluator.best if evaluator is not None else None)
        accelerator.wait_for_everyone()
        last_good.append(state.step)

    with (tracking.open_trackers(context, main) as trackers,  # runtime.log_with, closed on exit
          context.progress(params.steps, description or f"{context.stage_name}: training", unit="steps") as bar):
        if start:
            bar.advance(start)  # a resumed stage's bar starts at its step, out of the whole stage's
        for step in range(start, params.steps):
            micro = [next(batches) for _ in range(params.grad_accum)]
            counts = [_count(b) for b in micro]
            targets = max(1, sum(t for _, t in counts))
            step_tokens = sum(n for n, _ in counts)
            step_loss = torch.zeros((), device=accelerator.device)
            for k, batch in enumerate(micro):
                batch = {name: t.to(accelerator.device, non_blocking=True)
                         for name, t in _shard(batch, rank, world).items()}
                batch = model_inputs(batch, flat)  # document packing: no KV cache, maybe one row
                sync = k == len(micro) - 1
                with nullcontext() if sync else skip_sync(model):
                    # each process divides by its share of the targets: the averaged
                    # gradient is then the gradient of the global mean loss
                    loss = model(**batch, num_items_in_batch=targets / world if world > 1 else targets).loss
                    accelerator.backward(loss)
                step_loss += loss.detach()
            norm = (accelerator.clip_grad_norm_(trainable, params.max_grad_norm)
                    if params.max_grad_norm > 0 else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step = step + 1
            state.tokens += step_tokens
            window_tokens += step_tokens
            pending.append((step, step_loss, None if norm is None else norm.detach(), lr, state.tokens,
                            earlier_s + time.perf_counter() - began))
            if evaluator is not None and evaluator.due(state.step):
                evaluator.evaluate(model, state.step, accelerator.device, named)
            if state.step % params.log_every == 0 or state.step == params.steps:
                flush()
            if (checkpoints is not None and state.step % params.checkpoint_interval == 0
                    and state.step < params.steps):
                save_checkpoint()
            if kill_at == state.step:
                os.kill(os.getpid(), signal.SIGKILL)
            bar.advance(1, **shown)

    this_run = time.perf_counter() - began
    if main and log_path != context.output_dir / LOG_FILE:
        shutil.copyfile(log_path, context.output_dir / LOG_FILE)  # the stage output's copy
    context.note("training_seconds", {"whole_stage": round(earlier_s + this_run, 3),
                                      "this_run": round(this_run, 3)})
    if evaluator is not None:  # keep_best: the best step's trainable tensors go back in
        evaluator.finish(context, named, state.step)
    model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    if twin is not None:
        model = distributed.gather_model(model, twin)
    if params.gradient_checkpointing:
        levers.disable_checkpointing(model)
    model.eval()
    accelerator.free_memory()
    return TrainResult(model=model, state=state, losses=losses, seconds=this_run)
