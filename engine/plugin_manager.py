"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Built-ins are ordinary plugin modules listed in :data:`DEFAULT_PLUGINS` and loaded
through the same path as third-party ones (datasette's pattern); third parties ship
a distribution with an entry point in the group ``engine.plugins``. A plugin that
fails to import or to register is recorded as *broken*, reported by name, and the
rest keep working.

Tests and embedding code may ``pm.register(module_or_object, name=...)`` and
``pm.unregister(name=...)``; :func:`implementations` always reflects the current set.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from engine import __version__, hookspecs
from engine.errors import PluginError
from engine.implementation import StageImplementation, describe
from engine.params import PluginParams
from engine.stages import STAGE_KINDS

ENTRY_POINT_GROUP = "engine.plugins"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "engine_plugins.ct",
    "engine_plugins.sft",
    "engine_plugins.elo",
    "engine_plugins.elo_align",
    "engine_plugins.first_last",
    "engine_plugins.indices",
    "engine_plugins.layer_importance",
    "engine_plugins.linear",
    "engine_plugins.task_arithmetic",
    "engine_plugins.ties",
    "engine_plugins.slack_ties",
    "engine_plugins.dare_ties",
    "engine_plugins.perplexity",
    "engine_plugins.task_accuracy",
    "engine_plugins.retention",
    "engine_plugins.lm_eval",
)


@dataclass
class Registered:
    """One implementation and the plugin that registered it."""

    stage: str
    impl: StageImplementation
    plugin: str

    @property
    def name(self) -> str:
        return self.impl.name


@dataclass
class BrokenPlugin:
    name: str
    error: str


pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_broken: dict[str, BrokenPlugin] = {}
_versions: dict[str, str] = {}
_loaded = False


def load_plugins() -> None:
    """Load built-ins and entry-point plugins once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module_name in DEFAULT_PLUGINS:
        _load(module_name, lambda m=module_name: importlib.import_module(m), __version__)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else "?"
        _load(ep.name, ep.load, version)


def _load(name: str, loader: Any, version: str) -> None:
    if pm.has_plugin(name):
        return
    try:
        obj = loader()
        pm.register(obj, name=name)
        _versions[name] = version
    except Exception as exc:  # a broken plugin must not take the engine down
        _broken[name] = BrokenPlugin(name, f"{type(exc).__name__}: {exc}")


def broken_plugins() -> list[BrokenPlugin]:
    load_plugins()
    return list(_broken.values())


def plugin_version(name: str) -> str:
    return _versions.get(name, "-")


def implementations() -> dict[str, dict[str, Registered]]:
    """Every registered implementation: ``{stage kind: {name: Registered}}``.

    Registration problems (a non-conforming object, a name registered twice, an
    exception in the hook) mark the plugin at fault as broken and skip it.
    """
    load_plugins()
    found: dict[str, dict[str, Registered]] = {kind: {} for kind in STAGE_KINDS}
    for kind, entry in STAGE_KINDS.items():
        caller = getattr(pm.hook, entry.hook)
        for hookimpl in caller.get_hookimpls():  # registration order: first one wins a name
            plugin_name = pm.get_name(hookimpl.plugin) or repr(hookimpl.plugin)
            pending: list[StageImplementation] = []
            try:
                hookimpl.function(register=pending.append)
                for impl in pending:
                    _check_impl(impl, kind)
                    if impl.name in found[kind]:
                        other = found[kind][impl.name].plugin
                        raise PluginError(
                            f"{kind} implementation {impl.name!r} is already registered by {other!r}"
                        )
            except Exception as exc:
                _broken[plugin_name] = BrokenPlugin(plugin_name, f"{type(exc).__name__}: {exc}")
                continue
            for impl in pending:
                found[kind][impl.name] = Registered(kind, impl, plugin_name)
    return found


def _check_impl(impl: Any, kind: str) -> None:
    name = getattr(impl, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"a {kind} implementation {impl!r} has no string 'name'")
    params = getattr(impl, "Params", None)
    if not (inspect.isclass(params) and issubclass(params, PluginParams)):
        raise PluginError(f"{kind} implementation {name!r}: Params must subclass engine.api.PluginParams")
    if not callable(getattr(impl, "run", None)):
        raise PluginError(f"{kind} implementation {name!r} has no run(context, inputs, params)")


def get_implementation(stage: str, name: str) -> Registered:
    """The implementation a recipe names, or an error that lists the alternatives."""
    if stage not in STAGE_KINDS:
        raise PluginError(f"unknown stage kind {stage!r}; known: {', '.join(STAGE_KINDS)}")
    impls = implementations()[stage]
    if name in impls:
        return impls[name]
    msg = f"no {stage} plugin named {name!r}; available: {', '.join(sorted(impls)) or 'none'}"
    if _broken:
        msg += f" (broken plugins: {', '.join(sorted(_broken))}; see 'engine plugins')"
    raise PluginError(msg)


def plugins_info() -> list[dict[str, Any]]:
    """What ``engine plugins`` shows: each plugin, its version, and what it registers."""
    rows: dict[str, dict[str, Any]] = {}
    for name in (pm.get_name(p) for p in pm.get_plugins()):
        if name is None:
            continue
        rows[name] = {"name": name, "version": plugin_version(name), "registers": {}, "broken": None}
    for kind, impls in implementations().items():
        for reg in impls.values():
            entry = rows.setdefault(
                reg.plugin, {"name": reg.plugin, "version": plugin_version(reg.plugin),
                             "registers": {}, "broken": None})
            entry["registers"].setdefault(kind, []).append(
                {"name": reg.name, "description": describe(reg.impl)})
    for b in _broken.values():
        rows.setdefault(b.name, {"name": b.name, "version": plugin_version(b.name), "registers": {}})
        rows[b.name]["broken"] = b.error
    return sorted(rows.values(), key=lambda r: r["name"])


def call_observers(hook_name: str, **kwargs: Any) -> None:
    """Call a lifecycle hook; an observer's failure is reported, never fatal."""
    caller = getattr(pm.hook, hook_name)
    for hookimpl in caller.get_hookimpls():
        try:
            hookimpl.function(**{k: kwargs[k] for k in hookimpl.argnames})
        except Exception as exc:
            name = pm.get_name(hookimpl.plugin)
            print(f"warning: plugin {name!r} failed in {hook_name}: {exc}", file=sys.stderr)
