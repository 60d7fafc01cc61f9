"""nox sessions: tests, lint, the quickstart, a per-plugin matrix, the example plugin
package, the oldest and newest dependency releases, and the GPU check.

torch is installed first from the pinned CPU wheel in every session: a looser
requirement on a machine without torch would pull the newest CUDA build.

The plugin matrix (``nox -s "plugin(plugin='ties')"``) gives each built-in plugin its
own environment with only the extras it needs, and runs its conformance case
(tests/testing/test_conformance.py) and its unit tests, selected by node id: every test
function of its files whose name starts with ``test_<plugin>_`` (the suite's naming
convention), read from the files' syntax tree, plus files that are the plugin's alone.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"
#: what every test environment needs besides the engine
TEST_TOOLS = ("pytest", "hypothesis")
ROOT = Path(__file__).parent
EXAMPLE = "examples/lingoforge-extras"
#: the oldest releases pyproject.toml claims for the libraries the engine leans on
#: (torch excepted: 2.13.0 is the only CPU wheel reachable here, see ``oldest``). Measured
#: 2026-12: transformers 5.0-5.5 load a tokenizer from a folder without tokenizer files (an
#: evaluator then fails the stage instead of that model); transformers 5.x needs accelerate
#: >= 1.2 (get_module_size_with_ties; 1.0-1.1 count as missing, so device_map loading, e.g.
#: frozen_8bit, fails); peft 0.17 imports transformers' HybridCache, gone in 5.x.
OLDEST = ("transformers==5.6.0", "accelerate==1.2.0", "peft==0.18.0", "pydantic==2.7.0")


@dataclass(frozen=True)
class Plugin:
    """One built-in plugin of the matrix: its stage kind, the extras it needs, the test
    files holding its ``test_<prefix>_*`` tests, and files that are its alone."""

    kind: str
    extras: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    whole: tuple[str, ...] = ()
    prefix: str | None = None
    exclude: tuple[str, ...] = field(default_factory=tuple)
    #: its other conformance cases (tests/testing/test_conformance.py VARIANTS)
    variants: tuple[str, ...] = ()


PLUGINS: dict[str, Plugin] = {
    "ct": Plugin("adapt-language", ("lora", "8bit"),
                 ("training/test_plugins_adapt.py", "training/test_lora_training.py", "training/test_checkpoint.py",
                  "training/test_distributed.py"), variants=("layers", "lora", "frozen_8bit")),
    "sft": Plugin("adapt-language", ("lora",), ("training/test_plugins_adapt.py", "training/test_lora_training.py"),
                  variants=("lora-adapter",)),
    "elo": Plugin("adapt-language", (), ("training/test_plugins_adapt.py", "models/test_architectures.py",
                                         "training/test_training.py"), exclude=("test_elo_align",),
                  variants=("train_embeddings",)),
    "elo-align": Plugin("align", (), ("training/test_plugins_adapt.py",)),
    "vocabulary": Plugin("adapt-language", ("vocab",), whole=("models/tokenizer/test_vocab_recipes.py",)),
    "first-last": Plugin("select-layers", (), ("training/test_plugins_adapt.py",)),
    "indices": Plugin("select-layers", (), ("training/test_plugins_adapt.py",)),
    "layer-importance": Plugin("select-layers", (), ("training/test_plugins_adapt.py",)),
    "linear": Plugin("merge", (), ("merging/test_cli_merge.py", "merging/test_merge_math.py", "merging/test_merge_plugins.py")),
    "task-arithmetic": Plugin("merge", (), ("merging/test_merge_math.py", "merging/test_merge_plugins.py",
                                            "merging/test_merge_slices.py")),
    "ties": Plugin("merge", (), ("merging/test_cli_merge.py", "merging/test_merge_inputs.py", "merging/test_merge_math.py",
                                 "merging/test_merge_plugins.py", "merging/test_merge_slices.py")),
    "slack-ties": Plugin("merge", (), ("merging/test_merge_math.py", "merging/test_merge_plugins.py",
                                       "merging/test_merge_slices.py")),
    "dare-ties": Plugin("merge", (), ("merging/test_merge_math.py", "merging/test_merge_plugins.py")),
    "breadcrumbs": Plugin("merge", (), ("merging/test_merge_bands.py",), whole=("merging/test_breadcrumbs.py",),
                          exclude=("test_breadcrumbs_ties",)),
    "breadcrumbs-ties": Plugin("merge", (), ("merging/test_merge_bands.py",), whole=("merging/test_breadcrumbs.py",)),
    "slerp": Plugin("merge", (), ("merging/test_merge_methods_more.py",)),
    "model-stock": Plugin("merge", (), ("merging/test_merge_methods_more.py",)),
    "della": Plugin("merge", (), ("merging/test_merge_methods_more.py",)),
    "della-linear": Plugin("merge", (), ("merging/test_merge_methods_more.py",), prefix="della"),
    "passthrough": Plugin("merge", (), ("merging/test_merge_methods_more.py",)),
    "perplexity": Plugin("evaluate", (), ("evaluation/test_evaluate.py",)),
    "task-accuracy": Plugin("evaluate", ("8bit",), ("evaluation/test_evaluate.py",), whole=("evaluation/test_generation.py",)),
    "retention": Plugin("evaluate", (), whole=("evaluation/test_retention.py",)),
    "lm-eval": Plugin("evaluate", ("lm-eval",), whole=("evaluation/test_lm_eval.py",)),
}


def _test_functions(path: Path) -> list[str]:
    """``file::test`` node ids of a test file's test functions (classes' methods too)."""
    tree = ast.parse(path.read_text(), str(path))
    ids = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            ids.append(node.name)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            ids += [f"{node.name}::{n.name}" for n in node.body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name.startswith("test")]
    return ids


def plugin_tests(name: str) -> list[str]:
    """The node ids the matrix runs for built-in plugin ``name``."""
    spec = PLUGINS[name]
    prefix = f"test_{(spec.prefix or name).replace('-', '_')}_"
    ids = [f"tests/testing/test_conformance.py::test_builtin_conforms[{spec.kind}/{name}]"]
    ids += [f"tests/testing/test_conformance.py::test_builtin_variant_conforms[{name}+{v}]"
            for v in spec.variants]
    for file in spec.files:
        for test in _test_functions(ROOT / "tests" / file):
            func = test.split("::")[-1]
            if func.startswith(prefix) and not func.startswith(spec.exclude):
                ids.append(f"tests/{file}::{test}")
    ids += [f"tests/{file}" for file in spec.whole]
    return ids


def _install(session: nox.Session, extras: str = "dev", *, constrained: bool = True) -> None:
    session.install(TORCH)
    pins = ("-c", "constraints.txt") if constrained else ()
    session.install(*pins, "-e", f".[{extras}]" if extras else ".")


#: how the whole suite runs (README, .ci/run, docs/development.md): two pytest-xdist workers,
#: each running its part of the tests in collection order, the idle one taking over the end
#: of the other's queue; posargs may override (``-- -n 0`` runs in one process)
PARALLEL = ("-n", "2", "--dist", "worksteal")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, on two workers."""
    _install(session)
    session.run("pytest", *PARALLEL, *session.posargs)


