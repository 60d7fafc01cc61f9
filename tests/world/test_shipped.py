"""The build of the base model that ships with the package (engine/world/shipped-models/): its
bytes against its manifest, the package data that carries it into the wheel, whether
the build code is still set to make it, and how a first use installs it.

The full rebuild check pretrains for minutes and only matches on the kind of machine
that built the shipped files, so it runs only when asked:
``LINGOFORGE_CHECK_WORLD_BUILD=1 pytest tests/world/test_shipped.py -k bit_for_bit``.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from engine import world
from engine.world import cache as cache_module
from engine.world import pretrain
from engine.world.__main__ import main
from engine.world.cache import MANIFEST, differs_from_shipped, file_hashes, shipped_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = shipped_dir("tiny-base")
FILES = ["chat_template.jinja", "config.json", "generation_config.json", "lingoforge.json",
         "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
TOKENIZER_FILES = ["chat_template.jinja", "tokenizer.json", "tokenizer_config.json"]


def _record() -> dict:
    return json.loads((cache_module.ASSETS / "tiny-base.build.json").read_text())


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LINGOFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fast_builds(monkeypatch) -> list[Path]:
    """Pretraining on this machine shortened to one step; returns the folders built."""
    calls: list[Path] = []

    def fast_build(folder: Path) -> None:
        calls.append(folder)
        pretrain.build_base_model(folder, steps=1, batch_size=2)

    monkeypatch.setattr(world, "_build_model", fast_build)
    return calls


@pytest.fixture
def no_pretraining(monkeypatch):
    def refuse(folder: Path) -> None:
        raise AssertionError("the base model was pretrained instead of copied from the package")

    monkeypatch.setattr(world, "_build_model", refuse)


def test_the_shipped_model_matches_its_manifest():
    assert cache_module.shipped_problem("tiny-base") is None
    manifest = json.loads((SHIPPED / MANIFEST).read_text())
    assert manifest["world_version"] == world.WORLD_VERSION
    assert sorted(manifest["files"]) == sorted(file_hashes(SHIPPED)) == FILES
    assert sorted(p.name for p in SHIPPED.iterdir()) == sorted([*FILES, MANIFEST])
    for rel, want in manifest["files"].items():
        assert (SHIPPED / rel).stat().st_size == want["size"]


@pytest.mark.skipif(tomllib is None, reason="reading pyproject.toml needs Python 3.11's tomllib")
def test_the_package_data_carries_every_shipped_file():
    """What setuptools puts into the wheel: pyproject.toml's package-data patterns for
    engine.world, expanded as its glob does (``*`` skips dot files, a name matches itself)."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["package-data"]["engine.world"]
    base = ROOT / "engine" / "world"
    carried = {Path(p).relative_to(base).as_posix()
               for pattern in patterns for p in glob.glob(str(base / pattern)) if Path(p).is_file()}
    shipped = {p.relative_to(base).as_posix() for p in cache_module.ASSETS.rglob("*") if p.is_file()}
    assert shipped == {f"shipped-models/tiny-base/{f}" for f in [*FILES, MANIFEST]} | {
        "shipped-models/tiny-base.build.json"}
    assert shipped <= carried


def test_the_shipped_model_is_what_the_code_is_set_to_build(tmp_path):
    """Without pretraining (seconds): the settings, the architecture, the tokenizer the
    code trains and the rows it would feed the pretraining are those of the shipped build.
    A change to the corpus, the tokenizer or a setting fails here until the shipped build
    is remade (``python -m engine.world --write-shipped``, docs/world.md)."""
    record, meta = _record(), json.loads((SHIPPED / "lingoforge.json").read_text())
    settings = {"steps": pretrain.PRETRAIN_STEPS, "batch_size": pretrain.BATCH_SIZE,
                "seq_len": pretrain.SEQ_LEN, "peak_lr": pretrain.PEAK_LR, "seed": pretrain.SEED}
    for key, value in settings.items():
        assert record[key] == meta[key] == value, key
    assert record["world_version"] == world.WORLD_VERSION
    assert meta["torch_version"] == record["torch_version"] and meta["threads"] == record["threads"]
    assert json.loads((SHIPPED / "config.json").read_text()) == pretrain.config_dict()
    _, rows = pretrain.pretraining_data(save_to=tmp_path)
    for name in TOKENIZER_FILES:
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name
    assert pretrain.rows_digest(rows) == record["pretraining_rows_sha256"]


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LINGOFORGE_CHECK_WORLD_BUILD"),
                    reason="pretrains for minutes; set LINGOFORGE_CHECK_WORLD_BUILD=1 to run it")
