"""docs/api-reference.md, generated from the public API's own docstrings.

Every name a plugin may import (``__all__`` of :mod:`engine.api` and its submodules)
gets its signature and the first paragraph of its docstring; a class also lists its
public methods, properties, fields and class attributes (an attribute's docstring is
the string literal under its declaration). The test kit a plugin's tests use
(:mod:`engine.testing` and its pytest fixtures) follows. ``engine schema --api`` prints
it, and a test checks that the file in docs/ is current, so the reference cannot drift
from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap
from pathlib import Path
from typing import Any

MODULES = ("engine.api", "engine.api.training", "engine.api.merging", "engine.api.evaluation",
           "engine.api.models", "engine.api.errors")
#: what a plugin's tests import (not the plugin itself)
TEST_MODULES = ("engine.testing",)
#: the pytest plugin whose fixtures are listed (read as source: pytest need not be installed)
FIXTURES = Path(__file__).resolve().parents[1] / "testing" / "pytest_plugin.py"


def _first_paragraph(obj: Any) -> str:
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def _signature(obj: Any) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return sig if len(sig) <= 160 else sig[:157] + "..."


def plain_signature(obj: Any) -> str:
    """``(out_dir, *, seed=0, tokenizer=None) -> Path``: the parameters with their defaults,
    without annotations, and the return annotation (the test kit's entries, whole)."""
    sig = inspect.signature(obj)
    parts: list[str] = []
    star = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append(f"**{p.name}")
        else:
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    ret = sig.return_annotation
    ret = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return f"({', '.join(parts)}){ret}"


def _attribute_docs(cls: type) -> dict[str, str]:
    """``{name: docstring}`` of the class attributes declared in ``cls``'s own body with a
    string literal right under them (the convention Sphinx reads)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for stmt, after in zip(body, body[1:]):
        target = stmt.target if isinstance(stmt, ast.AnnAssign) else (
            stmt.targets[0] if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 else None)
        if (isinstance(target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[target.id] = " ".join(inspect.cleandoc(after.value.value).split("\n\n")[0].split())
    return docs


def _attributes(cls: type) -> list[str]:
    """The documented class attributes: name, declared type, default and docstring."""
    out = []
    hints = getattr(cls, "__annotations__", {})
    for name, doc in _attribute_docs(cls).items():
        if name.startswith("_"):
            continue
        kind = str(hints.get(name, "")).removeprefix("ClassVar[").removesuffix("]") \
            if "ClassVar" in str(hints.get(name, "")) else str(hints.get(name, ""))
        head = f"  - attribute `{name}{': ' + kind if kind else ''}`"
        if name in vars(cls):
            value = vars(cls)[name]
            shown = value.__name__ if isinstance(value, type) else repr(value)
            head += f" = `{shown}`"
        out.append(f"{head}: {doc}")
    return out


def _members(cls: type) -> list[str]:
    out = _attributes(cls) if cls.__module__.startswith("engine") else []
    if dataclasses.is_dataclass(cls):
        out += [f"  - field `{f.name}`" for f in dataclasses.fields(cls) if not f.name.startswith("_")]
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict) and cls.__module__.startswith("engine"):
        for name, info in fields.items():
            key = info.alias or name
            out.append(f"  - param `{key}`: {' '.join((info.description or '').split())}".rstrip(": "))
    for name, member in sorted(vars(cls).items()):
        if name.startswith("_") or name in {"model_config", "model_fields", "Params"}:
            continue
        if isinstance(member, property):
            out.append(f"  - property `{name}`: {_first_paragraph(member)}".rstrip(": "))
        elif inspect.isfunction(member) or isinstance(member, (classmethod, staticmethod)):
            fn = member.__func__ if isinstance(member, (classmethod, staticmethod)) else member
            out.append(f"  - `{name}{_signature(fn)}`: {_first_paragraph(fn)}".rstrip(": "))
    return out


def _entry(module: str, name: str, obj: Any, *, plain: bool = False) -> list[str]:
    if inspect.ismodule(obj):
        return [f"- **`{name}`** (module): {_first_paragraph(obj)}"]
    if inspect.isclass(obj):
        head = f"- **`{name}`** (class{', from ' + obj.__module__ if obj.__module__ != module else ''})"
        return [f"{head}: {_first_paragraph(obj)}", *_members(obj)]
    if callable(obj):
        sig = plain_signature(obj) if plain else _signature(obj)
        return [f"- **`{name}{sig}`**: {_first_paragraph(obj)}"]
    return [f"- **`{name}`** = `{obj!r}`" if len(repr(obj)) < 60 else f"- **`{name}`**"]


def _fixtures() -> list[str]:
    """The pytest fixtures of the test kit: name, scope, what they return, docstring."""
    tree = ast.parse(FIXTURES.read_text(encoding="utf-8"))
    out = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("lingoforge_"):
            continue
        scope = "test"
        for deco in node.decorator_list:
            for kw in deco.keywords if isinstance(deco, ast.Call) else []:
                if kw.arg == "scope" and isinstance(kw.value, ast.Constant):
                    scope = kw.value.value
        returns = f" -> `{ast.unparse(node.returns)}`" if node.returns is not None else ""
        doc = " ".join((ast.get_docstring(node) or "").split("\n\n")[0].split())
        out.append(f"- **`{node.name}`** (fixture, {scope} scope){returns}: {doc}".rstrip(": "))
    return out


def _module(module: str, *, plain: bool = False) -> list[str]:
    mod = importlib.import_module(module)
    out = [f"## `{module}`", "", _first_paragraph(mod), ""]
    for name in sorted(mod.__all__, key=str.lower):
        out += _entry(module, name, getattr(mod, name), plain=plain)
    return [*out, ""]


def markdown() -> str:
    out = ["# Plugin API reference", "",
           "Generated by `engine schema --api > docs/api-reference.md` from the docstrings of "
           "every name a plugin may import; the guide is [plugins.md](plugins.md). A plugin "
           "imports these modules and nothing else of the engine; its tests also use the test "
           "kit, [`engine.testing`](#enginetesting), listed last.", ""]
    for module in MODULES:
        out += _module(module)
    for module in TEST_MODULES:
        out += _module(module, plain=True)
    out += ["### pytest fixtures", "",
            "Registered by the `pytest11` entry point `lingoforge` in every project that has "
            "lingoforge installed:", "", *_fixtures(), ""]
    return "\n".join(out).rstrip() + "\n"
