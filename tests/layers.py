"""engine's import graph and its layers: every module mapped to a layer, every import read
(function-level and ``TYPE_CHECKING`` ones too, and ``importlib.import_module("engine...")``
or ``__import__("engine...")`` with a literal name), the imports that go against the layer
order, the import circles, the longest import chain, and the diagram in
docs/architecture.md.

tests/test_layers.py holds the engine to it; ``python tests/layers.py`` prints the
numbers, ``python tests/layers.py --write`` rewrites the diagram in docs/architecture.md
(a test fails while the file differs from what this module draws).

The order, each layer importing only layers to its left (and itself)::

    core < reporting < models < world < data < runtime < recipe < registry
         < {training, evaluation, merging, tokenizer} < search < plan < run < cli < {api, testing}

Layers in braces share a rank and import none of each other. ``reporting`` imports only
``core``; ``api`` and ``testing`` are faces: nothing in the engine imports them.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: layer -> rank; a module may import modules of its own layer or of a lower rank
RANKS: dict[str, int] = {
    "core": 0, "reporting": 1, "models": 2, "world": 3, "data": 4, "runtime": 5, "recipe": 6,
    "registry": 7, "training": 8, "evaluation": 8, "merging": 8, "tokenizer": 8, "search": 9,
    "plan": 10, "run": 11, "cli": 12, "api": 13, "testing": 13,
}

#: module path (or a package's path, for everything under it) -> layer; the longest
#: matching path decides. A package's folder may hold more than one layer (``run``: the
#: runtime a stage runs in, the runner, the report readers); its ``__init__`` then imports
#: nothing of the engine.
LAYER_OF: dict[str, str] = {
    "engine": "core",  # __version__ and the table of old import paths; imports nothing
    "engine.__main__": "cli",
    "engine.core": "core",
    "engine.models": "models",
    "engine.models.tokenizer": "tokenizer",
    "engine.world": "world",
    "engine.data": "data",
    "engine.run": "run",
    "engine.run.context": "runtime",
    "engine.run.distributed": "runtime",
    "engine.run.resources": "runtime",
    "engine.run.runtime": "runtime",
    "engine.run.threads": "runtime",
    "engine.run.report": "reporting",
    "engine.recipe": "recipe",
    "engine.recipe.estimate": "plan",
    "engine.recipe.model_checks": "plan",
    "engine.recipe.plan": "plan",
    "engine.recipe.schema": "plan",
    "engine.recipe.validate": "plan",
    "engine.registry": "registry",
    "engine.training": "training",
    "engine.evaluation": "evaluation",
    "engine.merging": "merging",
    "engine.merging.search": "search",
    "engine.cli": "cli",
    "engine.api": "api",
    "engine.testing": "testing",
}

#: what the engine promises about its shape (docs/architecture.md, "Numbers")
MAX_CHAIN = 12
MAX_TOP_ENTRIES = 16


@dataclass(frozen=True)
class Import:
    """One import of an engine module: where it is and what it names."""

    module: str       # the importing module
    target: str       # the imported engine module
    line: int
    inside_function: bool
    type_checking: bool
    comment: str      # the comment on the import's line and the comment lines above it


def module_name(path: Path, root: Path = ROOT) -> str:
    """``engine/run/runner.py`` -> ``engine.run.runner``; a package's ``__init__`` is the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def engine_modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the engine, by dotted name."""
    return {module_name(p, root): p for p in sorted((root / "engine").rglob("*.py"))}


def layer_of(module: str, layers: Mapping[str, str] = LAYER_OF) -> str | None:
    """The layer of ``module`` (the longest entry of ``layers`` that is it or a package above it)."""
    name = module
    while name:
        if name in layers:
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The engine module an import of ``name`` loads: itself, or the module a name belongs to."""
    known = set(known)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _literal_import(call: ast.Call) -> str | None:
    """``importlib.import_module("engine.x")`` / ``__import__("engine.x", ...)``: the name."""
    func = ast.unparse(call.func)
    if func not in ("importlib.import_module", "import_module", "__import__"):
        return None
    if call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def read_imports(module: str, source: str, known: Iterable[str], *, is_package: bool = False
                 ) -> list[Import]:
    """Every import of an engine module in ``source`` (the text of ``module``)."""
    known = set(known)
    tree = ast.parse(source)
    lines = source.splitlines()
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def comment(lineno: int) -> str:
        """The comment on the import's line and the comment lines right above it."""
        said = [lines[lineno - 1].partition("#")[2]] if "#" in lines[lineno - 1] else []
        i = lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            said.insert(0, lines[i].strip().lstrip("#"))
            i -= 1
        return " ".join(s.strip() for s in said)

    def add(name: str, node: ast.AST, in_function: bool, in_tc: bool) -> None:
        target = _resolve(name, known)
        if target is not None and target != module:
            found.append(Import(module, target, node.lineno, in_function, in_tc,
                                comment(node.lineno)))

    def visit(node: ast.AST, in_function: bool, in_tc: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node, in_function, in_tc)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            for alias in node.names:
                full = f"{base_name}.{alias.name}"
                add(full if full in known else base_name, node, in_function, in_tc)
        elif isinstance(node, ast.Call) and (name := _literal_import(node)):
            add(name, node, in_function, in_tc)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                visit(child, in_function, True)
            for child in node.orelse:
                visit(child, in_function, in_tc)
            return
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, in_tc)

    visit(tree, False, False)
    return found


def all_imports(root: Path = ROOT) -> list[Import]:
    """Every engine-to-engine import in the engine."""
    modules = engine_modules(root)
    out: list[Import] = []
    for name, path in modules.items():
        out += read_imports(name, path.read_text(encoding="utf-8"), modules,
                            is_package=path.name == "__init__.py")
    return out


