"""Memory levers of training and model loading: activation checkpointing, CPU bf16
autocast, the attention kernel and paged 8-bit optimizer state.

Each lever is a recipe setting; this module decides what it means for the model and
device at hand, by asking the library (never by a name), and says when the fast path
cannot be taken:

* :func:`enable_checkpointing`: ``gradient_checkpointing`` recomputes each decoder
  layer's activations in the backward pass instead of holding them (transformers'
  activation checkpointing, non-reentrant ``torch.utils.checkpoint``: gradients reach
  trained tensors behind frozen embeddings or LoRA without forcing the embedding
  output to require grad).
* :func:`resolve_mixed_precision` / :func:`cpu_autocast_problem`: ``mixed_precision``;
  bf16 autocast on the CPU is tried on a tiny matmul.
* ``runtime.attention``: :mod:`engine.models.attention` (model loading needs it too).
* :func:`make_optimizer` / :func:`paged_optimizer_path`: ``optimizer`` (AdamW, 8-bit,
  paged 8-bit; paging needs CUDA unified memory); :func:`adamw_kernel`: AdamW runs torch's
  fused kernel wherever torch offers it for the parameters' device and dtype.
* :func:`check_runtime`: what ``engine validate`` checks of these settings.
* :func:`train_only_embeddings`: ``ct``'s ``train_only``: only the input embedding and the
  output head learn (``embeddings``), or only some of their rows (``new-rows``: the rows a
  tokenizer change made, from the model's lingoforge.json: :func:`new_rows_of`); everything
  else is frozen and stays bit-identical.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import RecipeError, TrainingError
from engine.models.attention import attention_problem

if TYPE_CHECKING:
    from engine.training.params import TrainerParams

__all__ = ["adamw_kernel", "cpu_autocast_problem", "disable_checkpointing", "check_runtime", "enable_checkpointing",
           "make_optimizer", "new_rows_of", "paged_optimizer_path", "resolve_mixed_precision",
           "train_only_embeddings"]

#: set on a parameter of which only some rows train: it gets no weight decay (decoupled decay
#: would shrink the frozen rows, whose gradient is zero)
ROWS_ONLY = "_lingoforge_rows_only"

def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing(model: torch.nn.Module, where: str) -> None:
    """Turn on activation checkpointing (non-reentrant) for every checkpointable layer.

    ``where`` names the stage in the error a model that cannot checkpoint raises.
    transformers also hooks the input embedding so that its output requires grad (a
    need of reentrant checkpointing only); the hook is removed, so a frozen embedding
    costs no extra backward work.
    """
    base = _base_model(model)
    # transformers 5 names it activation_checkpointing_enable (gradient_... is its deprecated alias)
    method = next((m for m in ("activation_checkpointing_enable", "gradient_checkpointing_enable")
                   if callable(getattr(base, m, None))), None)
    if not getattr(base, "supports_gradient_checkpointing", False) or method is None:
        raise TrainingError(f"{where}: params.gradient_checkpointing: {type(base).__name__} cannot checkpoint "
                            "activations (its transformers class does not support it); set "
                            "gradient_checkpointing: false")
    kwargs = {"use_reentrant": False}
    hooked_before = bool(getattr(base, "_require_grads_hooks", None))
    try:
        getattr(base, method)(**{method.replace("_enable", "_kwargs"): kwargs})
    except ValueError as exc:
        raise TrainingError(f"{where}: params.gradient_checkpointing: {exc}") from None
    if not hooked_before and getattr(base, "_require_grads_hooks", None):
        base.disable_input_require_grads()
    config = getattr(base, "config", None)
    if config is not None and getattr(config, "use_cache", None):
        config.use_cache = False  # no KV cache is built while training (checkpointing drops it anyway)
        base._lingoforge_use_cache = True


def disable_checkpointing(model: torch.nn.Module) -> None:
    """Undo :func:`enable_checkpointing` (the trained model is saved and used as it came)."""
    base = _base_model(model)
    method = next((m for m in ("activation_checkpointing_disable", "gradient_checkpointing_disable")
                   if callable(getattr(base, m, None))), None)
    if method is not None:
        getattr(base, method)()
    if getattr(base, "_lingoforge_use_cache", False):
        base.config.use_cache = True
        del base._lingoforge_use_cache


def resolve_mixed_precision(setting: str, device: torch.device) -> str:
    """accelerate's ``mixed_precision`` value for ``setting`` on ``device``."""
    if setting == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if setting == "fp16" and device.type != "cuda":
        raise TrainingError(f"mixed_precision 'fp16' needs a CUDA device (running on {device.type}); "
                            "use 'bf16' or 'no'")
    if setting == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise TrainingError("mixed_precision 'bf16' is not supported by this GPU; use 'fp16' or 'no'")
    if setting == "bf16" and device.type == "cpu" and (problem := cpu_autocast_problem()):
        raise TrainingError(f"mixed_precision 'bf16': {problem}; use 'no'")
    return setting


