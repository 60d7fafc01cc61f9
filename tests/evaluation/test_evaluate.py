"""Evaluate-stage plugins, checked against plain transformers computations.

Each reference below is written the obvious way (one forward per document or per
choice, ``cross_entropy`` with sum) so that it shares no code with
:mod:`engine.evaluation`; the plugins must match it. ``-k perplexity`` and
``-k task_accuracy`` select each plugin's tests.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from rich.progress import Progress
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import DataError, ModelLoadError
from engine.evaluation.driver import document_spans, encode_document, encode_pair, plan_batches
from engine.run.context import StageContext
from engine.run.runtime import Runtime
from engine_plugins.perplexity import Perplexity
from engine_plugins.perplexity import register_evaluators as register_perplexity
from engine_plugins.task_accuracy import TaskAccuracy, load_items, plan_choices, predict
from engine_plugins.task_accuracy import register_evaluators as register_task_accuracy

DOCS = [
    "a",
    "the cat",
    "the cat sits on the mat and the dog runs in the park",
    "lum vela dora sen kato",
    ("question what color is the sky answer blue " * 3).strip(),
    "a small model learns words from a small corpus of text and the cat sits on the mat",
    "kira nen",
]

ITEMS = [
    ("question what color is the sky answer", [" blue", " cat", " mat"], 0),
    ("the cat sits on the", [" mat", " sky", " park"], 0),
    ("the dog runs in the", [" park", " blue"], 0),
    ("a small model learns words from a small", [" corpus", " dog", " vela dora"], 0),
    ("lum vela dora sen", [" kato", " the", " answer"], 0),
    ("lumi vel ados kira", [" nen", " cat sits"], 1),
    ("question what is the", [" sky", " mat", " text", " color"], 3),
    ("the cat and the dog", [" runs", " learns"], 0),
    ("a small corpus of", [" text", " lum", " question what"], 0),
    ("kato lumi vel", [" ados", " sits"], 0),
]


# --- helpers ----------------------------------------------------------------------------------


def build_short_context_llama(out_dir: Path, tokenizer, max_positions: int = 16) -> Path:
    """Like conftest's build_tiny_llama, with a tiny context window."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_short_context_llama(tmp_path_factory.mktemp("short-llama"), tiny_tokenizer)


@pytest.fixture
def docs_file(tmp_path) -> Path:
    f = tmp_path / "docs.txt"
    f.write_text("\n".join(DOCS) + "\n")
    return f


@pytest.fixture
def items_file(tmp_path) -> Path:
    f = tmp_path / "items.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": p, "choices": c, "label": y}) for p, c, y in ITEMS))
    return f


