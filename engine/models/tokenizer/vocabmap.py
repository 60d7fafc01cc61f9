"""Two vocabularies side by side: which tokens they share, and what the old one makes of the
new one's tokens.

A token is compared by the text it stands for (its *surface*, bytes), not by its spelling:
a byte-level BPE spells a leading space ``Ġ`` and bytes beyond ASCII in GPT-2's byte
alphabet, a SentencePiece-style BPE spells the space ``▁`` and a byte ``<0xNN>``. Special
(added) tokens are compared by their content. :func:`vocabulary_map` gives every new id
either the old id of the same token (*shared*: its row is copied exactly) or a
:class:`~engine.models.tokenizer.inits.NewToken` with the old tokenizer's split of its
surface (what the init methods start from). :func:`trained_tokenizer_json` learns a fresh
BPE of a given size on target text with the model's own normalizer, pre-tokenizer, decoder
and special tokens (what ``engine transplant-tokenizer --vocab-size`` gives a model).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from engine.core.errors import ModelLoadError
from engine.models.tokenizer.inits import NewToken

__all__ = ["VocabularyMap", "Vocabulary", "byte_level", "trained_tokenizer_json", "vocabulary_map"]


@lru_cache(maxsize=1)
def _byte_alphabet() -> tuple[dict[int, str], dict[str, int]]:
    """GPT-2's byte -> printable character table (and back): printable Latin-1 bytes stand
    for themselves, the rest are shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars, {c: b for b, c in chars.items()}


