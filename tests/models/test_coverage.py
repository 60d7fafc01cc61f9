"""Tokenizer coverage (engine.models.tokenizer.coverage): the numbers, the thresholds, and the warnings
``engine validate`` prints for a language the tokenizer splits into bytes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from engine import world
from engine.cli.commands import main
from engine.models.tokenizer.coverage import (
    MAX_DOCUMENTS,
    load_backend,
    measure,
    measure_file,
    poor_coverage,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "docs" / "examples"))
from own_language_data import cyrillic  # noqa: E402


@pytest.fixture(scope="module")
def world_tok():
    return load_backend(world.model_path("tiny-base"))


def test_world_languages_are_covered_and_cyrillic_is_not(world_tok):
    en = measure_file(world_tok, world.data_path("en/test.txt"))
    lum = measure_file(world_tok, world.data_path("lum/test.txt"))
    lines = world.data_path("lum/test.txt").read_text(encoding="utf-8").splitlines()
    cyr = measure(world_tok, [cyrillic(line) for line in lines])
    assert en.tokens_per_word < 1.5 and en.byte_share < 0.05 and en.long_word_share < 0.05
    assert lum.tokens_per_word < 2 and lum.byte_share < 0.05  # low-resource, but its script is known
    # a script the byte-level BPE never saw: every Cyrillic letter is two one-byte tokens
    assert cyr.tokens_per_word > 8 and cyr.byte_share > 0.8 and cyr.bytes_per_token == pytest.approx(1.0, abs=0.05)
    assert cyr.long_word_share > 0.9 and cyr.unk_share == 0
    assert poor_coverage(en, lum) == [] and poor_coverage(lum, en) == []
    why = poor_coverage(cyr, en)
    assert len(why) == 3 and "single bytes" in why[0] and "x the tokens per word" in why[1]


def test_the_counts_on_a_known_text(world_tok):
    cov = measure(world_tok, ["The fox is red.", "Küche"])
    assert cov.documents == 2 and cov.words == 5 and cov.bytes == len("The fox is red.Küche".encode())
    assert cov.tokens == len(world_tok.encode("The fox is red.").ids) + len(world_tok.encode("Küche").ids)
    assert cov.byte_tokens >= 2  # the two bytes of ü at least; the full stop does not count
    assert cov.long_words == 1  # Küche


def test_byte_fallback_pieces_and_unk_count():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate("abc")}}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cov = measure(tok, ["abc ü"])
    assert cov.tokens == 5 and cov.byte_tokens == 5  # a, b, c are single bytes too; ü two <0xNN>
    words = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "known": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    cov = measure(words, ["known unknown known"])
    assert cov.unk_tokens == 1 and cov.unk_share == pytest.approx(1 / 3)


def test_sample_is_bounded_and_fast(tmp_path, world_tok):
    big = tmp_path / "big.txt"
    big.write_text("The fox is red.\n" * (MAX_DOCUMENTS + 500))
    assert measure_file(world_tok, big).documents == MAX_DOCUMENTS
    started = time.perf_counter()
    measure_file(world_tok, world.data_path("en/train.txt"))
    assert time.perf_counter() - started < 1.0


def _recipe(tmp_path: Path) -> Path:
    lines = world.data_path("lum/train.txt").read_text(encoding="utf-8").splitlines()[:200]
    (tmp_path / "mine.txt").write_text("\n".join(cyrillic(line) for line in lines) + "\n", encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("""\
name: cov
models:
  base: {builtin: tiny-base}
stages:
  - name: ct-mine
    stage: adapt-language
    plugin: ct
    model: base
    data:
      - {path: mine.txt, language: mine, weight: 9}
      - {builtin: en/train.txt, language: en, weight: 1}
    params: {steps: 1}
""")
    return recipe


def test_validate_warns_per_stage_and_can_skip(tmp_path, capsys, monkeypatch):
    recipe = _recipe(tmp_path)
    assert main(["validate", str(recipe)]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "covers 'mine'" in line]
    assert len(warning) == 1, err
    for part in ("stage 'ct-mine'", "mine.txt", "tokens/word", "single-byte", "x the tokens per word of your en data",
                 "train_embeddings: true", "docs/extend-tokenizer.md", "--no-coverage"):
        assert part in warning[0], part
    assert "covers 'en'" not in err
    assert main(["validate", "--no-coverage", str(recipe)]) == 0
    assert "covers" not in capsys.readouterr().err
    monkeypatch.setenv("LINGOFORGE_NO_COVERAGE", "1")
    assert main(["validate", str(recipe)]) == 0
    assert "covers" not in capsys.readouterr().err


def test_quickstart_has_no_coverage_warning(capsys):
    recipe = Path(__file__).resolve().parents[2] / "recipes" / "quickstart.yaml"
    assert main(["validate", str(recipe)]) == 0
    assert "covers" not in capsys.readouterr().err


def test_coverage_command(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["coverage", str(recipe), "--json"]) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    rows = {Path(r["data"]).name: r for r in out["rows"]}
    assert rows["mine.txt"]["byte_share"] > 0.8 and rows["train.txt"]["byte_share"] < 0.05
    assert len(out["warnings"]) == 1
    en = str(world.data_path("en/test.txt"))
    assert main(["coverage", "--tokenizer", "builtin:tiny-base", "--data", en,
                 "--data", str(tmp_path / "mine.txt")]) == 0
    captured = capsys.readouterr()
    assert "mine.txt" in captured.out and "single bytes" in captured.err
    assert main(["coverage", "--tokenizer", "builtin:tiny-base", "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err


def test_run_warns_before_anything_runs(tmp_path, capsys):
    recipe = _recipe(tmp_path)
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--dry-run"]) == 0
    assert "stage 'ct-mine'" in capsys.readouterr().err
    assert main(["run", str(recipe), "--workdir", str(tmp_path / "w"), "--dry-run", "--no-coverage"]) == 0
    assert "covers" not in capsys.readouterr().err


def test_extend_tokenizer_command_names_bad_input(tmp_path, capsys):
    out = str(tmp_path / "ext")
    assert main(["extend-tokenizer", "builtin:tiny-base", "--data", str(tmp_path / "nope.txt"),
                 "--output", out]) == 2
    assert "nope.txt does not exist" in capsys.readouterr().err
    assert main(["extend-tokenizer", str(tmp_path / "no-model"), "--data", str(tmp_path / "x.txt"),
                 "--output", out]) == 2
    assert "no-model: no such model folder" in capsys.readouterr().err
    assert main(["extend-tokenizer", "builtin:tiny-base", "--data", str(world.data_path("en/test.txt")),
                 "--tokens", "0", "--output", out]) == 2
    assert "--tokens must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "ext").exists()