def load_plain(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_perplexity(model_dir: Path, tokenizer, docs: list[str]) -> tuple[float, int]:
    """One forward per document, summed cross-entropy, exp(total / count)."""
    model = load_plain(model_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor([[tokenizer.bos_token_id, *encode(tokenizer, doc)]])
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count), count


def reference_sliding_perplexity(model_dir: Path, tokenizer, doc: str, max_length: int,
                                 stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's sliding-window loop, written out."""
    model = load_plain(model_dir)
    ids = [tokenizer.bos_token_id, *encode(tokenizer, doc)]
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg_len = end - prev_end
            window = torch.tensor([ids[begin:end]])
            logits = model(window).logits[0, :-1]
            targets = window[0, 1:].clone()
            targets[:-trg_len] = -100
            total += F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
            prev_end = end
            if end == len(ids):
                break
    return math.exp(total / count), count


def reference_choices(model_dir: Path, tokenizer, contexts: list[str],
                      items=ITEMS) -> tuple[list[int], list[int]]:
    """Per item: argmax of summed log p(choice | context), and of that over len(choice)."""
    model = load_plain(model_dir)
    preds, preds_norm = [], []
    with torch.no_grad():
        for context, (_, choices, _) in zip(contexts, items, strict=True):
            lls = []
            for choice in choices:
                ctx = [tokenizer.bos_token_id, *encode(tokenizer, context)]
                cont = encode(tokenizer, choice)
                ids = torch.tensor([ctx + cont])
                logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                lls.append(logprobs[positions, torch.tensor(cont)].sum().item())
            normed = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
            preds.append(max(range(len(lls)), key=lambda i: (lls[i], -i)))
            preds_norm.append(max(range(len(normed)), key=lambda i: (normed[i], -i)))
    return preds, preds_norm


def run_plugin(plugin, make_context, models: dict[str, Path], sources: list[DataSource], **params):
    context = make_context("scores", stage_kind="evaluate", plugin=plugin.name)
    inputs = StageInputs(models=[ModelArtifact(n, p) for n, p in models.items()], data=sources)
    return plugin.run(context, inputs, plugin.Params(**params)), context


def accuracy(preds: list[int], labels: list[int]) -> float:
    return sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)


# --- perplexity -------------------------------------------------------------------------------


def test_perplexity_matches_plain_transformers(tiny_model, tiny_tokenizer, docs_file, make_context):
    expected, count = reference_perplexity(tiny_model, tiny_tokenizer, DOCS)
    art, context = run_plugin(Perplexity(), make_context, {"tiny": tiny_model},
                              [DataSource(docs_file, "text", language="xx")], batch_size=3,
                              bits_per_byte=True)
    assert art.name == "scores"
    assert art.metrics["tiny"]["ppl/xx"] == pytest.approx(expected, rel=1e-4)
    assert art.counts["tiny"]["ppl/xx"] == count
    assert context.stats.tokens == count  # no window overlap: fed positions == predictions
    nbytes = sum(len(d.encode()) for d in DOCS)
    bpb = math.log(art.metrics["tiny"]["ppl/xx"]) * count / (math.log(2) * nbytes)
    assert art.metrics["tiny"]["bpb/xx"] == pytest.approx(bpb, rel=1e-9)
    assert art.counts["tiny"]["bpb/xx"] == nbytes
    assert not art.errors


def test_perplexity_batching_equals_batch_size_one(tiny_model, docs_file, make_context):
    source = [DataSource(docs_file, "text")]
    one, _ = run_plugin(Perplexity(), make_context, {"m": tiny_model}, source, batch_size=1,
                        batch_tokens=None)  # one document per forward pass
    many, _ = run_plugin(Perplexity(), make_context, {"m": tiny_model}, source, batch_size=4)
    assert set(one.metrics["m"]) == {"ppl/docs"}  # label = file stem
    assert many.metrics["m"]["ppl/docs"] == pytest.approx(one.metrics["m"]["ppl/docs"], rel=1e-5)
    assert many.counts == one.counts


@pytest.mark.parametrize("stride", [5, 15])
def test_perplexity_sliding_window_long_text(short_model, tiny_tokenizer, tmp_path, make_context,
                                             stride):
    doc = " ".join(DOCS[2:6])  # about 6x the 16-token context
    n_tokens = 1 + len(encode(tiny_tokenizer, doc))
    assert n_tokens > 4 * 16
    f = tmp_path / "long.txt"
    f.write_text(doc + "\n")
    expected, count = reference_sliding_perplexity(short_model, tiny_tokenizer, doc, 16, stride)
    assert count == n_tokens - 1  # every token but the first, once
    art, context = run_plugin(Perplexity(), make_context, {"short": short_model},
                              [DataSource(f, "text")], batch_size=3, stride=stride)
    assert art.metrics["short"]["ppl/long"] == pytest.approx(expected, rel=1e-4)
    assert art.counts["short"]["ppl/long"] == count
    assert context.stats.tokens >= count  # windows overlap when stride < max_length


def test_perplexity_document_spans_cover_each_token_once():
    ids = list(range(50))
    for max_length, stride in [(8, 3), (8, 7), (64, 32), (2, 1)]:
        spans = document_spans(ids, max_length, stride)
        assert all(len(s.tokens) <= max_length for s in spans)
        scored = [t for s in spans for t in s.tokens[-s.n_targets:]]
        assert scored == ids[1:]
    assert document_spans([7], 8, 4) == []
    with pytest.raises(ValueError, match="stride"):
        document_spans(ids, 8, 8)


def test_perplexity_max_documents(tiny_model, tiny_tokenizer, docs_file, make_context):
    expected, count = reference_perplexity(tiny_model, tiny_tokenizer, DOCS[:3])
    art, _ = run_plugin(Perplexity(), make_context, {"m": tiny_model},
                        [DataSource(docs_file, "text", language="xx")], max_documents=3)
    assert art.metrics["m"]["ppl/xx"] == pytest.approx(expected, rel=1e-4)
    assert art.counts["m"]["ppl/xx"] == count


def test_perplexity_failed_model_reported_others_scored(tiny_model, tmp_path, docs_file,
                                                        make_context):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    models = {"a": tiny_model, "broken": broken, "missing": tmp_path / "nope", "b": tiny_model}
    art, _ = run_plugin(Perplexity(), make_context, models, [DataSource(docs_file, "text")])
    assert set(art.metrics) == {"a", "b"}
    assert set(art.errors) == {"broken", "missing"}
    assert str(broken) in art.errors["broken"] and "nope" in art.errors["missing"]
    assert art.to_json()["_errors"] == art.errors
    with pytest.raises(ModelLoadError, match="no model could be scored"):
        run_plugin(Perplexity(), make_context, {"broken": broken}, [DataSource(docs_file, "text")])


def test_perplexity_progress_counts_models_times_spans(tiny_model, tiny_tokenizer, tmp_path,
                                                      docs_file):
    """The bar counts one step per span of every model (whatever batching scores it); a
    model whose weights are missing fails after planning and the bar still completes."""
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, no_weights / f.name)
    progress = Progress(disable=True)
    context = StageContext(run_name="t", stage_name="scores", stage_kind="evaluate",
                           plugin="perplexity", workdir=tmp_path, output_dir=tmp_path / "out",
                           runtime=Runtime(device="cpu"), progress=progress)
    inputs = StageInputs(models=[ModelArtifact("a", tiny_model), ModelArtifact("x", no_weights),
                                 ModelArtifact("b", tiny_model)],
                         data=[DataSource(docs_file, "text")])
    art = Perplexity().run(context, inputs, Perplexity.Params(batch_size=2))
    assert set(art.metrics) == {"a", "b"} and "no model.safetensors" in art.errors["x"]
    (task,) = progress.tasks
    n_spans = sum(len(document_spans(encode_document(tiny_tokenizer, d), 256, 128)) for d in DOCS)
    assert task.total == task.completed == 3 * n_spans
    assert context.stats.tokens == 2 * art.counts["a"]["ppl/docs"]


