"""LoRA adapters as merge inputs: a PEFT adapter folder is the delta ``scaling · B·A`` on its base.

Per-language LoRA adapters are cheap to train and to store; writing each one out as a
full model only to merge it again costs a model's disk and I/O per language. A merge
input may therefore be a PEFT adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``). For every tensor of the merge's base it stands for
the model PEFT's ``merge_and_unload`` would give:

* a LoRA-adapted linear weight ``W`` becomes ``W + s · B @ A`` (``(B @ A)ᵀ`` for
  ``fan_in_fan_out`` layers such as GPT-2's ``Conv1D``), an adapted embedding
  ``E + s · (B @ A)ᵀ`` (PEFT's ``lora_embedding_A``/``lora_embedding_B``), a LoRA
  bias (``lora_bias``) adds ``s · b`` to the layer's bias;
* ``s = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
  ``lora_alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` (a key matches
  a module whose dotted name ends with it, as in PEFT);
* any other tensor the adapter holds (``modules_to_save``, trained biases, embedding
  layers PEFT saved alongside) **replaces** the base tensor of that name, as loading
  the adapter with PEFT does;
* every other tensor is the base's (a zero task vector).

Everything that can be known from ``adapter_config.json`` and the safetensors header
is checked before any tensor data is read (:func:`read_adapter`, :func:`check_adapter`):
the tensor names map onto base tensors, the factors' rank matches the config and
``B @ A`` has the base tensor's shape. Pickled ``adapter_model.bin`` files are never
loaded. Adapters that do not reduce to ``W + s · B @ A`` on the plain base (DoRA,
PiSSA/OLoRA/CorDA/LoftQ initialisations, layer replication, trainable tokens,
activated LoRA, non-LoRA PEFT types, convolution LoRA) are refused with the reason.

Precision: :class:`LoraReader` returns the adapted tensor as ``base + s · B @ A``
computed in float32 (float64 for a float64 base), whatever the base's dtype, so that
the task vector the merge forms again (``model − base`` in ``compute_dtype``) is the
LoRA delta up to one float32 rounding of the weight -- exactly what a float32 model
written by ``merge_and_unload`` gives, and far better than a bfloat16 one (whose
rounding would swallow most of a small delta).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import modelio
from engine.errors import EngineError, MergeError
from engine.merging.tensorio import ModelReader, TensorInfo, read_header

if TYPE_CHECKING:
    from engine.merging.preflight import MergeInput

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "LoraDelta", "LoraReader", "LoraSettings",
    "check_adapter", "is_adapter_folder", "open_reader", "read_adapter", "read_settings",
    "trained_on",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_META_FILE = "lingoforge.json"
_PICKLES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_FACTORS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
#: name parts of PEFT tensors that are not ``W + s·B@A`` (DoRA, trainable tokens, AdaLoRA, ...)
_UNSUPPORTED_PARTS = {
    "lora_magnitude_vector": "DoRA (use_dora) adapters",
    "trainable_tokens_delta": "trainable-token adapters (trainable_token_indices)",
    "trainable_tokens_original": "trainable-token adapters (trainable_token_indices)",
    "lora_E": "AdaLoRA adapters",
}
#: ``init_lora_weights`` values whose adapters belong to a modified base (residual or quantised)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def is_adapter_folder(path: Path | str) -> bool:
    """A folder with ``adapter_config.json`` and no ``config.json`` of its own is a PEFT
    adapter (:func:`engine.modelio.is_adapter_folder`)."""
    return modelio.is_adapter_folder(Path(path))


# --- adapter_config.json ----------------------------------------------------------------


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key (a regular expression) that matches the end of the dotted
    module name, on a dot boundary, gives the value."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module):
            return value
    return default


@dataclass(frozen=True)
class LoraSettings:
    """What ``adapter_config.json`` says about the arithmetic of a LoRA adapter."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None

    def rank(self, module: str) -> int:
        """``r`` of ``module`` (its dotted name, e.g. ``model.layers.0.self_attn.q_proj``)."""
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def alpha(self, module: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))

    def scaling(self, module: str) -> float:
        """``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)


def _refusal(cfg: Mapping[str, Any]) -> str | None:
    """Why a LoRA config cannot be merged as ``W + s·B@A`` onto the plain base, or None."""
    if cfg.get("use_dora"):
        return "it is a DoRA adapter (use_dora: true): its weight is not W + s·B@A"
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith("loftq"):
        return ("init_lora_weights is 'loftq': such an adapter belongs to the quantised base, "
                "not the full-precision one")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        return (f"init_lora_weights is {init!r}: such an adapter belongs to a modified (residual) "
                "base; convert it to a plain LoRA first (PEFT's save_pretrained("
                "path_initial_model_for_weight_conversion=...))")
    for key, what in (("layer_replication", "layer replication"),
                      ("trainable_token_indices", "trainable tokens"),
                      ("target_parameters", "LoRA on parameters (target_parameters)"),
                      ("alora_invocation_tokens", "activated LoRA (alora_invocation_tokens)"),
                      ("use_qalora", "QALoRA (use_qalora)"),
                      ("use_bdlora", "block-diagonal LoRA (use_bdlora)"),
                      ("megatron_config", "Megatron-parallel LoRA (megatron_config)")):
        if cfg.get(key):
            return f"it uses {what}, which lingoforge does not merge"
    return None


def read_settings(folder: Path | str) -> LoraSettings:
    """Parse and check ``adapter_config.json`` (peft_type must be LORA)."""
    f = Path(folder) / ADAPTER_CONFIG
    cfg = modelio.read_adapter_config(Path(folder))
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise MergeError(f"{f}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters "
                         "(peft_type LORA) can be merged")
    reason = _refusal(cfg)
    if reason is not None:
        raise MergeError(f"LoRA adapter {folder}: {reason}")
    try:
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
        settings = LoraSettings(
            r=r, lora_alpha=alpha, use_rslora=bool(cfg.get("use_rslora", False)),
            rank_pattern={str(k): int(v) for k, v in (cfg.get("rank_pattern") or {}).items()},
            alpha_pattern={str(k): float(v) for k, v in (cfg.get("alpha_pattern") or {}).items()},
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            target_modules=cfg.get("target_modules"),
            modules_to_save=list(cfg.get("modules_to_save") or []),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MergeError(f"{f}: invalid LoRA config ({type(exc).__name__}: {exc})") from None
    for key in [*settings.rank_pattern, *settings.alpha_pattern]:
        try:
            re.compile(key)
        except re.error as exc:
            raise MergeError(f"{f}: rank_pattern/alpha_pattern key {key!r} is not a regular "
                             f"expression ({exc})") from None
    ranks = [settings.r, *settings.rank_pattern.values()]
    if any(v <= 0 for v in ranks):
        raise MergeError(f"{f}: r must be positive (got {ranks})")
    return settings


# --- adapter_model.safetensors ------------------------------------------------------------


@dataclass(frozen=True)
class LoraDelta:
    """The LoRA delta on one base tensor ``target``: ``scaling · B @ A`` (transposed for
    embeddings and ``fan_in_fan_out``), or ``scaling · b`` for a LoRA bias (``a`` None)."""

    target: str
    module: str
    b: TensorInfo
    a: TensorInfo | None
    scaling: float
    transpose: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        if self.a is None:
            return self.b.shape
        out = (self.b.shape[0], self.a.shape[1])
        return out[::-1] if self.transpose else out


@dataclass
class LoraAdapter:
    """A checked PEFT LoRA adapter folder, described by headers only.

    ``deltas`` and ``replaced`` are keyed by the **base** tensor name they change;
    ``replaced`` maps to the adapter tensor that takes the base tensor's place.
    """

    folder: Path
    settings: LoraSettings
    tensors: dict[str, TensorInfo]
    deltas: dict[str, LoraDelta]
    replaced: dict[str, TensorInfo]

    def describe(self) -> str:
        return f"LoRA adapter {self.folder}"


def _split(name: str, folder: Path) -> tuple[str, str | None, str | None, str | None]:
    """``(base name or module, factor kind A/B or None, adapter name, weight|bias)`` of one
    adapter tensor name. For a non-factor tensor the first item is the base tensor name."""
    rest = name.removeprefix(_PREFIX)
    parts = rest.split(".")
    for part in parts:
        if part in _UNSUPPORTED_PARTS:
            raise MergeError(f"LoRA adapter {folder}: tensor {name!r} belongs to "
                             f"{_UNSUPPORTED_PARTS[part]}, which lingoforge does not merge")
    for i, part in enumerate(parts):
        if part in _FACTORS:
            module, tail = ".".join(parts[:i]), parts[i + 1:]
            embedding = part.startswith("lora_embedding")
            if embedding and len(tail) <= 1:
                return module, _FACTORS[part], (tail[0] if tail else None), "weight"
            if not embedding and tail and tail[-1] in ("weight", "bias") and len(tail) <= 2:
                return module, _FACTORS[part], (tail[0] if len(tail) == 2 else None), tail[-1]
            raise MergeError(f"LoRA adapter {folder}: cannot read tensor name {name!r} "
                             f"(expected <module>.{part}[.<adapter>]"
                             + ("" if embedding else ".weight") + ")")
    adapter = None
    if "modules_to_save" in parts:  # older PEFT: <module>.modules_to_save.<adapter>.<param>
        i = parts.index("modules_to_save")
        if i + 2 >= len(parts):
            raise MergeError(f"LoRA adapter {folder}: cannot read tensor name {name!r}")
        adapter = parts[i + 1]
        parts = parts[:i] + parts[i + 2:]
    parts = [p for p in parts if p != "base_layer"]  # PEFT's copy of a targeted embedding
    return ".".join(parts), None, adapter, None


def read_adapter(folder: Path | str) -> LoraAdapter:
    """Read and check an adapter folder from ``adapter_config.json`` and the safetensors
    header alone. Raises :class:`MergeError` naming the folder and the tensor."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MergeError(f"LoRA adapter folder {folder} does not exist")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p for p in _PICKLES if (folder / p).is_file()]
        if pickles:
            raise MergeError(f"LoRA adapter {folder}: only pickle weights ({pickles[0]}) found; "
                             "lingoforge never loads pickles. Save the adapter with safetensors "
                             "(PEFT's save_pretrained(..., safe_serialization=True), the default)")
        raise MergeError(f"LoRA adapter {folder}: no {ADAPTER_WEIGHTS}")
    settings = read_settings(folder)
    try:
        tensors = read_header(weights)
    except EngineError as exc:
        raise MergeError(f"LoRA adapter {folder}: {exc}") from None

    split = {name: _split(name, folder) for name in tensors}
    adapters = {adapter for _, _, adapter, _ in split.values() if adapter is not None}
    if len(adapters) > 1:
        raise MergeError(f"LoRA adapter {folder} holds several adapters ({sorted(adapters)}); "
                         "save each adapter in a folder of its own")
    factors: dict[tuple[str, str], dict[str, TensorInfo]] = {}
    replaced: dict[str, TensorInfo] = {}
    for name, info in tensors.items():
        module, kind, _, param = split[name]
        if kind is None:
            if module in replaced:
                raise MergeError(f"LoRA adapter {folder}: tensors {replaced[module].name!r} and "
                                 f"{name!r} both replace base tensor {module!r}")
            replaced[module] = info
            continue
        slot = factors.setdefault((module, param or "weight"), {})
        if kind in slot:
            raise MergeError(f"LoRA adapter {folder}: module {module!r} has lora_{kind} twice "
                             f"({slot[kind].name!r} and {name!r}); save one adapter per folder")
        slot[kind] = info

    deltas: dict[str, LoraDelta] = {}
    for (module, param), slot in factors.items():
        if param == "bias":  # lora_bias: B carries a bias, A none
            b = slot.get("B")
            if b is None or "A" in slot or len(b.shape) != 1:
                raise MergeError(f"LoRA adapter {folder}: module {module!r} has an unexpected "
                                 "LoRA bias (only lora_B may carry one, 1-D)")
            deltas[f"{module}.bias"] = LoraDelta(f"{module}.bias", module, b, None,
                                                 settings.scaling(module))
            continue
        missing = [k for k in ("A", "B") if k not in slot]
        if missing:
            raise MergeError(f"LoRA adapter {folder}: module {module!r} has no lora_{missing[0]} "
                             "tensor (a LoRA module needs both factors)")
        a, b = slot["A"], slot["B"]
        for info in (a, b):
            if len(info.shape) != 2:
                raise MergeError(f"LoRA adapter {folder}: tensor {info.name!r} has shape "
                                 f"{list(info.shape)}; only Linear and Embedding LoRA (2-D factors) "
                                 "can be merged")
            if not info.torch_dtype.is_floating_point:
                raise MergeError(f"LoRA adapter {folder}: tensor {info.name!r} is {info.dtype}, "
                                 "not floating point (quantised adapters cannot be merged)")
        embedding = "lora_embedding" in a.name
        rank = settings.rank(module)
        if a.shape[0] != rank or b.shape[1] != rank:
            raise MergeError(f"LoRA adapter {folder}: module {module!r} has factors of rank "
                             f"{a.shape[0]} (lora_A {list(a.shape)}, lora_B {list(b.shape)}) but "
                             f"{ADAPTER_CONFIG} gives it r={rank}")
        target = f"{module}.weight"
        deltas[target] = LoraDelta(target, module, b, a, settings.scaling(module),
                                   transpose=embedding or settings.fan_in_fan_out)
    if not deltas and not replaced:
        raise MergeError(f"LoRA adapter {folder}: {ADAPTER_WEIGHTS} holds no tensors")
    return LoraAdapter(folder, settings, tensors, deltas, replaced)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def trained_on(adapter: LoraAdapter) -> tuple[Path, str] | None:
    """The local base folder the adapter names, and where it is named: ``base_model`` in
    the folder's ``lingoforge.json`` (lingoforge's trainers write it), else
    ``base_model_name_or_path`` of ``adapter_config.json``; a relative path is taken
    relative to the adapter folder, as :mod:`engine.modelio` does. None when neither
    names an existing folder (a hub id, a folder of another machine)."""
    candidates: list[tuple[str, str]] = []
    meta = adapter.folder / _META_FILE
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text()).get("base_model")
        except (OSError, json.JSONDecodeError, AttributeError):
            recorded = None
        if isinstance(recorded, str) and recorded:
            candidates.append((recorded, f"base_model in {_META_FILE}"))
    named = adapter.settings.base_model_name_or_path
    if named:
        candidates.append((named, f"base_model_name_or_path in {ADAPTER_CONFIG}"))
    for value, source in candidates:
        path = Path(value).expanduser()
        path = path if path.is_absolute() else adapter.folder / path
        if path.is_dir() and not _same_folder(path, adapter.folder):
            return path, source
    return None


