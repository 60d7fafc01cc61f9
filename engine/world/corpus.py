"""The facts of the tiny world, the text that states them and the task that asks them.

Sixty-four animals each have a colour, a home, a food, a size and a number of
friends. Every language's raw text states these same facts, and some of its
documents ask about them and answer in a full sentence ("What color is the fox? The
fox is red."), as ordinary text does; that is where the base model learns the facts
and the task's skill, answering a question about them. The *task* asks the same
questions in an instruction format that no raw text uses, a chat turn (the
tokenizer's chat template, ``<|user|>`` ... ``<|assistant|>``) answered with the single
value word. English instructions cover three of each animal's five attributes; the
test asks the other two (the held-out pairs), so a model answers a test question only
from what pretraining (or continual pretraining) taught it, in the format instruction
tuning taught it.

``lum`` is the low-resource target: the base model saw little ``lum``, so it knows
the facts badly in ``lum``; continual pretraining on ``lum/train.txt`` (which states
every fact) repairs that, the English instructions teach the format, and merging the
two brings both halves together. docs/world.md says why the task asks about facts
learnt in pretraining rather than facts given in the prompt.

Every random choice comes from a :class:`random.Random` seeded with a fixed string,
and iteration is over tuples, so the files are byte-identical on every machine.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from engine.world.lexicon import ANIMALS, ATTRIBUTE_ORDER, ATTRIBUTES, GRAMMARS, Realiser

SOURCE_LANGUAGE = "en"
TARGET_LANGUAGE = "lum"

#: documents (lines) per language in train.txt; lum is the low-resource language
TRAIN_LINES: dict[str, int] = {"en": 3000, "vel": 3000, "dor": 3000, "lum": 800}
TEST_LINES = 200
#: the base model's pretraining text per language, drawn apart from train.txt; lum is rare
PRETRAIN_LINES: dict[str, int] = {"en": 5000, "vel": 5000, "dor": 5000, "lum": 200}
#: share of documents that ask about facts and answer them in a full sentence
QUESTION_SHARE = 0.3
#: mix/align.txt: lum and en lines, 9:1 as in the ELO paper's target:source mixture
ALIGN_LINES = {"lum": 270, "en": 30}
#: English phrasings of each question; the first is the one the test uses
EN_TASK_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the {E}", "which color does the {E} have",
              "what is the color of the {E}", "tell me the color of the {E}",
              "the {E} has which color"),
    "place": ("where does the {E} live", "in which place does the {E} live",
              "where can you find the {E}", "what is the home of the {E}",
              "tell me where the {E} lives"),
    "food": ("what does the {E} eat", "which food does the {E} eat",
             "what is the food of the {E}", "tell me what the {E} eats",
             "what food does the {E} like"),
    "size": ("how big is the {E}", "what size is the {E}", "what is the size of the {E}",
             "tell me the size of the {E}", "how large is the {E}"),
    "count": ("how many friends does the {E} have", "what number of friends does the {E} have",
              "how many friends has the {E}", "tell me how many friends the {E} has",
              "the {E} has how many friends"),
}


@dataclass(frozen=True)
class Question:
    """One held-out (animal, attribute) pair and its four choices: the true value and
    three other values of the attribute, in a seeded order."""

    animal: str
    attr: str
    choices: tuple[str, ...]
    label: int


def _choices(rng: random.Random, facts: dict[str, dict[str, str]], animal: str, attr: str) -> Question:
    truth = facts[animal][attr]
    choices = [truth, *rng.sample([v for v in ATTRIBUTES[attr] if v != truth], 3)]
    rng.shuffle(choices)
    return Question(animal, attr, tuple(choices), choices.index(truth))


def world_facts() -> dict[str, dict[str, str]]:
    """animal -> attribute -> value. Each value is used equally often (8 animals per
    colour, 16 per size, ...), so always answering the commonest value is chance."""
    rng = random.Random("lingoforge-world-facts")
    facts: dict[str, dict[str, str]] = {a: {} for a in ANIMALS}
    for attr in ATTRIBUTE_ORDER:
        values = list(ATTRIBUTES[attr]) * (len(ANIMALS) // len(ATTRIBUTES[attr]))
        rng.shuffle(values)
        for animal, value in zip(ANIMALS, values):
            facts[animal][attr] = value
    return facts


def held_out_questions() -> list[Question]:
    """Two held-out attributes per animal (128 items), balanced over attributes; four
    choices each."""
    rng = random.Random("lingoforge-world-questions")
    facts = world_facts()
    animals = list(ANIMALS)
    rng.shuffle(animals)
    pairs = ((0, 1), (2, 3), (4, 0), (1, 2), (3, 4))
    return [_choices(rng, facts, animal, ATTRIBUTE_ORDER[j])
            for i, animal in enumerate(animals) for j in pairs[i % len(pairs)]]


def dev_questions() -> list[Question]:
    """Dev questions (128 items) for tuning on, e.g. a merge search: two of each animal's
    three *trained* attributes (the facts task-train.jsonl covers), so they never ask a
    test question; four choices each, drawn apart from the test questions' draw."""
    rng = random.Random("lingoforge-world-dev-questions")
    facts = world_facts()
    held_out = {(q.animal, q.attr) for q in held_out_questions()}
    out = []
    for animal in ANIMALS:
        trained = [a for a in ATTRIBUTE_ORDER if (animal, a) not in held_out]
        for attr in rng.sample(trained, 2):
            out.append(_choices(rng, facts, animal, attr))
    rng.shuffle(out)
    return out


