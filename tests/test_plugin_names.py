"""Name clashes (docs/plugins.md, "Name clashes"), on a real installed distribution.

``lingoforge-breadcrumbs`` 0.1.0 is built here as a wheel (a zip with its module and a
``*.dist-info`` holding METADATA, WHEEL, RECORD and entry_points.txt: what any build
backend writes), installed with ``pip install --target`` into a folder of its own and
found by ``importlib.metadata`` through ``PYTHONPATH``/``sys.path``, exactly as an
installed third-party plugin is. It registers the merge method ``breadcrumbs``, as the
built-in does since 0.2.0. Its method copies the base and leaves ``crumbs.json``, and only
it accepts the param ``crumb``, so each test can prove which implementation ran or
validated.

The policy under test: an installed distribution wins a bare name over a built-in;
``DIST:name`` reaches each one; ``engine plugins`` shows the built-in *shadowed* (never
broken); validation warns with the qualified spellings; the plan, report and cache record
the qualified name when a bare name has several providers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from engine.cli import main
from engine.core.errors import PluginError
from engine.recipe import load_recipe
from engine.recipe.validate import plan_recipe
from engine.registry import manager as plugin_manager
from engine.run import stage_cache

DIST, VERSION, MODULE = "lingoforge-breadcrumbs", "0.1.0", "lf_breadcrumbs"
THEIRS, OURS = f"{DIST}:breadcrumbs", "lingoforge:breadcrumbs"

SOURCE = '''"""lingoforge-breadcrumbs: a breadcrumbs merge method, registered since lingoforge 0.1."""

import json
import shutil

from pydantic import Field

from engine.api import ModelArtifact, PluginParams, hookimpl


class Breadcrumbs:
    """Third-party breadcrumbs: copies the base model and leaves its crumbs."""

    name = "breadcrumbs"

    class Params(PluginParams):
        crumb: int = Field(1, ge=1, description="How many crumbs to leave (no built-in has it).")

    def run(self, context, inputs, params):
        for item in inputs.base.path.iterdir():
            if item.is_file() and not item.name.startswith("."):
                shutil.copy2(item, context.output_dir / item.name)
        (context.output_dir / "crumbs.json").write_text(
            json.dumps({"by": "lingoforge-breadcrumbs", "crumb": params.crumb}))
        return ModelArtifact(context.stage_name, context.output_dir)


@hookimpl
def register_merge_methods(register):
    register(Breadcrumbs())
'''


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _build_wheel(folder: Path) -> Path:
    """``lingoforge_breadcrumbs-0.1.0-py3-none-any.whl`` (the wheel format, PEP 427)."""
    info = f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    files = {
        f"{MODULE}/__init__.py": SOURCE,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n"
                            "Requires-Dist: lingoforge\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: lingoforge-tests\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
        f"{info}/entry_points.txt": f"[engine.plugins]\nbreadcrumbs = {MODULE}\n",
        f"{info}/top_level.txt": f"{MODULE}\n",
    }
    record = [_record_line(n, t.encode()) for n, t in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = "\n".join(record) + "\n"
    wheel = folder / f"{DIST.replace('-', '_')}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder the wheel was pip-installed into (``pip install --target``, no index)."""
    root = tmp_path_factory.mktemp("lf-breadcrumbs")
    wheel = _build_wheel(root)
    target = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    assert (target / f"{DIST.replace('-', '_')}-{VERSION}.dist-info" / "entry_points.txt").is_file()
    return target


@pytest.fixture
def installed(site, monkeypatch):
    """The distribution found on sys.path and loaded through the entry-point group, as a
    fresh ``engine`` process loads it; unregistered afterwards."""
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(plugin_manager, "_loaded", False)
    try:
        plugin_manager.load_plugins()
        assert plugin_manager.pm.has_plugin("breadcrumbs"), "the entry point was not loaded"
        yield
    finally:
        if plugin_manager.pm.has_plugin("breadcrumbs"):
            plugin_manager.pm.unregister(name="breadcrumbs")


def _recipe(tmp_path: Path, family: dict[str, Path], *stages: dict) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "clash",
        "models": {name: {"path": str(family[name])} for name in ("base", "a", "b")},
        "stages": [{"stage": "merge", "base": "base", "models": ["a", "b"], **s} for s in stages],
    }, sort_keys=False))
    return recipe


def _engine(args: list[str], site: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LINGOFORGE_")}
    full.update(COLUMNS="250", PYTHONPATH=os.pathsep.join([str(site), full.get("PYTHONPATH", "")]),
                **env)
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          env=full, timeout=300)


