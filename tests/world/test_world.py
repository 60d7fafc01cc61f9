"""The built-in tiny world: names, formats, determinism, coverage, safe builds.

Every test points ``LINGOFORGE_CACHE`` at its own temporary folder. No test pretrains
the full base model (the package ships it, tests/world/test_shipped.py); builds on this
machine run a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine import world
from engine.api import DataSource
from engine.core import outputs
from engine.core.errors import DataError, ModelLoadError
from engine.data.files import detect_format, iter_choices, iter_instructions
from engine.data.sources import iter_texts
from engine.world import cache as cache_module
from engine.world import corpus
from engine.world.cache import ensure_built, file_hashes
from engine.world.pretrain import build_base_model


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LINGOFORGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _lines(name: str) -> list[str]:
    return world.data_path(name).read_text(encoding="utf-8").splitlines()


def test_interface_constants():
    assert list(world.LANGUAGES) == ["en", "vel", "dor", "lum"]
    assert world.SOURCE_LANGUAGE == "en" and world.TARGET_LANGUAGE == "lum"
    assert world.BUILTIN_MODELS == ("tiny-base",)
    for lang in world.LANGUAGES:
        for split in ("train.txt", "test.txt", "task-test.jsonl", "task-test-gen.jsonl",
                      "task-train.jsonl"):
            assert f"{lang}/{split}" in world.BUILTIN_DATA
    assert "mix/align.txt" in world.BUILTIN_DATA


def test_cache_dir_follows_env(cache, monkeypatch):
    assert world.cache_dir() == cache.resolve()
    monkeypatch.delenv("LINGOFORGE_CACHE")
    assert world.cache_dir() == Path.home() / ".cache" / "lingoforge"


def test_every_data_name_resolves(cache):
    for name in world.BUILTIN_DATA:
        path = world.data_path(name)
        assert path.is_absolute() and path.is_file() and path.stat().st_size > 0
        assert cache.resolve() in path.parents
        assert f"world-v{world.WORLD_VERSION}" in path.parts


def test_formats(cache):
    for name in world.BUILTIN_DATA:
        path = world.data_path(name)
        if name.endswith(".txt"):
            assert detect_format(path) == "text"
            texts = list(iter_texts(DataSource(path=path, format="text")))
            assert texts and all(t.strip() == t and "\n" not in t for t in texts)
        elif name.endswith("task-train.jsonl"):
            assert detect_format(path) == "instructions"
            records = [r for _, r in iter_instructions(DataSource(path=path, format="instructions"))]
            assert len(records) == (960 if name.startswith("en/") else 192)
            assert all(r["prompt"][-1] in "?." and r["response"].startswith(" ")
                       and r["response"].endswith(".") for r in records)
        elif name.endswith("task-test-gen.jsonl"):
            assert detect_format(path) == "generation"
            assert len(_lines(name)) == 128
        else:
            assert detect_format(path) == "choice"
            records = [r for _, r in iter_choices(DataSource(path=path, format="choice"))]
            assert 100 <= len(records) <= 200
            assert all(c.startswith(" ") and len(set(r["choices"])) == len(r["choices"])
                       for r in records for c in r["choices"])


def test_sizes(cache):
    sizes = {lang: len(_lines(f"{lang}/train.txt")) for lang in world.LANGUAGES}
    for lang in ("en", "vel", "dor"):
        assert 2000 <= sizes[lang] <= 4000
        assert world.data_path("lum/train.txt").stat().st_size * 2 < \
            world.data_path(f"{lang}/train.txt").stat().st_size
    assert 600 <= sizes["lum"] <= 1000
    for lang in world.LANGUAGES:
        assert len(_lines(f"{lang}/test.txt")) == 200
        assert not set(_lines(f"{lang}/test.txt")) & set(_lines(f"{lang}/train.txt"))


def test_data_generation_is_deterministic(tmp_path, monkeypatch):
    digests = []
    for run in ("a", "b"):
        monkeypatch.setenv("LINGOFORGE_CACHE", str(tmp_path / run))
        digests.append(file_hashes(world.data_dir()))
    assert digests[0] == digests[1]
    assert sorted(digests[0]) == sorted(world.BUILTIN_DATA)


def test_languages_are_distinct(cache):
    """Only the attribute values (loanwords, written alike everywhere) are shared."""
    from engine.world.lexicon import SHARED_GLOSSES

    words = {lang: {w.strip(".?").lower() for line in _lines(f"{lang}/train.txt")
                    for w in line.split()} for lang in world.LANGUAGES}
    assert {"the", "fox", "red", "forest"} <= words["en"]
    assert "red" in words["lum"] and "fox" not in words["lum"]
    vocab = {lang: w - set(SHARED_GLOSSES) for lang, w in words.items()}
    for a in world.LANGUAGES:
        for b in world.LANGUAGES:
            if a < b:
                assert len(vocab[a] & vocab[b]) < 0.05 * min(len(vocab[a]), len(vocab[b])), (a, b)


def test_same_questions_in_every_language(cache):
    items = {lang: [r for _, r in iter_choices(DataSource(
        path=world.data_path(f"{lang}/task-test.jsonl"), format="choice"))]
        for lang in world.LANGUAGES}
    labels = {lang: [r["label"] for r in recs] for lang, recs in items.items()}
    assert len({tuple(v) for v in labels.values()}) == 1
    assert len({r["prompt"] for r in items["lum"]}) == len(items["lum"])


def test_task_train_never_asks_a_held_out_question(cache):
    train_prompts = {json.loads(x)["prompt"] for x in _lines("en/task-train.jsonl")}
    test_prompts = {json.loads(x)["prompt"] for x in _lines("en/task-test.jsonl")}
    assert not train_prompts & test_prompts
    for q in corpus.held_out_questions():
        for template in corpus.EN_TASK_TEMPLATES[q.attr]:
            phrase = template.replace("{E}", q.animal)
            assert not any(phrase in p.lower() for p in train_prompts), phrase


def test_align_mix_is_mostly_lum(cache):
    mix = _lines("mix/align.txt")
    lum, en = set(_lines("lum/train.txt")), set(_lines("en/train.txt"))
    n_lum, n_en = sum(line in lum for line in mix), sum(line in en for line in mix)
    assert n_lum + n_en == len(mix)
    assert n_lum == 9 * n_en


def test_unknown_names_are_clear_errors(cache):
    with pytest.raises(DataError, match=r"'xx/train.txt'.*lum/train.txt"):
        world.data_path("xx/train.txt")
    with pytest.raises(DataError, match="lum/task-update.jsonl"):
        world.data_path("lum/task-update.jsonl")
    with pytest.raises(ModelLoadError, match=r"'huge-base'.*tiny-base"):
        world.model_path("huge-base")
    with pytest.raises(ModelLoadError, match="tiny-base"):
        world.model_config("huge-base")


def test_model_config_needs_no_build(cache):
    config = world.model_config("tiny-base")
    assert config["num_hidden_layers"] == 8 and config["hidden_size"] == 128
    assert config["vocab_size"] == 1536 and config["tie_word_embeddings"] is False
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not (world.world_dir() / "models").exists()


def test_small_model_build_is_deterministic_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        build_base_model(folder, steps=2, batch_size=2)
    ha, hb = file_hashes(a), file_hashes(b)
    assert ha["model.safetensors"] == hb["model.safetensors"]
    assert ha["tokenizer.json"] == hb["tokenizer.json"]
    assert json.loads((a / "config.json").read_text()) == world.model_config("tiny-base")
    model = AutoModelForCausalLM.from_pretrained(str(a))
    tok = AutoTokenizer.from_pretrained(str(a))
    assert len(tok) == model.config.vocab_size
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.decode(tok("The fox is red.")["input_ids"]) == "The fox is red."
    turn = [{"role": "user", "content": "What color is the fox?"}]
    assert tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False) == \
        "<s><|user|>What color is the fox?<|assistant|>"
    ids = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert tok.convert_ids_to_tokens(ids)[:2] == ["<s>", "<|user|>"] and ids[-1] == tok.convert_tokens_to_ids("<|assistant|>")


@pytest.fixture
def fast_builds(monkeypatch, tmp_path) -> list[Path]:
    """An installation that ships no built model, so the model is pretrained on this
    machine, in one step; returns the folders built, in order."""
    monkeypatch.setattr(cache_module, "ASSETS", tmp_path / "no-shipped-build")
    calls: list[Path] = []

    def fast_build(folder: Path) -> None:
        calls.append(folder)
        build_base_model(folder, steps=1, batch_size=2)

    monkeypatch.setattr(world, "_build_model", fast_build)
    return calls


def test_model_path_builds_once(cache, fast_builds, capsys):
    calls = fast_builds
    path = world.model_path("tiny-base")
    err = capsys.readouterr().err
    assert "ships no build of tiny-base" in err and "building the built-in tiny world" in err
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert world.model_path("tiny-base") == path and len(calls) == 1
    assert world.model_config("tiny-base") == json.loads((path / "config.json").read_text())
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_interrupted_build_leaves_nothing_that_looks_done(tmp_path):
    final = tmp_path / "models" / "tiny-base"

    def killed(folder: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ensure_built(final, killed)
    assert not final.exists()
    stale = outputs.temp_dir(".tiny-base.tmp-", final.parent)  # as left by a build killed with SIGKILL
    mine = final.parent / ".tiny-base.tmp-mine"  # named like one, but not the engine's
    mine.mkdir()
    ensure_built(final, lambda folder: (folder / "ok").write_text("1"))
    assert (final / "ok").is_file() and not stale.exists()
    assert mine.is_dir()


def test_cli_prints_hashes(cache, capsys):
    from engine.world.__main__ import main

    assert main(["--data-only"]) == 0
    out = capsys.readouterr().out
    assert "data/lum/train.txt" in out and len(out.splitlines()) == len(world.BUILTIN_DATA) + 1


@pytest.mark.slow
def test_full_base_model():
    """The base model users get, from the shared world cache (the quickstart tests use the
    same one; a first use copies in the build the package ships)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.world.pretrain import perplexity

    path = world.model_path("tiny-base")
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ppl = {lang: perplexity(model, tok, _lines(f"{lang}/test.txt")) for lang in world.LANGUAGES}
    assert ppl["en"] < 20 and ppl["vel"] < 30 and ppl["dor"] < 30  # uniform would be 1536
    assert ppl["lum"] > 2 * max(ppl["en"], ppl["vel"], ppl["dor"])