def graph(imports: Iterable[Import], modules: Iterable[str]) -> dict[str, set[str]]:
    """module -> the engine modules it imports."""
    out: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        out.setdefault(imp.module, set()).add(imp.target)
    return out


def against_the_order(imports: Iterable[Import], layers: Mapping[str, str] = LAYER_OF,
                      ranks: Mapping[str, int] = RANKS) -> list[str]:
    """One line per import of a layer that its own layer may not import."""
    bad = []
    for imp in imports:
        mine, theirs = layer_of(imp.module, layers), layer_of(imp.target, layers)
        if mine is None or theirs is None or mine == theirs:
            continue
        if ranks[theirs] >= ranks[mine]:
            bad.append(f"{imp.module}:{imp.line} ({mine}) imports {imp.target} ({theirs})")
    return bad


def circles(g: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected sets of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in g.get(v, ()):
                found.append(sorted(part))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return found


def longest_chain(g: Mapping[str, set[str]]) -> list[str]:
    """The longest path of the import graph, as the modules along it (the graph has no circles)."""
    best: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in best:
            tails = [chain(w) for w in sorted(g.get(v, ()))]
            best[v] = [v, *max(tails, key=len, default=[])]
        return best[v]

    return max((chain(v) for v in sorted(g)), key=len, default=[])


def top_entries(root: Path = ROOT) -> list[str]:
    """What ``engine/`` holds at its top (caches left out)."""
    return sorted(p.name for p in (root / "engine").iterdir() if p.name != "__pycache__")


# --- the diagram -------------------------------------------------------------------------

DIAGRAM_START = "<!-- layers: generated by `python tests/layers.py --write`; do not edit -->"
DIAGRAM_END = "<!-- /layers -->"


def diagram(root: Path = ROOT) -> str:
    """The layers from the top down, each with its modules and the layers it imports (as
    the code has them today), between the markers docs/architecture.md holds."""
    modules = engine_modules(root)
    imports = all_imports(root)
    by_layer: dict[str, list[str]] = {}
    for m in modules:
        by_layer.setdefault(layer_of(m) or "?", []).append(m)
    uses: dict[str, set[str]] = {}
    for imp in imports:
        a, b = layer_of(imp.module), layer_of(imp.target)
        if a and b and a != b:
            uses.setdefault(a, set()).add(b)
    rows = ["```"]
    for rank in sorted(set(RANKS.values()), reverse=True):
        for layer in sorted(name for name, r in RANKS.items() if r == rank):
            names = sorted(by_layer.get(layer, []))
            shown = _short(names)
            used = sorted(uses.get(layer, ()), key=lambda x: (-RANKS[x], x))
            rows.append(f"{layer:<10} {len(names):>2} modules  imports: {', '.join(used) or '-'}")
            rows += [f"             {line}" for line in shown]
        if rank:
            rows.append("    |")
    rows.append("```")
    g = graph(imports, modules)
    chain = longest_chain(g)
    rows += ["", f"{len(modules)} modules, {len(imports)} imports, {len(circles(g))} import circles; "
             f"the longest import chain is {len(chain)} modules:", "",
             " -> ".join(f"`{m.removeprefix('engine.')}`" for m in chain)]
    return "\n".join([DIAGRAM_START, *rows, DIAGRAM_END]) + "\n"


def _short(names: list[str]) -> list[str]:
    """Module names grouped by package, wrapped at 88 columns."""
    groups: dict[str, list[str]] = {}
    for n in names:
        pkg, _, leaf = n.rpartition(".")
        if (ENGINE / Path(*n.split(".")[1:]) / "__init__.py").is_file() or n == "engine":
            pkg, leaf = n, "__init__"
        groups.setdefault(pkg, []).append(leaf)
    out = []
    for pkg, leaves in sorted(groups.items()):
        line = f"{pkg.replace('.', '/')}/: "
        for leaf in sorted(leaves, key=lambda x: (x != "__init__", x)):
            piece = leaf + " "
            if len(line) + len(piece) > 88:
                out.append(line.rstrip())
                line = " " * (len(pkg) + 3)
            line += piece
        out.append(line.rstrip())
    return out


def write_diagram(path: Path = ARCHITECTURE) -> bool:
    """Put the current diagram into ``path`` between its markers; True when it changed."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(DIAGRAM_START), text.index(DIAGRAM_END) + len(DIAGRAM_END) + 1
    new = text[:start] + diagram() + text[end:]
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def current_diagram(path: Path = ARCHITECTURE) -> str:
    """The diagram docs/architecture.md holds now."""
    text = path.read_text(encoding="utf-8")
    start, end = text.index(DIAGRAM_START), text.index(DIAGRAM_END) + len(DIAGRAM_END) + 1
    return text[start:end]


if __name__ == "__main__":
    if "--write" in sys.argv:
        print("rewrote" if write_diagram() else "unchanged", ARCHITECTURE.relative_to(ROOT))
    else:
        mods = engine_modules()
        imps = all_imports()
        g = graph(imps, mods)
        print(f"modules {len(mods)}  imports {len(imps)}  circles {len(circles(g))}")
        for c in circles(g):
            print("  circle:", " ".join(c))
        for line in against_the_order(imps):
            print("  against the order:", line)
        chain = longest_chain(g)
        print(f"longest chain {len(chain)}: " + " -> ".join(chain))
        print(f"top entries {len(top_entries())}: {' '.join(top_entries())}")
        inside = [i for i in imps if i.inside_function]
        print(f"imports inside functions {len(inside)}, under TYPE_CHECKING "
              f"{sum(i.type_checking for i in imps)}")
        for i in inside:
            print(f"  {i.module}:{i.line} -> {i.target}   #{i.comment.strip()}")