def test_perplexity_format_mismatch_names_stage(tiny_model, items_file, make_context):
    with pytest.raises(DataError, match="'scores'.*no data source of format 'text'"):
        run_plugin(Perplexity(), make_context, {"m": tiny_model}, [DataSource(items_file, "choice")])


def test_perplexity_duplicate_labels_rejected(tiny_model, docs_file, text_file, make_context):
    sources = [DataSource(docs_file, "text", language="mn"), DataSource(text_file, "text", language="mn")]
    with pytest.raises(DataError, match="share the label 'mn'"):
        run_plugin(Perplexity(), make_context, {"m": tiny_model}, sources)


def test_perplexity_params_and_registration():
    with pytest.raises(ValidationError, match="stride"):
        Perplexity.Params(max_length=8, stride=8)
    with pytest.raises(ValidationError):
        Perplexity.Params(batch_sise=2)
    Perplexity().check({"models": [{"max_position_embeddings": 64}]}, Perplexity.Params(stride=32))
    with pytest.raises(ValueError, match="stride 64 must be below the window of 64"):
        Perplexity().check({"models": [{"max_position_embeddings": 64}]},
                           Perplexity.Params(stride=64))
    got = []
    register_perplexity(got.append)
    assert [impl.name for impl in got] == ["perplexity"]


# --- task-accuracy ----------------------------------------------------------------------------


def test_task_accuracy_matches_reference_loop(tiny_model, tiny_tokenizer, items_file, make_context):
    labels = [y for _, _, y in ITEMS]
    ref, ref_norm = reference_choices(tiny_model, tiny_tokenizer, [p for p, _, _ in ITEMS])
    params = TaskAccuracy.Params(batch_size=5)
    items = load_items(DataSource(items_file, "choice", language="xx"), params)
    preds = predict(load_plain(tiny_model), tiny_tokenizer, items, max_length=256, batch_size=5)
    assert [p.pred for p in preds] == ref
    assert [p.pred_norm for p in preds] == ref_norm

    art, context = run_plugin(TaskAccuracy(), make_context, {"tiny": tiny_model},
                              [DataSource(items_file, "choice", language="xx")], batch_size=5)
    assert art.metrics["tiny"]["acc/xx"] == accuracy(ref, labels)
    assert art.metrics["tiny"]["acc_norm/xx"] == accuracy(ref_norm, labels)
    assert art.counts["tiny"] == {"acc/xx": len(ITEMS), "acc_norm/xx": len(ITEMS)}
    assert context.stats.tokens > 0


def test_task_accuracy_acc_norm_divides_by_characters(tiny_model, tiny_tokenizer, items_file):
    items = load_items(DataSource(items_file, "choice"), TaskAccuracy.Params())
    preds = predict(load_plain(tiny_model), tiny_tokenizer, items, max_length=256)
    for item, p in zip(items, preds, strict=True):
        normed = [lp / len(c) for lp, c in zip(p.logprobs, item.choices, strict=True)]
        assert p.pred_norm == normed.index(max(normed))
        assert p.pred == p.logprobs.index(max(p.logprobs))