def test_the_bare_name_runs_the_installed_one_and_each_is_reached_by_its_qualified_name(installed):
    bare = plugin_manager.get_implementation("merge", "breadcrumbs")
    assert (bare.plugin, bare.distribution, bare.qualified) == ("breadcrumbs", DIST, THEIRS)
    assert "crumb" in bare.impl.Params.model_fields
    ours = plugin_manager.get_implementation("merge", OURS)
    assert ours.plugin == "engine_plugins.breadcrumbs" and "gamma" in ours.impl.Params.model_fields
    assert ours.shadowed_by is not None and ours.shadowed_by.qualified == THEIRS
    assert plugin_manager.get_implementation("merge", THEIRS).plugin == "breadcrumbs"
    # the distribution in any PEP 503 spelling, or the plugin name engine plugins shows
    for spelling, plugin in (("Lingoforge_Breadcrumbs:breadcrumbs", "breadcrumbs"),
                             ("breadcrumbs:breadcrumbs", "breadcrumbs"),
                             ("engine_plugins.breadcrumbs:breadcrumbs", "engine_plugins.breadcrumbs")):
        assert plugin_manager.get_implementation("merge", spelling).plugin == plugin, spelling
    # a name nothing else registers keeps its bare spelling everywhere
    assert plugin_manager.get_implementation("merge", "lingoforge:breadcrumbs-ties").unique_name \
        == "breadcrumbs-ties"
    assert [r.qualified for r in plugin_manager.providers("merge", "breadcrumbs")] == [THEIRS, OURS]
    assert not [b for b in plugin_manager.broken_plugins() if b.name == "breadcrumbs"]


def test_qualified_names_get_did_you_mean(installed):
    with pytest.raises(PluginError, match=r"no merge plugin named 'lingoforge:breadcrumb' .*"
                                          r"did you mean 'lingoforge:breadcrumbs'\?"):
        plugin_manager.get_implementation("merge", "lingoforge:breadcrumb")
    with pytest.raises(PluginError, match=r"no loaded plugin or distribution 'lingoforge-breadcrumb' "
                                          r".*did you mean 'lingoforge-breadcrumbs:breadcrumbs'\?"):
        plugin_manager.get_implementation("merge", "lingoforge-breadcrumb:breadcrumbs")


def test_plugins_shows_the_built_in_shadowed_never_broken(installed, capsys, monkeypatch):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    theirs, ours = rows["breadcrumbs"], rows["engine_plugins.breadcrumbs"]
    assert theirs["broken"] is None and theirs["distribution"] == DIST and theirs["version"] == VERSION
    assert ours["broken"] is None
    item = theirs["registers"]["merge"][0]
    assert (item["qualified"], item["shadowed_by"], item["shadows"]) == (THEIRS, None, [OURS])
    shadowed = next(i for i in ours["registers"]["merge"] if i["name"] == "breadcrumbs")
    assert (shadowed["qualified"], shadowed["shadowed_by"]) == (OURS, THEIRS)
    assert shadowed["clash"] == (f"shadowed by {THEIRS} for the bare name 'breadcrumbs'; "
                                 f"reach this one as {OURS}")
    untouched = next(i for i in ours["registers"]["merge"] if i["name"] == "breadcrumbs-ties")
    assert "clash" not in untouched and "qualified" not in untouched

    monkeypatch.setenv("COLUMNS", "250")
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert f"shadowed by {THEIRS} for the bare name 'breadcrumbs'; reach this one as {OURS}" in table
    assert not [line for line in table.splitlines() if "breadcrumbs" in line and "broken" in line]


