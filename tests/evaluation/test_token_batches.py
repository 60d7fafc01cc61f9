"""Plain batches filled by positions (``max_tokens``) and the flattened log-probability pick.

Scores must not depend on how spans are batched: every check compares against one span
per forward pass, or against a plain ``log_softmax`` over a lone forward of the span.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.api import DataSource, ModelArtifact, StageInputs
from engine.evaluation import scoring
from engine.evaluation.choices import plan_perplexity, read_documents
from engine.evaluation.scoring import batch_order, plan_batches, score_spans
from engine.evaluation.spans import Span
from engine_plugins.perplexity import Perplexity


def random_spans(vocab: int, n: int, seed: int = 0, longest: int = 60) -> list[Span]:
    rng = random.Random(seed)
    spans = []
    for _ in range(n):
        length = rng.randint(2, longest)
        tokens = tuple(rng.randrange(vocab) for _ in range(length))
        spans.append(Span(tokens, rng.randint(1, length - 1)))
    return spans


@pytest.fixture(scope="module")
def model(tiny_model) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def lone(model: torch.nn.Module, span: Span) -> tuple[float, bool]:
    """The span's summed log-probability and greedy flag from a forward of it alone."""
    with torch.no_grad():
        logits = model(torch.tensor([span.tokens[:-1]])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[-span.n_targets:]
    targets = torch.tensor(span.tokens[-span.n_targets:])
    picked = logp.gather(-1, targets[:, None]).squeeze(-1)
    return float(picked.double().sum()), bool((logp.argmax(-1) == targets).all())


def greedy_span(model: torch.nn.Module, prompt: tuple[int, ...], n: int) -> Span:
    """``prompt`` continued by ``n`` greedy tokens: a span every target of which is the argmax."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return Span(tuple(tokens), n)


@pytest.mark.parametrize(("batch_size", "max_tokens"), [(1, 64), (2, 300), (3, 10_000)])
def test_token_batches_cover_every_span_once_and_fit(batch_size, max_tokens):
    spans = random_spans(50, 97, seed=batch_size)
    batches = batch_order(spans, batch_size, max_tokens)
    assert sorted(i for b in batches for i in b) == list(range(len(spans)))
    for k, batch in enumerate(batches):
        width = max(spans[i].n_inputs for i in batch)
        assert width == spans[batch[0]].n_inputs  # longest first
        assert len(batch) <= batch_size or len(batch) * width <= max_tokens
        if k < len(batches) - 1:
            assert len(batch) >= batch_size  # never fewer rows than batch_size
            nxt = spans[batches[k + 1][0]].n_inputs
            assert (len(batch) + 1) * width > max_tokens or len(batch) < batch_size or nxt <= width
    assert len(batches) < len(batch_order(spans, batch_size))  # more rows per pass than batch_size
    assert batch_order(spans, batch_size, None) == batch_order(spans, batch_size)
    plan = plan_batches(spans, batch_size, share_prefix=False, max_tokens=max_tokens)
    assert [list(b.indices) for b in plan] == batches
    assert sum(b.fed_tokens for b in plan) == sum(s.n_inputs for s in spans)


def test_token_batches_reject_bad_sizes():
    spans = random_spans(50, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        batch_order(spans, 2, 0)
    with pytest.raises(ValueError, match="batch_size"):
        batch_order(spans, 0, 100)


def test_token_batches_score_as_spans_alone(model, monkeypatch):
    vocab = model.config.vocab_size
    spans = random_spans(vocab, 40, seed=3)
    spans += [greedy_span(model, spans[k].tokens[:5], 4) for k in range(3)]
    expected = [lone(model, s) for s in spans]
    assert sum(g for _, g in expected) >= 3  # the greedy flag is really exercised
    one = score_spans(model, spans, batch_size=1, device="cpu", pad_id=0)
    packed = score_spans(model, spans, batch_size=2, device="cpu", pad_id=0, max_tokens=10_000)
    # the pick in chunks of three positions: chunk edges inside spans
    monkeypatch.setattr(scoring, "PICK_ELEMENTS", 3 * vocab)
    chunked = score_spans(model, spans, batch_size=2, device="cpu", pad_id=0, max_tokens=10_000)
    for (lp, greedy), span, *got in zip(expected, spans, one, packed, chunked, strict=True):
        for score in got:
            assert score.logprob == pytest.approx(lp, abs=1e-5)
            assert score.greedy == greedy
            assert score.n_targets == span.n_targets


def test_perplexity_batch_tokens_changes_batches_not_results(tiny_model, tiny_tokenizer, tmp_path,
                                                             make_context):
    rng = random.Random(0)
    words = ["the", "cat", "sits", "on", "mat", "lum", "vela", "dora", "sen", "kato"]
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(1, 30)))
                              for _ in range(60)) + "\n")
    source = DataSource(docs, "text", language="xx")
    results = []
    for tokens in (None, 2048):
        params = Perplexity.Params(batch_size=2, batch_tokens=tokens)
        context = make_context("scores", stage_kind="evaluate", plugin="perplexity")
        art = Perplexity().run(context, StageInputs(models=[ModelArtifact("m", tiny_model)],
                                                    data=[source]), params)
        results.append((art, context.stats.tokens))
    (plain, fed_plain), (filled, fed_filled) = results
    assert filled.metrics["m"]["ppl/xx"] == pytest.approx(plain.metrics["m"]["ppl/xx"], rel=1e-6)
    assert filled.counts == plain.counts
    assert fed_filled == fed_plain  # padding is never counted, whatever the batches
    texts = read_documents([source], None, "scores")
    plans = [plan_perplexity(tiny_tokenizer, [source], texts, 256, 128, max_tokens=t)
             for t in (None, 2048)]
    assert plans[1].num_batches(2) < plans[0].num_batches(2) / 4


def test_perplexity_batch_tokens_param():
    assert Perplexity.Params().batch_tokens == 2048
    assert Perplexity.Params(batch_tokens=None).batch_tokens is None
    with pytest.raises(ValueError):
        Perplexity.Params(batch_tokens=0)
