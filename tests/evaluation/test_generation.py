"""``task-accuracy`` generation items: greedy generation, stop rule, exact match, chat template.

The reference below generates the obvious way (one sequence at a time, the whole
sequence re-run for every new token, no padding, no KV cache, argmax of the last
logits) and shares no code with :mod:`engine.evaluation.generation`; the engine's batched,
left-padded, cached loop must produce the same tokens and strings.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from rich.progress import Progress
from test_evaluate import build_short_context_llama, load_plain, run_plugin
from transformers import AutoTokenizer

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.core.errors import DataError, EngineError, ModelLoadError
from engine.data.files import detect_format
from engine.evaluation.driver import Generation, StopRule, generate_greedy
from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.run.context import StageContext
from engine.run.runner import Runner
from engine.run.runtime import Runtime
from engine_plugins.task_accuracy import (
    AnswerMatch,
    TaskAccuracy,
    generate_answers,
    load_answer_items,
    load_items,
    plan_choices,
    plan_generation,
    render_prompt,
)

PROMPTS = [
    "the cat sits on the",
    "question what color is the sky answer",
    "a small model learns",
    "lum vela dora sen kato lumi vel ados kira nen",
    "the dog",
    "kira",
    "a small corpus of text and the cat",
    "question what is",
]

#: a minimal chat template: BOS, then "<|role|>\ncontent\n" per turn
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


# --- the reference -----------------------------------------------------------------------------


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def reference_generate(model, tokenizer, prompt_ids: list[int], max_new_tokens: int,
                       stop: tuple[str, ...] = (), eos: set[int] | None = None) -> tuple[str, list[int], str]:
    """(text, generated ids, reason), one token per full forward, no batching, no cache."""
    eos = {tokenizer.eos_token_id} if eos is None else eos
    seq, out = list(prompt_ids), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            tok = int(torch.argmax(logits))
            if tok in eos:
                return tokenizer.decode(out, skip_special_tokens=True), out, "eos"
            out.append(tok)
            seq.append(tok)
            text = tokenizer.decode(out, skip_special_tokens=True)
            lead = len(text) - len(text.lstrip())
            found = [text.find(s, lead) for s in stop if text.find(s, lead) >= 0]
            if found:
                return text[:min(found)], out, "stop"
    return tokenizer.decode(out, skip_special_tokens=True), out, "length"


def plain_ids(tokenizer, text: str) -> list[int]:
    return [tokenizer.bos_token_id, *encode(tokenizer, text)]


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_plain(tiny_model)


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, tiny_tokenizer) -> Path:
    return build_short_context_llama(tmp_path_factory.mktemp("short-gen"), tiny_tokenizer)


@pytest.fixture(scope="module")
def chat_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, tiny_model, chat_tokenizer) -> Path:
    """The tiny model's weights with a tokenizer that has a chat template."""
    out = tmp_path_factory.mktemp("chat-llama")
    for f in tiny_model.iterdir():
        shutil.copy(f, out / f.name)
    chat_tokenizer.save_pretrained(str(out))
    return out


