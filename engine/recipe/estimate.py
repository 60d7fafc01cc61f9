"""Peak-memory estimates of a stage, from the model's shape alone (no weight is loaded).

``engine validate`` (and ``engine run``, which validates first) warns when a stage's
estimate exceeds the device's memory (``runtime.memory_gb``, else CUDA's total memory,
else the machine's RAM for the CPU), with the numbers and the lever that would make
it fit. docs/scaling.md is generated from these figures for Llama-3.1-8B.

The model of a training stage's peak::

    weights + grads + optimizer state + saved activations + backward transient

* weights: every forward parameter at its load dtype (float32 master weights unless
  ``runtime.dtype`` is set, see :func:`engine.training.training_dtype`; 1 byte for
  ``frozen_8bit`` frozen layers);
* grads: trained parameters at the weights' dtype; optimizer: AdamW's two moments,
  4 bytes each (fp32), 1 byte each for the 8-bit optimizers;
* saved activations per token and decoder layer, counted in elements (derived from
  the tensors a transformers Llama layer hands autograd; checked against
  ``torch.autograd.graph.saved_tensors_hooks`` in tests/recipe/test_estimate.py)::

      8*hidden + 2*kv_dim + 4*intermediate + heads + 2

  (two RMSNorms keep input and normalised output, the q/k/v/o and MLP projections
  their inputs, SDPA q, k, v, output and one log-sum-exp per head, SiLU gate and
  product the MLP's four intermediate tensors), plus ``3*hidden + vocab`` for the
  final norm, head and loss (``hidden + vocab`` when the head is frozen). Only layers
  at or after the first trained layer hold activations (nothing below it needs a
  gradient; the first of them keeps ``hidden`` fewer: its input needs none). With gradient checkpointing a
  layer holds its input only (``hidden`` elements), and one layer's full set is
  rebuilt at a time during the backward pass;
* the backward transient: the float32 gradient of the logits (``vocab`` per token).

Activations are counted at 4 bytes (float32) or 2 bytes under bf16/fp16 autocast;
the autocast figure is the element count times 2, not a measurement. Merges stream
tensor by tensor, so their peak is a few copies of the largest tensor. An estimate
is a planning figure: allocator fragmentation and library workspaces come on top
(:data:`HEADROOM`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from engine.recipe.spec import root_config

GiB = 1024**3
#: the share of device memory an estimate may use before validate warns (allocator
#: fragmentation, CUDA context and kernel workspaces take the rest)
HEADROOM = 0.9
LORA_MODULES = 7  # q, k, v, o, gate, up, down

__all__ = ["Estimate", "Shape", "TrainSetup", "device_memory", "estimate_training", "estimate_stage",
           "memory_warnings"]


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only model's config.json."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        cfg = config.get("text_config") or config
        try:
            heads = int(cfg["num_attention_heads"])
            return cls(hidden=int(cfg["hidden_size"]), layers=int(cfg["num_hidden_layers"]), heads=heads,
                       kv_heads=int(cfg.get("num_key_value_heads") or heads),
                       intermediate=int(cfg["intermediate_size"]), vocab=int(cfg["vocab_size"]),
                       tied=bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False))),
                       head_dim=cfg.get("head_dim"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"config.json lacks a decoder shape field ({exc})") from None

    @property
    def dim(self) -> int:
        return int(self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.dim

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention, MLP, two norms)."""
        attn = self.hidden * self.heads * self.dim * 2 + self.hidden * self.kv_dim * 2
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        """Input embedding and output head (one tensor when tied), and the final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.embed_params

    def lora_layer_params(self, r: int) -> int:
        """LoRA A and B of the seven Llama projections of one layer, rank ``r``."""
        q = o = self.heads * self.dim
        dims = [(self.hidden, q), (self.hidden, self.kv_dim), (self.hidden, self.kv_dim), (o, self.hidden),
                (self.hidden, self.intermediate), (self.hidden, self.intermediate),
                (self.intermediate, self.hidden)]
        return sum(r * (a + b) for a, b in dims)


def layer_activation_elements(shape: Shape) -> int:
    """Saved activation elements per token of one decoder layer in training (no checkpointing)."""
    return 8 * shape.hidden + 2 * shape.kv_dim + 4 * shape.intermediate + shape.heads + 2


def head_activation_elements(shape: Shape, head_trains: bool = True) -> int:
    """Saved elements per token of the final norm, the head and the loss (a frozen head
    keeps neither its input nor the norm's output)."""
    return (3 if head_trains else 1) * shape.hidden + shape.vocab


@dataclass(frozen=True)
class TrainSetup:
    """How a training stage trains: which parts, at which precision and sizes."""

    micro_batch: int
    seq_len: int
    #: decoder layers in the model that runs (ELO: the sub-model's)
    model_layers: int
    #: indices of the decoder layers whose weights train (all: full training)
    trained_layers: tuple[int, ...]
    train_embeddings: bool = True
    lora_r: int | None = None
    frozen_8bit: bool = False
    #: bytes per layer weight of a quantised LoRA base (``lora.quantize``), None: weight_bytes
    base_bytes: float | None = None
    weight_bytes: int = 4
    mixed_precision: bool = False
    optimizer: str = "adamw"
    checkpointing: bool = False


@dataclass
class Estimate:
    """Peak memory of a stage by part, in bytes."""

    stage: str
    parts: dict[str, float]
    setup: TrainSetup | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in self.parts.items() if v)
        return f"{self.total / GiB:.1f} GiB ({parts})"


