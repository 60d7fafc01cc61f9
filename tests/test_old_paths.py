"""Old import paths: every module path that docs/, CHANGELOG.md or the API reference ever
showed still imports (for one minor release), through the one table in engine/__init__.py,
with a DeprecationWarning naming the new path (docs/architecture.md, "Old import paths")."""

from __future__ import annotations

import importlib
import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import engine
from engine import MOVED_MODULES, MOVED_NAMES, OLD_PATHS_REMOVED_IN

ROOT = Path(__file__).resolve().parents[1]

#: every module path the docs, the changelog and the API reference showed before the
#: packages (read from their git history when the table was made)
SHOWN_BEFORE = (
    "engine.adapters", "engine.answers", "engine.api", "engine.api.errors", "engine.api.evaluation",
    "engine.api.merging", "engine.api.models", "engine.api.training", "engine.arch",
    "engine.artifacts", "engine.batching", "engine.capabilities", "engine.cli_merge",
    "engine.cli_ops", "engine.console", "engine.context", "engine.coverage", "engine.distributed",
    "engine.errors", "engine.estimate", "engine.eval_cache", "engine.evaluation",
    "engine.generation", "engine.hookspecs", "engine.implementation", "engine.inputs",
    "engine.lora_training", "engine.merging", "engine.merging.arithmetic",
    "engine.merging.gradients", "engine.merging.method", "engine.merging.overrides",
    "engine.merging.params", "engine.merging.passthrough", "engine.merging.preflight",
    "engine.merging.streaming", "engine.merging.trims", "engine.model_card", "engine.modelio",
    "engine.outputs", "engine.packing", "engine.params", "engine.plugin_manager", "engine.recipe",
    "engine.report", "engine.resources", "engine.run_status", "engine.runner",
    "engine.runtime_spec", "engine.scoring", "engine.slow_paths", "engine.spans",
    "engine.stage_cache", "engine.stages", "engine.tasks", "engine.testing", "engine.testing._merge",
    "engine.testing._score", "engine.testing._train", "engine.testing.conformance",
    "engine.token_cache", "engine.tokenizer_extend", "engine.trainer_params", "engine.training",
    "engine.world", "engine.world.cache", "engine.world.pretrain",
)

#: names the docs show that no module holds, and why
NOT_NAMES = {
    "engine.plugins": "the entry-point group of plugin distributions, not a module",
    "engine.modelio.atomic_dir": "removed in 0.5 (the changelog says so: engine.outputs.publish)",
    "engine.plugin_manager.providers": "named by a changelog entry ahead of its code",
}


def _fresh_import(old: str):
    """Import ``old`` as a first import would (no cached module, no package attribute)."""
    sys.modules.pop(old, None)
    parent, _, leaf = old.rpartition(".")
    vars(sys.modules[parent]).pop(leaf, None)
    return importlib.import_module(old)


def test_every_module_path_shown_before_still_imports():
    aliased = [p for p in SHOWN_BEFORE if p in MOVED_MODULES]
    real = [p for p in SHOWN_BEFORE if p not in MOVED_MODULES and importlib.util.find_spec(p) is not None]
    assert sorted(real + aliased) == sorted(SHOWN_BEFORE), \
        f"neither a module nor in MOVED_MODULES: {sorted(set(SHOWN_BEFORE) - set(real) - set(aliased))}"
    assert set(MOVED_MODULES) <= set(SHOWN_BEFORE), "an alias for a path the docs never showed"


@pytest.mark.parametrize("old", sorted(MOVED_MODULES))
def test_an_old_module_path_warns_and_is_the_new_module(old):
    new = importlib.import_module(MOVED_MODULES[old])
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old} is deprecated: import {new.__name__}")) as seen:
        alias = _fresh_import(old)
    assert OLD_PATHS_REMOVED_IN in str(seen[0].message)
    assert seen[0].filename == __file__  # the warning points at the import, not the engine
    if not any(m == old for m, _ in MOVED_NAMES):
        assert alias is new  # the old path is the new module itself
    public = getattr(new, "__all__", None) or [n for n in vars(new) if not n.startswith("_")]
    for name in public:
        if (old, name) not in MOVED_NAMES:
            assert getattr(alias, name) is getattr(new, name), f"{old}.{name}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert getattr(engine, old.rpartition(".")[2]) is alias  # ``from engine import x`` too


@pytest.mark.parametrize("old, name", sorted(MOVED_NAMES))
def test_a_name_that_left_its_module_warns_and_is_found(old, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        alias = importlib.import_module(old)
    home = MOVED_NAMES[old, name]
    with pytest.warns(DeprecationWarning, match=re.escape(f"{old}.{name} is deprecated: import {name} "
                                                          f"from {home}")):
        found = getattr(alias, name)
    assert found is getattr(importlib.import_module(home), name)


def test_an_old_path_is_monkeypatched_where_the_name_lives():
    """Patching ``engine.modelio.load_model`` patches what the engine calls, and undoing the
    patch puts the engine's function back."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import engine.modelio as old
    from engine.models import modelio

    loader = modelio.load_model
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(old, "load_model", "patched")
        assert modelio.load_model == "patched"
    assert modelio.load_model is loader


def test_an_unknown_name_is_an_attribute_error_naming_both_paths():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import engine.tasks as old
    with pytest.raises(AttributeError, match=r"'engine.tasks' \(now engine.evaluation.choices\) has no "
                                             r"attribute 'no_such_name'"):
        _ = old.no_such_name
    with pytest.raises(AttributeError):
        _ = engine.no_such_module


def test_python_m_on_an_old_path_runs_the_new_module():
    result = subprocess.run([sys.executable, "-W", "always", "-m", "engine.cli_merge", "--help"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "--method" in result.stdout
    assert "engine.cli_merge is deprecated: run python -m engine.cli.merge" in result.stderr


def _shown_now() -> set[str]:
    texts = [p.read_text(encoding="utf-8") for p in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md",
                                                      ROOT / "CHANGELOG.md"]]
    return {m for t in texts for m in re.findall(r"\bengine(?:\.[A-Za-z_][A-Za-z0-9_]*)+", t)}


@pytest.mark.parametrize("path", sorted(_shown_now()))
def test_every_path_the_docs_show_resolves(path):
    """What docs/, the README and the changelog name (a module or a name in one) exists,
    through the old paths where it moved."""
    if path in NOT_NAMES:
        return
    parts = path.split(".")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                obj = getattr(obj, attr)  # AttributeError: the docs name what does not exist
            return
    pytest.fail(f"{path}: no such module")
