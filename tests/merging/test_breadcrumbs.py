"""The ``breadcrumbs`` and ``breadcrumbs-ties`` merges: mergekit 0.1.5's parameters and
arithmetic (the oracle in benchmarks/speed/mergekit_oracle.py runs mergekit itself), with the
band trim done by the engine, so the result is the same whole or in row slices."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from test_merge_plugins import assert_same_state, inputs, run, state

from engine.merging import MagnitudeBand, arithmetic, execute, magnitude_band
from engine.registry.manager import implementations


def impl(name: str):
    return implementations()["merge"][name].impl


def reference(fam, models, weights, densities, gammas, *, lam=1.0, normalize=False, ties=False):
    """In memory, tensor by tensor, from the formulas of docs/merging.md."""
    b, ms = state(fam["base"]), [state(fam[m]) for m in models]
    out = {}
    for k, base in b.items():
        trimmed = torch.stack([magnitude_band(m[k] - base, MagnitudeBand(d, g))
                               for m, d, g in zip(ms, densities, gammas)])
        if ties:
            delta = arithmetic.ties_combine(trimmed, weights, normalize=normalize, lam=lam)
        else:
            delta = arithmetic.task_arithmetic_delta(trimmed, weights, normalize=normalize, lam=lam)
        out[k] = base + delta
    return out


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs-ties"])
@pytest.mark.parametrize("chunk", [10**9, 100], ids=["whole", "sliced"])
def test_breadcrumbs_equals_reference_whole_and_sliced(method, chunk, tiny_model_family,
                                                       make_context, monkeypatch):
    monkeypatch.setattr(execute, "CHUNK_ELEMENTS", chunk)
    fam = tiny_model_family
    params = {"weight": {"a": 0.6, "b": 0.3, "c": 0.8}, "density": {"a": 0.2, "b": 0.5, "c": 0.35},
              "gamma": {"a": 0.01, "b": 0.1}, "lambda": 0.9}
    context = make_context(f"{method}-{chunk}", stage_kind="merge", plugin=method)
    m = impl(method)
    out = m.run(context, inputs(fam, "a", "b", "c"), m.Params.model_validate(params))
    want = reference(fam, "abc", [0.6, 0.3, 0.8], [0.2, 0.5, 0.35], [0.01, 0.1, 0.01], lam=0.9,
                     ties=method == "breadcrumbs-ties")
    assert_same_state(out.path, want)
    assert bool(context.stats.notes["merge"]["sliced_count"]) == (chunk == 100)


def test_breadcrumbs_defaults_are_mergekits():
    for method in ("breadcrumbs", "breadcrumbs-ties"):
        p = impl(method).Params()
        assert (p.density, p.gamma, p.normalize, p.lambda_, p.weight) == (1.0, 0.01, False, 1.0, 1.0)
    with pytest.raises(ValidationError, match=r"gamma must be in \[0, 1\].*for model 'a'"):
        impl("breadcrumbs").Params.model_validate({"gamma": {"a": 1.5}})


def test_breadcrumbs_honours_gamma_and_density(tiny_model_family, make_context):
    """Each of its params changes the result (no param is silently dropped)."""
    fam = tiny_model_family
    m = impl("breadcrumbs")
    base = run(m, make_context, inputs(fam, "a", "b"), name="base", density=0.5)
    variants = {"gamma": {"gamma": 0.2}, "density": {"density": 0.3}, "weight": {"weight": {"a": 2.0}},
                "lambda": {"lambda": 0.5}, "normalize": {"normalize": True, "weight": 3.0}}
    name = "model.layers.0.mlp.up_proj.weight"
    for label, extra in variants.items():
        out = run(m, make_context, inputs(fam, "a", "b"), name=label, **{"density": 0.5, **extra})
        assert not torch.equal(state(out.path)[name], state(base.path)[name]), label


def test_breadcrumbs_with_gamma_zero_is_task_arithmetic_of_the_ties_trim(tiny_model_family,
                                                                          make_context):
    fam = tiny_model_family
    out = run(impl("breadcrumbs"), make_context, inputs(fam, "a", "b"), density=0.4, gamma=0.0)
    b, ms = state(fam["base"]), [state(fam[x]) for x in "ab"]
    want = {k: b[k] + torch.stack([arithmetic.magnitude_trim(m[k] - b[k], 0.4) for m in ms]).sum(0)
            for k in b}
    assert_same_state(out.path, want)