def estimate_training(shape: Shape, setup: TrainSetup, stage: str = "") -> Estimate:
    """Peak memory of a training stage (see the module docstring for the model)."""
    layers = setup.model_layers
    trained = sorted(set(setup.trained_layers))
    tokens = setup.micro_batch * setup.seq_len
    if setup.lora_r is not None:
        lora_layers = trained or list(range(layers))
        trainable = len(lora_layers) * shape.lora_layer_params(setup.lora_r)
        first = min(lora_layers)
    else:
        trainable = len(trained) * shape.layer_params + (shape.embed_params if setup.train_embeddings else 0)
        first = 0 if setup.train_embeddings else (min(trained) if trained else layers)
    frozen_layers = layers - (len(trained) if setup.lora_r is None else 0)
    weight = layers * shape.layer_params + shape.embed_params
    if setup.frozen_8bit:
        weights = (weight - frozen_layers * shape.layer_params) * setup.weight_bytes \
            + frozen_layers * shape.layer_params * 1
    elif setup.base_bytes is not None:  # QLoRA: the layers quantised, embeddings and head not
        weights = layers * shape.layer_params * setup.base_bytes + shape.embed_params * setup.weight_bytes
    else:
        weights = weight * setup.weight_bytes
    if setup.lora_r is not None:
        weights += trainable * 4
    grad_bytes = 4 if setup.lora_r is not None else setup.weight_bytes
    opt_bytes = 2 if setup.optimizer in ("adamw-8bit", "paged-adamw-8bit") else 8
    act = 2 if setup.mixed_precision else 4
    holding = layers - first  # layers whose activations are kept for the backward pass
    per_layer = layer_activation_elements(shape)
    if setup.lora_r is not None:
        per_layer += LORA_MODULES * setup.lora_r
    if setup.checkpointing:
        saved = holding * shape.hidden + (per_layer if holding else 0)
    else:  # the first holding layer's input needs no gradient when nothing below trains
        saved = holding * per_layer - (shape.hidden if first > 0 or not setup.train_embeddings else 0)
    head_trains = setup.train_embeddings and setup.lora_r is None
    activations = tokens * (saved + head_activation_elements(shape, head_trains)) * act
    transient = tokens * shape.vocab * 4
    parts = {"weights": weights, "grads": trainable * grad_bytes, "optimizer": trainable * opt_bytes,
             "activations": activations, "logit grads": transient}
    return Estimate(stage, {k: float(v) for k, v in parts.items()}, setup)


def estimate_scoring(shape: Shape, *, batch: int, seq_len: int, weight_bytes: int, stage: str = "") -> Estimate:
    """Peak of a forward-only evaluation: weights, one layer's working set, the logits."""
    tokens = batch * seq_len
    working = tokens * (layer_activation_elements(shape) + 2 * shape.vocab) * 4
    return Estimate(stage, {"weights": float(shape.params * weight_bytes), "activations": float(working)})