def fact_sentence(lang: str, animal: str, attr: str) -> str:
    """The plain sentence stating one fact; every train.txt contains each one verbatim."""
    r = Realiser(lang)
    return r.statement(attr, world_facts()[animal][attr], r.noun_phrase(animal))


# --- raw text ---------------------------------------------------------------------------


def _fact(rng: random.Random, r: Realiser, facts: dict[str, dict[str, str]], animal: str,
          attr: str, pronoun: bool) -> str:
    """One fact sentence; the subject sometimes carries another true attribute as an
    adjective ("The red fox lives in the forest.")."""
    adjective = None
    if not pronoun and rng.random() < 0.3:
        choices = [a for a in ("color", "size") if a != attr]
        adjective = facts[animal][rng.choice(choices)]
    subject = r.noun_phrase(None if pronoun else animal, adjective)
    return r.statement(attr, facts[animal][attr], subject)


def question_document(rng: random.Random, r: Realiser, facts: dict[str, dict[str, str]]) -> str:
    """One to three questions about the world's facts, each answered in a full sentence:
    the ordinary text in which the base model sees questions answered."""
    sentences: list[str] = []
    for animal in rng.sample(ANIMALS, rng.randint(1, 3)):
        attr = rng.choice(ATTRIBUTE_ORDER)
        sentences.append(r.question(attr, animal))
        sentences.append(r.word(facts[animal][attr]) + ".")  # a short answer, as in dialogue
    return " ".join(sentences)


def _document(rng: random.Random, r: Realiser, facts: dict[str, dict[str, str]]) -> str:
    """A short paragraph: questions answered, a profile of one animal, a few scenes, or
    mixed facts."""
    if rng.random() < QUESTION_SHARE:
        return question_document(rng, r, facts)
    kind = rng.choices(("profile", "scene", "mixed"), weights=(5, 2, 3))[0]
    sentences: list[str] = []
    if kind == "profile":
        animal = rng.choice(ANIMALS)
        attrs = rng.sample(ATTRIBUTE_ORDER, rng.randint(2, 5))
        for i, attr in enumerate(attrs):
            sentences.append(_fact(rng, r, facts, animal, attr, pronoun=i > 0 and rng.random() < 0.5))
    elif kind == "scene":
        for animal in rng.sample(ANIMALS, rng.randint(1, 3)):
            f = facts[animal]
            sentences.append(r.scene(r.noun_phrase(animal), f["place"], f["food"]))
            if rng.random() < 0.5:
                sentences.append(_fact(rng, r, facts, animal, rng.choice(("color", "size", "count")),
                                       pronoun=True))
    else:
        for _ in range(rng.randint(2, 4)):
            sentences.append(_fact(rng, r, facts, rng.choice(ANIMALS), rng.choice(ATTRIBUTE_ORDER),
                                   pronoun=False))
    return " ".join(sentences)


def _fact_list(rng: random.Random, r: Realiser, facts: dict[str, dict[str, str]],
               animal: str) -> str:
    """All five facts of one animal in plain sentences (guarantees coverage)."""
    attrs = list(ATTRIBUTE_ORDER)
    rng.shuffle(attrs)
    return " ".join(r.statement(a, facts[animal][a], r.noun_phrase(animal)) for a in attrs)


def train_lines(lang: str) -> list[str]:
    """train.txt: one fact list per animal (so every fact is stated), then random
    paragraphs, shuffled together."""
    rng = random.Random(f"lingoforge-world-{lang}-train")
    r, facts = Realiser(lang), world_facts()
    lines = [_fact_list(rng, r, facts, a) for a in ANIMALS]
    while len(lines) < TRAIN_LINES[lang]:
        lines.append(_document(rng, r, facts))
    rng.shuffle(lines)
    return lines


def _fresh_lines(lang: str, split: str, n: int, exclude: set[str]) -> list[str]:
    rng = random.Random(f"lingoforge-world-{lang}-{split}")
    r, facts = Realiser(lang), world_facts()
    seen = set(exclude)
    lines: list[str] = []
    while len(lines) < n:
        doc = _document(rng, r, facts)
        if doc not in seen:
            seen.add(doc)
            lines.append(doc)
    return lines


