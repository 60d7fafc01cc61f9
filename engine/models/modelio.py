"""Loading and saving Hugging Face model folders, safely.

Only safetensors weights are loaded (never pickles), ``trust_remote_code`` is off
unless the recipe turns it on, and every save goes to a temporary folder that is
renamed into place when complete, so a crash never leaves a folder that looks done.

A *LoRA adapter folder* (``adapter_config.json`` + ``adapter_model.safetensors``, no
``config.json``; written by ``ct``/``sft`` with ``lora.save: adapter``) stands for its
base model with the adapter applied: :func:`read_config` and
:func:`check_model_folder` answer for the base, and :func:`load_model` loads the base
and merges the adapter into it (peft). What an adapter folder is and how its base is
found is :mod:`engine.models.adapters` (its folder functions are re-exported here, as is
:mod:`engine.core.artifacts`'s ``lingoforge.json`` reading).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from engine.core.artifacts import META_FILE, read_meta, write_meta
from engine.core.errors import ModelLoadError
from engine.models import adapters, quantization
from engine.models.adapters import (  # re-exported: their home was this module
    ADAPTER_BASE_KEY,
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_base,
    check_adapter_folder,
    is_adapter_folder,
    read_adapter_config,
)
from engine.models.layout import weight_files
from engine.models.quantization import Quantization
from engine.models.safety import check_remote_code, check_safetensors_file

__all__ = [
    "ADAPTER_BASE_KEY", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "META_FILE", "adapter_base",
    "check_adapter_folder", "check_model_folder", "copy_tokenizer_files",
    "count_parameters", "import_architecture", "is_adapter_folder", "load_model",
    "load_tokenizer", "read_adapter_config", "read_config", "read_meta",
    "resolve_device", "resolve_dtype", "save_model", "save_updated_copy", "weight_files",
    "write_meta",
]

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` means the first CUDA device when one is present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU that supports it and float32 elsewhere."""
    if dtype == "auto":
        if device is not None and device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


def read_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, with an error that names the folder.

    For a LoRA adapter folder it is the config of the adapter's base model.
    """
    if is_adapter_folder(path):
        return read_config(adapter_base(path))
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg}: invalid JSON ({exc})") from None


def check_model_folder(path: Path) -> dict[str, Any]:
    """Check that a folder holds a loadable model; return its config.

    Every safetensors file's header is checked against the file (a truncated or
    inconsistent file is named before anything loads it; :mod:`engine.models.safety`).
    A LoRA adapter folder passes when the adapter is complete and its base model
    folder does; the config returned is the base's.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    if is_adapter_folder(path):
        check_adapter_folder(path)
        return check_model_folder(adapter_base(path))
    config = read_config(path)
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'}: expected a JSON object")
    for file in weight_files(path):
        check_safetensors_file(file)
    return config


