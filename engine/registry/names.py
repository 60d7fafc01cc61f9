"""The plugin-name policy: what a recipe's ``plugin:`` reaches when two plugins register
the same name for a stage kind (docs/plugins.md, "Name clashes").

* **Qualified names.** Every implementation is reachable as ``QUALIFIER:name``, the
  qualifier being the distribution that ships it (its metadata's ``Name``, compared as
  PEP 503 does: ``Lingoforge_Breadcrumbs`` is ``lingoforge-breadcrumbs``; ``lingoforge``
  for a built-in) or its plugin name as ``engine plugins`` shows it (the entry-point
  name; ``engine_plugins.ties`` for a built-in; the name given to ``pm.register``).
  :func:`qualifier` gives the canonical spelling: the distribution, or the plugin name
  where there is no distribution or two plugins of one distribution share the name.
* **Precedence** (:func:`precedence`). A bare name registered by several plugins runs
  the one that is not built in (an installed distribution beats the built-in: it was
  installed deliberately and its recipes may predate the built-in); within one tier,
  the qualified name that sorts first, so the answer does not depend on the order in
  which entry points are found. The others are *shadowed*: listed by ``engine plugins``
  with the qualified name that reaches them, never broken.
* **Warnings** (:func:`clash_warning`). ``engine validate`` and ``engine run`` warn
  about a recipe's bare name that has several providers, naming which one runs and the
  qualified spellings that remove the doubt. A plan records a clashing implementation by
  its qualified name (``Registered.unique_name``), so reports, ``context.plugin`` and
  cache keys never take one provider's result for another's.


The policy reads only what it is handed (the providers of a name, the broken plugins, a
version lookup); :mod:`engine.registry.manager` hands them over, so this module sits below it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from engine.core.errors import PluginError
from engine.core.suggest import did_you_mean

#: a provider of a name: :class:`engine.registry.manager.Registered` (the manager sits above)
Registered = Any

__all__ = ["clash_warning", "precedence", "qualifier", "rank", "resolve_qualified", "split_name"]


def split_name(name: str) -> tuple[str | None, str]:
    """``("DIST", "name")`` for a qualified ``DIST:name``; ``(None, name)`` for a bare one."""
    qual, sep, bare = name.partition(":")
    if sep and qual.strip() and bare.strip():
        return qual.strip(), bare.strip()
    return None, name


def _normal(name: str) -> str:
    """A distribution name as PEP 503 compares it (``Foo_Bar.baz`` is ``foo-bar-baz``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _known_distribution(distribution: str) -> bool:
    return distribution not in ("-", "?", "")


def qualifier(reg: Registered, rivals: list[Registered] | None = None) -> str:
    """What goes before the colon of ``reg``'s qualified name: its distribution (as its
    metadata spells it), or its plugin name when it has no distribution (registered
    in-process) or when another plugin of the same distribution registers the same name
    (``rivals``: every provider of the name)."""
    if not _known_distribution(reg.distribution):
        return reg.plugin
    same = [r for r in rivals or [reg] if _known_distribution(r.distribution)
            and _normal(r.distribution) == _normal(reg.distribution)]
    return reg.distribution if len(same) < 2 else reg.plugin


def matches(qual: str, plugin: str, distribution: str) -> bool:
    """Whether the qualifier ``qual`` names this plugin: its plugin name, or its
    distribution in any PEP 503 spelling."""
    return qual == plugin or (_known_distribution(distribution)
                              and _normal(qual) == _normal(distribution))


def precedence(reg: Registered) -> tuple[bool, str]:
    """The sort key of the providers of one bare name; the smallest runs the bare name:
    not built in before built in, then the qualified name (case-insensitively)."""
    return (reg.builtin, reg.qualified.lower())


def rank(regs: list[Registered], trace: Callable[[str], None]) -> None:
    """Give each provider of one bare name its qualified name and sort them in
    :func:`precedence` order (in place); ``trace`` hears about a clash."""
    for reg in regs:
        reg.qualified = f"{qualifier(reg, regs)}:{reg.name}"
    regs.sort(key=precedence)
    if len(regs) > 1:
        trace(f"{regs[0].stage} name {regs[0].name!r} has {len(regs)} providers: "
              f"{', '.join(r.qualified for r in regs)}; the bare name runs {regs[0].qualified}")


def resolve_qualified(stage: str, name: str, qual: str, bare: str,
                      registry: dict[str, list[Registered]], unavailable: str = "", *,
                      broken: Iterable[Any] = (), version: Callable[[str], str] = lambda _: "?",
                      ) -> Registered:
    """The implementation ``QUALIFIER:bare`` reaches among ``registry`` (``{bare name:
    providers}`` of one stage kind), or an error in the words of an unknown plugin (with
    the qualified name closest to ``name``; ``unavailable`` lists broken and unloaded
    plugins, ``broken`` the broken plugins themselves, ``version`` a plugin's version)."""
    every = [r for regs in registry.values() for r in regs]
    hits = [r for r in registry.get(bare, ()) if matches(qual, r.plugin, r.distribution)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise PluginError(f"{stage} plugin {name!r} names {len(hits)} plugins of one distribution; "
                          f"write one of {', '.join(repr(r.qualified) for r in hits)}")
    for b in broken:
        if bare in b.names and matches(qual, b.name, b.distribution):
            raise PluginError(
                f"{stage} plugin {name!r} is provided by plugin {b.name!r} (distribution "
                f"{b.distribution} {version(b.name)}), which is broken: {b.error}")
    own = sorted({r.name for r in every if matches(qual, r.plugin, r.distribution)})
    why = (f"{qual} registers {stage} implementations {', '.join(own)}" if own else
           f"no loaded plugin or distribution {qual!r} registers {stage} implementations")
    raise PluginError(f"no {stage} plugin named {name!r} ({why})"
                      f"{did_you_mean(name, [r.qualified for r in every])}{unavailable}")


def clash_warning(name: str, regs: list[Registered], version: Callable[[str], str]) -> str | None:
    """What ``engine validate`` says about a recipe's ``plugin: name`` when the bare name
    has several providers (``regs``, winner first): which one runs, why, and the qualified
    spellings that remove the doubt. None when there are fewer than two."""
    if len(regs) < 2:
        return None
    winner, others = regs[0], regs[1:]
    why = ("a plugin that is not built in wins over a built-in" if not winner.builtin and any(
        r.builtin for r in others) else "among plugins of one tier, the qualified name that sorts "
                                        "first wins")
    listing = ", ".join(_who(r, version) for r in regs[:-1]) + f" and {_who(regs[-1], version)}"
    alternatives = ", ".join(f"plugin: {r.qualified} for {_who(r, version)}" for r in others)
    return (f"plugin {name!r} is registered by {len(regs)} plugins ({listing}); the bare name "
            f"runs {winner.qualified} ({why}). Write plugin: {winner.qualified} to keep it, or "
            f"{alternatives} (docs/plugins.md, 'Name clashes')")


def _who(reg: Registered, version: Callable[[str], str]) -> str:
    """``lingoforge-breadcrumbs 0.1``, ``the built-in`` or ``plugin 'name'`` (in-process)."""
    if reg.builtin:
        return "the built-in"
    if _known_distribution(reg.distribution):
        return f"{reg.distribution} {version(reg.plugin)}"
    return f"plugin {reg.plugin!r}"
