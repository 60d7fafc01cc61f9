"""Property tests (hypothesis): recipe reading fails only with the engine's own errors, and
the merge methods keep the invariants their definitions promise.

Example counts are kept small (25-50) so the file runs in seconds; hypothesis's database
replays any failure it found first on the next run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.cli.merge import cmd_merge  # noqa: F401 - the same path `engine merge` takes
from engine.core.errors import EngineError
from engine.merging.arithmetic import dare_ties, linear, slack_ties, task_arithmetic, ties
from engine.recipe.spec import apply_overrides, parse_recipe, read_recipe_data
from engine.recipe.validate import plan_recipe

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# --- recipe reading -------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                     st.sampled_from(["ct", "ties", "merge", "evaluate", "base", "../x", "/abs",
                                      "auto", "2024-13-45", "~", "*a", "&a", "!!binary", ""]))
_keys = st.one_of(st.sampled_from(["name", "stages", "models", "runtime", "stage", "plugin",
                                   "model", "models", "base", "data", "params", "path",
                                   "builtin", "threads", "steps", "weight", "format", "cache"]),
                  st.text(max_size=8))
_trees = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)

_RECIPE = {"name": "r", "models": {"base": {"path": "m"}},
           "stages": [{"name": "ct", "stage": "adapt-language", "plugin": "ct", "model": "base",
                       "data": {"path": "d.txt"}, "params": {"steps": 2}}]}


@st.composite
def _mutated_recipe(draw) -> str:
    """A valid-looking recipe with one subtree replaced by something arbitrary."""
    import copy

    data = copy.deepcopy(_RECIPE)
    path = draw(st.sampled_from([("name",), ("models",), ("models", "base"), ("stages",),
                                 ("stages", 0), ("stages", 0, "params"), ("stages", 0, "data"),
                                 ("stages", 0, "name"), ("runtime",)]))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = draw(_trees)
    return yaml.safe_dump(data)


_yamlish = st.one_of(
    st.text(max_size=200),                                   # anything at all
    _trees.map(lambda t: yaml.safe_dump(t)),                 # any YAML document
    _mutated_recipe(),                                       # almost a recipe
    st.lists(st.sampled_from(["name: x\n", "stages:\n", "  - ", "&a ", "*a ", "[", "]", "{",
                              "}", ": ", "- ", "'", '"', "\t", "\n", "!!python/object:os.system ",
                              "<<: *a\n", "? ", "%YAML 1.1\n", "---\n", "...\n"]),
             max_size=30).map("".join),                      # YAML syntax soup
)


@pytest.fixture(scope="module")
def scratch(tiny_model) -> Path:
    """A folder where the almost-recipes' model 'm' and data 'd.txt' exist, so that
    validation goes past the file checks into params, references and shapes."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m").symlink_to(tiny_model)
        (Path(d) / "d.txt").write_text("some text\nmore text\n")
        yield Path(d)


@FAST
@given(text=_yamlish, overrides=st.lists(st.text(max_size=30), max_size=2))
def test_reading_any_text_raises_only_engine_errors(scratch, text, overrides):
    """read, --set, parse and validate: whatever the text, only EngineError comes out."""
    f = scratch / "recipe.yaml"
    f.write_text(text, encoding="utf-8", errors="surrogatepass") if _encodable(text) else \
        f.write_bytes(text.encode("utf-8", "replace"))
    try:
        data = read_recipe_data(f)
        apply_overrides(data, overrides)
        plan_recipe(parse_recipe(data, str(f)), scratch, str(f))
    except EngineError as exc:
        assert str(exc).strip(), "an error with no message"


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@settings(max_examples=25, deadline=None)
@given(raw=st.binary(max_size=300))
def test_reading_any_bytes_raises_only_engine_errors(scratch, raw):
    f = scratch / "bytes.yaml"
    f.write_bytes(raw)
    try:
        parse_recipe(read_recipe_data(f), str(f))
    except EngineError:
        pass


# --- merge invariants ------------------------------------------------------------------------------