def write_items(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def items_of(path: Path, **params):
    p = TaskAccuracy.Params(**params)
    return load_answer_items(DataSource(path, "generation"), p,
                             AnswerMatch(p.ignore_case, p.ignore_punctuation))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_items(tmp_path / "gen.jsonl", [{"prompt": p, "answer": " x"} for p in PROMPTS])


# --- generation equals the reference ------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_batched_generation_equals_reference(model, tiny_tokenizer, prompts_file, batch_size):
    rule = StopRule(12, ())
    items = items_of(prompts_file)
    gens = generate_answers(model, tiny_tokenizer, items, max_length=256, rule=rule,
                            batch_size=batch_size, chat_template=False)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        text, toks, reason = reference_generate(model, tiny_tokenizer,
                                                plain_ids(tiny_tokenizer, prompt), 12)
        assert (gen.text, list(gen.tokens), gen.reason) == (text, toks, reason)
        assert reason == "length" and len(toks) == 12


def test_left_padding_keeps_learned_positions(tiny_tokenizer, tmp_path, prompts_file):
    """GPT-2 adds a learned embedding per absolute position (Llama's RoPE only sees
    relative ones): a left-padded row must count its positions from its first token."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=32, n_layer=2,
                        n_head=4, bos_token_id=tiny_tokenizer.bos_token_id,
                        eos_token_id=tiny_tokenizer.eos_token_id)
    gpt2 = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random init is too flat to show; make positions matter
        gpt2.transformer.wpe.weight.normal_(0, 1.0)
    gens = generate_answers(gpt2, tiny_tokenizer, items_of(prompts_file), max_length=64,
                            rule=StopRule(8, ()), batch_size=8, chat_template=False)
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        ref = reference_generate(gpt2, tiny_tokenizer, plain_ids(tiny_tokenizer, prompt), 8)
        assert (gen.text, list(gen.tokens), gen.reason) == ref


def test_exact_match_through_the_plugin(model, tiny_model, tiny_tokenizer, tmp_path, make_context):
    """Half the answers are the reference's outputs, half are not: exact_match is 0.5."""
    texts = [reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, p), 10)[0]
             for p in PROMPTS]
    assert all(t.strip() for t in texts) and len(set(texts)) == len(texts)
    rows = [{"prompt": p, "answer": t if i % 2 == 0 else "no such output"}
            for i, (p, t) in enumerate(zip(PROMPTS, texts, strict=True))]
    rows[1] = {"prompt": PROMPTS[1], "answers": ["wrong", "  " + texts[1].strip() + " "]}
    f = write_items(tmp_path / "em.jsonl", rows)
    art, context = run_plugin(TaskAccuracy(), make_context, {"tiny": tiny_model},
                              [DataSource(f, "generation", language="xx")], batch_size=3,
                              max_new_tokens=10, stop=[])
    assert art.metrics["tiny"] == {"exact_match/xx": 5 / 8}  # 4 even + item 1 via 'answers'
    assert art.counts["tiny"] == {"exact_match/xx": 8}
    fed = sum(len(plain_ids(tiny_tokenizer, p)) for p in PROMPTS) + 8 * 9
    assert context.stats.tokens == fed  # prompts once, then each new token but the last
    assert context.stats.notes["chat_template"] == {"tiny": False}


def test_stop_strings_cut_like_the_reference(model, tiny_tokenizer, prompts_file):
    full = [reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, p), 16)[0]
            for p in PROMPTS]
    # stop strings taken from the middle of two outputs, so those (at least) stop early
    stop = (full[0].lstrip()[4:6], full[3].lstrip()[6:8])
    assert all(s.strip() for s in stop)
    rule = StopRule(16, stop)
    gens = generate_answers(model, tiny_tokenizer, items_of(prompts_file), max_length=256,
                            rule=rule, batch_size=4, chat_template=False)
    reasons = []
    for prompt, gen, whole in zip(PROMPTS, gens, full, strict=True):
        text, toks, reason = reference_generate(model, tiny_tokenizer,
                                                plain_ids(tiny_tokenizer, prompt), 16, stop)
        assert (gen.text, list(gen.tokens), gen.reason) == (text, toks, reason)
        assert whole.startswith(gen.text)
        assert not any(s in gen.text for s in stop)
        reasons.append(reason)
    assert reasons[0] == reasons[3] == "stop"
    assert len(gens[0].text) == len(full[0]) - len(full[0].lstrip()) + 4


def test_eos_from_the_generation_config_ends_a_row(tiny_model, tiny_tokenizer, prompts_file):
    model = load_plain(tiny_model)
    _, toks, _ = reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, PROMPTS[0]), 8)
    end = toks[3]  # the 4th token item 0 writes becomes an end-of-turn id
    model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, end]
    gens = generate_answers(model, tiny_tokenizer, items_of(prompts_file), max_length=256,
                            rule=StopRule(8, ()), batch_size=8, chat_template=False)
    assert gens[0].reason == "eos" and list(gens[0].tokens) == toks[:3]
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        ref = reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, prompt), 8,
                                 eos={tiny_tokenizer.eos_token_id, end})
        assert (gen.text, list(gen.tokens), gen.reason) == ref


