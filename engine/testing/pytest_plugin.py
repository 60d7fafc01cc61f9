"""pytest fixtures for plugin authors, registered by the ``pytest11`` entry point
``lingoforge`` (installed with the engine: nothing to add to a conftest.py).

Every fixture name starts with ``lingoforge_`` so that it never collides with a
project's own fixtures:

* ``lingoforge_tokenizer`` (session): the tiny byte-level BPE tokenizer, a
  ``transformers.PreTrainedTokenizerFast``;
* ``lingoforge_tiny_model`` (session): a 4-layer, hidden-32 Llama folder (read-only);
* ``lingoforge_model_family`` (session): ``{"base", "a", "b", "c"}`` -> folders of the same
  shape with different weights and one tokenizer (merge inputs; read-only);
* ``lingoforge_text_file``, ``lingoforge_instructions_file``, ``lingoforge_choice_file``:
  small data files of each format, in the test's ``tmp_path``;
* ``lingoforge_context``: a factory ``(stage_name="stage", stage_kind="adapt-language",
  plugin="test", **runtime) -> StageContext`` writing into ``tmp_path``;
* ``lingoforge_run_recipe``: :func:`engine.testing.run_recipe` with the workdir defaulting
  to ``tmp_path / "work"``;
* ``lingoforge_register``: ``register(plugin, name=None)`` registers a plugin module or
  object with the engine for this test only (unregistered after it).

Heavy imports (torch, transformers) happen inside the fixtures, so loading this plugin
costs a pytest run nothing: every engine import below sits inside a fixture for start-up
speed (pytest loads this plugin in every project that has lingoforge installed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from engine.run.context import StageContext


@pytest.fixture(scope="session")
def lingoforge_tokenizer(tmp_path_factory) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE tokenizer (:func:`engine.testing.build_tokenizer`: vocabulary
    about 320, ``<pad>``, ``<s>`` bos, ``</s>`` eos), shared by the session's models."""
    from engine.testing.builders import build_tokenizer  # start-up speed

    return build_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def lingoforge_tiny_model(tmp_path_factory, lingoforge_tokenizer) -> Path:
    """A 4-layer, hidden-32 Llama folder (:func:`engine.testing.build_tiny_llama`, seed 0,
    the session's tokenizer). Treat it as read-only."""
    from engine.testing.builders import build_tiny_llama  # start-up speed

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer=lingoforge_tokenizer)


@pytest.fixture(scope="session")
def lingoforge_model_family(tmp_path_factory, lingoforge_tokenizer) -> dict[str, Path]:
    """``{"base", "a", "b", "c"}`` -> folders of one shape with different weights (seeds 0
    to 3) and the session's tokenizer (:func:`engine.testing.build_family`; merge
    inputs). Treat them as read-only."""
    from engine.testing.builders import build_family  # start-up speed

    return build_family(tmp_path_factory.mktemp("family"), tokenizer=lingoforge_tokenizer)


@pytest.fixture
def lingoforge_text_file(tmp_path) -> Path:
    """A ``text`` data file, ``tmp_path/text.txt`` (:func:`engine.testing.write_text_file`)."""
    from engine.testing.builders import write_text_file  # start-up speed

    return write_text_file(tmp_path / "text.txt")


@pytest.fixture
def lingoforge_instructions_file(tmp_path) -> Path:
    """An ``instructions`` data file, ``tmp_path/sft.jsonl``
    (:func:`engine.testing.write_instructions_file`)."""
    from engine.testing.builders import write_instructions_file  # start-up speed

    return write_instructions_file(tmp_path / "sft.jsonl")


@pytest.fixture
def lingoforge_choice_file(tmp_path) -> Path:
    """A ``choice`` data file, ``tmp_path/choice.jsonl`` (:func:`engine.testing.write_choice_file`)."""
    from engine.testing.builders import write_choice_file  # start-up speed

    return write_choice_file(tmp_path / "choice.jsonl")


@pytest.fixture
def lingoforge_context(tmp_path) -> Callable[..., StageContext]:
    """``make(stage_name="stage", stage_kind="adapt-language", plugin="test", **runtime)
    -> StageContext`` writing into ``tmp_path/out-<stage_name>``, on the CPU
    (:func:`engine.testing.make_stage_context`; no runner needed)."""
    from engine.testing.builders import make_stage_context  # start-up speed

    def make(stage_name: str = "stage", stage_kind: str = "adapt-language", plugin: str = "test",
             **runtime: Any):
        return make_stage_context(tmp_path, stage_name, stage_kind, plugin, **runtime)

    return make


@pytest.fixture
def lingoforge_run_recipe(tmp_path) -> Callable[..., dict[str, Any]]:
    """``run(recipe, workdir=None, **kw) -> report``: :func:`engine.testing.run_recipe`
    into ``tmp_path / "work"`` unless a workdir is given."""
    from engine.testing.recipes import run_recipe  # start-up speed

    def run(recipe: Any, workdir: Path | None = None, **kwargs: Any) -> dict[str, Any]:
        return run_recipe(recipe, workdir if workdir is not None else tmp_path / "work", **kwargs)

    return run


@pytest.fixture
def lingoforge_register() -> Iterator[Callable[..., Any]]:
    """``register(plugin, name=None)``: register a plugin module or object with the engine's
    plugin manager for one test; every plugin registered this way is unregistered after it."""
    from engine.registry.manager import pm  # start-up speed

    names: list[str] = []

    def register(plugin: Any, name: str | None = None) -> Any:
        name = name or f"lingoforge-test-{getattr(plugin, '__name__', type(plugin).__name__)}"
        pm.register(plugin, name=name)
        names.append(name)
        return plugin

    try:
        yield register
    finally:
        for name in reversed(names):
            if pm.has_plugin(name):
                pm.unregister(name=name)