def check_adapter(adapter: LoraAdapter, label: str, base_label: str, base_path: Path,
                  base_tensors: Mapping[str, TensorInfo]) -> None:
    """Check ``adapter`` (recipe name ``label``) against the merge's base, headers only:
    every tensor it changes exists in the base with the shape of ``B @ A`` (or of the
    replacing tensor) and a floating-point dtype, and the base folder the adapter names
    (:func:`trained_on`), when it exists here, is the merge base's folder."""
    where = f"model {label!r} ({adapter.describe()})"
    named = trained_on(adapter)
    if named is not None and not _same_folder(named[0], base_path):
        raise MergeError(f"{where} was trained on {named[0]} ({named[1]}) but the merge base "
                         f"{base_label!r} is {base_path}; merge it onto the base it was trained on, "
                         f"or, if {base_path} is a copy of that model, edit {named[1]}")
    for target, delta in adapter.deltas.items():
        source = delta.b.name if delta.a is None else f"{delta.a.name} / {delta.b.name}"
        info = base_tensors.get(target)
        if info is None:
            raise MergeError(f"{where}: LoRA factors {source} change tensor {target!r}, which "
                             f"base {base_label!r} lacks (an adapter of another model?)")
        if delta.shape != info.shape:
            raise MergeError(f"{where}: LoRA factors {source} give tensor {target!r} a delta of "
                             f"shape {list(delta.shape)} but it has shape {list(info.shape)} in base "
                             f"{base_label!r} (an adapter of another model?)")
        if not info.torch_dtype.is_floating_point:
            raise MergeError(f"{where}: LoRA factors {source} change tensor {target!r}, which is "
                             f"{info.dtype} in base {base_label!r} (not floating point)")
    for target, own in adapter.replaced.items():
        info = base_tensors.get(target)
        if info is None:
            raise MergeError(f"{where}: tensor {own.name!r} would replace tensor {target!r}, which "
                             f"base {base_label!r} lacks")
        if own.shape != info.shape:
            raise MergeError(f"{where}: tensor {own.name!r} has shape {list(own.shape)} but "
                             f"{target!r} has {list(info.shape)} in base {base_label!r}; an adapter "
                             "merges onto its base's shapes and vocabulary (resized embeddings "
                             "cannot be merged)")
        if own.torch_dtype.is_floating_point != info.torch_dtype.is_floating_point:
            raise MergeError(f"{where}: tensor {own.name!r} is {own.dtype} but {target!r} is "
                             f"{info.dtype} in base {base_label!r}")


