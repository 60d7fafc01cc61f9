"""A data spec's ``records``: a range of a file's records, as a recipe writes it
(``records: "0:50%"``), checked at validation, read by every reader, part of the cache key."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from engine.api import DataSource
from engine.core.errors import DataError, RecipeError
from engine.data.files import iter_choices, iter_instructions
from engine.data.records import parse_record_range, record_bounds
from engine.data.sources import iter_texts
from engine.recipe.spec import DataSpec, load_recipe
from engine.recipe.validate import plan_recipe
from engine.run.runner import Runner


@pytest.mark.parametrize(("text", "total", "bounds"), [
    ("0:50%", 10, (0, 5)),
    ("50%:", 10, (5, 10)),
    ("0:50%", 97, (0, 48)),       # a percentage rounds down
    ("50%:", 97, (48, 97)),
    (":3", 10, (0, 3)),
    ("3:", 10, (3, 10)),
    (":", 10, (0, 10)),
    ("2:7", 10, (2, 7)),
    ("25%:75%", 8, (2, 6)),
    ("0:100%", 7, (0, 7)),
    ("0:33.5%", 200, (0, 67)),
    (" 1 : 4 ", 10, (1, 4)),
])
def test_record_bounds(text, total, bounds):
    assert record_bounds(text, total) == bounds


@pytest.mark.parametrize("total", [1, 2, 3, 7, 96, 97, 191, 192])
def test_the_two_halves_split_a_file_exactly(total):
    if total < 2:
        with pytest.raises(ValueError, match="selects no records"):
            record_bounds("0:50%", total)
        return
    lo1, hi1 = record_bounds("0:50%", total)
    lo2, hi2 = record_bounds("50%:", total)
    assert (lo1, hi1 - lo1 + hi2 - lo2, hi2) == (0, total, total) and hi1 == lo2


@pytest.mark.parametrize(("text", "message"), [
    ("half", "not a record range"),
    ("0:50:100", "not a record range"),
    ("a:5", "neither a record index nor a percentage"),
    ("-1:5", "neither a record index nor a percentage"),
    ("0:150%", "more than the whole file"),
    ("5:5", "selects no records"),
    ("60%:50%", "selects no records"),
])
def test_bad_ranges_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_record_range(text)


def test_a_range_beyond_the_file_is_refused_with_the_count():
    with pytest.raises(ValueError, match="ends at record 12 but the file has 10 records"):
        record_bounds("0:12", 10)
    with pytest.raises(ValueError, match="selects no records of the file's 4"):
        record_bounds("10%:20%", 4)  # 0.4 and 0.8 both round down to 0


def test_data_spec_error_names_the_field():
    with pytest.raises(ValueError) as err:
        DataSpec(builtin="lum/task-train.jsonl", records="first half")
    assert "records" in str(err.value) and "not a record range" in str(err.value)
    assert DataSpec(builtin="lum/task-train.jsonl").records is None


def test_an_unquoted_yaml_sexagesimal_is_explained(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent("""
        name: r
        models: {base: {path: m}}
        stages:
          - {name: s, stage: adapt-language, plugin: sft, model: base,
             data: {path: d.jsonl, records: 1:30}}
        """))  # YAML 1.1 reads 1:30 as 90
    with pytest.raises(RecipeError) as err:
        load_recipe(f)
    assert "records" in str(err.value) and "quoted string" in str(err.value)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_every_reader_keeps_only_the_range(tmp_path):
    txt = _write_lines(tmp_path / "t.txt", [f"doc {i}" for i in range(10)] + [""] + ["doc 10", "doc 11"])
    assert list(iter_texts(DataSource(path=txt, records="0:50%"))) == [f"doc {i}" for i in range(6)]
    # empty lines are not records: the 12 documents split 6 and 6
    assert list(iter_texts(DataSource(path=txt, records="50%:"))) == [f"doc {i}" for i in range(6, 12)]

    sft = _write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": f"q{i}", "response": f" a{i}"})
                                              for i in range(8)])
    got = list(iter_instructions(DataSource(path=sft, format="instructions", records="2:5")))
    assert [r["prompt"] for _, r in got] == ["q2", "q3", "q4"]
    assert [lineno for lineno, _ in got] == [3, 4, 5]  # errors still name the file's own lines

    mc = _write_lines(tmp_path / "c.jsonl", [json.dumps({"prompt": f"q{i}", "choices": [" a", " b"],
                                                         "label": i % 2}) for i in range(4)])
    assert [r["prompt"] for _, r in iter_choices(DataSource(path=mc, format="choice", records="75%:"))] == ["q3"]
    assert len(list(iter_choices(DataSource(path=mc, format="choice")))) == 4


def test_a_bad_record_outside_the_range_is_not_read(tmp_path):
    sft = _write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": "q", "response": " a"}), "{not json"])
    source = DataSource(path=sft, format="instructions", records="0:1")
    assert len(list(iter_instructions(source))) == 1
    with pytest.raises(DataError, match="invalid JSON"):
        list(iter_instructions(DataSource(path=sft, format="instructions")))


def test_reading_a_range_that_no_longer_fits_names_file_and_field(tmp_path):
    txt = _write_lines(tmp_path / "t.txt", ["a", "b", "c"])
    with pytest.raises(DataError, match=r"t\.txt: records: record range '0:5' ends at record 5"):
        list(iter_texts(DataSource(path=txt, records="0:5")))


def test_training_batches_see_only_the_range(tmp_path, tiny_tokenizer):
    from engine.training.batching import training_batches

    sft = _write_lines(tmp_path / "s.jsonl", [json.dumps({"prompt": f"question {i}", "response": f" {i}"})
                                              for i in range(10)])
    src = DataSource(path=sft, format="instructions", records="0:30%")
    batches = training_batches(tiny_tokenizer, [src], seq_len=32, batch_size=4, seed=0, packing="padded")
    seen = set()
    for _ in range(6):
        batch = next(batches)
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            seen.add(tiny_tokenizer.decode(row[mask.bool()]).replace(" ", ""))
    assert {i for i in range(10) for s in seen if f"question{i}" in s} == {0, 1, 2}


def _recipe(tmp_path: Path, model: Path, data: Path, records: str | None) -> Path:
    rec = "" if records is None else f", records: '{records}'"
    f = tmp_path / "r.yaml"
    f.write_text(textwrap.dedent(f"""
        name: slice
        models:
          base: {{path: {model}}}
        stages:
          - name: adapted
            stage: adapt-language
            plugin: copy-model
            model: base
            data: {{path: {data}{rec}}}
        """))
    return f


def _cache(recipe: Path, work: Path) -> str:
    plan = plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
    return Runner(plan, work).run()["stages"][0]["cache"]


def test_the_range_is_part_of_the_cache_key(tmp_path, tiny_model, text_file, test_plugin):
    work = tmp_path / "work"
    assert _cache(_recipe(tmp_path, tiny_model, text_file, None), work) == "miss"
    assert _cache(_recipe(tmp_path, tiny_model, text_file, None), work) == "hit"
    assert _cache(_recipe(tmp_path, tiny_model, text_file, "0:50%"), work) == "miss"
    assert _cache(_recipe(tmp_path, tiny_model, text_file, "0:50%"), work) == "hit"
    assert _cache(_recipe(tmp_path, tiny_model, text_file, "0:100%"), work) == "miss"


def test_validate_names_a_range_beyond_the_file(tmp_path, tiny_model, text_file, test_plugin):
    from engine.cli.commands import main

    recipe = _recipe(tmp_path, tiny_model, text_file, "0:1000")
    assert main(["validate", str(recipe)]) != 0
    with pytest.raises(RecipeError, match="records: record range .0:1000. ends at record 1000 but the file has 16"):
        plan_recipe(load_recipe(recipe), recipe.parent, str(recipe))
