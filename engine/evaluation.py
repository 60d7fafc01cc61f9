"""Shared scoring helpers for evaluate-stage plugins.

Every evaluator in lingoforge reduces to one primitive: *the summed log-probability
of the last ``n`` tokens of a token sequence, each predicted from the tokens before
it*. Perplexity scores whole documents (every token after the first), multiple-choice
accuracy scores a continuation (a choice) after a context (a prompt). Keeping one
batched primitive means one place to get padding, truncation and numerics right.

How sequences are scored
------------------------
* A :class:`Span` holds up to ``max_length + 1`` token ids and the number of trailing
  tokens to score. The model is fed ``tokens[:-1]`` (at most ``max_length``
  positions) and the logits at position ``j`` give the log-probability of
  ``tokens[j + 1]``; the last token's own logits would predict nothing we score,
  so it is never fed.
* Spans are **sorted by length (longest first)** and cut into batches of
  ``batch_size``, so a batch holds sequences of similar length (little padding) and
  the largest batch runs first (an out-of-memory error shows at once, not after an
  hour). Results come back in the caller's order.
* A batch is **right-padded** with an attention mask. With right padding every real
  token keeps its position ids 0..n-1, and causal attention never lets a real
  token see a pad, so padded and unpadded scores agree to float rounding.
* Only the logit positions a batch scores are projected onto the vocabulary
  (``logits_to_keep``, when the model supports it), and log-softmax runs per row in
  float32; with 100k+ vocabularies the full ``batch x length x vocab`` logits
  tensor would otherwise dominate memory.
* Sums are accumulated in float64 (Python floats), so the order of batches does not
  change a corpus total beyond ~1e-12 relative.

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

import gc
import hashlib
import inspect
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine import modelio
from engine.api import DataSource, MetricsArtifact, ModelArtifact
from engine.errors import DataError, EngineError, ModelLoadError

if TYPE_CHECKING:
    from engine.context import StageContext

__all__ = [
    "DEFAULT_MAX_LENGTH", "EvalPlan", "Span", "SpanScore", "TokenTotals", "batch_order",
    "context_length", "continuation_span", "document_spans", "encode_document",
    "encode_pair", "evaluate_models", "num_batches", "score_spans", "select_sources",
    "tokenizer_fingerprint",
]

#: window used when neither the recipe nor the model config says how long a context is
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


# --- batched scoring ------------------------------------------------------------------------------


def batch_order(spans: Sequence[Span], batch_size: int) -> list[list[int]]:
    """Indices of ``spans`` in batches: longest first, so batches pad little."""
    order = sorted(range(len(spans)), key=lambda i: -spans[i].n_inputs)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def num_batches(n_spans: int, batch_size: int) -> int:
    return -(-n_spans // batch_size)


def _accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def _score_batch(model: torch.nn.Module, spans: Sequence[Span], device: torch.device,
                 pad_id: int, keep: bool) -> list[SpanScore]:
    lengths = [s.n_inputs for s in spans]
    width = max(lengths)
    ids = torch.full((len(spans), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(spans), width), dtype=torch.long)
    for row, span in enumerate(spans):
        ids[row, :span.n_inputs] = torch.tensor(span.tokens[:-1], dtype=torch.long)
        mask[row, :span.n_inputs] = 1
    # logits at position j predict token j+1; row r scores positions [n_in - n_t, n_in)
    lo = min(s.n_inputs - s.n_targets for s in spans)
    kwargs: dict[str, Any] = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                              "use_cache": False}
    if keep:
        kwargs["logits_to_keep"] = torch.arange(lo, width, device=device)
        offset = lo
    else:
        offset = 0
    logits = model(**kwargs).logits
    scores = []
    for row, span in enumerate(spans):
        start = span.n_inputs - span.n_targets - offset
        row_logits = logits[row, start:start + span.n_targets].float()
        targets = torch.tensor(span.tokens[-span.n_targets:], dtype=torch.long, device=row_logits.device)
        logprobs = torch.log_softmax(row_logits, dim=-1)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        greedy = bool((row_logits.argmax(dim=-1) == targets).all())
        scores.append(SpanScore(float(picked.double().sum()), span.n_targets, greedy))
    return scores


def score_spans(
    model: torch.nn.Module,
    spans: Sequence[Span],
    *,
    batch_size: int,
    device: torch.device | str,
    pad_id: int | None,
    on_batch: Callable[[list[int], list[SpanScore]], None] | None = None,
) -> list[SpanScore]:
    """Score every span, batched; results in the order of ``spans``.

    Puts the model in eval mode and runs under ``torch.inference_mode``.
    ``on_batch(indices, scores)`` is called after each batch (progress bars, token
    counters, streaming aggregation). ``pad_id`` may be any id in the vocabulary: pads
    are masked and never scored; ``None`` uses 0.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    model.eval()
    keep = _accepts_logits_to_keep(model)
    results: list[SpanScore | None] = [None] * len(spans)
    with torch.inference_mode():
        for indices in batch_order(spans, batch_size):
            batch = _score_batch(model, [spans[i] for i in indices], device,
                                 pad_id if pad_id is not None else 0, keep)
            for i, score in zip(indices, batch, strict=True):
                results[i] = score
            if on_batch is not None:
                on_batch(indices, batch)
    return results  # type: ignore[return-value]


