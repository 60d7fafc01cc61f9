"""docs/getting-started.md's "your own language" route, run as written (steps shortened
with --set): stand-in data, coverage, extend-tokenizer, validate, then ELO -> align ->
instruction model -> merge -> perplexity and task, every model loadable."""

from __future__ import annotations

import json

import doc_blocks
import pytest

DOC = "getting-started.md"
SHORT = [
    "stages.elo-mine.params.steps=12", "stages.elo-mine-aligned.params.steps=2",
    "stages.instruct.params.steps=4", "stages.perplexity.params.max_documents=16",
    "stages.task.params.max_items=16",
]


@pytest.mark.slow
def test_own_language_route_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("COLUMNS", "200")
    files = doc_blocks.files(DOC)
    assert set(files) == {"my-language.yaml"}
    (tmp_path / "my-language.yaml").write_text(files["my-language.yaml"])
    commands = doc_blocks.commands(DOC)
    own = [c for c in commands if c[:2] != ["engine", "run"] or "my-language.yaml" in c]
    own = own[own.index(next(c for c in own if c[0] == "python")):]
    assert [c[:2] for c in own][:5] == [["python", "docs/examples/own_language_data.py"],
                                        ["engine", "coverage"], ["engine", "extend-tokenizer"],
                                        ["engine", "validate"], ["engine", "run"]]
    for argv in own[:5]:
        extra = [a for s in SHORT for a in ("--set", s)] if argv[1] == "run" else None
        assert doc_blocks.run(argv, tmp_path, extra) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "single bytes" in err  # engine coverage warns on the stand-in before extending
    assert "covers 'mine'" not in err  # after extending, validate and run do not

    work = tmp_path / "runs" / "my-language"
    report = json.loads((work / "report.json").read_text())
    assert report["finished"]
    stages = {r["name"]: r for r in report["stages"]}
    assert list(stages) == ["layers", "elo-mine", "elo-mine-aligned", "instruct", "merged",
                            "perplexity", "task"]
    for name in ("elo-mine-aligned", "instruct", "merged"):
        model = AutoModelForCausalLM.from_pretrained(work / name)
        assert model.config.num_hidden_layers == 8 and model.config.vocab_size > 1536
    ppl = json.loads((work / "perplexity" / "metrics.json").read_text())
    task = json.loads((work / "task" / "metrics.json").read_text())
    for model in ("base", "elo-mine-aligned", "instruct", "merged"):
        assert ppl[model]["bpb/mine"] > 0 and ppl[model]["bpb/en"] > 0
        assert 0 <= task[model]["acc/mine"] <= 1 and 0 <= task[model]["exact_match/mine"] <= 1
    # twelve ELO steps with the embeddings training already beat the untrained new rows
    assert ppl["elo-mine-aligned"]["bpb/mine"] < ppl["base"]["bpb/mine"]


def test_the_guide_warns_without_extending(tmp_path, capsys):
    """The recipe pointed at the unextended base: validate names the stage and the fix."""
    text = doc_blocks.files(DOC)["my-language.yaml"].replace("{path: models/base-ext}", "{builtin: tiny-base}")
    (tmp_path / "r.yaml").write_text(text)
    doc_blocks.run(["python", "docs/examples/own_language_data.py", "data"], tmp_path)
    assert doc_blocks.run(["engine", "validate", "r.yaml"], tmp_path) == 0
    err = capsys.readouterr().err
    assert "stage 'elo-mine'" in err and "covers 'mine'" in err and "train_embeddings: true" in err
