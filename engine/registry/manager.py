"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Built-ins are ordinary plugin modules listed in :data:`DEFAULT_PLUGINS` and loaded
through the same path as third-party ones (datasette's pattern); third parties ship
a distribution with an entry point in the group ``engine.plugins``. A plugin that
fails to import, implements a hook the engine does not define (a stage kind that does
not exist), or declares params the engine cannot route is recorded as *broken*:
reported once on stderr with its distribution, none of its implementations used, and
the rest keep working; ``engine validate`` names it when a recipe asks for what it
would have provided.

Two plugins registering one name for a stage kind are a *name clash*, not a breakage:
each is reachable as ``QUALIFIER:name`` and the bare name goes to one of them by the
policy of :mod:`engine.registry.names` (docs/plugins.md, "Name clashes").

Environment controls (read once, when plugins first load):

* ``LINGOFORGE_PLUGINS=a,b`` -- allow-list: only these plugins load (plugin names as
  ``engine plugins`` shows them, or distribution names; ``builtins`` means every
  built-in);
* ``LINGOFORGE_DISABLE_PLUGINS=a,b`` -- block-list, same names, wins over the allow-list;
* ``LINGOFORGE_TRACE_HOOKS=1`` -- every load, registration and hook call on stderr.

Tests and embedding code may ``pm.register(module_or_object, name=...)`` and
``pm.unregister(name=...)``; :func:`implementations` always reflects the current set.

Long module: loading, the broken-plugin record, the allow/block lists and the per-name
registry with its lookups are one piece of state (the pluggy manager and what it collected)
read and invalidated together; the name policy itself is in :mod:`engine.registry.names`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from typing import Any

import pluggy

from engine import __version__
from engine.core.errors import PluginError
from engine.core.stages import STAGE_KINDS
from engine.core.suggest import did_you_mean
from engine.registry import hookspecs
from engine.registry import names as name_policy
from engine.registry.implementation import StageImplementation, check_implementation
from engine.registry.implementation import (
    declaration_problems as declaration_problems,  # re-exported
)
from engine.registry.names import split_name

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
    "engine_plugins.init_mean", "engine_plugins.init_random",
    "engine_plugins.init_omp", "engine_plugins.init_focus", "engine_plugins.vocabulary",
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
    #: ``QUALIFIER:name``, which reaches this implementation whatever else registers its
    #: name (set when implementations are collected: :func:`engine.registry.names.rank`)
    qualified: str = ""

    @property
    def name(self) -> str:
        return self.impl.name

    @property
    def distribution(self) -> str:
        return plugin_distribution(self.plugin)

    @property
    def builtin(self) -> bool:
        """Registered by one of :data:`DEFAULT_PLUGINS` (the ``lingoforge`` distribution)."""
        return self.plugin in _builtins

    @property
    def providers(self) -> list[Registered]:
        """Every implementation of this one's bare name and stage kind, the winner first."""
        return providers(self.stage, self.name) or [self]

    @property
    def shadowed_by(self) -> Registered | None:
        """The implementation the bare name runs instead of this one (None: this one)."""
        winner = self.providers[0]
        return None if winner.plugin == self.plugin else winner

    @property
    def unique_name(self) -> str:
        """What plans, reports and cache keys record: the bare name, or the qualified one
        when another plugin registers the name (one provider's result is never another's)."""
        return self.name if len(self.providers) < 2 else self.qualified or self.name


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
#: plugin names loaded from DEFAULT_PLUGINS (they lose a bare name to any other plugin)
_builtins: set[str] = set()
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
    if builtin:
        _builtins.add(name)
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
    """The implementation each bare name runs: ``{stage kind: {name: Registered}}``.

    Registration problems (a non-conforming object, an exception in the hook, params the
    engine cannot route) mark the plugin at fault as broken: none of its implementations
    is used, it is reported once on stderr with its distribution, and the rest keep
    working. A name several plugins register maps to the winner of the name policy
    (:mod:`engine.registry.names`); :func:`providers` lists them all.

    The result is kept while the set of registered plugins stays the same (validation
    asks once per stage, and registering calls every hook and probes every merge method).
    """
    found = _registry()
    return {kind: {name: regs[0] for name, regs in by_name.items()} for kind, by_name in found.items()}


def providers(stage: str, name: str) -> list[Registered]:
    """Every implementation registered as the bare ``name`` for ``stage``: the one the
    bare name runs first, then the shadowed ones (:mod:`engine.registry.names`)."""
    return list(_registry().get(stage, {}).get(name, ()))


def all_implementations() -> dict[str, list[Registered]]:
    """Every registered implementation, shadowed ones included: ``{stage kind: [...]}``
    (names in registration order, each name's providers in precedence order)."""
    return {kind: [r for regs in by_name.values() for r in regs]
            for kind, by_name in _registry().items()}


_found: dict[str, dict[str, list[Registered]]] | None = None
_found_for: tuple[tuple[str | None, object], ...] = ()


def _registry() -> dict[str, dict[str, list[Registered]]]:
    """``{stage kind: {bare name: [providers, winner first]}}``, kept while the plugins stay."""
    global _found, _found_for
    load_plugins()
    # the plugin objects themselves are the key (held, so no id is reused while cached)
    key = tuple((pm.get_name(p), p) for p in pm.get_plugins())
    if _found is None or len(key) != len(_found_for) or any(
            a[0] != b[0] or a[1] is not b[1] for a, b in zip(key, _found_for)):
        _found, _found_for = _collect(), key
    return _found


def _collect() -> dict[str, dict[str, list[Registered]]]:
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
                    check_implementation(impl, kind)
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
    found: dict[str, dict[str, list[Registered]]] = {kind: {} for kind in STAGE_KINDS}
    for plugin_name, impls in pending.items():
        if plugin_name in failed:
            continue
        own = {(kind, impl.name): impl for kind, impl in impls}  # one name twice: the last counts
        for (kind, name), impl in own.items():
            found[kind].setdefault(name, []).append(Registered(kind, impl, plugin_name))
    for by_name in found.values():  # qualified names, and the bare name's winner first
        for regs in by_name.values():
            name_policy.rank(regs, trace)
    for plugin_name, (error, names) in failed.items():
        _mark_broken(plugin_name, error, names)
    return found


def get_implementation(stage: str, name: str) -> Registered:
    """The implementation a recipe names (a bare name, or ``QUALIFIER:name``: see
    :mod:`engine.registry.names`), or an error that lists the alternatives and names the
    broken or unloaded plugin that would have provided it."""
    if stage not in STAGE_KINDS:
        raise PluginError(f"unknown stage kind {stage!r}; known: {', '.join(STAGE_KINDS)}"
                          f"{did_you_mean(stage, STAGE_KINDS)}")
    impls = implementations()[stage]
    if name in impls:
        return impls[name]
    qual, bare = split_name(name)
    if qual is not None:
        return name_policy.resolve_qualified(stage, name, qual, bare, _registry()[stage], _unavailable(),
                                       broken=broken_plugins(), version=plugin_version)
    for b in _broken.values():
        if name in b.names:
            raise PluginError(
                f"{stage} plugin {name!r} is provided by plugin {b.name!r} (distribution "
                f"{b.distribution} {plugin_version(b.name)}), which is broken: {b.error}")
    msg = (f"no {stage} plugin named {name!r}; available: {', '.join(sorted(impls)) or 'none'}"
           f"{did_you_mean(name, impls)}")
    raise PluginError(msg + _unavailable())


def _unavailable() -> str:
    """The broken and unloaded plugins, appended to a 'no such plugin' error."""
    msg = ""
    if _broken:
        listed = ", ".join(f"{b.name} ({b.distribution})" for b in sorted(_broken.values(),
                                                                         key=lambda b: b.name))
        msg += f" (broken plugins: {listed}; see 'engine plugins')"
    if _skipped:
        msg += f" (not loaded: {', '.join(f'{n} ({why})' for n, why in sorted(_skipped.items()))})"
    return msg


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


def clash_warning(stage: str, name: str) -> str | None:
    """What ``engine validate`` says about a recipe's ``plugin: name`` when the bare name
    has several providers (:func:`engine.registry.names.clash_warning`); None for a
    qualified name, a name one plugin registers, or an unknown one."""
    return name_policy.clash_warning(name, providers(stage, name), plugin_version)
