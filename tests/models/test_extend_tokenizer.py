"""docs/extend-tokenizer.md as a user runs it: measure, extend the world's tokenizer for
a script it never saw, measure again, train the extended model a few steps."""

from __future__ import annotations

import json

import doc_blocks
import pytest
import torch

from engine import world
from engine.core.errors import ModelLoadError
from engine.models.tokenizer.coverage import load_backend, measure_file
from engine.models.tokenizer.extend import extended_tokenizer_json

DOC = "extend-tokenizer.md"
SHORT = ["--set", "stages.ct-mine.params.steps=3", "--set", "stages.perplexity.params.max_documents=16"]


@pytest.mark.slow
def test_the_guide_runs_and_coverage_improves(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = doc_blocks.files(DOC)
    assert set(files) == {"extended.yaml"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    commands = doc_blocks.commands(DOC)
    assert [c[:2] for c in commands] == [["python", "docs/examples/own_language_data.py"],
                                         ["engine", "coverage"], ["engine", "extend-tokenizer"],
                                         ["engine", "coverage"], ["engine", "run"],
                                         ["engine", "extend-tokenizer"], ["engine", "transplant-tokenizer"],
                                         ["engine", "transplant-tokenizer"]]
    for argv in commands:
        extra = SHORT if argv[1] == "run" else None
        assert doc_blocks.run(argv, tmp_path, extra) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "single bytes" in err  # the first coverage run warns, the second does not
    assert err.count("ok no poorly covered text") == 1

    base, ext = world.model_path("tiny-base"), tmp_path / "models" / "base-ext"
    before = measure_file(load_backend(base), tmp_path / "data" / "test.txt")
    after = measure_file(load_backend(ext), tmp_path / "data" / "test.txt")
    assert before.tokens_per_word > 8 and before.byte_share > 0.8
    assert after.tokens_per_word < 2 and after.byte_share < 0.05 and after.bytes_per_token > 5

    # every world language keeps its ids
    old, new = load_backend(base), load_backend(ext)
    for lang in world.LANGUAGES:
        for line in world.data_path(f"{lang}/test.txt").read_text(encoding="utf-8").splitlines()[:50]:
            assert new.encode(line).ids == old.encode(line).ids, (lang, line)

    # the resized model loads; old rows are the base's, a new row the mean of its pieces
    model = AutoModelForCausalLM.from_pretrained(ext)
    tokenizer = AutoTokenizer.from_pretrained(ext)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) > 1536
    assert model.config.vocab_size == len(tokenizer)
    base_w = load_file(base / "model.safetensors")
    emb = model.get_input_embeddings().weight.detach()
    torch.testing.assert_close(emb[:1536], base_w["model.embed_tokens.weight"])
    token = next(t for t in json.loads((ext / "tokenizer.json").read_text())["model"]["vocab"]
                 if new.token_to_id(t) >= 1536 and len(t) > 2)
    pieces = [p.id for p in old.model.tokenize(token)]
    torch.testing.assert_close(emb[new.token_to_id(token)], base_w["model.embed_tokens.weight"][pieces].mean(0))
    head = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(head[new.token_to_id(token)], base_w["lm_head.weight"][pieces].mean(0))

    # sections 4 and 5: an init method, a learned tokenizer, a donor's tokenizer with omp
    for name, init in (("base-omp", "omp"), ("base-lum", "mean"), ("lum-on-ext", "omp")):
        meta = json.loads((tmp_path / "models" / name / "lingoforge.json").read_text())
        assert meta["init"] == init and meta["added_tokens"] > 0, name
    assert json.loads((tmp_path / "models" / "lum-on-ext" / "lingoforge.json").read_text())[
        "init_notes"]["space"] == "donor"

    # it trained: losses logged, and the new tokens' rows moved
    run = tmp_path / "runs" / "extended"
    log = [json.loads(line) for line in (run / "ct-mine" / "train_log.jsonl").read_text().splitlines()]
    assert len([r for r in log if "loss" in r]) == 3
    trained = AutoModelForCausalLM.from_pretrained(run / "ct-mine").get_input_embeddings().weight.detach()
    assert not torch.equal(trained[1536:], emb[1536:])
    ppl = json.loads((run / "perplexity" / "metrics.json").read_text())
    assert ppl["base"]["bpb/mine"] > 0 and ppl["ct-mine"]["bpb/mine"] > 0


def test_only_bpe_is_extended():
    spec = {"model": {"type": "Unigram", "vocab": []}}
    with pytest.raises(ModelLoadError, match="only BPE tokenizers"):
        extended_tokenizer_json(spec, ["text"], 10)


def test_extension_learns_tokens_the_old_vocabulary_lacks():
    spec = json.loads((world.model_path("tiny-base") / "tokenizer.json").read_text())
    out, added = extended_tokenizer_json(spec, ["Küche Küche Küche Brücke Brücke"] * 5, 20)
    vocab = out["model"]["vocab"]
    assert added and all(t not in spec["model"]["vocab"] for t in added)
    assert sorted(vocab[t] for t in added) == list(range(1536, 1536 + len(added)))
    assert out["model"]["merges"][:len(spec["model"]["merges"])] == spec["model"]["merges"]
