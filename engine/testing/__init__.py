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
"""

from engine.testing.builders import (
    FAMILY_NAMES,
    TINY_TEXT,
    build_family,
    build_tiny_llama,
    build_tokenizer,
    make_stage_context,
    shared_family,
    write_choice_file,
    write_instructions_file,
    write_text_file,
)
from engine.testing.conformance import (
    ConformanceError,
    ConformanceReport,
    check_aligner,
    check_evaluator,
    check_layer_selector,
    check_merge_method,
    check_params,
    check_plugin,
    check_trainer,
)
from engine.testing.recipes import run_recipe

__all__ = [
    "FAMILY_NAMES", "TINY_TEXT", "ConformanceError", "ConformanceReport", "build_family",
    "build_tiny_llama", "build_tokenizer", "check_aligner", "check_evaluator",
    "check_layer_selector", "check_merge_method", "check_params", "check_plugin", "check_trainer",
    "make_stage_context", "run_recipe", "shared_family", "write_choice_file",
    "write_instructions_file", "write_text_file",
]
