"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Built-ins are ordinary plugin modules listed in :data:`DEFAULT_PLUGINS` and loaded
through the same path as third-party ones (datasette's pattern); third parties ship
a distribution with an entry point in the group ``engine.plugins``. A plugin that
fails to import, implements a hook the engine does not define (a stage kind that does
not exist), registers a name another plugin registered first, or declares params the
engine cannot route is recorded as *broken*: reported once on stderr with its
distribution, none of its implementations used, and the rest keep working;
``engine validate`` names it when a recipe asks for what it would have provided.

Environment controls (read once, when plugins first load):

* ``LINGOFORGE_PLUGINS=a,b`` -- allow-list: only these plugins load (plugin names as
  ``engine plugins`` shows them, or distribution names; ``builtins`` means every
  built-in);
* ``LINGOFORGE_DISABLE_PLUGINS=a,b`` -- block-list, same names, wins over the allow-list;
* ``LINGOFORGE_TRACE_HOOKS=1`` -- every load, registration and hook call on stderr.

Tests and embedding code may ``pm.register(module_or_object, name=...)`` and
``pm.unregister(name=...)``; :func:`implementations` always reflects the current set.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from engine import __version__
from engine.core.errors import PluginError
from engine.core.params import PluginParams
from engine.core.stages import STAGE_KINDS
from engine.core.suggest import did_you_mean
from engine.registry import hookspecs
from engine.registry.implementation import StageImplementation

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
    "engine_plugins.breadcrumbs",
    "engine_plugins.slerp", "engine_plugins.model_stock",
    "engine_plugins.della", "engine_plugins.passthrough",
    "engine_plugins.perplexity",
    "engine_plugins.task_accuracy",
    "engine_plugins.retention",
    "engine_plugins.lm_eval",
)


#: allow-list: only these plugins load (comma-separated plugin or distribution names;
#: ``builtins`` stands for every built-in)
ALLOW_ENV = "LINGOFORGE_PLUGINS"
#: block-list, same names; wins over the allow-list
BLOCK_ENV = "LINGOFORGE_DISABLE_PLUGINS"
#: any non-empty value other than 0 traces every hook call to stderr
TRACE_ENV = "LINGOFORGE_TRACE_HOOKS"

BUILTIN_DISTRIBUTION = "lingoforge"


@dataclass
class Registered:
    """One implementation and the plugin that registered it."""

    stage: str
    impl: StageImplementation
    plugin: str

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def distribution(self) -> str:
        return plugin_distribution(self.plugin)


@dataclass
class BrokenPlugin:
    name: str
    error: str
    #: implementation names the plugin tried to register, where known (so that
    #: ``engine validate`` can say which broken plugin a recipe's ``plugin:`` needed)
    names: tuple[str, ...] = ()

    @property
    def distribution(self) -> str:
        return plugin_distribution(self.name)


pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
pm.add_hookspecs(hookspecs)

_broken: dict[str, BrokenPlugin] = {}
_versions: dict[str, str] = {}
#: plugin name -> the distribution that ships it
_distributions: dict[str, str] = {}
#: plugins skipped by the allow/block lists: name -> which variable and why
_skipped: dict[str, str] = {}
#: broken plugins already reported on stderr (each is reported once per process)
_reported: set[str] = set()
_loaded = False


def _names_from(variable: str) -> set[str] | None:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _selected(name: str, distribution: str, builtin: bool) -> str | None:
    """Why the plugin must not load (None: load it), from the allow and block lists."""
    keys = {name, distribution, *(["builtins"] if builtin else [])}
    blocked = _names_from(BLOCK_ENV)
    if blocked is not None and keys & blocked:
        return f"blocked by {BLOCK_ENV}"
    allowed = _names_from(ALLOW_ENV)
    if allowed is not None and not keys & allowed:
        return f"not in {ALLOW_ENV}"
    return None


def tracing() -> bool:
    return os.environ.get(TRACE_ENV, "").strip() not in ("", "0")


def trace(message: str) -> None:
    """One line on stderr when :data:`TRACE_ENV` is set (hook calls, registrations)."""
    if tracing():
        print(f"[hook] {message}", file=sys.stderr, flush=True)