def estimate_merge(shape: Shape, n_models: int, stage: str = "") -> Estimate:
    """A streamed merge: every input's copy of the largest tensor plus base, result and
    working copies, in float32 (the merge engine computes in float32)."""
    largest = max(shape.vocab * shape.hidden, shape.hidden * shape.intermediate)
    return Estimate(stage, {"tensors": float((n_models + 3) * largest * 4)})


# --- a planned stage -------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def _weight_bytes(runtime: Any, training: bool) -> int:
    dtype = str(getattr(runtime, "dtype", "auto"))
    if dtype == "auto":
        return 4 if training else (2 if _device_type(runtime) == "cuda" else 4)
    return _DTYPE_BYTES.get(dtype, 4)


def _device_type(runtime: Any) -> str:
    device = str(getattr(runtime, "device", "auto"))
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


def _mixed(params: Any, runtime: Any) -> bool:
    setting = getattr(params, "mixed_precision", "no")
    return setting in ("bf16", "fp16") or (setting == "auto" and _device_type(runtime) == "cuda")


def training_setup(plugin: str, params: Any, runtime: Any, shape: Shape,
                   selected: int | None = None) -> tuple[TrainSetup, list[str]]:
    """The :class:`TrainSetup` of a trainer's params (``selected``: layers a select-layers
    stage gives, when known). Returns it with notes on what was assumed."""
    notes: list[str] = []
    explicit = getattr(params, "layers", None)
    lora = getattr(params, "lora", None)
    quant = getattr(lora, "base_quantization", None)  # 4 bits: 0.5 byte + block scales
    qbytes = None if quant is None else (1.0 if quant.bits == 8 else 0.5 + (0.016 if quant.double_quant else 0.0625))
    base = dict(base_bytes=qbytes,micro_batch=params.batch_size // getattr(params, "grad_accum", 1), seq_len=params.seq_len,
                weight_bytes=_weight_bytes(runtime, True), mixed_precision=_mixed(params, runtime),
                optimizer=getattr(params, "optimizer", "adamw"),
                checkpointing=bool(getattr(params, "gradient_checkpointing", False)))
    if plugin == "elo":
        count = len(explicit) if explicit else (selected or 2)
        return TrainSetup(model_layers=count, trained_layers=tuple(range(count)),
                          train_embeddings=bool(getattr(params, "train_embeddings", False)), **base), notes
    if explicit is not None or selected is not None:
        n = shape.layers
        if explicit:
            idx = sorted({(i + n) % n for i in explicit})
        else:  # a select-layers stage's choice is known only when it runs
            idx = sorted({0, n - 1})
            notes.append("assumed the first and last layer are selected")
        return TrainSetup(model_layers=n, trained_layers=tuple(idx), train_embeddings=False,
                          lora_r=lora.r if lora is not None else None,
                          frozen_8bit=bool(getattr(params, "frozen_8bit", False)), **base), notes
    all_layers = tuple(range(shape.layers))
    if lora is not None:
        return TrainSetup(model_layers=shape.layers, trained_layers=all_layers, train_embeddings=False,
                          lora_r=lora.r, **base), notes
    return TrainSetup(model_layers=shape.layers, trained_layers=all_layers, **base), notes


def estimate_stage(name: str, stage: str, plugin: str, params: Any, runtime: Any, shape: Shape,
                   n_models: int = 1, selected: int | None = None) -> Estimate | None:
    """The estimate of one planned stage (None for kinds that hold no model)."""
    if stage == "merge":
        return estimate_merge(shape, n_models, name)
    if stage == "evaluate":
        seq = getattr(params, "max_length", None) or getattr(params, "seq_len", None) or 2048
        return estimate_scoring(shape, batch=getattr(params, "batch_size", 8), seq_len=seq,
                                weight_bytes=_weight_bytes(runtime, False), stage=name)
    if hasattr(params, "seq_len") and hasattr(params, "batch_size") and hasattr(params, "steps"):
        setup, notes = training_setup(plugin, params, runtime, shape, selected)
        estimate = estimate_training(shape, setup, name)
        estimate.notes.extend(notes)
        return estimate
    return None