def make_optimizer(params: list[torch.nn.Parameter], hp: TrainerParams) -> torch.optim.Optimizer:
    """AdamW over ``params``; matrices decay, vectors (biases, norms) do not."""
    decays = [p.ndim >= 2 and not getattr(p, ROWS_ONLY, False) for p in params]
    groups = [
        {"params": [p for p, d in zip(params, decays) if d], "weight_decay": hp.weight_decay},
        {"params": [p for p, d in zip(params, decays) if not d], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if hp.optimizer in ("adamw-8bit", "paged-adamw-8bit"):
        try:
            from bitsandbytes.optim import AdamW8bit, PagedAdamW8bit
        except ImportError as exc:
            raise TrainingError(f"optimizer {hp.optimizer!r} needs bitsandbytes ({exc}); "
                                "install lingoforge[8bit] or use 'adamw'") from None
        return (AdamW8bit if hp.optimizer == "adamw-8bit" else PagedAdamW8bit)(groups, lr=hp.lr)
    kernel, _ = adamw_kernel(params)
    return torch.optim.AdamW(groups, lr=hp.lr, **({"fused": True} if kernel == "fused" else {}))


def adamw_kernel(params: Sequence[torch.Tensor]) -> tuple[str, str | None]:
    """Which of torch's AdamW implementations :func:`make_optimizer` uses for ``params``:
    ``("fused", None)`` when ``torch.optim.AdamW`` takes ``fused`` and a fused step runs on
    a tensor of each device and dtype among ``params`` (one kernel reads and writes each
    parameter, gradient and moment once; torch's default on the CPU is a loop of about ten
    element-wise passes per tensor, its foreach form the same passes). Otherwise
    ``("default", why)``: torch's own choice, with the reason (a slow path). Tensor
    subclasses (the sharded parameters of ``runtime.fsdp``) keep torch's default, as
    before: ``("default", None)``.

    The fused kernel computes the same update; its float32 rounding differs from the
    loop's in the last bits (about 1e-7 relative per step)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return "default", f"torch {torch.__version__}'s AdamW has no fused implementation"
    if any(type(p.data) is not torch.Tensor for p in params):
        return "default", None
    for device, dtype in sorted({(str(p.device), p.dtype) for p in params}, key=str):
        problem = _fused_adamw_problem(device, dtype)
        if problem is not None:
            return "default", problem
    return "fused", None


@functools.cache
def _fused_adamw_problem(device: str, dtype: torch.dtype) -> str | None:
    """None when a fused AdamW step runs on a ``dtype`` tensor on ``device``; else why not."""
    try:
        probe = torch.zeros(2, device=device, dtype=dtype, requires_grad=True)
        probe.grad = torch.ones_like(probe)
        torch.optim.AdamW([probe], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return f"fused AdamW does not run on {dtype} tensors on {device} ({str(exc).splitlines()[0]})"
    return None


def cpu_autocast_problem() -> str | None:
    """None when torch runs bf16 autocast on the CPU (a tiny matmul comes out bf16)."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = torch.ones(2, 2) @ torch.ones(2, 2)
    except (RuntimeError, ValueError) as exc:
        return f"torch {torch.__version__} has no bf16 autocast on the CPU ({exc})"
    if out.dtype != torch.bfloat16:
        return f"torch {torch.__version__} does not autocast matmuls to bf16 on the CPU"
    return None


def paged_optimizer_path(device: torch.device) -> str | None:
    """For ``optimizer: paged-adamw-8bit``: a sentence when paging is unavailable (not CUDA)."""
    if device.type == "cuda":
        return None
    return (f"paged optimizer state needs CUDA unified memory; on {device.type} bitsandbytes keeps the "
            "8-bit state unpaged (the same as adamw-8bit)")


def check_runtime(runtime: Any, loads_models: bool = True) -> None:
    """``engine validate``'s check of the levers a stage's effective runtime sets: raises
    :class:`~engine.core.errors.RecipeError` naming the field when one cannot work here."""
    device = str(runtime.device)
    # "cuda..." is taken at its word (a recipe for a GPU may be checked on a laptop)
    dev = torch.device("cuda" if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
                       else "cpu" if device == "auto" else device)
    problem = attention_problem(runtime.attention, dev) if loads_models else None
    if problem is not None:
        raise RecipeError(problem)


def checkpointing_status(model: Any) -> bool:
    """Whether any module of ``model`` has activation checkpointing on (for tests and notes)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in _base_model(model).modules())


def new_rows_of(meta: dict[str, Any], where: str) -> list[int]:
    """The ids of the rows a tokenizer change made, from a model's lingoforge.json
    (``new_rows``: ``[start, end)`` ranges, written by ``engine extend-tokenizer`` and
    ``engine transplant-tokenizer``)."""
    ranges = meta.get("new_rows")
    if not ranges:
        raise TrainingError(f"{where}: train_only: new-rows trains the rows a tokenizer change made, but "
                            "the model's lingoforge.json records none (write the model with engine "
                            "extend-tokenizer or transplant-tokenizer, or use train_only: embeddings)")
    return [i for a, b in ranges for i in range(int(a), int(b))]


def train_only_embeddings(model: torch.nn.Module, rows: Sequence[int] | None = None) -> int:
    """Freeze every parameter but the input embedding and the output head (one tensor when
    tied); with ``rows``, a gradient hook zeroes every other row's gradient, so only those
    rows move (AdamW's update of a row whose gradient was always zero is zero, and the
    tensors get no weight decay). Returns the number of parameters that learn."""
    base = _base_model(model)
    inp = base.get_input_embeddings().weight
    head_module = base.get_output_embeddings()
    tensors = [inp] + ([head_module.weight] if head_module is not None
                       and head_module.weight is not inp else [])
    for p in base.parameters():
        p.requires_grad_(False)
    for t in tensors:
        t.requires_grad_(True)
    if rows is None:
        return sum(t.numel() for t in tensors)
    index = torch.as_tensor(sorted(set(rows)), dtype=torch.long)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= inp.shape[0]):
        raise TrainingError(f"train_only: new-rows: row {int(index.max())} is beyond the embedding's "
                            f"{inp.shape[0]} rows")
    for t in tensors:
        mask = torch.zeros((t.shape[0], 1), dtype=t.dtype, device=t.device)
        mask[index.to(t.device)] = 1
        t.register_hook(lambda grad, m=mask: grad * m.to(grad.dtype))
        setattr(t, ROWS_ONLY, True)
    return int(index.numel()) * sum(t.shape[1] for t in tensors)
