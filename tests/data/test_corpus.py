"""Corpora beyond one text file: parquet, folders of shards, broken shards, and what
``engine validate`` says about them (engine.data.shards, engine.data.resolve_data)."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import pytest

from engine.api import DataSource
from engine.core.errors import DataError, RecipeError
from engine.data.sources import iter_texts, resolve_data
from engine.recipe.spec import DataSpec, load_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import Runner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")


def _parquet(path: Path, texts: list[str | None], column: str = "text") -> Path:
    pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), path)
    return path


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _resolve(tmp_path: Path, **spec) -> DataSource:
    return resolve_data(DataSpec(**spec), tmp_path)


def test_parquet_text_column_is_read_in_order_and_empty_rows_skipped(tmp_path):
    _parquet(tmp_path / "c.parquet", ["first doc", "", None, "  ", "second doc", "third doc"])
    src = _resolve(tmp_path, path="c.parquet")
    assert src.format == "text" and not src.shards
    assert list(iter_texts(src)) == ["first doc", "second doc", "third doc"]


def test_parquet_other_text_column_and_records_count_rows(tmp_path):
    _parquet(tmp_path / "c.parquet", [f"doc {i}" for i in range(10)], column="body")
    src = _resolve(tmp_path, path="c.parquet", text_field="body", records="50%:")
    assert list(iter_texts(src)) == [f"doc {i}" for i in range(5, 10)]
    with pytest.raises(DataError, match=r"c\.parquet: records: .* the file has 10 records"):
        _resolve(tmp_path, path="c.parquet", text_field="body", records="0:11")


def test_parquet_without_the_text_column_names_file_and_columns(tmp_path):
    _parquet(tmp_path / "c.parquet", ["a doc"], column="content")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text' .* columns \['content', 'id'\]"):
        _resolve(tmp_path, path="c.parquet")


def test_validate_names_the_missing_parquet_column(tmp_path, tiny_model, test_plugin):
    from engine.cli.commands import main

    _parquet(tmp_path / "c.parquet", ["a doc"], column="content")
    recipe = _recipe(tmp_path, tiny_model, "c.parquet")
    assert main(["validate", str(recipe)]) != 0
    with pytest.raises(RecipeError, match=r"data: .*c\.parquet: no column 'text'.*\['content', 'id'\]"):
        plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))


def test_folder_of_shards_reads_them_in_sorted_order(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _lines(folder / "part-2.txt", ["c", "d"])
    _lines(folder / "part-10.txt", ["e"])
    _lines(folder / "part-1.txt", ["a", "b"])
    (folder / "README.md").write_text("not a shard")
    src = _resolve(tmp_path, path="corpus")
    assert [p.name for p in src.shards] == ["part-1.txt", "part-10.txt", "part-2.txt"]
    assert list(iter_texts(src)) == ["a", "b", "e", "c", "d"]


def test_folder_of_parquet_and_jsonl_shards_and_glob(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _parquet(folder / "a.parquet", ["p1", "p2"])
    _parquet(folder / "b.parquet", ["p3"])
    assert list(iter_texts(_resolve(tmp_path, path="corpus"))) == ["p1", "p2", "p3"]
    only_b = _resolve(tmp_path, path="corpus", glob="b*.parquet")
    assert list(iter_texts(only_b)) == ["p3"]
    sub = folder / "json"
    sub.mkdir()
    _lines(sub / "x.jsonl", [json.dumps({"text": "j1"}), json.dumps({"text": "j2"})])
    assert list(iter_texts(_resolve(tmp_path, path="corpus/json"))) == ["j1", "j2"]


def test_folder_refusals_are_clear(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    with pytest.raises(DataError, match="holds no shard files"):
        _resolve(tmp_path, path="corpus")
    _lines(folder / "a.txt", ["a"])
    _parquet(folder / "b.parquet", ["b"])
    with pytest.raises(DataError, match=r"mixes shard types \['\.parquet', '\.txt'\]"):
        _resolve(tmp_path, path="corpus")
    with pytest.raises(DataError, match="'records' .* not supported for a folder .* 'glob'"):
        _resolve(tmp_path, path="corpus", glob="*.txt", records="0:50%")


def test_a_broken_shard_is_named(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _lines(folder / "a.txt", ["good one"])
    (folder / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    _lines(folder / "c.txt", ["good two"])
    with pytest.raises(DataError, match=r"b\.parquet: not a readable parquet file"):
        _resolve(tmp_path, path="corpus", glob="*.parquet")
    (folder / "b.parquet").unlink()
    (folder / "b.txt").write_bytes(b"fine line\nbad \xff byte\n")
    with pytest.raises(DataError, match=r"b\.txt:2: not UTF-8 text"):
        _resolve(tmp_path, path="corpus")


def test_a_broken_shard_is_skipped_when_allowed(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _lines(folder / "a.txt", ["good one"])
    (folder / "b.txt").write_bytes(b"fine line\nbad \xff byte\n")
    _lines(folder / "c.txt", ["good two"])
    src = _resolve(tmp_path, path="corpus", skip_broken_shards=True)
    assert [p.name for p in src.shards] == ["a.txt", "b.txt", "c.txt"]  # still listed: read skips it
    assert "skipping broken shard" in capsys.readouterr().err
    texts = list(iter_texts(src))
    assert texts[0] == "good one" and texts[-1] == "good two"


def test_damage_past_the_validated_head_is_found_while_reading(tmp_path):
    """validate decodes a text file's first megabyte; a bad byte later is named when read,
    and with skip_broken_shards the token cache drops that shard whole (checked in
    test_token_cache)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    _lines(folder / "a.txt", ["good one"])
    filler = b"".join(b"line %d of filler text\n" % i for i in range(60000))  # > 1 MB
    (folder / "b.txt").write_bytes(filler + b"bad \xff byte\n")
    src = _resolve(tmp_path, path="corpus")  # passes: the head is fine
    with pytest.raises(DataError, match=r"b\.txt:60001: not UTF-8 text"):
        list(iter_texts(src))
    skipping = _resolve(tmp_path, path="corpus", skip_broken_shards=True)
    assert list(itertools.islice(iter_texts(skipping), 1)) == ["good one"]


