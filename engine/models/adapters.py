"""PEFT LoRA adapter folders: the one place that knows their layout and arithmetic.

Long module: all knowledge of adapter folders is kept in this one module (it was once
written twice, in modelio and merging/lora); about half of it is :func:`read_adapter`,
mapping PEFT's tensor names onto base tensors with a refusal for each layout lingoforge
does not merge.

An *adapter folder* holds ``adapter_config.json`` and ``adapter_model.safetensors`` and
no ``config.json`` of its own (written by PEFT's ``save_pretrained``, or by ``ct``/``sft``
with ``lora.save: adapter``). It stands for its base model with the adapter applied:

* **detecting** one: :func:`is_adapter_folder`;
* **its config**: :func:`read_adapter_config` (the raw JSON), :func:`read_settings` (what
  it says about the arithmetic, checked to be a plain LoRA that merges as ``W + s·B@A``);
* **its weights**: :func:`check_adapter_folder` (safetensors present and sound, for
  loading it) and :func:`read_adapter` (every tensor mapped onto the base tensor it
  changes, from the safetensors header alone, for merging it);
* **its base**: the folder named in the adapter's ``lingoforge.json``
  (:data:`ADAPTER_BASE_KEY`), else ``base_model_name_or_path`` of ``adapter_config.json``
  when that is a local folder (relative paths are relative to the adapter folder):
  :func:`adapter_base` (must exist; adapters on adapters are followed) and
  :func:`trained_on` (None when not found here);
* **its delta**, per base tensor, as PEFT's ``merge_and_unload`` applies it
  (:func:`delta`, :func:`delta_rows`): a LoRA-adapted linear weight ``W`` becomes
  ``W + s · B @ A`` (``(B @ A)ᵀ`` for ``fan_in_fan_out`` layers such as GPT-2's
  ``Conv1D``), an adapted embedding ``E + s · (B @ A)ᵀ`` (``lora_embedding_A``/``_B``), a
  LoRA bias (``lora_bias``) adds ``s · b`` to the layer's bias; ``s = lora_alpha / r``,
  or ``lora_alpha / sqrt(r)`` with ``use_rslora``, ``r`` and ``lora_alpha`` per module
  from ``rank_pattern``/``alpha_pattern`` (a key matches a module whose dotted name ends
  with it, as in PEFT). Any other tensor the adapter holds (``modules_to_save``, trained
  biases) **replaces** the base tensor of that name;
* **loading** it as a model: :func:`load_adapted` (peft merges it into its loaded base;
  :func:`engine.models.modelio.load_model` does this for an adapter folder).

Pickled ``adapter_model.bin`` files are never loaded. Adapters that do not reduce to
``W + s · B @ A`` on the plain base (DoRA, PiSSA/OLoRA/CorDA/LoftQ initialisations, layer
replication, trainable tokens, activated LoRA, non-LoRA PEFT types, convolution LoRA) are
refused by :func:`read_settings`/:func:`read_adapter` with the reason. The merge side
(checking an adapter against a merge's base, reading adapted tensors) is
:mod:`engine.merging.lora`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.artifacts import META_FILE, read_meta
from engine.core.errors import EngineError, MergeError, ModelLoadError
from engine.models.layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    TensorInfo,
    is_adapter_folder,
    read_header,
)
from engine.models.safety import check_safetensors_file

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_BASE_KEY", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraAdapter", "LoraDelta",
    "LoraSettings", "adapter_base", "check_adapter_folder", "delta", "delta_rows",
    "is_adapter_folder", "load_adapted", "read_adapter", "read_adapter_config", "read_settings",
    "trained_on",
]

#: lingoforge.json key of an adapter folder that names its base model folder
ADAPTER_BASE_KEY = "base_model"
#: adapters stacked on adapters are followed at most this deep (a cycle is an error)
MAX_ADAPTER_DEPTH = 8
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


def read_adapter_config(path: Path | str) -> dict[str, Any]:
    """adapter_config.json of an adapter folder, checked to be a JSON object."""
    f = Path(path) / ADAPTER_CONFIG
    try:
        data = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{f}: unreadable adapter config ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{f}: expected a JSON object")
    return data


def check_adapter_folder(path: Path | str) -> dict[str, Any]:
    """Check an adapter folder holds safetensors adapter weights; return its adapter config."""
    path = Path(path)
    config = read_adapter_config(path)
    if not (path / ADAPTER_WEIGHTS).is_file():
        if (path / "adapter_model.bin").is_file():
            raise ModelLoadError(f"{path}: only pickle adapter weights (adapter_model.bin) found; "
                                 f"lingoforge loads safetensors only ({ADAPTER_WEIGHTS})")
        raise ModelLoadError(f"{path}: adapter folder without {ADAPTER_WEIGHTS}")
    check_safetensors_file(path / ADAPTER_WEIGHTS)
    return config


# --- the base model ---------------------------------------------------------------------------


def _base_candidates(recorded: Any, named: Any) -> list[tuple[str, str]]:
    """(path, where it is named) of the base an adapter names: ``lingoforge.json`` first."""
    out: list[tuple[str, str]] = []
    if isinstance(recorded, str) and recorded:
        out.append((recorded, f"{ADAPTER_BASE_KEY} in {META_FILE}"))
    if isinstance(named, str) and named and named not in [c for c, _ in out]:
        out.append((named, f"base_model_name_or_path in {ADAPTER_CONFIG}"))
    return out


def _local(value: str, folder: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def adapter_base(path: Path, _depth: int = 0) -> Path:
    """The base model folder of an adapter folder (see the module docstring); raises
    :class:`ModelLoadError` saying what was tried when it is not found."""
    path = Path(path)
    if _depth > MAX_ADAPTER_DEPTH:
        raise ModelLoadError(f"{path}: adapters name each other as base more than "
                             f"{MAX_ADAPTER_DEPTH} deep (a cycle?)")
    candidates = _base_candidates(read_meta(path).get(ADAPTER_BASE_KEY),
                                  read_adapter_config(path).get("base_model_name_or_path"))
    for candidate, _ in candidates:
        base = _local(candidate, path)
        if base.is_dir() and base.resolve() != path.resolve():
            if is_adapter_folder(base):
                adapter_base(base, _depth + 1)  # the chain must end in a model folder
            return base
    tried = ", ".join(repr(c) for c, _ in candidates) or "none recorded"
    raise ModelLoadError(
        f"{path}: the base model of this LoRA adapter was not found (tried {tried}; from "
        f"{META_FILE} '{ADAPTER_BASE_KEY}' and {ADAPTER_CONFIG} 'base_model_name_or_path'). "
        f"Put the base model folder back, or set '{ADAPTER_BASE_KEY}' in {path / META_FILE} "
        "to its path")


def trained_on(adapter: LoraAdapter) -> tuple[Path, str] | None:
    """The local base folder a read adapter names, and where it is named (as
    :func:`adapter_base` looks, but an unreadable ``lingoforge.json`` is skipped). None
    when neither names an existing folder (a hub id, a folder of another machine)."""
    try:
        recorded = read_meta(adapter.folder).get(ADAPTER_BASE_KEY)
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = None
    for value, source in _base_candidates(recorded, adapter.settings.base_model_name_or_path):
        path = _local(value, adapter.folder)
        if path.is_dir() and not _same_folder(path, adapter.folder):
            return path, source
    return None


def load_adapted(path: Path, load_base: Callable[[Path], torch.nn.Module]) -> torch.nn.Module:
    """The adapter's base model, loaded with ``load_base``, with the adapter merged in
    (peft's ``merge_and_unload``). The folder and peft are checked before the base loads."""
    path = Path(path)
    check_adapter_folder(path)
    base = adapter_base(path)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError(f"{path} is a LoRA adapter folder; loading it needs peft: "
                             "install lingoforge[lora]") from None
    model = load_base(base)
    device = next(model.parameters()).device
    try:
        wrapped = PeftModel.from_pretrained(model, str(path), is_trainable=False,
                                            torch_device=str(device))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{path}: could not apply the LoRA adapter to {base}: {exc}") from None
    merged = wrapped.merge_and_unload()
    merged.eval()
    return merged


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
    cfg = read_adapter_config(Path(folder))
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


# --- the delta --------------------------------------------------------------------------------


def delta(d: LoraDelta, get: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``s · B @ A`` of one base tensor (transposed for embeddings and ``fan_in_fan_out``;
    ``s · b`` for a LoRA bias) in ``dtype``; ``get`` reads an adapter tensor by name."""
    b = get(d.b.name).to(dtype)
    if d.a is None:
        return b * d.scaling
    product = b @ get(d.a.name).to(dtype)
    return (product.T if d.transpose else product) * d.scaling


def delta_rows(d: LoraDelta, get: Callable[[str], torch.Tensor], dtype: torch.dtype, start: int,
               stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of :func:`delta`, the product formed for those rows only."""
    b = get(d.b.name).to(dtype)
    if d.a is None:
        return b[start:stop] * d.scaling
    a = get(d.a.name).to(dtype)
    if d.transpose:  # rows of (B @ A)ᵀ are columns of B @ A
        return (b @ a[:, start:stop]).T * d.scaling
    return (b[start:stop] @ a) * d.scaling