class NoCacheLlama(torch.nn.Module):
    """A model whose forward takes no past_key_values (and has no generation_config)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=False)


def test_models_without_a_kv_cache_generate_the_same(model, tiny_tokenizer, prompts_file):
    rule = StopRule(6, ("e",))
    items = items_of(prompts_file)
    cached = generate_answers(model, tiny_tokenizer, items, max_length=256, rule=rule,
                              batch_size=3, chat_template=False)
    plain = generate_answers(NoCacheLlama(model), tiny_tokenizer, items, max_length=256,
                             rule=rule, batch_size=3, chat_template=False)
    assert cached == plain


def test_stop_rule_and_normalisation():
    rule = StopRule(4, ("\n", "Q:"))
    assert rule.cut("\n\n 42\nQ: next") == ("\n\n 42", True)  # leading whitespace is kept
    assert rule.cut(" 42 Q:\n") == (" 42 ", True)  # the earliest stop string wins
    assert rule.cut(" 42") == (" 42", False)
    assert StopRule(4, ()).cut("a\nb") == ("a\nb", False)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        StopRule(0)
    with pytest.raises(ValueError, match="must not be empty"):
        StopRule(4, ("",))
    exact = AnswerMatch()
    assert exact.matches("  Paris\n", (" Paris",))
    assert not exact.matches("paris", ("Paris",)) and not exact.matches("Paris.", ("Paris",))
    loose = AnswerMatch(ignore_case=True, ignore_punctuation=True)
    assert loose.matches("PARIS!", ("paris",)) and loose.matches("Straße.", ("STRASSE",))
    assert loose.normalize(" «Hello», world… ") == "Hello world".casefold()
    assert not loose.matches("Paris 2", ("Paris",))


# --- chat template --------------------------------------------------------------------------


def test_chat_template_text_and_tokens(tiny_tokenizer, chat_tokenizer, tmp_path):
    f = write_items(tmp_path / "g.jsonl", [{"prompt": "q one", "answer": " a1"},
                                           {"prompt": "q two", "answers": [" a2", "b2"]}])
    items = items_of(f, num_fewshot=1)
    text, templated = render_prompt(chat_tokenizer, items[0], None)
    assert templated
    assert text == "<s><|user|>\nq two\n<|assistant|>\na2\n<|user|>\nq one\n<|assistant|>\n"
    # auto without a template, or disabled: the plain few-shot text
    assert render_prompt(tiny_tokenizer, items[0], None) == ("q two a2\n\nq one", False)
    assert render_prompt(chat_tokenizer, items[0], False) == ("q two a2\n\nq one", False)
    with pytest.raises(EngineError, match="no chat template"):
        render_prompt(tiny_tokenizer, items[0], True)

    rule = StopRule(4)
    bos = chat_tokenizer.bos_token_id
    (chat_ids, _) = plan_generation(chat_tokenizer, items, 256, rule)
    assert list(chat_ids) == encode(chat_tokenizer, text)
    assert chat_ids[0] == bos and chat_ids[1] != bos  # the template's BOS, not a second one
    (plain, _) = plan_generation(tiny_tokenizer, items, 256, rule)
    assert list(plain) == plain_ids(tiny_tokenizer, "q two a2\n\nq one")


def test_chat_template_for_choices_adds_no_second_bos(tiny_tokenizer, chat_tokenizer, tmp_path):
    f = write_items(tmp_path / "c.jsonl", [{"prompt": "the cat sits on the",
                                            "choices": [" mat", " sky"], "label": 0}])
    items = load_items(DataSource(f, "choice"), TaskAccuracy.Params())
    spans, _ = plan_choices(chat_tokenizer, items, 256, chat_template=None)
    rendered = "<s><|user|>\nthe cat sits on the\n<|assistant|>\n"
    for span in spans:  # the template's trailing newline moves onto the choice
        assert list(span.context) == encode(chat_tokenizer, rendered.rstrip())
        assert span.context[0] == chat_tokenizer.bos_token_id != span.context[1]
    plain, _ = plan_choices(chat_tokenizer, items, 256, chat_template=False)
    assert plain == plan_choices(tiny_tokenizer, items, 256)[0]
    assert list(plain[0].context) == plain_ids(tiny_tokenizer, "the cat sits on the")


def test_chat_template_applied_when_the_model_has_one(model, tiny_model, chat_model,
                                                      tiny_tokenizer, tmp_path, make_context):
    """Same weights, two tokenizers: the chat model's outputs are those of the templated
    prompt (the answers), the plain model's those of the plain prompt."""
    def templated(p: str) -> list[int]:
        return encode(tiny_tokenizer, f"<s><|user|>\n{p}\n<|assistant|>\n")

    chat_out = [reference_generate(model, tiny_tokenizer, templated(p), 6)[0] for p in PROMPTS]
    plain_out = [reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, p), 6)[0]
                 for p in PROMPTS]
    assert chat_out != plain_out
    f = write_items(tmp_path / "chat.jsonl",
                    [{"prompt": p, "answer": t} for p, t in zip(PROMPTS, chat_out, strict=True)])
    source = [DataSource(f, "generation", language="xx")]
    models = {"plain": tiny_model, "chat": chat_model}
    art, context = run_plugin(TaskAccuracy(), make_context, models, source, batch_size=4,
                              max_new_tokens=6, stop=[])
    assert art.metrics["chat"]["exact_match/xx"] == 1.0
    expected = sum(a.strip() == b.strip() for a, b in zip(chat_out, plain_out, strict=True)) / 8
    assert art.metrics["plain"]["exact_match/xx"] == expected < 1.0
    assert context.stats.notes["chat_template"] == {"plain": False, "chat": True}
    off, context = run_plugin(TaskAccuracy(), make_context, models, source, batch_size=4,
                              max_new_tokens=6, stop=[], chat_template=False)
    assert off.metrics["chat"] == off.metrics["plain"] == art.metrics["plain"]
    assert context.stats.notes["chat_template"] == {"plain": False, "chat": False}
    forced, _ = run_plugin(TaskAccuracy(), make_context, models, source, max_new_tokens=6,
                           stop=[], chat_template=True)
    assert set(forced.metrics) == {"chat"} and "no chat template" in forced.errors["plain"]