def byte_level(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer spells text in GPT-2's byte alphabet (a ByteLevel pre-tokenizer)."""
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def key_of(surface: bytes) -> str:
    """The one spelling of a surface every map here uses: GPT-2's byte alphabet."""
    return surface.decode("latin-1").translate(_byte_table())


@lru_cache(maxsize=1)
def _byte_table() -> dict[int, str]:
    """``str.translate``'s table of :func:`_byte_alphabet` (Latin-1 code point -> character)."""
    chars, _ = _byte_alphabet()
    return dict(chars)


@dataclass
class Vocabulary:
    """One tokenizer: its ``tokenizers.Tokenizer``, and each id's surface (None: special)."""

    spec: dict[str, Any]
    backend: Any
    surfaces: dict[int, bytes | None]
    special: dict[str, int]
    #: spelled in GPT-2's byte alphabet (see :func:`byte_level`)
    levels: bool = False
    #: surface -> split, filled by :meth:`split` (a corpus repeats its words many times)
    _splits: dict[bytes, tuple[int, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], where: str) -> Vocabulary:
        from tokenizers import Tokenizer

        model = spec.get("model") or {}
        if model.get("type") != "BPE":
            raise ModelLoadError(f"{where}: only BPE tokenizers (tokenizer.json with a BPE model) are "
                                 f"handled here, not {model.get('type')!r}")
        backend = Tokenizer.from_str(json.dumps(spec))
        levels = byte_level(spec)
        _, to_byte = _byte_alphabet()
        surfaces: dict[int, bytes | None] = {}
        for token, i in model.get("vocab", {}).items():
            surfaces[int(i)] = _surface(token, levels, to_byte)
        special: dict[str, int] = {}
        for added in spec.get("added_tokens") or []:
            i = int(added["id"])
            if added.get("special", True):
                surfaces[i] = None
                special[added["content"]] = i
            else:
                surfaces[i] = added["content"].encode("utf-8")
        return cls(spec, backend, surfaces, special, levels)

    @property
    def size(self) -> int:
        return 1 + max(self.surfaces) if self.surfaces else 0

    def split(self, surface: bytes) -> list[int]:
        """The ids this tokenizer's model splits ``surface`` into (BPE on the one piece, no
        pre-tokenizer: a token's text is one word to it)."""
        if not surface:
            return []
        known = self._splits.get(surface)
        if known is None:
            if self.levels:
                known = tuple(t.id for t in self.backend.model.tokenize(key_of(surface)))
            else:
                text = surface.decode("utf-8", errors="replace")
                known = tuple(self.backend.encode(text, add_special_tokens=False).ids)
            self._splits[surface] = known
        return list(known)


def _surface(token: str, levels: bool, to_byte: dict[str, int]) -> bytes:
    if levels:
        try:
            return bytes(to_byte[c] for c in token)
        except KeyError:  # a token outside the byte alphabet: take it as text
            return token.encode("utf-8")
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass
class VocabularyMap:
    """New ids against old ones: ``shared`` new id -> old id (copied exactly), ``new`` the
    tokens an init method fills, ``size`` the new embedding's rows."""

    old: Vocabulary
    new: Vocabulary
    shared: dict[int, int]
    new_tokens: list[NewToken]
    size: int

    @property
    def new_ids(self) -> list[int]:
        return [t.id for t in self.new_tokens]


def vocabulary_map(old: Vocabulary, new: Vocabulary, *, rows: int | None = None,
                   extension: bool = False) -> VocabularyMap:
    """Map ``new``'s ids onto ``old``'s. ``rows``: the old embedding's row count (a model may
    have more rows than tokens). ``extension``: ``new`` extends ``old`` id for id, so every
    old id (rows beyond the tokenizer too) keeps its row."""
    by_surface: dict[bytes, int] = {}
    for i, s in sorted(old.surfaces.items()):
        if s is not None:
            by_surface.setdefault(s, i)
    size = max(new.size, rows or 0) if extension else new.size
    shared: dict[int, int] = {}
    fresh: list[NewToken] = []
    spelled = {i: t for t, i in (new.spec["model"].get("vocab") or {}).items()}
    spelled.update({i: c for c, i in new.special.items()})
    for i in range(size):
        if extension and i < (rows or old.size) and (i in old.surfaces or i >= new.size):
            shared[i] = i
            continue
        surface = new.surfaces.get(i)
        if surface is None and i in new.special.values():
            content = spelled[i]
            if content in old.special:
                shared[i] = old.special[content]
                continue
            fresh.append(NewToken(i, content, content.encode("utf-8"),
                                  tuple(old.split(content.encode("utf-8"))), special=True))
            continue
        if surface is None:  # an id no token of the new tokenizer uses: give it a row anyway
            fresh.append(NewToken(i, "", b"", ()))
            continue
        if surface in by_surface and (rows is None or by_surface[surface] < rows):
            shared[i] = by_surface[surface]
            continue
        fresh.append(NewToken(i, spelled.get(i, ""), surface, tuple(old.split(surface))))
    if rows is not None:
        bad = [t for t in fresh if any(p >= rows for p in t.pieces)]
        if bad:
            raise ModelLoadError(f"the old tokenizer splits {bad[0].token!r} into ids beyond the model's "
                                 f"{rows} embedding rows: tokenizer and weights do not belong together")
    return VocabularyMap(old, new, shared, fresh, size)


def trained_tokenizer_json(spec: dict[str, Any], texts: Iterable[str], vocab_size: int,
                           min_frequency: int = 2) -> dict[str, Any]:
    """A new ``tokenizer.json`` (parsed): a BPE of ``vocab_size`` tokens learned from ``texts``
    with ``spec``'s normalizer, pre-tokenizer, post-processor and decoder, its special tokens
    first (same content, ids from 0) and, for a byte-level tokenizer, all 256 bytes, so that it
    spells any text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    if (spec.get("model") or {}).get("type") != "BPE":
        raise ModelLoadError(f"only BPE tokenizers are retrained here, not "
                             f"{(spec.get('model') or {}).get('type')!r}")
    specials = [t for t in spec.get("added_tokens") or [] if t.get("special", True)]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_level(spec) else []
    floor = len(specials) + len(alphabet) + 1
    if vocab_size < floor:
        raise ModelLoadError(f"vocab_size {vocab_size} is too small: the special tokens and the byte "
                             f"alphabet alone take {floor - 1}")
    learner = Tokenizer.from_str(json.dumps({**spec, "added_tokens": [], "post_processor": None}))
    learner.model = models.BPE()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  initial_alphabet=alphabet, show_progress=False,
                                  special_tokens=[t["content"] for t in specials])
    learner.train_from_iterator(list(texts), trainer=trainer)
    learned = json.loads(learner.to_str())
    out = json.loads(json.dumps(spec))
    out["model"] = {**spec["model"], "vocab": learned["model"]["vocab"],
                    "merges": [list(m.split(" ", 1)) if isinstance(m, str) else list(m)
                               for m in learned["model"]["merges"]]}
    vocab = out["model"]["vocab"]
    out["added_tokens"] = [{**t, "id": vocab[t["content"]]} for t in specials]
    _remap_post_processor(out, {t["content"]: t["id"] for t in out["added_tokens"]})
    return out


def _remap_post_processor(spec: dict[str, Any], ids: dict[str, int]) -> None:
    """A TemplateProcessing post-processor names special tokens with their ids: give it the new ones."""
    post = spec.get("post_processor") or {}
    for content, entry in (post.get("special_tokens") or {}).items():
        if content in ids:
            entry["ids"] = [ids[content]]