def test_task_accuracy_fewshot(tiny_model, tiny_tokenizer, items_file, make_context):
    source = DataSource(items_file, "choice", language="xx")
    params = TaskAccuracy.Params(num_fewshot=2, fewshot_seed=3, batch_size=4)
    items = load_items(source, params)
    assert items == load_items(source, params)  # deterministic
    for (prompt, choices, label), item in zip(ITEMS, items, strict=True):
        parts = item.context.split("\n\n")
        assert len(parts) == 3 and parts[-1] == prompt
        assert prompt + choices[label] not in parts[:2]  # never its own answer
        assert all(any(s == p + c[y] for p, c, y in ITEMS) for s in parts[:2])
    other = load_items(source, TaskAccuracy.Params(num_fewshot=2, fewshot_seed=4))
    assert [i.context for i in other] != [i.context for i in items]

    ref, ref_norm = reference_choices(tiny_model, tiny_tokenizer, [i.context for i in items])
    art, _ = run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [source],
                        num_fewshot=2, fewshot_seed=3, batch_size=4)
    labels = [y for _, _, y in ITEMS]
    assert art.metrics["m"]["acc/xx"] == accuracy(ref, labels)
    assert art.metrics["m"]["acc_norm/xx"] == accuracy(ref_norm, labels)

    with pytest.raises(DataError, match="num_fewshot=10 needs at least 11 items"):
        load_items(source, TaskAccuracy.Params(num_fewshot=10))


def test_task_accuracy_long_prompt_is_left_truncated(short_model, tmp_path, make_context):
    f = tmp_path / "long.jsonl"
    prompt = " ".join(DOCS[2:6]) + " the cat sits on the"
    f.write_text(json.dumps({"prompt": prompt, "choices": [" mat", " sky"], "label": 0}) + "\n")
    art, _ = run_plugin(TaskAccuracy(), make_context, {"s": short_model}, [DataSource(f, "choice")])
    assert art.counts["s"]["acc/long"] == 1
    assert art.metrics["s"]["acc/long"] in (0.0, 1.0)


def test_task_accuracy_failed_model_reported_others_scored(tiny_model, tmp_path, items_file,
                                                           make_context):
    models = {"good": tiny_model, "missing": tmp_path / "nope"}
    art, _ = run_plugin(TaskAccuracy(), make_context, models, [DataSource(items_file, "choice")])
    assert set(art.metrics) == {"good"}
    assert "nope" in art.errors["missing"]


def test_task_accuracy_format_mismatch_names_stage(tiny_model, text_file, make_context):
    with pytest.raises(DataError, match="'scores'.*no data source of format 'choice'"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(text_file, "text")])


def test_task_accuracy_empty_choice_rejected(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "p", "choices": ["a", ""], "label": 0}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'choices' holds an empty string"):
        load_items(DataSource(f, "choice"), TaskAccuracy.Params())


def test_task_accuracy_encode_pair_moves_trailing_space(tiny_tokenizer):
    assert encode_pair(tiny_tokenizer, "the cat sits on the ", "mat") == \
        encode_pair(tiny_tokenizer, "the cat sits on the", " mat")
    ctx, cont = encode_pair(tiny_tokenizer, "the cat", " sits")
    assert ctx[0] == tiny_tokenizer.bos_token_id and cont == encode(tiny_tokenizer, " sits")


def test_task_accuracy_registration():
    got = []
    register_task_accuracy(got.append)
    assert [impl.name for impl in got] == ["task-accuracy"]


# --- shared-prefix (KV cache) scoring -------------------------------------------------------


def reference_choice_logprobs(model_dir: Path, tokenizer, items) -> list[list[float]]:
    """Per item and choice: summed log p(choice | context), one plain forward each."""
    model = load_plain(model_dir)
    out = []
    with torch.no_grad():
        for item in items:
            lls = []
            for choice in item.choices:
                ctx = [tokenizer.bos_token_id, *encode(tokenizer, item.context)]
                cont = encode(tokenizer, choice)
                logprobs = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0, :-1], -1)
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                lls.append(logprobs[positions, torch.tensor(cont)].sum().item())
            out.append(lls)
    return out


