"""A test kit for plugin authors, installed with the engine.

* builders of tiny in-process models, tokenizers, data files and stage contexts
  (:mod:`engine.testing.builders`; nothing is downloaded);
* :func:`run_recipe`: run a recipe through the real runner, in-process;
* pytest fixtures (:mod:`engine.testing.pytest_plugin`, registered as the pytest plugin
  ``lingoforge``): ``lingoforge_tiny_model``, ``lingoforge_model_family``,
  ``lingoforge_context``, ``lingoforge_run_recipe``, ``lingoforge_register``, ...;
* the conformance suite (:mod:`engine.testing.conformance`): ``check_plugin(impl, kind)``
  raises an ``AssertionError`` naming the plugin and the property it broke.

It is part of the engine (it may use engine internals); plugins keep importing only
``engine.api*``, and their tests import this.

The names below are imported on first use (PEP 562): pytest loads the ``lingoforge``
plugin in every project that has lingoforge installed, and importing this package must
not import torch for a test session that never uses a fixture.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_WHERE: dict[str, str] = {
    "build_family": "engine.testing.builders",
    "build_tiny_llama": "engine.testing.builders",
    "build_tokenizer": "engine.testing.builders",
    "check_aligner": "engine.testing.conformance",
    "check_embedding_init": "engine.testing.conformance",
    "check_evaluator": "engine.testing.conformance",
    "check_layer_selector": "engine.testing.conformance",
    "check_merge_method": "engine.testing.conformance",
    "check_options": "engine.testing.conformance",
    "check_params": "engine.testing.conformance",
    "check_plugin": "engine.testing.conformance",
    "check_trainer": "engine.testing.conformance",
    "ConformanceError": "engine.testing.conformance",
    "ConformanceReport": "engine.testing.conformance",
    "FAMILY_NAMES": "engine.testing.builders",
    "family_names": "engine.testing.builders",
    "make_stage_context": "engine.testing.builders",
    "run_recipe": "engine.testing.recipes",
    "saved_activation_bytes": "engine.testing.memory",
    "shared_family": "engine.testing.builders",
    "TINY_TEXT": "engine.testing.builders",
    "write_choice_file": "engine.testing.builders",
    "write_instructions_file": "engine.testing.builders",
    "write_text_file": "engine.testing.builders",
}

__all__ = [
    "FAMILY_NAMES", "TINY_TEXT", "ConformanceError", "ConformanceReport", "build_family",
    "build_tiny_llama", "build_tokenizer", "check_aligner", "check_embedding_init", "check_evaluator",
    "check_layer_selector", "check_merge_method", "check_options", "check_params", "check_plugin",
    "check_trainer", "family_names", "make_stage_context", "run_recipe", "saved_activation_bytes", "shared_family", "write_choice_file",
    "write_instructions_file", "write_text_file",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
