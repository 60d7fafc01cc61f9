"""The built wheel, not the editable install: built from this tree, installed into a fresh
virtual environment, and ``engine run recipes/quickstart.yaml --dry-run`` run from outside
the repository, so a package missing from pyproject.toml's list fails here.

The fresh environment borrows the test environment's third-party packages (torch,
transformers, ...) through a ``.pth`` line instead of installing them again, which takes
minutes and a package index; ``nox -s wheel`` installs everything from scratch
(docs/development.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_built_wheel_runs_the_quickstart_dry_run(tmp_path):
    # a clean copy: an in-tree build would reuse build/lib, which may hold a package the
    # list no longer names
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".nox", "build", "dist", "*.egg-info", "runs", "__pycache__", ".*_cache",
        ".hypothesis"))
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps",
                            "--no-build-isolation", "-q", "-w", str(dist)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = dist.glob("lingoforge-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the test environment's third-party packages; its editable lingoforge is not among them
    # (an editable install is a finder that only its own site-packages' .pth files start)
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                                "--no-deps", "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(python), "-c", "import engine, engine_plugins; print(engine.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout  # the wheel's engine

    run = subprocess.run([str(env_dir / "bin" / "engine"), "run", str(ROOT / "recipes" / "quickstart.yaml"),
                          "--dry-run", "--workdir", str(tmp_path / "runs")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ct-lum" in run.stdout + run.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
