"""The facts of the tiny world, the text that states them and the task that asks them.

Sixty-four animals each have a colour, a home, a food, a size and a number of
friends. Every language's raw text states these same facts (so a model adapted to
``lum`` can learn them from ``lum`` text alone); the task asks one question per
held-out (animal, attribute) pair after a short context that states that attribute
for three animals with values drawn at random (counterfactual on purpose, so that no
memorised fact helps): the task is reading, and answering in ``lum`` needs the
language (from continual pretraining on ``lum``) and the question-answer format
(from the English instructions, which cover only the other pairs): the two halves
the CT + SFT merge brings together.

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
#: lum lines the base model sees in pretraining (about 4% of its text), disjoint seed
LUM_PRETRAIN_LINES = 360
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
    """One held-out multiple-choice item, before it is rendered in a language.

    The prompt first states ``attr`` for each animal of ``context`` with the values in
    ``values`` (same order), then asks about ``animal``. The values are drawn at random,
    not the world's facts, and differ between the context animals: a model can only
    answer by reading the context and binding the asked animal to its value, never
    from memorised facts, and "the value that appears in the text" is not enough
    because the other animals' values are wrong choices too.
    """

    animal: str
    attr: str
    context: tuple[str, ...]
    values: tuple[str, ...]
    choices: tuple[str, ...]
    label: int


#: animals whose (counterfactual) facts a task prompt states: the asked one and distractors
CONTEXT_ANIMALS = 3


def _context_item(rng: random.Random, animal: str, attr: str) -> Question:
    """A random context around ``animal`` and four choices: the context animals'
    values (truth first, before shuffling) and one value not in the context."""
    others = rng.sample([a for a in ANIMALS if a != animal], CONTEXT_ANIMALS - 1)
    context = [animal, *others]
    rng.shuffle(context)
    drawn = rng.sample(ATTRIBUTES[attr], CONTEXT_ANIMALS + 1)
    values = dict(zip(context, drawn[:CONTEXT_ANIMALS], strict=True))
    choices = [*drawn]
    rng.shuffle(choices)
    return Question(animal, attr, tuple(context), tuple(values[a] for a in context),
                    tuple(choices), choices.index(values[animal]))


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
    choices each, asked after a short context that states the facts."""
    rng = random.Random("lingoforge-world-questions")
    animals = list(ANIMALS)
    rng.shuffle(animals)
    pairs = ((0, 1), (2, 3), (4, 0), (1, 2), (3, 4))
    out: list[Question] = []
    for i, animal in enumerate(animals):
        for j in pairs[i % len(pairs)]:
            attr = ATTRIBUTE_ORDER[j]
            out.append(_context_item(rng, animal, attr))
    return out


def context_text(r: Realiser, q: Question) -> str:
    """The sentences a task prompt starts with: each context animal's ``attr`` value."""
    return " ".join(r.statement(q.attr, v, r.noun_phrase(a)) for a, v in zip(q.context, q.values, strict=True))


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


def _document(rng: random.Random, r: Realiser, facts: dict[str, dict[str, str]]) -> str:
    """A short paragraph: a profile of one animal, a few scenes, or mixed facts."""
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
    """The base model's pretraining text: the train splits of en, vel and dor, and a
    small lum sample drawn apart from lum/train.txt (the base barely knows lum)."""
    out = {lang: train_lines(lang) for lang in GRAMMARS if lang != TARGET_LANGUAGE}
    out[TARGET_LANGUAGE] = _fresh_lines(TARGET_LANGUAGE, "pretrain", LUM_PRETRAIN_LINES, set())
    return out


# --- task ---------------------------------------------------------------------------------


def task_train_records() -> list[dict[str, str]]:
    """English instructions: every non-held-out (animal, attribute) pair in five
    phrasings, each after its own random context."""
    rng = random.Random("lingoforge-world-task-train")
    held_out = {(q.animal, q.attr) for q in held_out_questions()}
    r = Realiser(SOURCE_LANGUAGE)
    records = []
    for animal in ANIMALS:
        for attr in ATTRIBUTE_ORDER:
            if (animal, attr) in held_out:
                continue
            for template in EN_TASK_TEMPLATES[attr]:
                text = template.replace("{E}", animal)
                question = text[:1].upper() + text[1:] + ("." if text.startswith("tell") else "?")
                item = _context_item(rng, animal, attr)
                records.append({"prompt": context_text(r, item) + " " + r.qa_prompt(question),
                                "response": " " + item.choices[item.label]})
    rng.shuffle(records)
    return records


def task_test_records(lang: str) -> list[dict[str, object]]:
    """The held-out questions rendered in ``lang`` after their context; choices begin
    with a space because the answer follows ``Answer:`` after one."""
    r = Realiser(lang)
    return [{"prompt": context_text(r, q) + " " + r.qa_prompt(r.question(q.attr, q.animal)),
             "choices": [" " + r.word(c) for c in q.choices], "label": q.label}
            for q in held_out_questions()]


# --- files --------------------------------------------------------------------------------


def data_files() -> dict[str, str]:
    """data name -> file content, for every built-in data file."""
    files: dict[str, str] = {}
    train = {lang: train_lines(lang) for lang in GRAMMARS}
    for lang in GRAMMARS:
        files[f"{lang}/train.txt"] = _text(train[lang])
        files[f"{lang}/test.txt"] = _text(eval_lines(lang, train[lang]))
    rng = random.Random("lingoforge-world-align")
    mix = [line for lang, n in ALIGN_LINES.items() for line in rng.sample(train[lang], n)]
    rng.shuffle(mix)
    files["mix/align.txt"] = _text(mix)
    files[f"{SOURCE_LANGUAGE}/task-train.jsonl"] = _jsonl(task_train_records())
    for lang in GRAMMARS:
        files[f"{lang}/task-test.jsonl"] = _jsonl(task_test_records(lang))
    return dict(sorted(files.items()))


def data_names() -> tuple[str, ...]:
    """Every valid built-in data name, without generating anything."""
    names = [f"{lang}/{split}.txt" for lang in GRAMMARS for split in ("train", "test")]
    names += ["mix/align.txt", f"{SOURCE_LANGUAGE}/task-train.jsonl"]
    names += [f"{lang}/task-test.jsonl" for lang in GRAMMARS]
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
