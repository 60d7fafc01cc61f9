"""Plugin controls and plugin errors, through the real CLI in a fresh process (plugins
load once per process): allow and block lists, hook tracing, and the three ways a
third-party plugin can be broken -- each reported once with its distribution, the
engine working on without it, ``engine validate`` naming it. Registering a name a
built-in also registers is not one of them (tests/test_plugin_names.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOOD = '''
from engine.api import PluginParams, hookimpl
class Noop:
    name = "{impl}"
    Params = PluginParams
    def run(self, context, inputs, params):
        raise NotImplementedError
@hookimpl
def {hook}(register):
    register(Noop())
'''

BROKEN = {
    "import": ("raise ImportError('needs a package that is not installed')\n",
               "ImportError: needs a package that is not installed"),
    "unknown-kind": (GOOD.format(impl="tok", hook="register_tokenizers"),
                     "implements hook 'register_tokenizers', which the engine does not define"),
    "unroutable": ('''
from engine.api import PluginParams, hookimpl
from pydantic import ConfigDict
class Opaque:
    pass
class Odd:
    name = "odd-merge"
    class Params(PluginParams):
        model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
        blob: Opaque | None = None
    def run(self, context, inputs, params):
        raise NotImplementedError
@hookimpl
def register_merge_methods(register):
    register(Odd())
''', "declares params the engine cannot route: no JSON schema"),
}


def _distribution(root: Path, dist: str, module: str, source: str) -> None:
    """An installed distribution (dist-info with an entry point) on a path of its own."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[engine.plugins]\n{dist} = {module}\n")


def _engine(args: list[str], path: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LINGOFORGE_")}
    full.update(env)
    if path is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(path), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=full, timeout=300)


def _registered(result: subprocess.CompletedProcess) -> dict[str, dict]:
    assert result.returncode == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_allow_list_loads_only_the_named_plugins():
    rows = _registered(_engine(["plugins", "--json"], LINGOFORGE_PLUGINS="engine_plugins.ties"))
    loaded = {n for n, r in rows.items() if r["registers"]}
    assert loaded == {"engine_plugins.ties"}
    assert rows["engine_plugins.sft"]["skipped"] == "not in LINGOFORGE_PLUGINS"


def test_block_list_by_distribution_wins_over_the_allow_list(tmp_path):
    _distribution(tmp_path, "lf-extra", "lf_extra", GOOD.format(impl="noop-align",
                                                                 hook="register_aligners"))
    rows = _registered(_engine(["plugins", "--json"], tmp_path, LINGOFORGE_PLUGINS="builtins,lf-extra",
                               LINGOFORGE_DISABLE_PLUGINS="lingoforge"))
    loaded = {n for n, r in rows.items() if r["registers"]}
    assert loaded == {"lf-extra"}
    assert rows["lf-extra"]["distribution"] == "lf-extra" and rows["lf-extra"]["version"] == "1.2"
    assert rows["engine_plugins.ties"]["skipped"] == "blocked by LINGOFORGE_DISABLE_PLUGINS"


def test_tracing_shows_loads_registrations_and_hook_calls():
    result = _engine(["plugins", "--json"], LINGOFORGE_TRACE_HOOKS="1")
    assert result.returncode == 0, result.stderr
    assert "[hook] loaded engine_plugins.ties (lingoforge " in result.stderr
    assert "[hook] register_merge_methods() in engine_plugins.ties: registered ['ties']" in result.stderr
    quiet = _engine(["plugins", "--json"])
    assert "[hook]" not in quiet.stderr


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_plugin_is_reported_once_and_the_engine_works_on(tmp_path, case):
    source, message = BROKEN[case]
    _distribution(tmp_path, "lf-broken", "lf_broken", source)
    result = _engine(["plugins", "--json"], tmp_path)
    rows = _registered(result)
    assert message in rows["lf-broken"]["broken"]
    assert rows["lf-broken"]["registers"] == {}
    assert rows["engine_plugins.ties"]["registers"] == {"merge": [
        {"name": "ties", "description": rows["engine_plugins.ties"]["registers"]["merge"][0]["description"]}]}
    warnings = [line for line in result.stderr.splitlines() if "lf-broken" in line]
    assert len(warnings) == 1, result.stderr
    assert "distribution lf-broken 1.2" in warnings[0] and message in warnings[0]