# --- reading ------------------------------------------------------------------------------


class LoraReader:
    """The adapter's version of every base tensor, one at a time, with :class:`ModelReader`'s
    interface (``get``, ``label``, ``close``, context manager): ``base + s · B @ A`` in
    float32 (float64 for a float64 base) for a tensor with a LoRA delta, the adapter's
    tensor for a replaced one (``modules_to_save``), the base tensor otherwise."""

    def __init__(self, adapter: LoraAdapter, label: str, base: MergeInput) -> None:
        self.adapter = adapter
        self.label = label
        self._base = ModelReader(base.path, base.name, base.tensors)
        self._own = ModelReader(adapter.folder, label, adapter.tensors)

    def _delta(self, delta: LoraDelta, dtype: torch.dtype) -> torch.Tensor:
        b = self._own.get(delta.b.name).to(dtype)
        if delta.a is None:
            return b * delta.scaling
        product = b @ self._own.get(delta.a.name).to(dtype)
        return (product.T if delta.transpose else product) * delta.scaling

    def _delta_rows(self, delta: LoraDelta, dtype: torch.dtype, start: int,
                    stop: int) -> torch.Tensor:
        b = self._own.get(delta.b.name).to(dtype)
        if delta.a is None:
            return b[start:stop] * delta.scaling
        a = self._own.get(delta.a.name).to(dtype)
        if delta.transpose:  # rows of (B @ A)ᵀ are columns of B @ A
            return (b @ a[:, start:stop]).T * delta.scaling
        return (b[start:stop] @ a) * delta.scaling

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` of the adapted model (see the class docstring)."""
        own = self.adapter.replaced.get(name)
        raw = self._own.get(own.name) if own is not None else self._base.get(name)
        delta = self.adapter.deltas.get(name)
        if delta is None:
            return raw
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return raw.to(dtype).add_(self._delta(delta, dtype))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of :meth:`get` ``(name)``, reading only those rows of the
        base (the engine merges huge tensors in row slices). The product is formed for
        those rows only, so it may differ from :meth:`get`'s in the last bit (the matrix
        product's summation order depends on its shape); equal slices give equal rows."""
        own = self.adapter.replaced.get(name)
        raw = (self._own.get_rows(own.name, start, stop) if own is not None
               else self._base.get_rows(name, start, stop))
        delta = self.adapter.deltas.get(name)
        if delta is None:
            return raw
        dtype = torch.promote_types(raw.dtype, torch.float32)
        return raw.to(dtype).add_(self._delta_rows(delta, dtype, start, stop))

    def close(self) -> None:
        self._base.close()
        self._own.close()

    def __enter__(self) -> LoraReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(m: MergeInput, base: MergeInput | None) -> ModelReader | LoraReader:
    """The reader for merge input ``m``: a :class:`LoraReader` on ``base`` for an adapter,
    a :class:`ModelReader` for a model folder."""
    adapter: LoraAdapter | None = getattr(m, "adapter", None)
    if adapter is None:
        return ModelReader(m.path, m.name, m.tensors)
    if base is None:
        raise MergeError(f"model {m.name!r} is a LoRA adapter ({m.path}); merging it needs a base")
    return LoraReader(adapter, m.name, base)
