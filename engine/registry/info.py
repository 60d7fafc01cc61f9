"""What ``engine plugins`` shows: each plugin, what it registers, and whether it can run.

Every implementation gets a one-line description: its ``description`` attribute, else
the first line of its class docstring, else of its module's docstring.

An implementation whose work needs an optional package declares it, and ``engine
plugins`` (and ``engine validate``, as a warning) says when that package is missing,
without importing anything (:func:`importlib.util.find_spec`):

* ``requires`` -- a tuple of top-level module names the implementation imports when
  it runs (``("lm_eval",)``);
* ``extra`` (optional) -- the extra of the plugin's distribution that installs them
  (``"lm-eval"``): the message is then ``needs extra lingoforge[lm-eval]: pip install
  'lingoforge[lm-eval]'``, with the plugin's own distribution name for a third-party
  plugin. Without ``extra`` it names the missing modules.

The implementation still registers (recipes using it validate); its ``run`` should
raise a clear :class:`~engine.core.errors.EngineError` when the package is missing.
"""

from __future__ import annotations

import sys
from typing import Any

from engine.registry import manager as _pm
from engine.registry.implementation import (  # the requirement helpers: importable from here too
    describe,
    missing_requirements,
    requirement_hint,
    requirements,
)

__all__ = ["clash_fields", "description", "missing_requirements", "plugins_info",
           "requirement_hint"]


def description(impl: Any) -> str:
    """One line that says what ``impl`` does (``description``, class or module docstring)."""
    text = describe(impl)
    if text:
        return text
    module = sys.modules.get(type(impl).__module__)
    doc = (getattr(module, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def _row(name: str) -> dict[str, Any]:
    return {"name": name, "distribution": _pm.plugin_distribution(name),
            "version": _pm.plugin_version(name), "registers": {}, "broken": None, "skipped": None}


def _implementation(reg: Any) -> dict[str, Any]:
    """``name`` and ``description``; with ``requires`` declared, also ``requires``, the
    ``missing`` modules and ``needs`` (the install hint, null when nothing is missing);
    when another plugin registers the same name, also ``qualified`` (the spelling that
    reaches this one), ``shadowed_by`` (the qualified name the bare name runs instead,
    null for the one it runs), ``shadows`` (for that one: the others) and ``clash`` (one
    line saying so)."""
    row: dict[str, Any] = {"name": reg.name, "description": description(reg.impl)}
    if requirements(reg.impl):
        row.update(requires=list(requirements(reg.impl)), missing=missing_requirements(reg.impl),
                   needs=requirement_hint(reg.impl, reg.distribution))
    row.update(clash_fields(reg))
    return row


def clash_fields(reg: Any) -> dict[str, Any]:
    """What ``engine plugins`` adds to an implementation whose bare name another plugin
    also registers (nothing when none does): see :func:`_implementation`."""
    regs = reg.providers
    if len(regs) < 2:
        return {}
    winner = regs[0]
    if reg.shadowed_by is not None:
        return {"qualified": reg.qualified, "shadowed_by": winner.qualified, "shadows": [],
                "clash": f"shadowed by {winner.qualified} for the bare name {reg.name!r}; "
                         f"reach this one as {reg.qualified}"}
    others = [r.qualified for r in regs[1:]]
    return {"qualified": reg.qualified, "shadowed_by": None, "shadows": others,
            "clash": f"the bare name {reg.name!r} runs this one, shadowing {', '.join(others)}; "
                     f"qualified: {reg.qualified}"}


def plugins_info() -> list[dict[str, Any]]:
    """What ``engine plugins`` shows: each plugin, its distribution and version, what it
    registers (per stage kind, and ``embedding-init`` for init methods of new vocabulary
    rows; name, description; declared requirements, the missing ones and the install
    hint where it declares ``requires``; the qualified name and who shadows whom where
    another plugin registers the same name), and whether it is broken or kept out by the
    allow/block lists. A shadowed implementation is listed under its plugin like any
    other: a name clash never makes a plugin broken."""
    every = _pm.all_implementations()
    rows: dict[str, dict[str, Any]] = {}
    for name in (_pm.pm.get_name(p) for p in _pm.pm.get_plugins()):
        if name is not None:
            rows[name] = _row(name)
    for kind, regs in every.items():
        for reg in regs:
            rows.setdefault(reg.plugin, _row(reg.plugin))["registers"].setdefault(kind, []).append(
                _implementation(reg))
    for impl in _pm.pm.hook.register_embedding_inits.get_hookimpls():  # not a stage kind
        plugin = _pm.pm.get_name(impl.plugin) or repr(impl.plugin)
        got: list[Any] = []
        try:
            impl.function(register=got.append)
        except Exception:  # the commands that use init methods report it
            continue
        for method in got:
            item = {"name": getattr(method, "name", repr(method)), "description": description(method)}
            if requirements(method):
                item.update(requires=list(requirements(method)), missing=missing_requirements(method),
                            needs=requirement_hint(method, _pm.plugin_distribution(plugin)))
            rows.setdefault(plugin, _row(plugin))["registers"].setdefault("embedding-init", []).append(item)
    for b in _pm.broken_plugins():
        rows.setdefault(b.name, _row(b.name))["broken"] = b.error
        rows[b.name]["registers"] = {}
    for name, why in _pm.skipped_plugins().items():
        rows.setdefault(name, _row(name))["skipped"] = why
    return sorted(rows.values(), key=lambda r: r["name"])