def test_task_asks_held_out_facts_that_every_train_text_states(cache):
    """A test question's answer is the world's fact, never asked in the instructions but
    stated verbatim in every language's train.txt (what CT teaches) and in the prompt of
    no item (so only what a model learnt answers it)."""
    from engine.world.corpus import fact_sentence, held_out_questions, world_facts

    facts = world_facts()
    for lang in world.LANGUAGES:
        train = world.data_path(f"{lang}/train.txt").read_text(encoding="utf-8")
        records = [json.loads(x) for x in _lines(f"{lang}/task-test.jsonl")]
        gens = [json.loads(x) for x in _lines(f"{lang}/task-test-gen.jsonl")]
        for q, rec, gen in zip(held_out_questions(), records, gens, strict=True):
            assert q.choices[q.label] == facts[q.animal][q.attr]
            assert fact_sentence(lang, q.animal, q.attr) in train
            assert rec["choices"][rec["label"]].strip() == gen["answer"]


def test_the_chat_tokens_never_occur_in_raw_text(cache):
    for name in world.BUILTIN_DATA:
        text = world.data_path(name).read_text(encoding="utf-8")
        assert "<|user|>" not in text and "<|assistant|>" not in text, name

def test_a_damaged_cached_file_is_found_and_rebuilt(cache, capsys):
    path = world.data_path("lum/train.txt")
    good = path.read_bytes()
    assert (world.data_dir() / ".manifest.json").is_file()
    path.write_bytes(good[: len(good) // 2])  # truncated by a full disk, say
    cache_module._verified.clear()  # a new process
    again = world.data_path("lum/train.txt")
    err = capsys.readouterr().err
    assert "lum/train.txt does not match its checksum" in err and err.count("rebuilding") == 1
    assert again.read_bytes() == good
    cache_module._verified.clear()
    world.data_path("lum/train.txt")
    assert capsys.readouterr().err == ""  # intact now: nothing said, nothing rebuilt


def test_a_damaged_model_file_is_rebuilt(cache, fast_builds, capsys):
    calls = fast_builds
    path = world.model_path("tiny-base")
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    cache_module._verified.clear()
    world.model_path("tiny-base")
    assert len(calls) == 2 and "model.safetensors does not match its checksum" in capsys.readouterr().err


def test_an_older_world_version_is_named_once_and_never_read(cache, capsys):
    old = world.cache_dir() / f"world-v{world.WORLD_VERSION - 1}"
    (old / "data" / "lum").mkdir(parents=True)
    (old / "data" / "lum" / "train.txt").write_text("stale\n")
    path = world.data_path("lum/train.txt")
    assert old not in path.parents and path.read_text() != "stale\n"
    world.data_dir(rebuild=True)
    err = capsys.readouterr().err
    assert err.count(f"{old.name} is from an older world version") == 1


def test_a_manifest_from_another_version_means_a_rebuild(cache, capsys):
    folder = world.data_dir()
    manifest = json.loads((folder / ".manifest.json").read_text())
    manifest["world_version"] = world.WORLD_VERSION - 1
    (folder / ".manifest.json").write_text(json.dumps(manifest))
    cache_module._verified.clear()
    world.data_dir()
    assert "was built by world version" in capsys.readouterr().err
    assert json.loads((folder / ".manifest.json").read_text())["world_version"] == world.WORLD_VERSION


def test_a_folder_without_a_manifest_is_rebuilt(cache, capsys):
    folder = world.data_dir()
    (folder / ".manifest.json").unlink()
    (folder / "lum" / "train.txt").write_text("from some other build\n")
    cache_module._verified.clear()
    world.data_dir()
    assert "has no .manifest.json" in capsys.readouterr().err
    assert (folder / "lum" / "train.txt").read_text() != "from some other build\n"
    assert (folder / ".manifest.json").is_file()
