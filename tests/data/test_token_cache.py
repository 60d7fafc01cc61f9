"""The token cache (engine.data.token_cache): built once, reused by later calls and
processes, never served to another tokenizer, and giving the same packed batches as
tokenizing the text on every pass did."""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import threading
from pathlib import Path

import pytest

from engine.api import DataSource
from engine.data import token_cache
from engine.data.sources import iter_texts, resolve_data
from engine.recipe.spec import DataSpec
from engine.testing import build_tokenizer
from engine.training import batching, examples


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Every test starts with its own empty cache folder and no entry open in memory."""
    monkeypatch.setenv("LINGOFORGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LINGOFORGE_TOKEN_CACHE", raising=False)
    token_cache._open.clear()
    for k in token_cache.stats:
        token_cache.stats[k] = 0
    yield
    token_cache._open.clear()


def _corpus(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the cat sat on a mat with ünïcode words and more of them".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(n)]
    lines[5] = ""  # blank lines are not documents
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _old_documents(tokenizer, source, rng, buffer_size, skip=None):
    """The tokenization path training used before the cache, kept here as the reference:
    texts shuffled through the buffer, tokenized 64 at a time, ``BOS text EOS`` (nothing
    held out)."""
    assert not skip
    eos = tokenizer.eos_token_id
    bos = getattr(tokenizer, "bos_token_id", None)
    start = [bos] if bos is not None and bos != eos else []
    docs = batching.shuffled(iter_texts(source), rng, buffer_size)
    while chunk := list(itertools.islice(docs, 64)):
        for ids in tokenizer(chunk)["input_ids"]:
            if start and ids[:1] != start:
                ids = [*start, *ids]
            yield ids if ids and ids[-1] == eos else [*ids, eos]


def _policy(tok):
    return examples.document_policy(tok)


def _entries() -> list[Path]:
    root = token_cache.tokens_dir()
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def test_batches_are_identical_to_the_old_tokenization_path(tmp_path, tiny_tokenizer, monkeypatch):
    txt = _corpus(tmp_path / "a.txt", 300, seed=1)
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in iter_texts(DataSource(path=_corpus(
        tmp_path / "tmp.txt", 120, seed=2)))), encoding="utf-8")
    sources = [DataSource(path=txt, weight=3.0, records="10%:90%"),
               DataSource(path=jsonl, text_field="body", weight=1.0)]
    kw = dict(seq_len=48, batch_size=4, seed=7, shuffle_buffer=50)
    new = list(itertools.islice(batching.packed_batches(tiny_tokenizer, sources, **kw), 60))  # several passes
    assert token_cache.stats["builds"] == 2
    monkeypatch.setattr(batching, "_tokenized_documents", _old_documents)
    old = list(itertools.islice(batching.packed_batches(tiny_tokenizer, sources, **kw), 60))
    assert len(new) == len(old) == 60
    for a, b in zip(new, old, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), k


def test_a_second_call_reads_the_cache_without_tokenizing(tmp_path, tiny_tokenizer, monkeypatch):
    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    first = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    (entry,) = _entries()
    mtimes = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    assert token_cache.stats["builds"] == 1
    token_cache._open.clear()  # as a new process would: nothing open in memory

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(token_cache, "_build", no_tokenizing)
    again = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    assert token_cache.stats == {"builds": 1, "hits": 1, "rebuilds": 0, "tokens_built": first.meta["tokens"]}
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == mtimes
    assert [again.document(i) for i in range(len(again))] == [first.document(i) for i in range(len(first))]
    assert len(again) == sum(1 for _ in iter_texts(src))


def test_the_entry_is_in_the_engine_cache_with_its_metadata(tmp_path, tiny_tokenizer):
    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    docs = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    assert docs.folder.parent == Path(os.environ["LINGOFORGE_CACHE"]) / "tokens"
    meta = json.loads((docs.folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["documents"] == len(docs)
    assert (docs.folder / "tokens.bin").stat().st_size == 2 * meta["tokens"]
    assert not [p for p in docs.folder.parent.iterdir() if ".tmp-" in p.name]


def test_the_token_cache_can_have_its_own_folder(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("LINGOFORGE_TOKEN_CACHE", str(tmp_path / "tok"))
    docs = token_cache.documents(tiny_tokenizer, DataSource(path=_corpus(tmp_path / "a.txt")),
                                 _policy(tiny_tokenizer))
    assert docs.folder.parent == tmp_path / "tok"


def test_a_cache_from_another_tokenizer_is_never_reused(tmp_path, tiny_tokenizer, capsys):
    other = build_tokenizer(tmp_path / "other", texts=["completely different training text"] * 20)
    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    mine = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    theirs = token_cache.documents(other, src, _policy(other))
    assert token_cache.stats["builds"] == 2 and len(_entries()) == 2
    assert theirs.folder != mine.folder
    expected = [list(other(t)["input_ids"]) for t in iter_texts(src)]
    assert [theirs.document(i)[1:-1] for i in range(3)] == expected[:3]  # BOS ... EOS around it

    # an entry whose metadata names another tokenizer (copied in by hand, or a key
    # collision) is not read: it is rebuilt, and that is said once
    token_cache._open.clear()
    shutil.rmtree(theirs.folder)
    shutil.copytree(mine.folder, theirs.folder)
    rebuilt = token_cache.documents(other, src, _policy(other))
    assert token_cache.stats["rebuilds"] == 1
    assert rebuilt.document(0) == theirs.document(0)
    assert capsys.readouterr().err.count("built by another tokenizer") == 1


def test_a_damaged_entry_is_rebuilt(tmp_path, tiny_tokenizer):
    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    docs = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    with open(docs.folder / "tokens.bin", "r+b") as fh:
        fh.truncate(10)
    token_cache._open.clear()
    again = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    assert token_cache.stats["rebuilds"] == 1
    assert again.meta["tokens"] == docs.meta["tokens"]


def test_key_covers_content_field_records_and_policy(tmp_path, tiny_tokenizer):
    path = _corpus(tmp_path / "a.txt")
    pol = _policy(tiny_tokenizer)
    token_cache.documents(tiny_tokenizer, DataSource(path=path), pol)
    token_cache.documents(tiny_tokenizer, DataSource(path=path, records="0:50%"), pol)
    token_cache.documents(tiny_tokenizer, DataSource(path=path), token_cache.DocumentPolicy(None, pol.eos))
    assert token_cache.stats["builds"] == 3
    copy = tmp_path / "copy.txt"  # same content elsewhere: the same entry
    shutil.copy(path, copy)
    token_cache.documents(tiny_tokenizer, DataSource(path=copy), pol)
    assert token_cache.stats["builds"] == 3
    _corpus(path, seed=9)  # content changed: a new entry
    token_cache.documents(tiny_tokenizer, DataSource(path=path), pol)
    assert token_cache.stats["builds"] == 4


def test_two_builders_of_one_key_build_it_once(tmp_path, tiny_tokenizer):
    src = DataSource(path=_corpus(tmp_path / "a.txt", 2000))
    results, errors = [], []

    def build():
        try:
            results.append(token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer)))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert token_cache.stats["builds"] == 1 and token_cache.stats["hits"] == 1
    assert len(_entries()) == 1 and results[0].folder == results[1].folder


def test_a_large_vocabulary_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, **{f"w{i}": i + 3 for i in range(70000)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    path = tmp_path / "big.txt"
    path.write_text("w1 w69999 w40000\nw65536 w2\n")
    docs = token_cache.documents(tok, DataSource(path=path), _policy(tok))
    assert docs.meta["dtype"] == "uint32"
    assert docs.document(0) == [0, 4, 70002, 40003, 1] and docs.document(1) == [0, 65539, 5, 1]


def test_a_skipped_shard_is_dropped_whole_and_noted(tmp_path, tiny_tokenizer, make_context, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("good one\n")
    filler = b"".join(b"filler %d\n" % i for i in range(120000))  # past the validated first MB
    (folder / "b.txt").write_bytes(filler + b"bad \xff\n")
    (folder / "c.txt").write_text("good two\n")
    src = resolve_data(DataSpec(path="corpus", skip_broken_shards=True), tmp_path)
    ctx = make_context()
    with token_cache.reporting_to(ctx):
        docs = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    assert [tiny_tokenizer.decode(docs.document(i), skip_special_tokens=True) for i in range(len(docs))] == [
        "good one", "good two"]
    note = ctx.stats.notes["token_cache"][str(folder)]
    assert note["skipped_shards"][0]["shard"] == str(folder / "b.txt")
    assert "120001: not UTF-8" in note["skipped_shards"][0]["reason"]
    assert "skipping broken shard" in capsys.readouterr().err


def test_stage_notes_record_throughput_and_reuse(tmp_path, tiny_tokenizer, make_context):
    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    first, second = make_context(stage_name="one"), make_context(stage_name="two")
    for ctx in (first, second):
        with token_cache.reporting_to(ctx):
            next(batching.packed_batches(tiny_tokenizer, [src], seq_len=32, batch_size=2))
    a, b = first.stats.notes["token_cache"][str(src.path)], second.stats.notes["token_cache"][str(src.path)]
    assert a["reused"] is False and a["tokens_per_s"] > 0 and a["tokens"] > 0
    assert b["reused"] is True and b["entry"] == a["entry"]
    assert token_cache.stats["builds"] == 1


def test_parallelism_is_on_for_the_build_only(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    with token_cache.parallel_tokenizers():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    with token_cache.parallel_tokenizers():
        pass
    assert "TOKENIZERS_PARALLELISM" not in os.environ


def test_a_slow_tokenizer_gives_the_same_documents(tmp_path, tiny_tokenizer):
    """The pure-Python path (no Rust backend) encodes through ``tokenizer(texts)``."""

    class Plain:
        bos_token_id, eos_token_id = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
        special_tokens_map = tiny_tokenizer.special_tokens_map

        def __call__(self, texts):
            return tiny_tokenizer(texts)

        def get_vocab(self):
            return tiny_tokenizer.get_vocab()

        def __len__(self):
            return len(tiny_tokenizer)

    src = DataSource(path=_corpus(tmp_path / "a.txt"))
    fast = token_cache.documents(tiny_tokenizer, src, _policy(tiny_tokenizer))
    slow = token_cache.documents(Plain(), src, _policy(tiny_tokenizer))
    assert slow.folder != fast.folder  # another tokenizer (class): another entry
    assert [slow.document(i) for i in range(len(slow))] == [fast.document(i) for i in range(len(fast))]