@st.composite
def _tensor(draw, shape=None):
    """A small float32 tensor; often with exact magnitude ties and zeros (what trims and
    sign elections find hardest)."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        return torch.randint(-3, 4, shape, generator=g).float(), shape
    return torch.randn(shape, generator=g), shape


_weights = st.floats(0.1, 3.0)
_density = st.floats(0.05, 1.0)


@st.composite
def _merge_case(draw, min_models: int = 1, max_models: int = 4):
    base, shape = draw(_tensor())
    m = draw(st.integers(min_models, max_models))
    models = [draw(_tensor(shape))[0] for _ in range(m)]
    weights = [draw(_weights) for _ in range(m)]
    densities = [draw(_density) for _ in range(m)]
    return base, models, weights, densities


def _all_methods(base, models, weights, densities):
    """Every base-relative method on the same inputs (slack-TIES protects the last model)."""
    return {
        "task-arithmetic": task_arithmetic(base, models, weights),
        "ties": ties(base, models, weights, densities),
        "dare-ties": dare_ties(base, models, weights, densities, seed=3, tensor_name="t"),
        "slack-ties": slack_ties(base, models, weights, densities, protect=len(models) - 1,
                                 slack=0.5),
    }


@FAST
@given(case=_merge_case())
def test_zero_task_vectors_give_the_base_exactly(case):
    base, models, weights, densities = case
    same = [base.clone() for _ in models]
    for method, out in _all_methods(base, same, weights, densities).items():
        assert torch.equal(out, base), method


@FAST
@given(case=_merge_case(), copies=st.integers(1, 4))
def test_a_model_merged_with_itself_is_itself(case, copies):
    base, models, weights, _ = case
    x = models[0]
    xs, ws = [x] * copies, weights[:1] * copies
    norm = sum(ws)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert torch.allclose(linear(xs, ws), x, **tol)
    assert torch.allclose(task_arithmetic(base, xs, [w / norm for w in ws]), x, **tol)
    assert torch.allclose(task_arithmetic(base, xs, ws, normalize=True), x, **tol)
    assert torch.allclose(ties(base, xs, ws, [1.0] * copies), x, **tol)  # nothing trimmed


@FAST
@given(case=_merge_case(min_models=2), order=st.randoms(use_true_random=False))
def test_order_of_inputs_does_not_matter(case, order):
    """linear, task arithmetic and TIES are symmetric in their inputs (DARE's drop masks are
    seeded per input position and slack-TIES singles one input out: no such promise)."""
    base, models, weights, densities = case
    perm = list(range(len(models)))
    order.shuffle(perm)

    def permuted(xs):
        return [xs[i] for i in perm]

    tol = {"rtol": 1e-5, "atol": 1e-5}
    assert torch.allclose(linear(models, weights), linear(permuted(models), permuted(weights)),
                          **tol)
    assert torch.allclose(task_arithmetic(base, models, weights),
                          task_arithmetic(base, permuted(models), permuted(weights)), **tol)
    assert torch.allclose(ties(base, models, weights, densities),
                          ties(base, permuted(models), permuted(weights), permuted(densities)),
                          **tol)


@FAST
@given(case=_merge_case(), scale=st.floats(0.25, 4.0))
def test_normalized_methods_ignore_a_common_weight_scale(case, scale):
    """With ``normalize``, only the weights' ratios matter (TIES divides by the sum of the
    agreeing weights, linear by the sum of all)."""
    base, models, weights, densities = case
    scaled = [w * scale for w in weights]
    tol = {"rtol": 1e-4, "atol": 1e-5}
    assert torch.allclose(linear(models, weights), linear(models, scaled), **tol)
    assert torch.allclose(task_arithmetic(base, models, weights, normalize=True),
                          task_arithmetic(base, models, scaled, normalize=True), **tol)
    assert torch.allclose(ties(base, models, weights, densities),
                          ties(base, models, scaled, densities), **tol)


@FAST
@given(case=_merge_case(), lam=st.floats(0.0, 3.0))
def test_lambda_scales_the_merged_task_vector(case, lam):
    base, models, weights, densities = case
    tol = {"rtol": 1e-4, "atol": 1e-5}
    for method in (task_arithmetic, ties):
        extra = () if method is task_arithmetic else (densities,)
        one = method(base, models, weights, *extra) - base
        scaled = method(base, models, weights, *extra, lam=lam) - base
        assert torch.allclose(scaled, lam * one, **tol), method.__name__


@FAST
@given(case=_merge_case())
def test_merging_never_reads_nan_out_of_finite_inputs(case):
    base, models, weights, densities = case
    for method, out in _all_methods(base, models, weights, densities).items():
        assert torch.isfinite(out).all(), method


# --- the same invariant through the streaming engine, on model folders ---------------------------


@pytest.mark.parametrize("method", ["linear", "task-arithmetic", "ties", "dare-ties",
                                    "slack-ties"])
def test_merging_a_model_folder_onto_itself_gives_it_back_bitwise(tmp_path, tiny_model, method):
    from helpers import state

    from engine.cli.commands import main

    out = tmp_path / "out"
    base = [] if method == "linear" else ["--base", str(tiny_model)]
    assert main(["merge", "--method", method, *base, "--model", f"a={tiny_model}",
                 "--model", f"b={tiny_model}", "--out", str(out)]) == 0
    got, want = state(out), state(tiny_model)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), (method, name)