def eval_lines(lang: str, train: list[str] | None = None) -> list[str]:
    """test.txt: paragraphs that do not occur in train.txt."""
    return _fresh_lines(lang, "test", TEST_LINES, set(train if train is not None else train_lines(lang)))


def pretrain_lines() -> dict[str, list[str]]:
    """The base model's pretraining text: documents of every language drawn apart from
    the train splits, lum rare (the base barely knows lum)."""
    return {lang: _fresh_lines(lang, "pretrain", PRETRAIN_LINES[lang], set()) for lang in GRAMMARS}


# --- task ---------------------------------------------------------------------------------


def task_train_records(lang: str = SOURCE_LANGUAGE) -> list[dict[str, str]]:
    """Instructions in ``lang`` for every non-held-out (animal, attribute) pair: the
    question (in English, each of its five phrasings; in the other languages, the one
    question form their grammar has) and the value word as the response."""
    rng = random.Random(f"lingoforge-world-task-train-{lang}")
    held_out = {(q.animal, q.attr) for q in held_out_questions()}
    facts, r = world_facts(), Realiser(lang)
    records = []
    for animal in ANIMALS:
        for attr in ATTRIBUTE_ORDER:
            if (animal, attr) in held_out:
                continue
            answer = " " + r.word(facts[animal][attr]) + "."  # as raw text answers
            if lang == SOURCE_LANGUAGE:
                for template in EN_TASK_TEMPLATES[attr]:
                    text = template.replace("{E}", animal)
                    question = text[:1].upper() + text[1:] + ("." if text.startswith("tell") else "?")
                    records.append({"prompt": question, "response": answer})
            else:
                records.append({"prompt": r.question(attr, animal), "response": answer})
    rng.shuffle(records)
    return records


def task_test_records(lang: str) -> list[dict[str, object]]:
    """The held-out questions in ``lang``, multiple choice; choices begin with a space
    (in text a word follows a space)."""
    r = Realiser(lang)
    return [{"prompt": r.question(q.attr, q.animal),
             "choices": [" " + r.word(c) for c in q.choices], "label": q.label}
            for q in held_out_questions()]


def task_dev_records(lang: str) -> list[dict[str, object]]:
    """The dev questions (:func:`dev_questions`) in ``lang``, multiple choice."""
    r = Realiser(lang)
    return [{"prompt": r.question(q.attr, q.animal),
             "choices": [" " + r.word(c) for c in q.choices], "label": q.label}
            for q in dev_questions()]


def task_generation_records(lang: str) -> list[dict[str, object]]:
    """The same held-out questions for greedy generation scored by exact match."""
    r = Realiser(lang)
    return [{"prompt": r.question(q.attr, q.animal), "answer": r.word(q.choices[q.label])}
            for q in held_out_questions()]


# --- files --------------------------------------------------------------------------------


#: languages with task training data: all four (the per-language merging experiment
#: trains one task model per language; the low-resource recipes use English only)
TASK_LANGUAGES = tuple(GRAMMARS)


def data_files() -> dict[str, str]:
    """data name -> file content, for every built-in data file."""
    files: dict[str, str] = {}
    train = {lang: train_lines(lang) for lang in GRAMMARS}
    for lang in GRAMMARS:
        files[f"{lang}/train.txt"] = _text(train[lang])
        files[f"{lang}/test.txt"] = _text(eval_lines(lang, train[lang]))
        files[f"{lang}/task-test.jsonl"] = _jsonl(task_test_records(lang))
        files[f"{lang}/task-test-gen.jsonl"] = _jsonl(task_generation_records(lang))
        files[f"{lang}/task-dev.jsonl"] = _jsonl(task_dev_records(lang))
    for lang in TASK_LANGUAGES:
        files[f"{lang}/task-train.jsonl"] = _jsonl(task_train_records(lang))
    rng = random.Random("lingoforge-world-align")
    mix = [line for lang, n in ALIGN_LINES.items() for line in rng.sample(train[lang], n)]
    rng.shuffle(mix)
    files["mix/align.txt"] = _text(mix)
    return dict(sorted(files.items()))


def data_names() -> tuple[str, ...]:
    """Every valid built-in data name, without generating anything."""
    names = [f"{lang}/{split}" for lang in GRAMMARS
             for split in ("train.txt", "test.txt", "task-test.jsonl", "task-test-gen.jsonl",
                           "task-dev.jsonl")]
    names += [f"{lang}/{split}" for lang in TASK_LANGUAGES
              for split in ("task-train.jsonl",)]
    names += ["mix/align.txt"]
    return tuple(sorted(names))


def write_data(folder: Path) -> None:
    """Write every data file under ``folder`` (``folder/<lang>/<file>``)."""
    for name, content in data_files().items():
        path = Path(folder) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode("utf-8"))


def _text(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n" for r in records)
