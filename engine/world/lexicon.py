"""The four languages of the tiny world: their words and their grammar.

``en`` is real English. ``vel``, ``dor`` and ``lum`` are invented: each has its own
sound inventory (so its words look different), its own word order and its own
suffixes, so a model has to learn them as separate languages that happen to talk
about the same facts. Words are drawn from a seeded :class:`random.Random` over a
fixed list of glosses, so a lexicon depends on nothing but the code.

A grammar writes sentences as templates of space-separated tokens:

* ``{S}`` the subject noun phrase (itself built from ``np`` / ``np_adj`` or the
  pronoun), ``{V}`` the value being stated, ``{P}`` a place, ``{F}`` a food;
* any other token is a gloss looked up in the language's lexicon;
* ``token+SUF`` appends the language's suffix ``SUF`` to the realised token.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# --- the concepts the world talks about ------------------------------------------------

ANIMALS: tuple[str, ...] = (
    "fox", "bear", "cat", "dog", "owl", "frog", "horse", "goat", "wolf", "newt", "mouse",
    "duck", "crow", "deer", "lion", "tiger", "snake", "rabbit", "sheep", "cow", "pig", "hen",
    "eagle", "otter", "seal", "whale", "crab", "ant", "bee", "moth", "bat", "mole", "toad",
    "swan", "goose", "hawk", "lynx", "yak", "camel", "zebra", "llama", "panda", "koala",
    "badger", "beaver", "ferret", "hare", "lamb", "mule", "ox", "pony", "raven", "robin",
    "shark", "squid", "snail", "spider", "turtle", "weasel", "wren", "gecko", "heron",
    "bison", "moose",
)

#: attribute -> the values an animal can have (the choices of a question)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "color": ("red", "blue", "green", "white", "black", "yellow", "brown", "gray"),
    "place": ("forest", "river", "city", "meadow", "farm", "lake", "cave", "garden"),
    "food": ("corn", "grass", "seeds", "berries", "bread", "apples", "nuts", "leaves"),
    "size": ("tiny", "small", "big", "huge"),
    "count": ("two", "three", "four", "five", "six", "seven", "eight", "nine"),
}
ATTRIBUTE_ORDER: tuple[str, ...] = ("color", "place", "food", "size", "count")

#: grammatical words the templates use (English glosses)
FUNCTION_GLOSSES: tuple[str, ...] = (
    "it", "is", "lives", "in", "eats", "has", "friends", "what", "color", "where", "size",
    "how-many", "QP", "question", "answer",
)

#: attribute values: shared by every language (loanwords), so an answer is the same word in
#: each; the questions, the animals and the grammar differ
SHARED_GLOSSES: tuple[str, ...] = tuple(v for attr in ("color", "place", "food", "size", "count")
                                        for v in ATTRIBUTES[attr])

CONTENT_GLOSSES: tuple[str, ...] = ANIMALS + tuple(
    v for attr in ATTRIBUTE_ORDER for v in ATTRIBUTES[attr]
)


@dataclass(frozen=True)
class Grammar:
    """How one language sounds and orders its words."""

    code: str
    description: str
    seed: int
    onsets: tuple[str, ...] = ()
    vowels: tuple[str, ...] = ()
    codas: tuple[str, ...] = ()
    suffixes: dict[str, str] = field(default_factory=dict)
    np: str = "{E}"
    np_adj: str = "{E} {A}"
    statements: dict[str, str] = field(default_factory=dict)
    scene: str = ""
    questions: dict[str, str] = field(default_factory=dict)


GRAMMARS: dict[str, Grammar] = {
    "en": Grammar(
        code="en",
        description="English (source language): real English words, subject-verb-object, "
                    "adjective before the noun; its instructions teach the task format.",
        seed=0,
        np="the {E}", np_adj="the {A} {E}",
        statements={"color": "{S} is {V}", "place": "{S} lives in the {V}",
                    "food": "{S} eats {V}", "size": "{S} is {V}",
                    "count": "{S} has {V} friends"},
        scene="in the {P} {S} eats {F}",
        questions={"color": "what color is {S}", "place": "where does {S} live",
                   "food": "what does {S} eat", "size": "how big is {S}",
                   "count": "how many friends does {S} have"},
    ),
    "vel": Grammar(
        code="vel",
        description="Vel (invented): light CV syllables, subject-verb-object, no articles, "
                    "adjective after the noun, number after the counted noun.",
        seed=101,
        onsets=("v", "l", "s", "t", "r", "n", "m", "k", "th"),
        vowels=("a", "e", "i", "o"),
        codas=("", "", "", "n", "l", "s"),
        np="{E}", np_adj="{E} {A}",
        statements={"color": "{S} is {V}", "place": "{S} lives in {V}", "food": "{S} eats {V}",
                    "size": "{S} is {V}", "count": "{S} has friends {V}"},
        scene="in {P} {S} eats {F}",
        questions={"color": "what color is {S}", "place": "where lives {S}",
                   "food": "what eats {S}", "size": "what size is {S}",
                   "count": "how-many friends has {S}"},
    ),
    "dor": Grammar(
        code="dor",
        description="Dor (invented): heavy closed syllables, verb-final (subject-object-verb), "
                    "case suffixes -ak (place) and -um (object), question particle at the end.",
        seed=202,
        onsets=("d", "r", "g", "b", "k", "z", "dr", "gr", "br", "kh"),
        vowels=("o", "u", "a"),
        codas=("", "r", "k", "g", "n", "d"),
        suffixes={"LOC": "ak", "ACC": "um"},
        np="{E}", np_adj="{A} {E}",
        statements={"color": "{S} {V} is", "place": "{S} {V}+LOC lives",
                    "food": "{S} {V}+ACC eats", "size": "{S} {V} is",
                    "count": "{S} friends {V} has"},
        scene="{P}+LOC {S} {F}+ACC eats",
        questions={"color": "{S} what color is QP", "place": "{S} where lives QP",
                   "food": "{S} what+ACC eats QP", "size": "{S} what size is QP",
                   "count": "{S} friends how-many has QP"},
    ),
    "lum": Grammar(
        code="lum",
        description="Lum (invented, the low-resource target): soft open syllables, verb-first "
                    "(verb-subject-object), suffixes -wa (adjective), -ne (place), -li (plural), "
                    "question particle first; little of it in the base model's pretraining.",
        seed=303,
        onsets=("l", "m", "n", "w", "y", "h", ""),
        vowels=("u", "o", "a", "i", "ua", "io"),
        codas=("", "", "m", "n"),
        suffixes={"LOC": "ne", "PL": "li", "MOD": "wa"},
        np="{E}", np_adj="{E} {A}+MOD",
        statements={"color": "is {S} {V}", "place": "lives {S} {V}+LOC", "food": "eats {S} {V}",
                    "size": "is {S} {V}", "count": "has {S} friends+PL {V}"},
        scene="eats {S} {F} {P}+LOC",
        questions={"color": "QP color is {S}", "place": "QP where lives {S}",
                   "food": "QP what eats {S}", "size": "QP size is {S}",
                   "count": "QP how-many friends+PL has {S}"},
    ),
}

LANGUAGES: dict[str, str] = {code: g.description for code, g in GRAMMARS.items()}

#: how Question / Answer are written in English (the other languages translate the glosses)
EN_MARKERS = ("Question", "Answer")


def _pseudo_word(rng: random.Random, g: Grammar, syllables: int) -> str:
    return "".join(rng.choice(g.onsets) + rng.choice(g.vowels) + rng.choice(g.codas)
                   for _ in range(syllables))


def build_lexicon(code: str) -> dict[str, str]:
    """gloss -> word. English maps a word to itself; an invented language draws a fresh
    pseudo-word per gloss (one syllable for grammatical words, two or three for content
    words), never reusing a word or producing a real English word of the world."""
    g = GRAMMARS[code]
    if code == "en":
        return {gl: gl for gl in FUNCTION_GLOSSES + CONTENT_GLOSSES}
    rng = random.Random(g.seed)
    taken = set(CONTENT_GLOSSES) | set(FUNCTION_GLOSSES) | {"the", "a", "and"}
    lexicon: dict[str, str] = {}
    for gloss in FUNCTION_GLOSSES + CONTENT_GLOSSES:
        short = gloss in FUNCTION_GLOSSES
        while True:
            n = 1 if short else rng.choice((2, 2, 3))
            word = _pseudo_word(rng, g, n)
            if len(word) >= 2 and word not in taken:
                break
        taken.add(word)
        lexicon[gloss] = word
    for gloss in SHARED_GLOSSES:  # written alike in every language, as names and numbers are
        lexicon[gloss] = gloss
    return lexicon


class Realiser:
    """Turns templates into sentences of one language."""

    def __init__(self, code: str) -> None:
        self.code = code
        self.grammar = GRAMMARS[code]
        self.lexicon = build_lexicon(code)

    def word(self, gloss: str) -> str:
        return self.lexicon[gloss]

    def _fill(self, template: str, slots: dict[str, str]) -> str:
        out: list[str] = []
        for token in template.split():
            base, *sufs = token.split("+")
            text = slots[base[1:-1]] if base.startswith("{") else self.lexicon.get(base, base)
            out.append(text + "".join(self.grammar.suffixes[s] for s in sufs))
        return " ".join(out)

    def noun_phrase(self, entity: str | None, adjective: str | None = None) -> str:
        """``entity`` None means the pronoun ("it")."""
        if entity is None:
            return self.word("it")
        slots = {"E": self.word(entity)}
        if adjective is None:
            return self._fill(self.grammar.np, slots)
        slots["A"] = self.word(adjective)
        return self._fill(self.grammar.np_adj, slots)

    def statement(self, attr: str, value: str, subject: str) -> str:
        """A declarative sentence, capitalised and ending with a full stop."""
        return _sentence(self._fill(self.grammar.statements[attr],
                                    {"S": subject, "V": self.word(value)}), ".")

    def scene(self, subject: str, place: str, food: str) -> str:
        return _sentence(self._fill(self.grammar.scene, {"S": subject, "P": self.word(place),
                                                          "F": self.word(food)}), ".")

    def question(self, attr: str, entity: str) -> str:
        return _sentence(self._fill(self.grammar.questions[attr],
                                    {"S": self.noun_phrase(entity)}), "?")

    def markers(self) -> tuple[str, str]:
        """The words written before a question and before its answer."""
        if self.code == "en":
            return EN_MARKERS
        return (self.word("question").capitalize(), self.word("answer").capitalize())

    def qa_prompt(self, question: str) -> str:
        """``Question: <question> Answer:`` in this language; the answer follows after a space."""
        q, a = self.markers()
        return f"{q}: {question} {a}:"


def _sentence(text: str, end: str) -> str:
    return text[:1].upper() + text[1:] + end