def load_model(
    path: Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    int8_skip_modules: Sequence[str] | None = None,
    attention: str | None = None,
    quantize: Quantization | None = None,
) -> torch.nn.Module:
    """Load a causal LM from a folder, safetensors only.

    ``attention`` is the ``attn_implementation`` (``sdpa``, ``eager``,
    ``flash_attention_2``); None lets transformers choose (SDPA where the model class
    has it, else eager; :func:`engine.models.attention.resolve_attention` maps ``runtime.attention``).

    ``load_in_8bit`` quantises linear layers with bitsandbytes (LLM.int8); such a
    model is for reading (evaluation, frozen parts), not for training its quantised
    weights. ``int8_skip_modules`` (module name prefixes such as ``model.layers.3``)
    stay unquantised in ``dtype``, so they can train; the output head always does.
    ``quantize`` holds the decoder's linear layers in 4 bits (NF4/FP4, computing in
    ``dtype``) or 8 bits for a frozen base that LoRA trains on (QLoRA,
    :mod:`engine.models.quantization`); embeddings, norms and ``lm_head`` stay in ``dtype``.
    A LoRA adapter folder loads as its base with the adapter merged in. A folder
    whose config names custom code (``auto_map``) is refused unless
    ``trust_remote_code`` is on (:func:`engine.models.safety.check_remote_code`).
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_remote_code(path, trust_remote_code)
    if is_adapter_folder(path):
        if quantize is not None:
            raise ModelLoadError(f"{path}: a LoRA adapter folder cannot be loaded with {quantize.field} "
                                 "(its adapter would be merged into quantised weights); give a model "
                                 "folder with full weights (train the earlier stage with lora.save: merged)")
        return adapters.load_adapted(path, lambda base: load_model(
            base, dtype=dtype, device=device, load_in_8bit=load_in_8bit,
            trust_remote_code=trust_remote_code, int8_skip_modules=int8_skip_modules, attention=attention))
    check_model_folder(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = {
        "dtype": dt,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if quantize is not None:
        if not quantization.bitsandbytes_available():
            raise ModelLoadError(f"{quantize.field} needs bitsandbytes: {quantization.BNB_INSTALL_HINT}")
        kwargs["quantization_config"] = quantization.bnb_config(quantize, dt, tuple(int8_skip_modules or ()))
    elif load_in_8bit:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelLoadError(f"load_in_8bit needs bitsandbytes: {exc}") from None
        skip = None if int8_skip_modules is None else sorted({"lm_head", *int8_skip_modules})
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": str(dev) if dev.type == "cpu" else dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        hint = f" (runtime.attention {attention!r})" if attention is not None else ""
        raise ModelLoadError(f"{path}: could not load model{hint}: {exc}") from None
    if "quantization_config" not in kwargs:
        model.to(dev)
    return model


def import_architecture(path: Path) -> str | None:
    """Import the modelling code of the model in ``path`` ahead of time; returns the
    class name, or None when there is nothing to import here.

    transformers imports a model type's configuration and modelling modules lazily, on
    first use in a process (about 1.5 s for Llama on 2 CPU cores), so without this the
    first stage that loads a model is charged for it. Only built-in architectures are
    imported (for an adapter folder, its base's): a folder with custom code
    (``auto_map``) or an unknown model type is left to the stage that loads it, which
    reports any problem itself.
    """
    import transformers

    path = Path(path)
    try:
        config = read_config(path)
    except (ModelLoadError, OSError, ValueError):
        return None
    if "auto_map" in config or "model_type" not in config:
        return None
    try:
        config_class = transformers.CONFIG_MAPPING[config["model_type"]]
        return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[config_class].__name__
    except (KeyError, ImportError, AttributeError):
        return None


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a model; a pad token is set to EOS when missing.

    An adapter folder without tokenizer files uses its base model's tokenizer.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if is_adapter_folder(path) and not (path / "tokenizer_config.json").is_file():
        path = adapter_base(path)
    check_remote_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: could not load tokenizer: {exc}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def save_model(model: torch.nn.Module, tokenizer: Any, out_dir: Path, *,
               meta: dict[str, Any] | None = None, max_shard_size: str = "2GB") -> Path:
    """Write a loadable HF folder (config, safetensors shards, tokenizer) into ``out_dir``.

    ``out_dir`` is expected to be a stage's temporary output folder; the runner
    renames it into place.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    if meta:
        write_meta(out_dir, meta)
    return out_dir


def save_updated_copy(source: Path, out_dir: Path, updates: dict[str, torch.Tensor], *,
                      tokenizer: Any = None, meta: dict[str, Any] | None = None) -> Path:
    """Write ``source``'s model folder into ``out_dir`` with the tensors in ``updates`` replaced.

    Every other tensor is copied from ``source`` unchanged (shards untouched by
    ``updates`` are copied byte for byte), so a trainer whose frozen part was held
    in a lossy form (8-bit) still writes the frozen weights exactly as they were
    read. Shard names, the index and config.json are the source's; an updated
    tensor is cast to its source tensor's dtype and must have its shape.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = dict(updates)
    for file in weight_files(source):
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            keys = list(fh.keys())
            if not pending.keys() & set(keys):
                shutil.copyfile(file, out_dir / file.name)
                continue
            tensors: dict[str, torch.Tensor] = {}
            for key in keys:
                original = fh.get_tensor(key)
                new = pending.pop(key, None)
                if new is None:
                    tensors[key] = original
                    continue
                if tuple(new.shape) != tuple(original.shape):
                    raise ModelLoadError(f"{file}: tensor {key!r} has shape {tuple(original.shape)}, "
                                         f"its replacement {tuple(new.shape)}")
                tensors[key] = new.detach().to(device="cpu", dtype=original.dtype).contiguous()
            save_file(tensors, str(out_dir / file.name), metadata=fh.metadata() or {"format": "pt"})
    if pending:
        raise ModelLoadError(f"{source}: no tensor(s) {sorted(pending)[:6]} to replace")
    for name in ("config.json", "model.safetensors.index.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    else:
        copy_tokenizer_files(source, out_dir)
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out_dir / "generation_config.json")
    if meta:
        write_meta(out_dir, meta)
    return out_dir


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Carry tokenizer and generation files from one model folder to another."""
    for name in (
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
        "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
        "chat_template.jinja", "added_tokens.json",
    ):
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