# --- the per-model driver every evaluator shares -------------------------------------------------


def select_sources(context: StageContext, data: Sequence[DataSource], fmt: str) -> list[DataSource]:
    """The data sources of format ``fmt``; the others are ignored, as documented.

    Raises :class:`DataError` naming the stage when none match, or when two sources
    share a label (their metric names would collide).
    """
    chosen = [d for d in data if d.format == fmt]
    if not chosen:
        got = ", ".join(f"{d.path.name} ({d.format})" for d in data) or "no data at all"
        raise DataError(f"evaluate stage {context.stage_name!r} ({context.plugin}): "
                        f"no data source of format {fmt!r}; got {got}")
    seen: dict[str, DataSource] = {}
    for d in chosen:
        if d.label in seen:
            raise DataError(
                f"evaluate stage {context.stage_name!r}: data sources {seen[d.label].path} and "
                f"{d.path} share the label {d.label!r}; give them distinct 'language' values")
        seen[d.label] = d
    return chosen


@dataclass
class EvalPlan:
    """What to score for one tokenizer and window, and how to turn scores into metrics.

    ``summarize(scores)`` receives one :class:`SpanScore` per span, in order, and
    returns ``(metrics, counts)`` for one model.
    """

    spans: list[Span]
    summarize: Callable[[list[SpanScore]], tuple[dict[str, float], dict[str, int]]]


PlanBuilder = Callable[[Any, int], EvalPlan]


def _message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"


def evaluate_models(
    context: StageContext,
    models: Sequence[ModelArtifact],
    build_plan: PlanBuilder,
    *,
    batch_size: int,
    max_length: int | None = None,
) -> MetricsArtifact:
    """Score each model with the plan ``build_plan(tokenizer, max_length)`` returns.

    * Tokenizers are loaded first, and a plan is built once per distinct tokenizer and
      window (:func:`tokenizer_fingerprint`), so that the progress bar knows its total
      (models x batches) before the first (slow) model load.
    * ``max_length`` ``None`` means each model's own context (:func:`context_length`).
    * A model or tokenizer that fails to load or score is logged and reported in
      ``errors``; the other models are still scored. Bad data (:class:`DataError`)
      stops the stage, since it would fail every model. When no model at all could
      be scored the stage fails with every model's reason.
    * ``context.add_tokens`` counts the positions fed to models (no padding).
    """
    if not models:
        raise EngineError(f"evaluate stage {context.stage_name!r}: no models to evaluate")
    errors: dict[str, str] = {}
    load_failures: set[str] = set()
    plans: dict[tuple[str, int], EvalPlan] = {}
    todo: list[tuple[ModelArtifact, Any, EvalPlan]] = []
    for artifact in models:
        try:
            config = modelio.read_config(artifact.path)
            tokenizer = context.load_tokenizer(artifact)
            length = max_length or context_length(config, tokenizer)
            key = (tokenizer_fingerprint(artifact.path), length)
            if key not in plans:
                plans[key] = build_plan(tokenizer, length)
            todo.append((artifact, tokenizer, plans[key]))
        except DataError:
            raise
        except Exception as exc:
            errors[artifact.name] = _message(exc)
            load_failures.add(artifact.name)
            context.log(f"[red]model {artifact.name!r} skipped:[/] {errors[artifact.name]}")

    metrics: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, int]] = {}
    total = sum(num_batches(len(plan.spans), batch_size) for _, _, plan in todo)
    with context.progress(total, f"{context.stage_name}: {context.plugin}") as bar:
        for artifact, tokenizer, plan in todo:
            done = 0

            def advance(indices: list[int], scores: list[SpanScore],
                        name: str = artifact.name, plan: EvalPlan = plan) -> None:
                nonlocal done
                done += 1
                context.add_tokens(sum(plan.spans[i].n_inputs for i in indices))
                bar.advance(1, model=name)

            model = None
            alive: Callable[[], Any] = _nothing
            try:
                model = context.load_model(artifact)
                alive = weakref.ref(model)
                scores = score_spans(model, plan.spans, batch_size=batch_size,
                                     device=context.device, pad_id=tokenizer.pad_token_id,
                                     on_batch=advance)
                metrics[artifact.name], counts[artifact.name] = plan.summarize(scores)
            except DataError:
                raise
            except Exception as exc:
                errors[artifact.name] = _message(exc)
                if model is None:
                    load_failures.add(artifact.name)
                context.log(f"[red]model {artifact.name!r} not scored:[/] {errors[artifact.name]}")
                bar.advance(num_batches(len(plan.spans), batch_size) - done)
            finally:
                del model
                _free_memory(alive)

    if not metrics:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        cls = ModelLoadError if load_failures == set(errors) else EngineError
        raise cls(f"evaluate stage {context.stage_name!r}: no model could be scored ({detail})")
    return MetricsArtifact(name=context.stage_name, metrics=metrics, counts=counts, errors=errors)


def _nothing() -> None:
    return None


def _free_memory(alive: Callable[[], Any]) -> None:
    """Release a model before the next loads: peak memory stays one model.

    A full ``gc.collect`` takes a noticeable fraction of a second in a process
    that imported transformers, so it runs only when reference cycles kept the model.
    """
    if alive() is not None:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
