"""Shared fixtures: tiny models and tokenizers built in-process (nothing is downloaded)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

import engine.testing as _testing


def pytest_configure(config):
    """Per test process (the suite runs on pytest-xdist workers, docs/development.md):

    - SIGINT handled again where the process was started with it ignored (a background job
      of a non-interactive shell is; an ignored signal stays ignored through fork and exec,
      and a Python started so never raises KeyboardInterrupt), so that the engine runs the
      tests start and interrupt with SIGINT stop as they would at a terminal;
    - on a worker, the processes the tests start (``engine run``, torchrun, scripts) get
      this worker's share of the cores as torch's default thread count: a second worker
      busy on the other core would otherwise make their OpenMP threads wait on each other.
    """
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if os.environ.get("PYTEST_XDIST_WORKER") and workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // workers))


def pytest_collection_modifyitems(config, items):
    """The slow end-to-end tests (marked ``slow``) first, half of them at the head of each
    half of the collection: pytest-xdist's worksteal scheduler gives each of the two workers
    one contiguous half and lets an idle worker take the *end* of the other's queue, so a
    slow test left near the end ran alone while the other worker idled (a minute and more
    of the suite's wall time). Only the order changes; every test still runs."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    rest = [item for item in items if not item.get_closest_marker("slow")]
    half = len(rest) // 2
    items[:] = slow[0::2] + rest[:half] + slow[1::2] + rest[half:]


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test runs torch single-threaded: the models and tensors here are tiny, so
    intra-op threads only add overhead (and stall on shared cores), and one thread gives
    one reduction order, so results that tests compare bitwise stay reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def _own_token_cache(tmp_path_factory):
    """Token-cache entries the suite builds go to a folder of its own (subprocesses inherit
    the variable), not into the user's cache; the built-in world's cache stays shared."""
    before = os.environ.get("LINGOFORGE_TOKEN_CACHE")
    os.environ["LINGOFORGE_TOKEN_CACHE"] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if before is None:
        os.environ.pop("LINGOFORGE_TOKEN_CACHE", None)
    else:
        os.environ["LINGOFORGE_TOKEN_CACHE"] = before


# The builders and fixtures live in engine.testing (installed with the engine, its pytest
# plugin registered as ``lingoforge``); the names below are the suite's own spellings of them.
# Other test modules import TINY_TEXT, build_tokenizer and build_tiny_llama from here.
TINY_TEXT = _testing.TINY_TEXT
build_tokenizer = _testing.build_tokenizer
build_tiny_llama = _testing.build_tiny_llama


@pytest.fixture(scope="session")
def tiny_tokenizer(lingoforge_tokenizer):
    return lingoforge_tokenizer


@pytest.fixture(scope="session")
def tiny_model(lingoforge_tiny_model) -> Path:
    """A 4-layer hidden-32 Llama folder. Treat it as read-only."""
    return lingoforge_tiny_model


@pytest.fixture(scope="session")
def tiny_model_family(lingoforge_model_family) -> dict[str, Path]:
    """A base and three models of the same shape with different weights (merge inputs)."""
    return lingoforge_model_family


@pytest.fixture
def text_file(lingoforge_text_file) -> Path:
    return lingoforge_text_file


@pytest.fixture
def instructions_file(lingoforge_instructions_file) -> Path:
    return lingoforge_instructions_file


@pytest.fixture
def choice_file(lingoforge_choice_file) -> Path:
    return lingoforge_choice_file


@pytest.fixture
def make_context(lingoforge_context):
    """Build a StageContext writing into a fresh folder (no runner needed):
    ``make(stage_name="stage", stage_kind="adapt-language", plugin="test", **runtime)``."""
    return lingoforge_context


@pytest.fixture
def test_plugin():
    """Register tests/engine_test_plugin.py for one test, then unregister it."""
    import engine_test_plugin

    from engine.registry.manager import pm

    pm.register(engine_test_plugin, name="engine-test-plugin")
    try:
        yield engine_test_plugin
    finally:
        pm.unregister(name="engine-test-plugin")