def test_every_shard_broken_is_an_error(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.parquet").write_bytes(b"junk")
    with pytest.raises(DataError, match="every shard is broken"):
        _resolve(tmp_path, path="corpus", skip_broken_shards=True)


# --- through a recipe -----------------------------------------------------------------------


def _recipe(tmp_path: Path, model: Path, data: str, extra: str = "") -> Path:
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: corpus
        models:
          base: {{path: {model}}}
        stages:
          - name: adapted
            stage: adapt-language
            plugin: copy-model
            model: base
            data: {{path: {data}{extra}}}
        """))
    return f


def _cache(recipe: Path, work: Path) -> str:
    plan = plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
    return Runner(plan, work).run()["stages"][0]["cache"]


def test_stage_fingerprint_changes_when_a_shard_changes(tmp_path, tiny_model, test_plugin):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _lines(folder / "a.txt", ["one", "two"])
    _lines(folder / "b.txt", ["three"])
    recipe, work = _recipe(tmp_path, tiny_model, "corpus"), tmp_path / "work"
    assert _cache(recipe, work) == "miss"
    assert _cache(recipe, work) == "hit"
    _lines(folder / "b.txt", ["three", "four"])
    assert _cache(recipe, work) == "miss"
    _lines(folder / "c.txt", ["five"])  # a shard added
    assert _cache(recipe, work) == "miss"
    assert _cache(recipe, work) == "hit"


# --- a dataset in the local Hugging Face cache ----------------------------------------------------


def _hub_dataset(hub: Path, name: str, files: dict[str, list[str]]) -> Path:
    """A dataset snapshot laid out as the hub cache keeps it (refs/main -> snapshots/<rev>)."""
    repo = hub / f"datasets--{name.replace('/', '--')}"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    for rel, texts in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        _parquet(snap / rel, texts)
    return snap


def test_a_cached_hub_dataset_split_is_read_without_network(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_dataset(hub, "org/mn-news", {
        "data/train-00000-of-00002.parquet": ["t0", "t1"],
        "data/train-00001-of-00002.parquet": ["t2"],
        "data/test-00000-of-00001.parquet": ["x0"],
    })
    src = _resolve(tmp_path, hf_dataset="org/mn-news")
    assert [p.name for p in src.shards] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert list(iter_texts(src)) == ["t0", "t1", "t2"]
    assert list(iter_texts(_resolve(tmp_path, hf_dataset="org/mn-news", split="test"))) == ["x0"]
    with pytest.raises(DataError, match=r"no split 'validation'; it has \['test', 'train'\]"):
        _resolve(tmp_path, hf_dataset="org/mn-news", split="validation")
    with pytest.raises(DataError, match="'org/other' is not in the local Hugging Face cache.*Nothing is downloaded"):
        _resolve(tmp_path, hf_dataset="org/other")
