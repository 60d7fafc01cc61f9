"""Loading and saving Hugging Face model folders, safely.

Only safetensors weights are loaded (never pickles), ``trust_remote_code`` is off
unless the recipe turns it on, and every save goes to a temporary folder that is
renamed into place when complete, so a crash never leaves a folder that looks done.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError

META_FILE = "lingoforge.json"

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
    """config.json of a model folder, with an error that names the folder."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{path}: not a model folder (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{cfg}: invalid JSON ({exc})") from None


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model folder (from the index when sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index}: invalid safetensors index ({exc})") from None
        files = [path / s for s in shards]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shard(s) named in the index are missing: {missing}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise ModelLoadError(
            f"{path}: only pickle weights (.bin/.pt) found; lingoforge loads safetensors only. "
            "Convert the model to safetensors with a tool you trust."
        )
    raise ModelLoadError(f"{path}: no model.safetensors or model.safetensors.index.json")


def check_model_folder(path: Path) -> dict[str, Any]:
    """Check that a folder holds a loadable model; return its config."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    config = read_config(path)
    weight_files(path)
    return config


def load_model(
    path: Path,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a causal LM from a folder, safetensors only.

    ``load_in_8bit`` quantises linear layers with bitsandbytes; such a model is for
    reading (evaluation, frozen parts), not for training its quantised weights.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    check_model_folder(path)
    dev = resolve_device(device) if isinstance(device, str) else device
    dt = resolve_dtype(dtype, dev) if isinstance(dtype, str) else dtype
    kwargs: dict[str, Any] = {
        "dtype": dt,
        "use_safetensors": True,
        "trust_remote_code": trust_remote_code,
    }
    if load_in_8bit:
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ModelLoadError(f"load_in_8bit needs bitsandbytes: {exc}") from None
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": str(dev) if dev.type == "cpu" else dev.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: could not load model: {exc}") from None
    if not load_in_8bit:
        model.to(dev)
    return model


def load_tokenizer(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved beside a model; a pad token is set to EOS when missing."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: could not load tokenizer: {exc}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


@contextmanager
def atomic_dir(final: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it into place on success.

    On error the temporary folder is removed and ``final`` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} exists (pass overwrite to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place, replacing an older one.

    The old folder is first renamed aside, so ``final`` is always either the old or
    the new complete folder, never a mix of the two.
    """
    if final.exists():
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


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


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_meta(folder: Path) -> dict[str, Any]:
    """lingoforge's own facts about a model folder (empty when absent)."""
    f = Path(folder) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


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