# --- the device, and what validate says ---------------------------------------------------------


def device_memory(runtime: Any) -> tuple[float, str] | None:
    """(bytes, what it is) of the memory a stage is checked against; None when unknown
    (a CUDA recipe checked on a machine without CUDA and no ``runtime.memory_gb``)."""
    set_gb = getattr(runtime, "memory_gb", None)
    if set_gb:
        return float(set_gb) * GiB, f"runtime.memory_gb {set_gb:g} GiB"
    kind = _device_type(runtime)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return float(props.total_memory), f"{props.name} {props.total_memory / GiB:.0f} GiB"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return float(total), f"this machine's RAM {total / GiB:.0f} GiB"


def _levers(setup: TrainSetup) -> list[tuple[str, dict[str, Any]]]:
    """Levers in the order a user would try them: each the setting and its effect."""
    out: list[tuple[str, dict[str, Any]]] = []
    if not setup.checkpointing:
        out.append(("params.gradient_checkpointing: true", {"checkpointing": True}))
    if not setup.mixed_precision:
        out.append(("params.mixed_precision: bf16", {"mixed_precision": True}))
    if setup.optimizer == "adamw":
        out.append(("params.optimizer: adamw-8bit", {"optimizer": "adamw-8bit"}))
    if setup.weight_bytes == 4:
        out.append(("runtime.dtype: bfloat16 (bf16 weights and grads)", {"weight_bytes": 2}))
    if setup.micro_batch > 1:
        out.append(("a larger params.grad_accum (micro-batch 1)", {"micro_batch": 1}))
    return out


def fitting_levers(shape: Shape, setup: TrainSetup, limit: float) -> tuple[list[str], float] | None:
    """The shortest prefix of :func:`_levers` whose estimate fits ``limit`` (None: none does)."""
    chosen: list[str] = []
    current = setup
    for label, change in _levers(setup):
        current = replace(current, **change)
        chosen.append(label)
        total = estimate_training(shape, current).total
        if total <= limit:
            return chosen, total
    return None


def memory_warning(estimate: Estimate, shape: Shape, memory: tuple[float, str], where: str) -> str | None:
    """The warning line for an estimate over the device's memory (None when it fits)."""
    available, what = memory
    limit = available * HEADROOM
    if estimate.total <= limit:
        return None
    text = (f"{where}: estimated peak memory {estimate.describe()} exceeds {HEADROOM:.0%} of {what}")
    if estimate.setup is not None:
        found = fitting_levers(shape, estimate.setup, limit)
        if found is not None:
            levers, total = found
            text += f"; it would fit with {', '.join(levers)} (estimate {total / GiB:.1f} GiB)"
        else:
            text += ("; no single-device lever makes it fit: train fewer layers (ct layers, elo), "
                     "use lora, or shard it with FSDP over several devices")
    else:
        text += "; use a device with more memory"
    return text


def memory_warnings(stages: list[Any], recipe: Any, configs: dict[str, dict | None], source: str) -> list[str]:
    """``engine validate``'s memory warnings for planned stages (see :mod:`engine.recipe.validate`)."""
    lines: list[str] = []
    for planned in stages:
        spec = planned.spec
        refs = [r for k, rs in spec.references().items() if k != "layers" for r in rs]
        if spec.base is not None and spec.stage != "merge":
            refs = [spec.base, *refs]
        config = next((c for r in refs if (c := root_config(r, recipe, configs)) is not None), None)
        if config is None:
            continue
        try:
            shape = Shape.from_config(config)
        except ValueError:
            continue
        memory = device_memory(planned.runtime)
        if memory is None:
            continue
        estimate = estimate_stage(spec.name, spec.stage, spec.plugin, planned.params, planned.runtime, shape,
                                  n_models=len(spec.models or []) + (1 if spec.base else 0),
                                  selected=2 if spec.layers is not None else None)
        if estimate is None:
            continue
        line = memory_warning(estimate, shape, memory, f"{source}: stage {spec.name!r}")
        if line is not None:
            lines.append(line)
    return lines