@nox.session
def newest(session: nox.Session) -> None:
    """The whole suite against the newest releases of every dependency (torch stays
    pinned to the local CPU wheel): what a fresh ``pip install`` gets next month."""
    _install(session, constrained=False)
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", *PARALLEL, *session.posargs)


@nox.session
def oldest(session: nox.Session) -> None:
    """The oldest releases pyproject.toml claims of transformers, accelerate, peft and
    pydantic, with the conformance suite and the core unit tests (posargs: other tests).

    torch stays at the pinned 2.13.0 CPU wheel: no older CPU wheel is reachable from
    these machines (the PyTorch CPU index cannot be resolved, and PyPI's older torch
    wheels bring CUDA), so pyproject.toml's torch floor is claimed, not tested here.
    """
    session.install(TORCH)
    session.install(*OLDEST, "-e", ".[lora,8bit]", *TEST_TOOLS)
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", *(session.posargs or (
        "tests/testing/test_conformance.py", "tests/training/test_plugins_adapt.py", "tests/merging/test_merge_plugins.py",
        "tests/training/test_lora_training.py", "tests/evaluation/test_evaluate.py", "tests/run/test_runner.py",
        "tests/recipe/test_recipe.py")))


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on everything."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def wheel(session: nox.Session) -> None:
    """The built wheel in a fresh environment, not the editable install: build it from a
    clean copy of the tree, install it with its dependencies, check that it carries the
    shipped world (``python -m engine.world --shipped``: tiny-base against its manifest)
    and dry-run the quickstart from outside the repository (tests/test_wheel.py does the
    dry run too, borrowing the test environment's dependencies)."""
    tmp = Path(session.create_tmp())
    source = tmp / "source"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".nox", "build", "dist", "*.egg-info", "runs", "__pycache__", ".*_cache"))
    session.install(TORCH, "setuptools>=77", "wheel")
    session.run("python", "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                "-w", str(tmp / "dist"))
    (built,) = (tmp / "dist").glob("lingoforge-*.whl")
    session.install("-c", "constraints.txt", str(built))
    session.chdir(tmp)
    session.run("python", "-m", "engine.world", "--shipped")
    session.run("engine", "run", str(ROOT / "recipes" / "quickstart.yaml"), "--dry-run",
                "--workdir", str(tmp / "runs"))


@nox.session
def quickstart(session: nox.Session) -> None:
    """Run recipes/quickstart.yaml end to end on the built-in world."""
    _install(session)
    session.run("engine", "validate", "recipes/quickstart.yaml")
    session.run("engine", "run", "recipes/quickstart.yaml", "--workdir", "runs/quickstart", *session.posargs)


@nox.session
def maintenance(session: nox.Session) -> None:
    """Run recipes/maintenance.yaml (per-language LoRA adapters, merged) end to end."""
    _install(session)
    session.run("engine", "run", "recipes/maintenance.yaml", "--workdir", "runs/maintenance",
                *session.posargs)


@nox.session
@nox.parametrize("plugin", list(PLUGINS))
def plugin(session: nox.Session, plugin: str) -> None:
    """One built-in plugin in its own environment, with only the extras it needs: its
    conformance case and its unit tests (``nox -s "plugin(plugin='ties')"``)."""
    spec = PLUGINS[plugin]
    session.install(TORCH)
    session.install("-c", "constraints.txt", "-e", f".[{','.join(spec.extras)}]" if spec.extras else ".",
                    *TEST_TOOLS)
    ids = plugin_tests(plugin)
    if len(ids) < 2:
        session.error(f"no unit tests found for {plugin} (test_{plugin.replace('-', '_')}_* in "
                      f"{', '.join(spec.files)})")
    session.run("pytest", *ids, *session.posargs)


@nox.session
def example(session: nox.Session) -> None:
    """The out-of-tree example package (examples/lingoforge-extras) installed beside the
    engine: ``engine plugins`` lists it and its own tests (engine.testing's fixtures and
    conformance suite) pass."""
    session.install(TORCH)
    session.install("-c", "constraints.txt", "-e", ".", "-e", EXAMPLE, *TEST_TOOLS)
    session.run("engine", "plugins")
    session.run("pytest", f"{EXAMPLE}/tests", *session.posargs)


@nox.session
def mergekit_oracle(session: nox.Session) -> None:
    """lingoforge vs mergekit 0.1.5 (own venv, run as a command, never imported)."""
    _install(session)
    mk = Path(session.virtualenv.location).parent / "mergekit"
    session.run("python", "-m", "venv", str(mk), external=True)
    session.run(str(mk / "bin/pip"), "install", TORCH, "mergekit==0.1.5", external=True)
    session.run("pytest", "tests/merging/test_mergekit_oracle.py", "-rs",
                env={"LINGOFORGE_MERGEKIT": str(mk / "bin/mergekit-yaml")})


@nox.session
def gpu(session: nox.Session) -> None:
    """The GPU check (benchmarks/speed/gpu_check.py) on this machine's first CUDA device, at tiny
    size on the CPU without one; arguments go to the script (``-- --out DIR``)."""
    _install(session, "8bit")
    session.run("python", "benchmarks/speed/gpu_check.py", *session.posargs)