def load_plugins() -> None:
    """Load built-ins and entry-point plugins once per process, honouring the allow and
    block lists (:data:`ALLOW_ENV`, :data:`BLOCK_ENV`)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    if tracing():
        pm.trace.root.setwriter(lambda text: print(f"[hook] {text}", end="", file=sys.stderr))
        pm.enable_tracing()
    for module_name in DEFAULT_PLUGINS:
        _load(module_name, lambda m=module_name: importlib.import_module(m), __version__,
              BUILTIN_DISTRIBUTION, builtin=True)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else "?"
        dist = ep.dist.metadata["Name"] if ep.dist is not None else "?"
        _load(ep.name, ep.load, version, dist, builtin=False)


def _load(name: str, loader: Any, version: str, distribution: str, *, builtin: bool) -> None:
    if pm.has_plugin(name):
        return
    _versions[name] = version
    _distributions[name] = distribution
    why = _selected(name, distribution, builtin)
    if why is not None:
        _skipped[name] = why
        trace(f"skip {name} ({distribution} {version}): {why}")
        return
    try:
        obj = loader()
        pm.register(obj, name=name)
        _check_hooks(name, obj)
        trace(f"loaded {name} ({distribution} {version})")
    except Exception as exc:  # a broken plugin must not take the engine down
        if pm.has_plugin(name):
            pm.unregister(name=name)
        _mark_broken(name, f"{type(exc).__name__}: {exc}")


def _check_hooks(name: str, plugin: object) -> None:
    """A hook implementation with no hookspec is a plugin error (pluggy accepts it
    silently): most often a stage kind that does not exist."""
    for caller in pm.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            stage_hooks = ", ".join(k.hook for k in STAGE_KINDS.values())
            raise PluginError(
                f"implements hook {caller.name!r}, which the engine does not define; "
                f"the stage hooks are {stage_hooks} (stage kinds: {', '.join(STAGE_KINDS)})")


def _mark_broken(name: str, error: str, names: tuple[str, ...] = ()) -> None:
    _broken[name] = BrokenPlugin(name, error, names)
    if name not in _reported:
        _reported.add(name)
        dist = plugin_distribution(name)
        print(f"warning: plugin {name!r} (distribution {dist} {plugin_version(name)}) is broken "
              f"and was skipped: {error}", file=sys.stderr)


def broken_plugins() -> list[BrokenPlugin]:
    load_plugins()
    return list(_broken.values())


def skipped_plugins() -> dict[str, str]:
    """Plugins the allow/block lists kept out: ``{name: reason}``."""
    load_plugins()
    return dict(_skipped)


def plugin_version(name: str) -> str:
    return _versions.get(name, "-")


def plugin_distribution(name: str) -> str:
    """The distribution that ships plugin ``name`` (``-`` for one registered in-process)."""
    return _distributions.get(name, "-")


def implementations() -> dict[str, dict[str, Registered]]:
    """Every registered implementation: ``{stage kind: {name: Registered}}``.

    Registration problems (a non-conforming object, a name another plugin registered
    first, an exception in the hook, params the engine cannot route) mark the plugin at
    fault as broken: none of its implementations is used, it is reported once on
    stderr with its distribution, and the rest keep working.

    The result is kept while the set of registered plugins stays the same (validation
    asks once per stage, and registering calls every hook and probes every merge method).
    """
    global _found, _found_for
    load_plugins()
    # the plugin objects themselves are the key (held, so no id is reused while cached)
    key = tuple((pm.get_name(p), p) for p in pm.get_plugins())
    if _found is None or len(key) != len(_found_for) or any(
            a[0] != b[0] or a[1] is not b[1] for a, b in zip(key, _found_for)):
        _found, _found_for = _collect(), key
    return {kind: dict(impls) for kind, impls in _found.items()}


_found: dict[str, dict[str, Registered]] | None = None
_found_for: tuple[tuple[str | None, object], ...] = ()


def _collect() -> dict[str, dict[str, Registered]]:
    pending: dict[str, list[tuple[str, StageImplementation]]] = {}
    failed: dict[str, tuple[str, tuple[str, ...]]] = {}
    for kind, entry in STAGE_KINDS.items():
        for hookimpl in getattr(pm.hook, entry.hook).get_hookimpls():
            plugin_name = pm.get_name(hookimpl.plugin) or repr(hookimpl.plugin)
            got: list[StageImplementation] = []
            try:
                hookimpl.function(register=got.append)
                trace(f"{entry.hook}() in {plugin_name}: registered "
                      f"{[getattr(i, 'name', repr(i)) for i in got]}")
                for impl in got:
                    _check_impl(impl, kind)
            except Exception as exc:
                names = tuple(n for n in (getattr(i, "name", None) for i in got) if isinstance(n, str))
                failed.setdefault(plugin_name, (f"{type(exc).__name__}: {exc}", names))
                continue
            pending.setdefault(plugin_name, []).extend((kind, impl) for impl in got)
    for plugin in pm.get_plugins():  # also plugins registered in-process, not only loaded ones
        plugin_name = pm.get_name(plugin) or repr(plugin)
        try:
            _check_hooks(plugin_name, plugin)
        except PluginError as exc:
            failed.setdefault(plugin_name, (f"PluginError: {exc}", ()))
    found: dict[str, dict[str, Registered]] = {kind: {} for kind in STAGE_KINDS}
    for plugin_name, impls in pending.items():  # registration order: the first one wins a name
        if plugin_name in failed:
            continue
        clash = next(((k, i.name) for k, i in impls if i.name in found[k]), None)
        if clash is not None:
            kind, impl_name = clash
            other = found[kind][impl_name]
            failed[plugin_name] = (
                f"PluginError: {kind} implementation {impl_name!r} is already registered by "
                f"{other.plugin!r} (distribution {other.distribution})",
                tuple(i.name for _, i in impls))
            continue
        for kind, impl in impls:
            found[kind][impl.name] = Registered(kind, impl, plugin_name)
    for plugin_name, (error, names) in failed.items():
        _mark_broken(plugin_name, error, names)
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
    problems = declaration_problems(impl)
    if problems:
        raise PluginError(f"{kind} implementation {name!r} declares params the engine cannot "
                          f"route: {'; '.join(problems)}")


def declaration_problems(impl: Any) -> list[str]:
    """Why ``impl.Params`` cannot be routed from a recipe (empty: it can).

    Every param must be writable in YAML and shown by ``engine schema``: its JSON
    schema must build and its recipe key must be a plain name. An implementation may
    add its own checks with a ``declaration_problems()`` method returning messages (the
    merge-method base checks that each param reaches its arithmetic).
    """
    params = impl.Params
    problems: list[str] = []
    for field_name, info in params.model_fields.items():
        key = info.alias or field_name
        if not key.replace("_", "a").replace("-", "a").isalnum() or key.startswith("_"):
            problems.append(f"params.{key}: not a plain recipe key")
    try:
        params.model_json_schema()
    except Exception as exc:  # pydantic cannot describe a field type to a recipe writer
        problems.append(f"no JSON schema ({type(exc).__name__}: {exc})")
    extra = getattr(impl, "declaration_problems", None)
    if callable(extra):
        problems += list(extra())
    return problems


def get_implementation(stage: str, name: str) -> Registered:
    """The implementation a recipe names, or an error that lists the alternatives and
    names the broken or unloaded plugin that would have provided it."""
    if stage not in STAGE_KINDS:
        raise PluginError(f"unknown stage kind {stage!r}; known: {', '.join(STAGE_KINDS)}"
                          f"{did_you_mean(stage, STAGE_KINDS)}")
    impls = implementations()[stage]
    if name in impls:
        return impls[name]
    for b in _broken.values():
        if name in b.names:
            raise PluginError(
                f"{stage} plugin {name!r} is provided by plugin {b.name!r} (distribution "
                f"{b.distribution} {plugin_version(b.name)}), which is broken: {b.error}")
    msg = (f"no {stage} plugin named {name!r}; available: {', '.join(sorted(impls)) or 'none'}"
           f"{did_you_mean(name, impls)}")
    if _broken:
        listed = ", ".join(f"{b.name} ({b.distribution})" for b in sorted(_broken.values(),
                                                                         key=lambda b: b.name))
        msg += f" (broken plugins: {listed}; see 'engine plugins')"
    if _skipped:
        listed = ", ".join(f"{n} ({why})" for n, why in sorted(_skipped.items()))
        msg += f" (not loaded: {listed})"
    raise PluginError(msg)


def call_observers(hook_name: str, **kwargs: Any) -> None:
    """Call a lifecycle hook; an observer's failure is reported, never fatal."""
    caller = getattr(pm.hook, hook_name)
    for hookimpl in caller.get_hookimpls():
        if pm.get_name(hookimpl.plugin) in _broken:
            continue
        trace(f"{hook_name}() in {pm.get_name(hookimpl.plugin)}")
        try:
            hookimpl.function(**{k: kwargs[k] for k in hookimpl.argnames})
        except Exception as exc:
            name = pm.get_name(hookimpl.plugin)
            print(f"warning: plugin {name!r} failed in {hook_name}: {exc}", file=sys.stderr)