@pytest.mark.parametrize("batch_size", [1, 4, 32])
def test_task_accuracy_shared_prefix_equals_plain_scoring(tiny_model, tiny_tokenizer, items_file,
                                                          batch_size):
    items = load_items(DataSource(items_file, "choice"), TaskAccuracy.Params(num_fewshot=2))
    spans, _ = plan_choices(tiny_tokenizer, items, 256)
    batches = plan_batches(spans, batch_size, min_saved_tokens=0)
    assert sum(b.shared for b in batches) >= 1  # the prefix path really runs
    assert sorted(i for b in batches for i in b.indices) == list(range(len(spans)))
    model = load_plain(tiny_model)
    shared = predict(model, tiny_tokenizer, items, max_length=256, batch_size=batch_size,
                     min_saved_tokens=0)
    plain = predict(model, tiny_tokenizer, items, max_length=256, batch_size=batch_size,
                    share_prefix=False)
    expected = reference_choice_logprobs(tiny_model, tiny_tokenizer, items)
    for s, p, e in zip(shared, plain, expected, strict=True):
        assert s.logprobs == pytest.approx(e, abs=1e-5)
        assert s.logprobs == pytest.approx(p.logprobs, abs=1e-5)
        assert (s.pred, s.pred_norm) == (p.pred, p.pred_norm)


def test_task_accuracy_shared_prefix_feeds_fewer_tokens(tiny_model, items_file, make_context):
    source = [DataSource(items_file, "choice", language="xx")]
    shared, ctx_shared = run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, source,
                                    num_fewshot=3, batch_size=6)
    plain, ctx_plain = run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, source,
                                  num_fewshot=3, batch_size=6, share_prefix=False)
    assert shared.metrics == plain.metrics and shared.counts == plain.counts
    assert ctx_shared.stats.tokens < 0.6 * ctx_plain.stats.tokens


def test_perplexity_documents_sharing_only_bos_stay_plain(tiny_tokenizer):
    spans = [s for d in DOCS for s in document_spans(encode_document(tiny_tokenizer, d), 256, 128)]
    batches = plan_batches(spans, 4)
    assert not any(b.shared for b in batches)
    assert sum(b.fed_tokens for b in batches) == sum(s.n_inputs for s in spans)


# --- bad input --------------------------------------------------------------------------------


def test_perplexity_empty_file_is_an_error(tiny_model, tmp_path, make_context):
    f = tmp_path / "empty.txt"
    f.write_text("\n\n")
    with pytest.raises(DataError, match=r"no documents in .*empty\.txt"):
        run_plugin(Perplexity(), make_context, {"m": tiny_model}, [DataSource(f, "text")])


def test_task_accuracy_empty_file_is_an_error(tiny_model, tmp_path, make_context):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(DataError, match=r"empty\.jsonl: no multiple-choice items"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(f, "choice")])


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p", "choices": [" a"], "label": 0}, "'choices' needs at least two entries"),
    ({"prompt": "p", "choices": [" a", " b"], "label": 2}, r"'label' must be an index .*0\.\.1"),
    ({"prompt": "p", "choices": [" a", " b"], "label": -1}, "'label' must be an index"),
])
def test_task_accuracy_bad_items_name_file_and_line(tiny_model, tmp_path, make_context, record,
                                                    message):
    f = tmp_path / "bad.jsonl"
    good = {"prompt": "q", "choices": [" a", " b"], "label": 1}
    f.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(f, "choice")])


def test_task_accuracy_load_in_8bit_on_cpu(tiny_model, tiny_tokenizer, items_file, make_context):
    """Evaluation through bitsandbytes int8 weights (CPU backend) scores every item, with
    log-likelihoods close to the float32 ones."""
    pytest.importorskip("bitsandbytes")
    context = make_context("scores", stage_kind="evaluate", plugin="task-accuracy",
                           load_in_8bit=True)
    try:
        model = context.load_model(ModelArtifact("m", tiny_model))
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot load int8 weights on this CPU: {exc}")
    assert any("8bit" in type(m).__name__ for m in model.modules())
    items = load_items(DataSource(items_file, "choice"), TaskAccuracy.Params())
    int8 = predict(model, tiny_tokenizer, items, max_length=256, batch_size=4)
    fp32 = predict(load_plain(tiny_model), tiny_tokenizer, items, max_length=256, batch_size=4)
    for q, f in zip(int8, fp32, strict=True):
        assert q.logprobs == pytest.approx(f.logprobs, abs=0.05)
    assert int8[0].logprobs != fp32[0].logprobs  # really quantized
    source = [DataSource(items_file, "choice", language="xx")]
    inputs = StageInputs(models=[ModelArtifact("m", tiny_model)], data=source)
    art = TaskAccuracy().run(context, inputs, TaskAccuracy.Params(batch_size=4))
    assert not art.errors and art.counts["m"]["acc/xx"] == len(ITEMS)
