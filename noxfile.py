"""nox sessions: tests, lint, the quickstart, and a per-plugin test matrix.

torch is installed first from the pinned CPU wheel in every session: a looser
requirement on a machine without torch would pull the newest CUDA build.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

TORCH = "torch==2.13.0"

#: built-in plugin -> pytest -k expression selecting its tests
PLUGIN_TESTS = {
    "ct": "(ct and not elo) or lora_training or frozen_8bit",
    "sft": "sft or lora_training",
    "elo": "elo and not align",
    "elo-align": "elo_align",
    "first-last": "first_last",
    "indices": "indices",
    "layer-importance": "layer_importance",
    "linear": "linear",
    "task-arithmetic": "task_arithmetic",
    "ties": "ties and not slack",
    "slack-ties": "slack_ties",
    "dare-ties": "dare",
    "perplexity": "perplexity",
    "task-accuracy": "task_accuracy or generation",
    "retention": "retention",
    "lm-eval": "lm_eval",
}


def _install(session: nox.Session, extras: str = "dev", *, constrained: bool = True) -> None:
    session.install(TORCH)
    pins = ("-c", "constraints.txt") if constrained else ()
    session.install(*pins, "-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite."""
    _install(session)
    session.run("pytest", *session.posargs)


@nox.session
def newest(session: nox.Session) -> None:
    """The whole suite against the newest releases of every dependency (torch stays
    pinned to the local CPU wheel): what a fresh ``pip install`` gets next month."""
    _install(session, constrained=False)
    session.run("pip", "list", "--format=freeze")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on everything."""
    session.install("ruff")
    session.run("ruff", "check", ".")


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
@nox.parametrize("plugin", list(PLUGIN_TESTS))
def plugin(session: nox.Session, plugin: str) -> None:
    """One built-in plugin's tests (the plugin matrix): nox -s "plugin(plugin='ties')"."""
    _install(session)
    session.run("pytest", "-k", PLUGIN_TESTS[plugin], *session.posargs)


@nox.session
def mergekit_oracle(session: nox.Session) -> None:
    """lingoforge vs mergekit 0.1.5 (own venv, run as a command, never imported)."""
    _install(session)
    mk = Path(session.virtualenv.location).parent / "mergekit"
    session.run("python", "-m", "venv", str(mk), external=True)
    session.run(str(mk / "bin/pip"), "install", TORCH, "mergekit==0.1.5", external=True)
    session.run("pytest", "tests/test_mergekit_oracle.py", "-rs",
                env={"LINGOFORGE_MERGEKIT": str(mk / "bin/mergekit-yaml")})