def _recipe(tmp_path: Path, plugin: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""name: broken-plugin
models:
  base: {{builtin: tiny-base}}
stages:
  - {{name: merged, stage: merge, plugin: {plugin}, base: base, models: [base]}}
""")
    return recipe


@pytest.mark.parametrize(("case", "plugin", "expected"), [
    ("unroutable", "odd-merge", "merge plugin 'odd-merge' is provided by plugin 'lf-broken' "
                                "(distribution lf-broken 1.2), which is broken"),
    ("import", "median", "no merge plugin named 'median'"),
])
def test_validate_names_the_broken_plugin_a_recipe_needs(tmp_path, case, plugin, expected):
    _distribution(tmp_path, "lf-broken", "lf_broken", BROKEN[case][0])
    result = _engine(["validate", str(_recipe(tmp_path, plugin))], tmp_path)
    assert result.returncode == 2
    assert expected in result.stdout + result.stderr
    assert "lf-broken" in result.stdout + result.stderr


def test_a_name_a_built_in_also_registers_is_a_clash_not_a_breakage(tmp_path):
    """The installed plugin runs the bare name (with a warning naming both spellings), the
    built-in is shown shadowed and stays reachable as lingoforge:ties; nothing is broken."""
    _distribution(tmp_path, "lf-ties", "lf_ties", GOOD.format(impl="ties", hook="register_merge_methods"))
    rows = _registered(_engine(["plugins", "--json"], tmp_path))
    assert rows["lf-ties"]["broken"] is None and rows["engine_plugins.ties"]["broken"] is None
    assert rows["lf-ties"]["registers"]["merge"][0]["shadows"] == ["lingoforge:ties"]
    assert rows["engine_plugins.ties"]["registers"]["merge"][0]["shadowed_by"] == "lf-ties:ties"
    result = _engine(["validate", str(_recipe(tmp_path, "ties"))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    said = " ".join((result.stdout + result.stderr).split())
    assert "the bare name runs lf-ties:ties" in said and "plugin: lingoforge:ties for the built-in" in said
    assert "broken" not in said
    result = _engine(["validate", str(_recipe(tmp_path, "lingoforge:ties"))], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout + result.stderr


def test_a_merge_method_with_a_param_its_arithmetic_never_reads_is_broken_at_registration():
    """Found when the plugin registers, before any recipe uses it: the merge-method
    base's probe (docs/merging.md) reports the param, and the plugin is skipped."""
    from pydantic import Field

    from engine.api import hookimpl
    from engine.api.merging import MergeMethod, MergeParams
    from engine.registry import manager as plugin_manager

    class Sloppy(MergeMethod):
        """Sums task vectors, forgetting its own scale."""

        name = "sloppy-sum"

        class Params(MergeParams):
            scale: float = Field(1.0, description="Never used.")

        def merge(self, stacked, p, tensor):
            return (stacked * stacked.new_tensor(p.weight).view(-1, 1, 1)).sum(0)

    class Plugin:
        @hookimpl
        def register_merge_methods(self, register):
            register(Sloppy())

    plugin_manager.pm.register(Plugin(), name="sloppy-plugin")
    try:
        impls = plugin_manager.implementations()
        assert "sloppy-sum" not in impls["merge"] and "ties" in impls["merge"]
        error = plugin_manager._broken["sloppy-plugin"].error
        assert "declares params the engine cannot route" in error
        assert "params.scale" in error and "never reads it" in error
    finally:
        plugin_manager.pm.unregister(name="sloppy-plugin")
        plugin_manager._broken.pop("sloppy-plugin", None)
