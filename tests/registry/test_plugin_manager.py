"""Hook registration: built-ins and third-party plugins go through the same path."""

from __future__ import annotations

import pytest

from engine.api import PluginParams, hookimpl
from engine.core.errors import PluginError
from engine.registry import manager as plugin_manager
from engine.registry.info import plugins_info
from engine.registry.manager import clash_warning, get_implementation, implementations, pm


def test_test_plugin_registers_per_stage(test_plugin):
    impls = implementations()
    assert impls["adapt-language"]["copy-model"].plugin == "engine-test-plugin"
    assert impls["select-layers"]["all-layers"].impl.name == "all-layers"
    assert "line-count" in impls["evaluate"]


def test_unregister_removes_implementations(test_plugin):
    pm.unregister(name="engine-test-plugin")
    try:
        assert "copy-model" not in implementations()["adapt-language"]
    finally:
        pm.register(test_plugin, name="engine-test-plugin")


def test_unknown_plugin_error_lists_alternatives(test_plugin):
    with pytest.raises(PluginError, match=r"no adapt-language plugin named 'nope'.*copy-model"):
        get_implementation("adapt-language", "nope")
    with pytest.raises(PluginError, match="unknown stage kind"):
        get_implementation("finetune", "x")


class _BadParams:
    name = "bad"
    Params = dict  # not a PluginParams subclass

    def run(self, context, inputs, params):  # pragma: no cover - never run
        raise AssertionError


class _BrokenPlugin:
    @hookimpl
    def register_merge_methods(self, register):
        register(_BadParams())


class _RaisingPlugin:
    @hookimpl
    def register_evaluators(self, register):
        raise RuntimeError("boom in register")


@pytest.mark.parametrize(("plugin", "message"), [
    (_BrokenPlugin(), "Params must subclass"),
    (_RaisingPlugin(), "boom in register"),
])
def test_broken_plugin_is_reported_by_name_not_fatal(test_plugin, plugin, message):
    pm.register(plugin, name="broken-one")
    try:
        impls = implementations()  # does not raise
        assert "copy-model" in impls["adapt-language"]
        broken = {b.name: b.error for b in plugin_manager.broken_plugins()}
        assert message in broken["broken-one"]
        row = next(r for r in plugins_info() if r["name"] == "broken-one")
        assert message in row["broken"]
    finally:
        pm.unregister(name="broken-one")
        plugin_manager._broken.pop("broken-one", None)


class _Dup:
    """Another copy-model."""

    name = "copy-model"
    Params = PluginParams

    def run(self, context, inputs, params):  # pragma: no cover
        raise AssertionError


class _DupPlugin:
    @hookimpl
    def register_language_adapters(self, register):
        register(_Dup())


def test_a_duplicate_name_is_a_clash_ranked_by_qualified_name_not_a_broken_plugin(test_plugin):
    """Two plugins that are not built in: the qualified name that sorts first runs the
    bare name (the same on every machine); both are reachable; neither is broken."""
    for name, runs in (("aa-dup", "aa-dup"), ("zz-dup", "engine-test-plugin")):
        pm.register(_DupPlugin(), name=name)
        try:
            assert get_implementation("adapt-language", "copy-model").plugin == runs
            assert get_implementation("adapt-language", f"{name}:copy-model").plugin == name
            assert get_implementation("adapt-language", "engine-test-plugin:copy-model").plugin \
                == "engine-test-plugin"
            assert name not in {b.name for b in plugin_manager.broken_plugins()}
            warning = clash_warning("adapt-language", "copy-model")
            assert "among plugins of one tier, the qualified name that sorts first wins" in warning
            assert f"the bare name runs {runs}:copy-model" in warning
        finally:
            pm.unregister(name=name)
    assert clash_warning("adapt-language", "copy-model") is None


def test_a_plugin_wins_a_bare_name_over_a_built_in(test_plugin):
    class Ties:
        """In-process ties."""

        name = "ties"
        Params = PluginParams

        def run(self, context, inputs, params):  # pragma: no cover
            raise AssertionError

    class Plugin:
        @hookimpl
        def register_merge_methods(self, register):
            register(Ties())

    pm.register(Plugin(), name="my-ties")
    try:
        assert get_implementation("merge", "ties").plugin == "my-ties"
        builtin = get_implementation("merge", "lingoforge:ties")
        assert builtin.plugin == "engine_plugins.ties" and builtin.builtin
        assert builtin.shadowed_by.qualified == "my-ties:ties"
        assert builtin.unique_name == "lingoforge:ties"
        assert implementations()["merge"]["ties"].plugin == "my-ties"
        assert [r.plugin for r in plugin_manager.all_implementations()["merge"]
                if r.name == "ties"] == ["my-ties", "engine_plugins.ties"]
    finally:
        pm.unregister(name="my-ties")
    assert get_implementation("merge", "ties").unique_name == "ties"
    assert get_implementation("merge", "lingoforge:ties").unique_name == "ties"


def test_a_qualified_name_of_a_broken_plugin_says_so(test_plugin):
    pm.register(_BrokenPlugin(), name="broken-two")
    try:
        with pytest.raises(PluginError, match=r"merge plugin 'broken-two:bad' is provided by plugin "
                                              r"'broken-two' .*which is broken"):
            get_implementation("merge", "broken-two:bad")
    finally:
        pm.unregister(name="broken-two")
        plugin_manager._broken.pop("broken-two", None)


def test_builtins_are_loaded_through_the_plugin_manager():
    names = {pm.get_name(p) for p in pm.get_plugins()}
    implementations()
    loaded = {pm.get_name(p) for p in pm.get_plugins()} | names
    for module in plugin_manager.DEFAULT_PLUGINS:
        assert module in loaded or module in {b.name for b in plugin_manager.broken_plugins()}


def test_entry_point_plugins_are_loaded(monkeypatch, tmp_path):
    """A real installed distribution with an entry point in 'engine.plugins' is registered."""
    (tmp_path / "tp_lingoforge_plugin.py").write_text(
        "from engine.api import PluginParams, hookimpl\n"
        "class Noop:\n"
        "    name = 'tp-align'\n"
        "    Params = PluginParams\n"
        "    def run(self, context, inputs, params):\n"
        "        raise NotImplementedError\n"
        "@hookimpl\n"
        "def register_aligners(register):\n"
        "    register(Noop())\n"
    )
    dist = tmp_path / "tp_lingoforge_plugin-9.9.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tp-lingoforge-plugin\nVersion: 9.9\n")
    (dist / "entry_points.txt").write_text("[engine.plugins]\nthird-party = tp_lingoforge_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugin_manager, "_loaded", False)
    try:
        plugin_manager.load_plugins()
        assert get_implementation("align", "tp-align").plugin == "third-party"
        assert plugin_manager.plugin_version("third-party") == "9.9"
    finally:
        if pm.has_plugin("third-party"):
            pm.unregister(name="third-party")