# --- few-shot -------------------------------------------------------------------------------


def test_fewshot_generation(model, tiny_model, tiny_tokenizer, tmp_path, make_context):
    rows = [{"prompt": p, "answer": f" a{i}"} for i, p in enumerate(PROMPTS)]
    rows[2] = {"prompt": PROMPTS[2], "answers": [" first", " second"]}
    f = write_items(tmp_path / "fs.jsonl", rows)
    items = items_of(f, num_fewshot=2, fewshot_seed=5)
    assert items == items_of(f, num_fewshot=2, fewshot_seed=5)  # deterministic
    solved = [r["prompt"] + (r.get("answer") or r["answers"][0]) for r in rows]
    for i, item in enumerate(items):
        parts = item.context.split("\n\n")
        assert len(parts) == 3 and parts[-1] == PROMPTS[i]
        assert solved[i] not in parts[:2] and all(s in solved for s in parts[:2])
        assert [p + a for p, a in item.shots] == parts[:2]
    assert any(" first" in i.context for i in items) and not any(" second" in i.context for i in items)
    assert [i.context for i in items_of(f, num_fewshot=2, fewshot_seed=6)] != [i.context for i in items]

    gens = generate_answers(model, tiny_tokenizer, items, max_length=256, rule=StopRule(5, ()),
                            batch_size=3, chat_template=False)
    refs = [reference_generate(model, tiny_tokenizer, plain_ids(tiny_tokenizer, i.context), 5)[0]
            for i in items]
    assert [g.text for g in gens] == refs
    hits = [i for i, r in enumerate(refs) if r.strip() in items[i].answers]
    art, _ = run_plugin(TaskAccuracy(), make_context, {"m": tiny_model},
                        [DataSource(f, "generation", language="xx")], num_fewshot=2,
                        fewshot_seed=5, max_new_tokens=5, stop=[])
    assert art.metrics["m"]["exact_match/xx"] == len(hits) / 8
    with pytest.raises(DataError, match="num_fewshot=8 needs at least 9 items"):
        items_of(f, num_fewshot=8)


# --- stages: mixing, failures, bad input ---------------------------------------------------


