"""What evaluators score: token spans, how texts become them, and score totals.

Every evaluator in lingoforge reduces to one primitive: *the summed log-probability
of the last ``n`` tokens of a token sequence, each predicted from the tokens before
it* (a :class:`Span`). Perplexity scores whole documents (every token after the
first), multiple-choice accuracy scores a continuation (a choice) after a context
(a prompt). This module turns texts into spans; :mod:`engine.evaluation.scoring` runs them
through a model; :mod:`engine.evaluation` drives models and metrics.

Long texts
----------
A document longer than the model's context is scored with the **sliding-window**
method of the Hugging Face perplexity guide (:func:`document_spans`): windows of
``max_length`` tokens start every ``stride`` tokens (``1 <= stride < max_length``);
each window scores only the tokens the previous window did not, so every token
after the first is predicted exactly once, with at least ``max_length - stride``
tokens of context (except in the first window). Smaller strides give more context
per prediction and cost more forwards; ``stride = max_length - 1`` gives windows that
share one token (the least context, the fewest forwards). Nothing is ever fed past
``max_length``, so long texts never crash a model with learned position embeddings.
A context+continuation pair longer than the window keeps its continuation and the
*end* of its context (:func:`continuation_span`), as lm-evaluation-harness does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_MAX_LENGTH", "Span", "SpanScore", "TokenTotals", "context_length",
    "continuation_span", "document_spans", "encode_document", "encode_pair",
    "tokenizer_fingerprint",
]

DEFAULT_MAX_LENGTH = 2048

_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length",
                 "seq_length", "n_ctx")


# --- what gets scored -------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Score the last ``n_targets`` of ``tokens``, each given the tokens before it.

    ``tokens`` holds at most ``max_length + 1`` ids (the model is fed all but the
    last); ``1 <= n_targets <= len(tokens) - 1``.
    """

    tokens: tuple[int, ...]
    n_targets: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_targets <= len(self.tokens) - 1:
            raise ValueError(f"span of {len(self.tokens)} tokens cannot score {self.n_targets}")

    @property
    def n_inputs(self) -> int:
        """Positions fed to the model (the span minus its last token)."""
        return len(self.tokens) - 1

    @property
    def n_context(self) -> int:
        """Leading tokens that are only context (never scored); at least one."""
        return len(self.tokens) - self.n_targets

    @property
    def context(self) -> tuple[int, ...]:
        """The context tokens: spans with equal contexts can share one prefix pass."""
        return self.tokens[:self.n_context]


@dataclass(frozen=True)
class SpanScore:
    """Summed log-probability (natural log) of a span's targets.

    ``greedy`` says whether every target was the model's top-1 prediction (what an
    exact-match or "would greedy decoding produce it" metric needs).
    """

    logprob: float
    n_targets: int
    greedy: bool


@dataclass
class TokenTotals:
    """Running token-weighted NLL: ``perplexity = exp(nll / tokens)``.

    ``nbytes`` (UTF-8 bytes of the scored text) allows a tokenizer-independent
    bits-per-byte, which is what compares models whose vocabularies differ.
    """

    nll: float = 0.0
    tokens: int = 0
    nbytes: int = 0

    def add(self, score: SpanScore) -> None:
        self.nll -= score.logprob
        self.tokens += score.n_targets

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else float("nan")

    @property
    def bits_per_byte(self) -> float:
        return self.nll / (math.log(2) * self.nbytes) if self.nbytes else float("nan")


# --- tokenization ---------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_document(tokenizer: Any, text: str) -> list[int]:
    """A document's ids: BOS (when the tokenizer has one) followed by the text.

    BOS is added by hand rather than with ``add_special_tokens`` because tokenizers
    disagree on what that adds (EOS too, nothing at all); with BOS every text token
    is predicted, without it the first text token is context only.
    """
    ids = _encode(tokenizer, text)
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if bos is not None else ids


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them.

    Trailing whitespace of the context moves to the continuation (``"Answer: "`` +
    ``"blue"`` is scored as ``"Answer:"`` + ``" blue"``, the way text is tokenized in
    training). The pair is encoded as one string and split after the context's own
    tokens, because SentencePiece tokenizers encode a string that starts mid-text
    differently from the same text after a context. The context starts with BOS when
    the tokenizer has one, else EOS (a model needs one token to predict from).
    Returns an empty continuation when ``continuation`` is empty.
    """
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont and continuation:  # a merge across the boundary swallowed it
        cont = _encode(tokenizer, continuation)
    prefix = getattr(tokenizer, "bos_token_id", None)
    if prefix is None:
        prefix = getattr(tokenizer, "eos_token_id", None)
    if prefix is not None:
        ctx = [prefix, *ctx]
    return ctx, cont


def tokenizer_fingerprint(folder: Path) -> str:
    """A hash of a model folder's tokenizer files.

    Models produced by merges and fine-tunes usually carry their base's tokenizer
    unchanged; evaluators tokenize a data set once per distinct fingerprint instead
    of once per model.
    """
    h = hashlib.sha256()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json"):
        f = Path(folder) / name
        if f.is_file():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def context_length(config: dict[str, Any], tokenizer: Any = None) -> int:
    """The model's context in tokens, from its config.json (a dict).

    Looks at the names architectures use for it (``max_position_embeddings``,
    GPT-2's ``n_positions``, ...), then the tokenizer's ``model_max_length`` when it is
    a real number, then :data:`DEFAULT_MAX_LENGTH`.
    """
    for cfg in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and value > 0:
                return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    return DEFAULT_MAX_LENGTH


# --- spans --------------------------------------------------------------------------------------


def document_spans(ids: Sequence[int], max_length: int, stride: int) -> list[Span]:
    """Spans that predict every token of ``ids`` after the first exactly once.

    The Hugging Face sliding-window method: window ``k`` covers
    ``ids[k*stride : k*stride + max_length]`` and scores the tokens past the previous
    window's end; the last window ends at the document's end. A document of at most
    ``max_length`` tokens is one span. Returns no span for a document of fewer than
    two tokens (nothing to predict). ``stride`` must be below ``max_length``: a window
    starting where the previous one ended could not predict its own first token.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if not 1 <= stride < max_length:
        raise ValueError(f"stride must be between 1 and max_length - 1 ({max_length - 1}), "
                         f"got {stride}")
    ids = tuple(ids)
    spans: list[Span] = []
    prev_end = 1  # the first token is never predicted
    begin = 0
    while prev_end < len(ids):
        end = min(begin + max_length, len(ids))
        if end > prev_end:
            spans.append(Span(ids[begin:end], end - prev_end))
            prev_end = end
        begin += stride
    return spans


def continuation_span(context: Sequence[int], continuation: Sequence[int], max_length: int) -> Span:
    """The span that scores ``continuation`` after ``context``.

    When both do not fit in ``max_length`` fed positions, the start of the context is
    dropped (the end of a prompt matters most). A continuation that alone fills the
    window cannot be scored: :class:`ValueError`, for the caller to name the item.
    """
    if not continuation:
        raise ValueError("the continuation is empty")
    if not context:
        raise ValueError("the context is empty (a model needs one token to predict from)")
    if len(continuation) >= max_length + 1:
        raise ValueError(f"the continuation has {len(continuation)} tokens; "
                         f"it must be shorter than max_length ({max_length})")
    tokens = (tuple(context) + tuple(continuation))[-(max_length + 1):]
    return Span(tokens, len(continuation))