def test_the_build_code_still_makes_the_shipped_model_bit_for_bit(tmp_path):
    """The full build, as ``python -m engine.world --rebuild`` runs it, with the shipped
    build's thread count. Bit for bit only on the kind of CPU and the torch version the
    record names; elsewhere the weights differ in the last bits (docs/world.md)."""
    import torch

    record = _record()
    before = torch.get_num_threads()
    torch.set_num_threads(record["threads"])
    try:
        pretrain.build_base_model(tmp_path / "tiny-base")
    finally:
        torch.set_num_threads(before)
    built, shipped = file_hashes(tmp_path / "tiny-base"), file_hashes(SHIPPED)
    differing = sorted(k for k in shipped if built.get(k) != shipped[k])
    assert not differing, (
        f"{differing} differ from the shipped build (made on {record['cpu']}, torch "
        f"{record['torch_version']}, {record['threads']} threads; this is torch {torch.__version__})")


def test_first_use_copies_the_shipped_model_and_pretrains_nothing(cache, no_pretraining, capsys):
    path = world.model_path("tiny-base")
    assert path == world.world_dir() / "models" / "tiny-base"
    assert file_hashes(path) == file_hashes(SHIPPED)
    assert differs_from_shipped("tiny-base", path) == []
    assert json.loads((path / MANIFEST).read_text()) == json.loads((SHIPPED / MANIFEST).read_text())
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]
    assert "building" not in capsys.readouterr().err
    assert world.model_config("tiny-base") == json.loads((SHIPPED / "config.json").read_text())


def test_a_damaged_cached_model_is_copied_again(cache, no_pretraining, capsys):
    path = world.model_path("tiny-base")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    cache_module._verified.clear()  # a new process
    assert world.model_path("tiny-base") == path
    assert "model.safetensors does not match its checksum" in capsys.readouterr().err
    assert file_hashes(path) == file_hashes(SHIPPED)


def test_a_damaged_shipped_build_is_not_used(cache, fast_builds, monkeypatch, tmp_path, capsys):
    assets = tmp_path / "assets"
    shutil.copytree(SHIPPED, assets / "tiny-base")
    (assets / "tiny-base" / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(cache_module, "ASSETS", assets)
    world.model_path("tiny-base")
    err = capsys.readouterr().err
    assert "tokenizer.json does not match its checksum" in err and len(fast_builds) == 1


def test_rebuild_pretrains_here_even_with_a_shipped_build(cache, fast_builds, capsys):
    path = world.model_path("tiny-base")
    assert fast_builds == []
    assert world.model_path("tiny-base", rebuild=True) == path and len(fast_builds) == 1
    assert "building the built-in tiny world" in capsys.readouterr().err
    assert differs_from_shipped("tiny-base", path)  # one step of pretraining is not 900


def test_cli_says_whether_the_cache_holds_the_shipped_build(cache, no_pretraining, capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "# models/tiny-base: identical to the build the package ships" in out
    assert f"{file_hashes(SHIPPED)['model.safetensors']}  models/tiny-base/model.safetensors" in out
    weights = world.model_path("tiny-base") / "model.safetensors"
    weights.write_bytes(b"built elsewhere")  # and its manifest with it: a build of its own
    cache_module.write_manifest(weights.parent)
    cache_module._verified.clear()
    assert main([]) == 0
    assert "differs from the build the package ships in model.safetensors" in capsys.readouterr().out


def test_cli_checks_the_shipped_build(monkeypatch, tmp_path, capsys):
    assert main(["--shipped"]) == 0
    out = capsys.readouterr().out
    assert "matches its manifest" in out and out.count("models/tiny-base/") == len(FILES)
    monkeypatch.setattr(cache_module, "ASSETS", tmp_path / "no-assets")
    assert main(["--shipped"]) == 1
    assert "ships no build of tiny-base" in capsys.readouterr().out


def test_write_shipped_makes_a_build_the_one_that_installs(cache, monkeypatch, tmp_path):
    monkeypatch.setattr(cache_module, "ASSETS", tmp_path / "assets")
    built = tmp_path / "built"  # files as a build leaves them (their content does not matter here)
    built.mkdir()
    (built / "config.json").write_text("{}")
    (built / "model.safetensors").write_bytes(b"weights")
    cache_module.write_shipped("tiny-base", built, {"model": "tiny-base"})
    assert cache_module.shipped_problem("tiny-base") is None
    assert json.loads((tmp_path / "assets" / "tiny-base.build.json").read_text()) == {"model": "tiny-base"}
    assert file_hashes(world.model_path("tiny-base")) == file_hashes(built)