def test_choice_and_generation_in_one_stage(tiny_model, tmp_path, prompts_file, choice_file):
    loads = []
    progress = Progress(disable=True)
    context = StageContext(run_name="t", stage_name="scores", stage_kind="evaluate",
                           plugin="task-accuracy", workdir=tmp_path, output_dir=tmp_path / "out",
                           runtime=Runtime(device="cpu"), progress=progress)
    load = context.load_model
    context.load_model = lambda artifact, **kw: loads.append(artifact.name) or load(artifact, **kw)
    data = [DataSource(choice_file, "choice", language="en"),
            DataSource(prompts_file, "generation", language="en"),
            DataSource(prompts_file, "text")]  # ignored
    inputs = StageInputs(models=[ModelArtifact("a", tiny_model), ModelArtifact("b", tiny_model)],
                         data=data)
    art = TaskAccuracy().run(context, inputs, TaskAccuracy.Params(batch_size=3, max_new_tokens=4))
    assert loads == ["a", "b"]  # each model loaded once for both kinds
    assert set(art.metrics["a"]) == {"acc/en", "acc_norm/en", "exact_match/en"}
    assert art.counts["a"] == {"acc/en": 2, "acc_norm/en": 2, "exact_match/en": len(PROMPTS)}
    assert art.metrics["a"] == art.metrics["b"]
    (task,) = progress.tasks
    assert task.total == task.completed


def test_generation_failed_model_reported_others_scored(tiny_model, tmp_path, prompts_file,
                                                        make_context):
    models = {"good": tiny_model, "missing": tmp_path / "nope"}
    art, _ = run_plugin(TaskAccuracy(), make_context, models,
                        [DataSource(prompts_file, "generation")], max_new_tokens=3)
    assert set(art.metrics) == {"good"} and "nope" in art.errors["missing"]
    assert art.to_json()["_errors"] == art.errors


def test_long_prompt_keeps_its_end(short_model, tiny_tokenizer, tmp_path, make_context):
    """A 16-position model: the prompt keeps its last 16 - max_new_tokens tokens."""
    prompt = " ".join(PROMPTS)
    assert len(plain_ids(tiny_tokenizer, prompt)) > 30
    f = write_items(tmp_path / "long.jsonl", [{"prompt": prompt, "answer": "x"}])
    (ids,) = plan_generation(tiny_tokenizer, items_of(f), 16, StopRule(4))
    assert list(ids) == plain_ids(tiny_tokenizer, prompt)[-12:]
    art, _ = run_plugin(TaskAccuracy(), make_context, {"s": short_model},
                        [DataSource(f, "generation")], max_new_tokens=4, stop=[])
    assert art.counts["s"]["exact_match/long"] == 1
    short = load_plain(short_model)
    text = reference_generate(short, tiny_tokenizer, list(ids), 4)[0]
    assert art.metrics["s"]["exact_match/long"] == float(text.strip() == "x")


def test_max_new_tokens_filling_the_window_fails_that_model(short_model, tiny_model,
                                                            prompts_file, make_context):
    source = [DataSource(prompts_file, "generation")]
    art, _ = run_plugin(TaskAccuracy(), make_context, {"short": short_model, "big": tiny_model},
                        source, max_new_tokens=16)
    assert set(art.metrics) == {"big"}
    assert "max_new_tokens=16 leaves no room for a prompt in a window of 16" in art.errors["short"]
    with pytest.raises(ModelLoadError, match="max_new_tokens=16 leaves no room"):
        run_plugin(TaskAccuracy(), make_context, {"short": short_model}, source,
                   max_new_tokens=16)


@pytest.mark.parametrize(("record", "message"), [
    ({"prompt": "p"}, "'answer' missing"),
    ({"prompt": "p", "answer": ""}, "'answer' holds '', which is empty after normalisation"),
    ({"prompt": "p", "answer": " \n"}, "'answer' holds ' \\\\n', which is empty"),
    ({"prompt": "p", "answer": 3}, "'answer' must be a string"),
    ({"prompt": "p", "answers": []}, "'answers' must be a non-empty list of strings"),
    ({"prompt": "p", "answers": ["a", ""]}, "'answers' holds '', which is empty"),
    ({"prompt": "p", "answer": "a", "answers": ["a"]}, "give 'answer' or 'answers', not both"),
    ({"answer": "a"}, "'prompt' missing or not a string"),
])
def test_bad_generation_items_name_file_and_line(tiny_model, tmp_path, make_context, record,
                                                 message):
    f = write_items(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a"}, record])
    with pytest.raises(DataError, match=rf"bad\.jsonl:2: {message}"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(f, "generation")])


