"""Auxiliary static token embeddings learned on the target text: a space in which the new
tokens and old ones are both known, for init methods that pick old tokens by similarity
(``focus``, ``omp``).

The corpus is the target text split by the new tokenizer (FOCUS's corpus, arXiv
2305.14481) and, unless ``mix`` is 0, the same text once more with each word (the new
tokenizer's pre-tokenizer's words) split by the old tokenizer with probability ``mix``. On
a vocabulary *extension* the first copy holds almost no old token (the new tokens replace
them); in the second, the old tokens that spell the language (its bytes, its old
sub-words) occur in the same contexts as the new tokens, so they get vectors beside them. Tokens are keyed by the text they stand for, so a token both
vocabularies have is one entry. The vectors are fastText's (skip-gram with character
n-grams; gensim's ``FastText``, the optional extra ``lingoforge[vocab]``), one worker and
a fixed seed, so a run repeats exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from engine.core.errors import ModelLoadError
from engine.core.params import PluginParams
from engine.models.tokenizer.inits import InitProblem, NewToken

__all__ = ["AUX_EXTRA", "AUX_REQUIRES", "AuxParams", "AuxSpace", "aux_atoms", "aux_corpus", "aux_vector",
           "train_aux"]

#: what ``requires`` and the install hint of a method that uses the space name
AUX_REQUIRES = ("gensim",)
AUX_EXTRA = "vocab"


class AuxParams(PluginParams):
    """The auxiliary space's params (fastText's own defaults where it has one)."""

    dim: int = Field(100, ge=2, le=1024, description="Size of the auxiliary vectors (fastText's default 100).")
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the target text (fastText's default 5).")
    window: int = Field(5, ge=1, le=50, description="Context window in tokens (fastText's default 5).")
    min_count: int = Field(2, ge=1, description="A token seen fewer times gets no vector of its own and a "
                           "new one takes `fallback` (2: the tokenizer learners' own min_frequency, so a token "
                           "learned from this text is usually covered; fastText's default is 5).")
    mix: float = Field(0.5, ge=0.0, le=1.0, description="Share of words split by the old tokenizer in the "
                       "corpus's second copy, so old tokens are learned in the new tokens' contexts (0: no "
                       "second copy: FOCUS's corpus, the new tokenizer's tokens alone).")
    buckets: int = Field(200_000, ge=1000, description="Hash buckets of the character n-gram vectors "
                         "(fastText's default 2,000,000 holds 800 MB at dim 100; a vocabulary's tokens need "
                         "far fewer).")
    fallback: str = Field("random", pattern="^(random|mean)$", description="Row of a new token without an "
                          "auxiliary vector: `random` (FOCUS's choice: drawn from the old rows' per-dimension "
                          "mean and deviation) or `mean` (of its pieces, as the `mean` method).")


@dataclass
class AuxSpace:
    """Unit vectors by key, and how often each key occurred."""

    index: dict[str, int]
    vectors: np.ndarray  # [keys, dim], unit length
    counts: dict[str, int]

    def vector(self, key: str) -> np.ndarray | None:
        i = self.index.get(key)
        return None if i is None else self.vectors[i]


def _keys(ids: list[int], surfaces: dict[int, bytes | None], key: Any) -> list[str]:
    out = []
    for i in ids:
        s = surfaces.get(i)
        if s:
            out.append(key(s))
    return out


def aux_corpus(problem: InitProblem, mix: float, seed: int) -> list[list[str]]:
    """The target text as sentences of token keys (see the module docstring)."""
    rng = random.Random(seed)
    new = problem.new_tokenizer
    # a text repeats its words: each word's keys are worked out once per tokenizer
    by_old: dict[bytes, list[str]] = {}
    by_new: dict[bytes, list[str]] = {}

    def spelled(surface: bytes, old: bool) -> list[str]:
        memo = by_old if old else by_new
        keys = memo.get(surface)
        if keys is None:
            if old:
                keys = _keys(problem.old_split(surface), problem.old_surfaces, problem.surface_key)
            else:
                keys = _keys(problem.new_split(surface), problem.new_surfaces, problem.surface_key)
            memo[surface] = keys
        return keys

    words_of: list[list[bytes]] = []
    for text in problem.texts:
        norm = new.normalizer.normalize_str(text) if new.normalizer is not None else text
        words = (new.pre_tokenizer.pre_tokenize_str(norm) if new.pre_tokenizer is not None
                 else [(norm, (0, len(norm)))])
        words_of.append([norm[a:b].encode("utf-8") for _, (a, b) in words])
    sentences: list[list[str]] = []
    for copy in ((0.0, mix) if mix > 0 else (0.0,)):
        for surfaces in words_of:
            sentence: list[str] = []
            for surface in surfaces:
                sentence += spelled(surface, bool(copy) and rng.random() < copy)
            if sentence:
                sentences.append(sentence)
    return sentences


def train_aux(problem: InitProblem, params: AuxParams) -> AuxSpace:
    """fastText vectors of every token key of the target text (:func:`aux_corpus`)."""
    try:
        from gensim.models import FastText  # start-up speed: gensim is optional and slow to import
    except ImportError:
        raise ModelLoadError("the auxiliary embeddings need gensim: pip install 'lingoforge[vocab]'") from None
    sentences = aux_corpus(problem, params.mix, problem.seed)
    if not sentences:
        raise ModelLoadError("the auxiliary embeddings are learned on the target text, and there is none: "
                             "give the language's text (--data)")
    model = FastText(vector_size=params.dim, window=params.window, min_count=params.min_count, sg=1,
                     epochs=params.epochs, workers=1, seed=problem.seed, min_n=3, max_n=6,
                     bucket=params.buckets)
    model.build_vocab(corpus_iterable=sentences)
    if not model.wv.key_to_index:
        raise ModelLoadError(f"no token of the target text occurs min_count={params.min_count} times: "
                             "too little text for auxiliary embeddings")
    model.train(corpus_iterable=sentences, total_examples=len(sentences), epochs=params.epochs)
    keys = list(model.wv.index_to_key)
    vectors = np.stack([model.wv[k] for k in keys]).astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-8)
    counts = {k: int(model.wv.get_vecattr(k, "count")) for k in keys}
    return AuxSpace({k: i for i, k in enumerate(keys)}, vectors, counts)


def aux_atoms(problem: InitProblem, space: AuxSpace) -> tuple[list[int], np.ndarray]:
    """The old tokens with an auxiliary vector (the atoms a new token is made of): their
    old ids and unit vectors."""
    ids, rows = [], []
    for i, surface in sorted(problem.old_surfaces.items()):
        if surface is None or i >= problem.old_input.shape[0]:
            continue
        v = space.vector(problem.surface_key(surface))
        if v is not None:
            ids.append(i)
            rows.append(v)
    if not ids:
        raise ModelLoadError("no old token occurs in the target text often enough to have an auxiliary "
                             "vector; lower min_count or raise mix")
    return ids, np.stack(rows)


def aux_vector(problem: InitProblem, space: AuxSpace, token: NewToken) -> np.ndarray | None:
    """A new token's unit vector (None: it occurred fewer than min_count times)."""
    return space.vector(problem.surface_key(token.surface)) if token.surface else None
