"""Fast-path detection by trying the model: cache keyword renames, models without a cache."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM

from engine.evaluation.generation import StopRule, generate_greedy
from engine.evaluation.scoring import score_spans
from engine.evaluation.spans import continuation_span
from engine.models.capabilities import CACHE_KEYWORDS, probe


class OldCacheName(torch.nn.Module):
    """A real tiny Llama behind the pre-5.24 API: the cache goes in and out as
    ``past_key_values`` and ``forward`` takes no ``**kwargs``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=None, logits_to_keep=0):
        kw = {"cache": past_key_values} if "cache" in CACHE_KEYWORDS and past_key_values is not None else {}
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, logits_to_keep=logits_to_keep, **kw)
        return SimpleNamespace(logits=out.logits, past_key_values=getattr(out, "cache", None)
                               or getattr(out, "past_key_values", None))


class NoCache(torch.nn.Module):
    """A real tiny Llama that cannot continue from a cache (it ignores one) and has no
    ``logits_to_keep``: the engine must notice and take the slow, correct path."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, **ignored):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False)
        return SimpleNamespace(logits=out.logits, cache=None, past_key_values=None)


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def test_installed_transformers_keeps_every_fast_path(tiny_model):
    caps = probe(_load(tiny_model))
    assert caps.kv_cache and caps.logits_to_keep and caps.missing == ()


def test_the_old_keyword_is_found_by_trying(tiny_model):
    caps = probe(OldCacheName(_load(tiny_model)))
    assert (caps.cache_argument, caps.cache_output) == ("past_key_values", "past_key_values")
    assert caps.logits_to_keep


def test_a_model_without_a_cache_is_named_slow(tiny_model):
    caps = probe(NoCache(_load(tiny_model)))
    assert not caps.kv_cache and not caps.logits_to_keep
    assert len(caps.missing) == 2 and "kv-cache" in caps.missing[0]


def _spans(tokenizer):
    ctx = tokenizer("the fox is red and the owl is blue and the cat", add_special_tokens=False)["input_ids"]
    return [continuation_span(ctx, tokenizer(c, add_special_tokens=False)["input_ids"], 128)
            for c in (" is green", " sleeps", " is very red", " eats bread")]


def test_scores_and_generations_agree_across_apis(tiny_model, tiny_tokenizer):
    base = _load(tiny_model)
    models = [base, OldCacheName(base), NoCache(base)]
    spans = _spans(tiny_tokenizer)
    shared: list[list[bool]] = [[], [], []]
    scores = [score_spans(m, spans, batch_size=4, device="cpu", pad_id=0,
                          on_batch=lambda b, _, k=k: shared[k].append(b.shared))
              for k, m in enumerate(models)]
    assert shared == [[True], [True], [False]]  # the fast path is used wherever it works
    for other in scores[1:]:
        for a, b in zip(scores[0], other, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4 and a.n_targets == b.n_targets
    prompts = [s.tokens[:8] for s in spans]
    gens = [[g.tokens for g in generate_greedy(m, tiny_tokenizer, prompts, StopRule(max_new_tokens=6, stop=()),
                                               batch_size=4, device="cpu")] for m in models]
    assert gens[0] == gens[1] == gens[2]