def test_answer_empty_after_ignoring_punctuation(tmp_path):
    f = write_items(tmp_path / "p.jsonl", [{"prompt": "q", "answer": "?!"}])
    assert items_of(f)[0].answers == ("?!",)
    with pytest.raises(DataError, match=r"p\.jsonl:1: 'answer' holds '\?!', which is empty"):
        items_of(f, ignore_punctuation=True)


def test_empty_generation_file_and_format_mismatch(tiny_model, tmp_path, text_file, make_context):
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no generation items"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(f, "generation")])
    with pytest.raises(DataError, match="'scores'.*no data source of format 'choice' or "
                                        "'generation'; got text.txt"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model}, [DataSource(text_file, "text")])


def test_generation_params_are_checked():
    with pytest.raises(ValidationError, match="max_new_tokens"):
        TaskAccuracy.Params(max_new_tokens=0)
    with pytest.raises(ValidationError, match="empty stop string"):
        TaskAccuracy.Params(stop=["\n", ""])
    params = TaskAccuracy.Params()
    assert (params.max_new_tokens, params.stop, params.chat_template) == (32, ["\n"], None)


def test_labels_may_repeat_across_formats_not_within(tiny_model, tmp_path, prompts_file,
                                                     choice_file, make_context):
    twice = write_items(tmp_path / "other.jsonl", [{"prompt": "q", "answer": "a"}])
    with pytest.raises(DataError, match="share the label 'en'"):
        run_plugin(TaskAccuracy(), make_context, {"m": tiny_model},
                   [DataSource(prompts_file, "generation", language="en"),
                    DataSource(twice, "generation", language="en")])


def test_generation_format_is_detected(tmp_path):
    one = write_items(tmp_path / "one.jsonl", [{"prompt": "q", "answer": "a"}])
    many = write_items(tmp_path / "many.jsonl", [{"prompt": "q", "answers": ["a", "b"]}])
    assert detect_format(one) == detect_format(many) == "generation"
    sft = write_items(tmp_path / "sft.jsonl", [{"prompt": "q", "response": "a"}])
    assert detect_format(sft) == "instructions"


def test_generate_greedy_rejects_an_empty_prompt(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="a prompt is empty"):
        generate_greedy(model, tiny_tokenizer, [[1, 2], []], StopRule(2), batch_size=2, device="cpu")
    assert generate_greedy(model, tiny_tokenizer, [], StopRule(2), batch_size=2, device="cpu") == []
    (gen,) = generate_greedy(model, tiny_tokenizer, [[1]], StopRule(1, ()), batch_size=1, device="cpu")
    assert isinstance(gen, Generation) and len(gen.tokens) == 1 and gen.reason == "length"


# --- a recipe ---------------------------------------------------------------------------------


def test_recipe_run_writes_exact_match(tiny_model, tmp_path, choice_file):
    data = write_items(tmp_path / "qa.jsonl", [{"prompt": p, "answers": [" x", "y"]}
                                               for p in PROMPTS[:4]])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: gen
        models:
          base: {{path: {tiny_model}}}
        stages:
          - name: task
            stage: evaluate
            plugin: task-accuracy
            models: [base]
            data:
              - {{path: {data}, language: mn}}
              - {{path: {choice_file}, language: mn}}
            params: {{max_new_tokens: 4, stop: ["\\n", "."], ignore_case: true}}
        """))
    plan = plan_recipe(load_recipe(recipe, []), recipe.parent, str(recipe))
    assert [d.format for d in plan.stages[0].data] == ["generation", "choice"]
    work = tmp_path / "work"
    report = Runner(plan, work).run()
    metrics = json.loads((work / "task" / "metrics.json").read_text())
    assert set(metrics["base"]) == {"exact_match/mn", "acc/mn", "acc_norm/mn"}
    assert 0.0 <= metrics["base"]["exact_match/mn"] <= 1.0
    assert metrics["_counts"]["base"] == {"exact_match/mn": 4, "acc/mn": 2, "acc_norm/mn": 2}
    assert report["stages"][0]["metrics"]["base"] == metrics["base"]
