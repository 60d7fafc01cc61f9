"""The built-in tiny multilingual world: data, tokenizer and base model for demos.

Four languages state the same facts about sixty-four animals: English (``en``, the
source language, whose instructions the low-resource recipes use) and three invented
languages, ``vel``, ``dor`` and ``lum``; ``lum`` is the low-resource target (a small
raw-text split, little of it in the base model's pretraining). The data is generated
deterministically at first use; the base model ships with the package, built once
from this code (``engine/world/shipped-models/``), and is copied next to the data at first
use. Both are cached under :func:`cache_dir`, so recipes and tests run without
downloading or pretraining anything. See docs/world.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from engine.core.errors import DataError, ModelLoadError
from engine.world.cache import (
    WORLD_VERSION,
    cache_dir,
    ensure_built,
    install_shipped,
    shipped_problem,
    world_dir,
)
from engine.world.corpus import SOURCE_LANGUAGE, TARGET_LANGUAGE, data_names, write_data
from engine.world.lexicon import LANGUAGES

__all__ = [
    "BUILTIN_DATA", "BUILTIN_MODELS", "LANGUAGES", "SOURCE_LANGUAGE", "TARGET_LANGUAGE",
    "WORLD_VERSION", "cache_dir", "data_dir", "data_path", "model_config", "model_path",
    "world_dir",
]

#: every name :func:`data_path` accepts, e.g. ``"lum/train.txt"``
BUILTIN_DATA: tuple[str, ...] = data_names()
#: every name :func:`model_path` accepts
BUILTIN_MODELS: tuple[str, ...] = ("tiny-base",)


def data_dir(*, rebuild: bool = False) -> Path:
    """The folder holding every built-in data file (generated in well under a second
    when missing; ``rebuild`` regenerates it)."""
    return ensure_built(world_dir() / "data", write_data, force=rebuild)


def data_path(name: str) -> Path:
    """Absolute path of a built-in data file, generating the data when missing."""
    if name not in BUILTIN_DATA:
        raise DataError(f"unknown built-in data {name!r}; valid names: {', '.join(BUILTIN_DATA)}")
    path = data_dir() / name
    if not path.is_file():  # someone removed a file from the cache: regenerate it all
        path = data_dir(rebuild=True) / name
    return path


def _check_model_name(name: str) -> None:
    if name not in BUILTIN_MODELS:
        raise ModelLoadError(
            f"unknown built-in model {name!r}; valid names: {', '.join(BUILTIN_MODELS)}")


#: printed to stderr before the base model is pretrained on this machine
_BUILD_MESSAGE = ("building the built-in tiny world: pretraining tiny-base on this machine "
                 "(its time on one machine is in docs/benchmarks.md)...")


def _build_model(folder: Path) -> None:
    """Train the tokenizer and pretrain the base model into ``folder`` (minutes)."""
    from transformers.utils import logging as hf_logging

    # imported here for start-up speed: the pretraining code imports torch, which reading
    # the built-in data (every recipe that names it) never needs
    from engine.world.pretrain import build_base_model

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        build_base_model(folder)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _install_model(folder: Path) -> None:
    """The shipped build of the base model copied into ``folder``; pretrained here
    instead when this installation ships none or a damaged one (said on stderr)."""
    problem = shipped_problem("tiny-base")
    if problem is None:
        install_shipped("tiny-base", folder)
        return
    print(f"built-in world: {problem}", file=sys.stderr, flush=True)
    print(_BUILD_MESSAGE, file=sys.stderr, flush=True)
    _build_model(folder)


def model_path(name: str, *, rebuild: bool = False) -> Path:
    """A Hugging Face folder of a built-in model in the world cache. Its first use copies
    in the build the package ships (well under a second); ``rebuild`` pretrains it on
    this machine instead (minutes, see docs/benchmarks.md). Later calls return at once."""
    _check_model_name(name)
    final = world_dir() / "models" / name
    complete = (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    data_dir()
    return ensure_built(
        final, _build_model if rebuild else _install_model,
        force=rebuild or (final.is_dir() and not complete),
        message=_BUILD_MESSAGE if rebuild else None,
    )


def model_config(name: str) -> dict[str, Any]:
    """config.json of a built-in model, without building it (read from the folder when
    it exists, else computed from the architecture the build uses)."""
    _check_model_name(name)
    # imported here for start-up speed: the architecture is read without the torch import
    # the pretraining module carries
    from engine.world.pretrain import config_dict

    config = world_dir() / "models" / name / "config.json"
    return json.loads(config.read_text()) if config.is_file() else config_dict()