def test_validate_warns_and_the_params_are_the_winner_s(installed, lingoforge_model_family,
                                                        tmp_path, capsys):
    fam = lingoforge_model_family
    recipe = _recipe(tmp_path, fam, {"name": "merged", "plugin": "breadcrumbs", "params": {"crumb": 3}})
    assert main(["validate", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert (f"warning: {recipe}: stage 'merged': plugin 'breadcrumbs' is registered by 2 plugins "
            f"({DIST} {VERSION} and the built-in); the bare name runs {THEIRS} (a plugin that is "
            f"not built in wins over a built-in). Write plugin: {THEIRS} to keep it, or plugin: "
            f"{OURS} for the built-in") in " ".join(err.split())

    # the bare name's params errors are worded by the one that runs: the installed one
    recipe = _recipe(tmp_path, fam, {"name": "merged", "plugin": "breadcrumbs", "params": {"gamma": 0.1}})
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr()
    assert "params.gamma: unknown key" in out.out + out.err

    # the plan records the spelling that names the implementation: the cache key and the
    # report can never take one provider's result for the other's
    recipe = _recipe(tmp_path, fam, {"name": "merged", "plugin": "breadcrumbs"},
                     {"name": "qualified", "plugin": "lingoforge:breadcrumbs-ties"})
    plan = plan_recipe(load_recipe(recipe), tmp_path, str(recipe))
    assert [s.spec.plugin for s in plan.stages] == [THEIRS, "breadcrumbs-ties"]
    assert stage_cache.stage_components(plan.stages[0], dict.fromkeys(fam, "f"))["plugin"] == THEIRS

    # a qualified name removes the doubt, and the warning
    for plugin, params in ((OURS, {"gamma": 0.1}), (THEIRS, {"crumb": 2})):
        recipe = _recipe(tmp_path, fam, {"name": "merged", "plugin": plugin, "params": params})
        assert main(["validate", str(recipe)]) == 0
        assert "registered by 2 plugins" not in capsys.readouterr().err
    recipe = _recipe(tmp_path, fam, {"name": "merged", "plugin": OURS, "params": {"crumb": 2}})
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr()
    assert "params.crumb: unknown key" in out.out + out.err


@pytest.mark.slow
def test_a_run_runs_what_each_spelling_names(site, lingoforge_model_family, tmp_path):
    """In a fresh ``engine`` process (plugins load once per process, as for a user)."""
    fam = lingoforge_model_family
    recipe = _recipe(tmp_path, fam,
                     {"name": "bare", "plugin": "breadcrumbs", "params": {"crumb": 3}},
                     {"name": "theirs", "plugin": THEIRS, "params": {"crumb": 5}},
                     {"name": "ours", "plugin": OURS, "params": {"density": 0.5, "gamma": 0.1}})
    work = tmp_path / "work"
    result = _engine(["run", str(recipe), "--workdir", str(work)], site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((work / "bare" / "crumbs.json").read_text()) == {"by": DIST, "crumb": 3}
    assert json.loads((work / "theirs" / "crumbs.json").read_text()) == {"by": DIST, "crumb": 5}
    assert not (work / "ours" / "crumbs.json").exists()  # the built-in merged: its own metadata
    assert json.loads((work / "ours" / "lingoforge.json").read_text())["merge"]["method"] == OURS
    said = " ".join((result.stdout + result.stderr).split())
    assert "stage 'bare': plugin 'breadcrumbs' is registered by 2 plugins" in said
    assert f"Write plugin: {THEIRS} to keep it, or plugin: {OURS} for the built-in" in said
    assert "stage 'theirs': plugin" not in said and "stage 'ours': plugin" not in said
    assert "broken" not in said
    # the report records which implementation ran (and so does the cache key)
    report = json.loads((work / "report.json").read_text())
    plugins = {s["name"]: s["plugin"] for s in report["stages"]}
    assert plugins == {"bare": THEIRS, "theirs": THEIRS, "ours": OURS}

    # with the distribution blocked, the bare name is the built-in's again (its params)
    result = _engine(["validate", str(recipe)], site, LINGOFORGE_DISABLE_PLUGINS=DIST)
    assert result.returncode == 2
    assert "stage 'bare' params.crumb: unknown key" in result.stdout + result.stderr


def test_engine_merge_takes_qualified_methods(installed, lingoforge_model_family, tmp_path, capsys):
    fam = lingoforge_model_family
    common = ["--base", str(fam["base"]), "--model", str(fam["a"]), "--model", str(fam["b"])]
    assert main(["merge", "--method", THEIRS, *common, "--out", str(tmp_path / "t"), "-p", "crumb=4"]) == 0
    assert json.loads((tmp_path / "t" / "crumbs.json").read_text())["crumb"] == 4
    assert f"with {THEIRS} into" in " ".join(capsys.readouterr().err.split())
    assert main(["merge", "--method", OURS, *common, "--out", str(tmp_path / "o"),
                 "-p", "density=0.5"]) == 0
    assert not (tmp_path / "o" / "crumbs.json").exists()
    capsys.readouterr()
    assert main(["merge", "--method", "lingoforge:breadcrums", *common, "--out", str(tmp_path / "x")]) == 2
    said = " ".join("".join(capsys.readouterr()).split())
    assert "--method lingoforge:breadcrums: no merge method of that name" in said
    assert "did you mean 'lingoforge:breadcrumbs'?" in said
