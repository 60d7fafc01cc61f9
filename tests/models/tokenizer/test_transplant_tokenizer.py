"""engine transplant-tokenizer on real tiny models: shared tokens keep their rows exactly
(whatever their new id), the model loads and runs with its new tokenizer, the output is
published by the engine's rules, and bad input is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import OTHER_TEXT
from safetensors.torch import load_file

from engine.cli.commands import main
from engine.core.errors import ModelLoadError, OutputRefused
from engine.models.tokenizer.transplant import transplant_tokenizer
from engine.models.tokenizer.vocabmap import Vocabulary
from engine.testing import TINY_TEXT


def _vocab(folder):
    return Vocabulary.from_spec(json.loads((folder / "tokenizer.json").read_text()), str(folder))


def _load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def test_a_learned_tokenizer_keeps_shared_rows_and_the_model_runs(vocab_models, tmp_path):
    src = vocab_models["model"]
    out = transplant_tokenizer(src, tmp_path / "t", vocab_size=400, texts=OTHER_TEXT + TINY_TEXT[:4],
                               init="mean")
    old, new = _vocab(src), _vocab(out.folder)
    assert out.new_size == new.size and out.shared + len(out.added) == new.size
    w_old, w_new = load_file(src / "model.safetensors"), load_file(out.folder / "model.safetensors")
    by_surface = {s: i for i, s in old.surfaces.items() if s is not None}
    moved = 0
    for i, s in new.surfaces.items():
        j = old.special.get(next((c for c, k in new.special.items() if k == i), ""), None) \
            if s is None else by_surface.get(s)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            if j is not None:
                assert torch.equal(w_new[name][i], w_old[name][j]), (name, i, s)
            else:
                pieces = old.split(s)
                torch.testing.assert_close(w_new[name][i], w_old[name][pieces].mean(0))
        moved += j is not None and j != i
    assert moved > 0  # the learned vocabulary puts shared tokens at other ids
    for name, t in w_old.items():  # every other tensor is the source's
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            assert torch.equal(w_new[name], t)
    config = json.loads((out.folder / "config.json").read_text())
    assert config["vocab_size"] == new.size
    model, tok = _load(out.folder)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (new.special["<s>"], new.special["</s>"],
                                                                  new.special["<pad>"])
    ids = tok(OTHER_TEXT[0], return_tensors="pt").input_ids
    assert ids.shape[1] < len(OTHER_TEXT[0].encode()) / 2  # the learned tokenizer covers the script
    assert torch.isfinite(model(ids).logits).all()
    meta = json.loads((out.folder / "lingoforge.json").read_text())
    assert meta["kind"] == "transplanted-tokenizer" and meta["learned_vocab_size"] == 400
    assert sum(b - a for a, b in meta["new_rows"]) == len(out.added)
    owner = json.loads((out.folder / ".lingoforge-output.json").read_text())
    assert owner["kind"] == "transplanted-tokenizer"


def test_its_own_tokenizer_changes_nothing(vocab_models, tmp_path):
    """The identity transplant: every token shared, every weight and every logit the source's."""
    src = vocab_models["model"]
    out = transplant_tokenizer(src, tmp_path / "same", tokenizer=src, init="random")
    assert out.added == [] and out.shared == _vocab(src).size
    a, b = load_file(src / "model.safetensors"), load_file(out.folder / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_donor_tokenizer_and_a_tied_model(vocab_models, tmp_path):
    src, donor = vocab_models["tied"], vocab_models["donor"]
    out = transplant_tokenizer(src, tmp_path / "t", tokenizer=donor, init="omp")
    assert json.loads((out.folder / "lingoforge.json").read_text())["init_notes"]["space"] == "donor"
    weights = load_file(out.folder / "model.safetensors")
    assert "lm_head.weight" not in weights
    assert weights["model.embed_tokens.weight"].shape == (_vocab(donor).size, 32)
    model, tok = _load(out.folder)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tok.get_vocab() == _load(donor)[1].get_vocab()
    assert torch.isfinite(model(tok(OTHER_TEXT[1], return_tensors="pt").input_ids).logits).all()


def test_bad_input_is_refused_before_any_work(vocab_models, tmp_path):
    src = vocab_models["model"]
    with pytest.raises(ModelLoadError, match="give either a tokenizer folder"):
        transplant_tokenizer(src, tmp_path / "o", texts=OTHER_TEXT)
    with pytest.raises(ModelLoadError, match="give either a tokenizer folder"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=src, vocab_size=300, texts=OTHER_TEXT)
    with pytest.raises(ModelLoadError, match="the data has no text"):
        transplant_tokenizer(src, tmp_path / "o", vocab_size=300)
    with pytest.raises(ModelLoadError, match="vocab_size 10 is too small"):
        transplant_tokenizer(src, tmp_path / "o", vocab_size=10, texts=OTHER_TEXT)
    with pytest.raises(ModelLoadError, match="no such tokenizer folder"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=f"{empty}: no tokenizer.json"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=empty)
    unigram = tmp_path / "unigram"
    unigram.mkdir()
    (unigram / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(ModelLoadError, match="only BPE tokenizers .* not 'Unigram'"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=unigram)
    with pytest.raises(ModelLoadError, match="no init method named 'nope'"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=vocab_models["donor"], init="nope")
    with pytest.raises(OutputRefused, match="inside"):
        transplant_tokenizer(src, src / "sub", tokenizer=vocab_models["donor"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(OutputRefused):
            transplant_tokenizer(src, mine, tokenizer=vocab_models["donor"], overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "unigram"]


def test_an_earlier_output_is_replaced_only_with_overwrite(vocab_models, tmp_path):
    src, donor = vocab_models["model"], vocab_models["donor"]
    transplant_tokenizer(src, tmp_path / "o", tokenizer=donor)
    with pytest.raises(OutputRefused, match="--overwrite"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=donor, init="random")
    transplant_tokenizer(src, tmp_path / "o", tokenizer=donor, init="random", overwrite=True)
    assert json.loads((tmp_path / "o" / "lingoforge.json").read_text())["init"] == "random"


def test_the_command(vocab_models, tmp_path, other_text, capsys):
    out = tmp_path / "cli"
    assert main(["transplant-tokenizer", str(vocab_models["model"]), "--vocab-size", "300",
                 "--data", str(other_text), "--init", "random", "--seed", "3", "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"ok {out}: vocabulary" in err and "rows by random" in err
    assert "other.txt:" in err and "tokens/word" in err
    meta = json.loads((out / "lingoforge.json").read_text())
    assert meta["init"] == "random" and meta["seed"] == 3
    cases = [
        (["--output", str(tmp_path / "x")], "give --tokenizer DIR or --vocab-size N"),
        (["--vocab-size", "300", "--output", str(tmp_path / "x")], "--vocab-size learns the tokenizer on --data"),
        (["--vocab-size", "0", "--data", str(other_text), "--output", str(tmp_path / "x")],
         "--vocab-size must be at least 1"),
        (["--vocab-size", "300", "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "x")],
         "does not exist"),
        (["--tokenizer", str(vocab_models["donor"]), "--init", "omp", "--init-param", "k=0",
          "--output", str(tmp_path / "x")], "--init-param k: Input should be greater than or equal to 1"),
        (["--tokenizer", str(vocab_models["donor"]), "--output", str(other_text.parent / "x"),
          "--data", str(other_text)], None),
    ]
    for extra, message in cases:
        code = main(["transplant-tokenizer", str(vocab_models["model"]), *extra])
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
            continue
        assert code == 2 and message in err, (extra, err)
    assert not (tmp_path / "x").exists()


def test_extend_tokenizer_takes_an_init_method(vocab_models, tmp_path, other_text, capsys):
    out = tmp_path / "ext"
    assert main(["extend-tokenizer", str(vocab_models["model"]), "--data", str(other_text), "--tokens", "30",
                 "--init", "random", "--output", str(out)]) == 0
    assert "rows by random" in capsys.readouterr().err
    assert json.loads((out / "lingoforge.json").read_text())["init"] == "random"
    assert main(["extend-tokenizer", str(vocab_models["model"]), "--data", str(other_text), "--tokens", "30",
                 "--init", "nope", "--output", str(tmp_path / "x")]) == 2
    assert "no init method named 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()



def _disjoint_tokenizer(folder: Path) -> Path:
    """A whole-word BPE of Cyrillic words: not one token the tiny models' tokenizer has."""
    folder.mkdir()
    words = ["кошка", "собака", "сидит", "бежит", "на", "в", "ковре", "парке"]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "vocab": {w: i for i, w in enumerate(words)}, "merges": []}}
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return folder


def test_a_tokenizer_sharing_no_token_is_refused_unless_asked(vocab_models, tmp_path):
    src = vocab_models["model"]
    other = _disjoint_tokenizer(tmp_path / "cyrillic")
    with pytest.raises(ModelLoadError, match="shares no token with the tokenizer of .*--allow-disjoint"):
        transplant_tokenizer(src, tmp_path / "o", tokenizer=other)
    assert not (tmp_path / "o").exists()
    done = transplant_tokenizer(src, tmp_path / "o", tokenizer=other, allow_disjoint=True)
    assert done.shared == 0 and done.new_size == 8 and len(done.added) == 8


def test_a_sentencepiece_only_folder_is_named_with_the_way_out(vocab_models, tmp_path):
    sp = tmp_path / "sp"
    sp.mkdir()
    (sp / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(ModelLoadError, match="only a SentencePiece tokenizer.model, no tokenizer.json"):
        transplant_tokenizer(vocab_models["model"], tmp_path / "o", tokenizer=sp)
