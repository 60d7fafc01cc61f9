"""``engine plugins``: descriptions, and implementations whose optional dependency is
missing (engine/registry/info.py), on the real registry."""

from __future__ import annotations

import importlib.machinery
import json

import pytest

from engine.api import LayerSelection, PluginParams, hookimpl
from engine.cli.commands import main
from engine.registry import manager as plugin_manager
from engine.registry.implementation import requirement_hint
from engine.registry.info import description, missing_requirements, plugins_info

MISSING = "lingoforge_no_such_module_xyz"


class NeedsFancy:
    """Select layers with a package that is not installed."""

    name = "fancy-select"
    requires = (MISSING, "json")
    extra = "fancy"
    Params = PluginParams

    def run(self, context, inputs, params):  # pragma: no cover - never run
        return LayerSelection(context.stage_name, [0], 1, "")


class Undocumented:  # no class docstring: the module docstring's first line describes it
    name = "undocumented-select"
    Params = PluginParams

    def run(self, context, inputs, params):  # pragma: no cover - never run
        raise AssertionError


class _FancyPlugin:
    @hookimpl
    def register_layer_selectors(self, register):
        register(NeedsFancy())
        register(Undocumented())


@pytest.fixture
def fancy(monkeypatch):
    plugin_manager.pm.register(_FancyPlugin(), name="lf-fancy-plugin")
    try:
        yield
    finally:
        plugin_manager.pm.unregister(name="lf-fancy-plugin")


def _impl(rows, plugin, name):
    row = next(r for r in rows if r["name"] == plugin)
    return next(i for items in row["registers"].values() for i in items if i["name"] == name)


def test_missing_requirement_is_found_without_importing_and_named(fancy, monkeypatch):
    assert missing_requirements(NeedsFancy()) == [MISSING]
    # a plugin registered in-process has no distribution: the hint names the module
    assert requirement_hint(NeedsFancy()) == f"needs module(s) {MISSING} (not installed)"
    monkeypatch.setitem(plugin_manager._distributions, "lf-fancy-plugin", "lf-fancy")
    item = _impl(plugins_info(), "lf-fancy-plugin", "fancy-select")
    assert item == {"name": "fancy-select",
                    "description": "Select layers with a package that is not installed.",
                    "requires": [MISSING, "json"], "missing": [MISSING],
                    "needs": "needs extra lf-fancy[fancy]: pip install 'lf-fancy[fancy]'"}
    # nothing declared: no requirement fields; the module docstring describes it
    assert _impl(plugins_info(), "lf-fancy-plugin", "undocumented-select") == {
        "name": "undocumented-select", "description": "``engine plugins``: descriptions, and "
                                                      "implementations whose optional dependency is"}


def test_plugins_table_shows_descriptions_and_the_missing_extra(fancy, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "250")
    real = importlib.machinery.PathFinder.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if "evaluate lm-eval: lm-evaluation-harness" in line)
    assert "needs extra lingoforge[lm-eval]: pip install 'lingoforge[lm-eval]'" in lines[at + 1]
    assert "merge ties: TIES merging" in out
    assert "select-layers fancy-select: Select layers with a package that is not installed." in out

    assert main(["plugins", "--json"]) == 0
    item = _impl(json.loads(capsys.readouterr().out), "engine_plugins.lm_eval", "lm-eval")
    assert item["missing"] == ["lm_eval"]
    assert item["needs"] == "needs extra lingoforge[lm-eval]: pip install 'lingoforge[lm-eval]'"


def test_installed_requirement_is_not_flagged(capsys):
    pytest.importorskip("lm_eval")
    assert main(["plugins", "--json"]) == 0
    item = _impl(json.loads(capsys.readouterr().out), "engine_plugins.lm_eval", "lm-eval")
    assert item["requires"] == ["lm_eval"] and item["missing"] == [] and item["needs"] is None


def test_validate_warns_about_a_missing_requirement(fancy, tiny_model, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodels:\n  base: {{path: {tiny_model}}}\nstages:\n"
                      "  - {name: pick, stage: select-layers, plugin: fancy-select, model: base}\n")
    assert main(["validate", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {recipe}: stage 'pick': plugin 'fancy-select' needs module(s) {MISSING}" in err


def test_description_falls_back_to_the_class_then_the_module_docstring():
    class Described:
        description = "Own line.\nsecond line"

    assert description(Described()) == "Own line."
    assert description(NeedsFancy()) == "Select layers with a package that is not installed."
