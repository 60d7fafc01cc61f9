"""The init methods of new vocabulary rows: the plugin interface (built-ins, a third party's,
broken ones, bad params and bad rows) and what each built-in computes, on real tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import OTHER_TEXT
from safetensors.torch import load_file

from engine.api import PluginParams, hookimpl
from engine.core.errors import ModelLoadError
from engine.models.tokenizer.extend import extend_tokenizer
from engine.models.tokenizer.inits import get_init, init_methods, parse_init_params
from engine.models.tokenizer.sparse import omp, sparsemax
from engine.models.tokenizer.transplant import transplant_tokenizer
from engine.models.tokenizer.vocabmap import Vocabulary
from engine.registry.info import plugins_info
from engine.registry.manager import pm


def _rows(folder):
    w = load_file(folder / "model.safetensors")
    return w["model.embed_tokens.weight"], w.get("lm_head.weight")


def _new_ids(folder):
    meta = json.loads((folder / "lingoforge.json").read_text())
    return [i for a, b in meta["new_rows"] for i in range(a, b)], meta


def test_the_builtins_are_registered_and_an_unknown_name_lists_them():
    assert {"mean", "random", "omp", "focus"} <= set(init_methods())
    with pytest.raises(ModelLoadError, match=r"no init method named 'foucs'; available: .*focus.*"
                                             r"did you mean 'focus'"):
        get_init("foucs")


def test_init_params_parse_as_yaml_scalars_and_bad_ones_name_the_field(vocab_models, tmp_path):
    assert parse_init_params(["k=8", "mix=0.25", "space=aux"]) == {"k": 8, "mix": 0.25, "space": "aux"}
    with pytest.raises(ModelLoadError, match="--init-param 'k8': write KEY=VALUE"):
        parse_init_params(["k8"])
    with pytest.raises(ModelLoadError, match=r"--init-param k: Input should be greater than or equal to 1 "
                                             r"\(init method 'omp'\)"):
        extend_tokenizer(vocab_models["model"], OTHER_TEXT, tmp_path / "out", new_tokens=20, init="omp",
                         init_params={"k": 0})
    with pytest.raises(ModelLoadError, match="--init-param colour: Extra inputs are not permitted"):
        extend_tokenizer(vocab_models["model"], OTHER_TEXT, tmp_path / "out", new_tokens=20, init="mean",
                         init_params={"colour": 1})
    assert not (tmp_path / "out").exists()


def test_mean_is_the_mean_of_the_pieces_for_input_and_head(vocab_models, tmp_path):
    src = vocab_models["model"]
    out = extend_tokenizer(src, OTHER_TEXT, tmp_path / "ext", new_tokens=40, init="mean").folder
    old_in, old_out = _rows(src)
    new_in, new_out = _rows(out)
    old = Vocabulary.from_spec(json.loads((src / "tokenizer.json").read_text()), "old")
    new = Vocabulary.from_spec(json.loads((out / "tokenizer.json").read_text()), "new")
    ids, meta = _new_ids(out)
    assert meta["init"] == "mean" and len(ids) == meta["added_tokens"] > 0
    torch.testing.assert_close(new_in[: old_in.shape[0]], old_in, rtol=0, atol=0)
    for i in ids:
        pieces = old.split(new.surfaces[i])
        assert len(pieces) > 1
        torch.testing.assert_close(new_in[i], old_in[pieces].mean(0))
        torch.testing.assert_close(new_out[i], old_out[pieces].mean(0))


def test_random_draws_from_the_old_rows_distribution_by_seed(vocab_models, tmp_path):
    src = vocab_models["model"]
    a = extend_tokenizer(src, OTHER_TEXT, tmp_path / "a", new_tokens=60, init="random", seed=1).folder
    b = extend_tokenizer(src, OTHER_TEXT, tmp_path / "b", new_tokens=60, init="random", seed=1).folder
    c = extend_tokenizer(src, OTHER_TEXT, tmp_path / "c", new_tokens=60, init="random", seed=2).folder
    ids, _ = _new_ids(a)
    (ra, ha), (rb, _), (rc, _) = _rows(a), _rows(b), _rows(c)
    assert torch.equal(ra[ids], rb[ids]) and not torch.equal(ra[ids], rc[ids])
    old_in, old_out = _rows(src)
    assert not torch.equal(ra[ids], ha[ids])  # the head rows are drawn apart from the input rows
    for new, old in ((ra[ids], old_in), (ha[ids], old_out)):
        assert abs(float(new.std() / old.std()) - 1) < 0.25


def test_omp_in_a_donor_space_recovers_a_sparse_combination_exactly(vocab_models, tmp_path):
    """A donor whose new tokens' rows are known combinations of shared tokens' rows: OMP
    finds the combination, and the model's new row is the same combination of its own rows."""
    from safetensors.torch import save_file

    src = vocab_models["model"]
    donor = tmp_path / "donor"
    donor.mkdir()
    for f in vocab_models["donor"].iterdir():
        if f.name != "model.safetensors":
            (donor / f.name).write_bytes(f.read_bytes())
    weights = load_file(vocab_models["donor"] / "model.safetensors")
    old = Vocabulary.from_spec(json.loads((src / "tokenizer.json").read_text()), "old")
    new = Vocabulary.from_spec(json.loads((donor / "tokenizer.json").read_text()), "new")
    by_surface = {s: i for i, s in old.surfaces.items() if s is not None}
    shared = {i: by_surface[s] for i, s in new.surfaces.items() if s is not None and s in by_surface}
    fresh = [i for i in new.surfaces if i not in shared and new.surfaces[i] is not None]
    assert len(shared) > 50 and len(fresh) > 20
    old_in, old_out = _rows(src)
    gen = torch.Generator().manual_seed(0)
    keys = sorted(shared)
    want = {}
    for name, old_rows in (("model.embed_tokens.weight", old_in), ("lm_head.weight", old_out)):
        donor_rows = torch.randn(weights[name].shape[0], 48, generator=gen)
        for i in fresh:  # the donor's row of a new token: 0.7 a + 0.4 b of two shared tokens
            a, b = (keys[j] for j in torch.randperm(len(keys), generator=gen)[:2].tolist())
            donor_rows[i] = 0.7 * donor_rows[a] + 0.4 * donor_rows[b]
            want[(name, i)] = 0.7 * old_rows[shared[a]] + 0.4 * old_rows[shared[b]]
        weights[name] = donor_rows
    save_file(weights, str(donor / "model.safetensors"), metadata={"format": "pt"})
    out = transplant_tokenizer(src, tmp_path / "out", tokenizer=donor, init="omp",
                               init_params={"k": 4}).folder
    assert json.loads((out / "lingoforge.json").read_text())["init_notes"]["space"] == "donor"
    new_in, new_out = _rows(out)
    for (name, i), row in want.items():
        got = new_in[i] if name == "model.embed_tokens.weight" else new_out[i]
        torch.testing.assert_close(got, row, atol=1e-4, rtol=1e-4)


def test_omp_space_donor_without_a_donor_is_refused(vocab_models, tmp_path):
    with pytest.raises(Exception, match="space 'donor' needs a tokenizer folder with model weights"):
        extend_tokenizer(vocab_models["model"], OTHER_TEXT, tmp_path / "o", new_tokens=20, init="omp",
                         init_params={"space": "donor"})


@pytest.mark.parametrize("method", ["focus", "omp"])
def test_aux_methods_are_reproducible_and_combine_old_rows(vocab_models, tmp_path, method):
    pytest.importorskip("gensim")
    src = vocab_models["model"]
    params = {"fallback": "mean", "min_count": 1}
    a = extend_tokenizer(src, OTHER_TEXT, tmp_path / "a", new_tokens=60, init=method, init_params=params)
    b = extend_tokenizer(src, OTHER_TEXT, tmp_path / "b", new_tokens=60, init=method, init_params=params)
    ids, meta = _new_ids(a.folder)
    notes = meta["init_notes"]
    assert notes["old_tokens_with_vectors"] > 5 and notes["mean_old_tokens_used"] >= 1
    (ra, ha), (rb, hb) = _rows(a.folder), _rows(b.folder)
    assert torch.equal(ra, rb) and torch.equal(ha, hb)
    old_in, _ = _rows(src)
    mean = extend_tokenizer(src, OTHER_TEXT, tmp_path / "m", new_tokens=60, init="mean").folder
    rm, _ = _rows(mean)
    assert not torch.allclose(ra[ids], rm[ids])  # not the mean in disguise
    if method == "focus":  # sparsemax weights: each row a convex combination of old rows
        lo, hi = old_in.min(0).values, old_in.max(0).values
        assert ((ra[ids] >= lo - 1e-5) & (ra[ids] <= hi + 1e-5)).all()


def test_focus_without_text_is_a_clear_error(vocab_models, tmp_path):
    pytest.importorskip("gensim")
    with pytest.raises(ModelLoadError, match="learned on the target text, and there is none"):
        transplant_tokenizer(vocab_models["model"], tmp_path / "o", tokenizer=vocab_models["donor"],
                             init="focus")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.tmp-*"))


def test_aux_corpus_mixes_old_and_new_splits(vocab_models, tmp_path):
    from engine.models.tokenizer import auxiliary
    from engine.models.tokenizer.inits import InitProblem
    from engine.models.tokenizer.vocabmap import key_of

    spec = json.loads((vocab_models["model"] / "tokenizer.json").read_text())
    old = Vocabulary.from_spec(spec, "old")
    new = Vocabulary.from_spec(json.loads((vocab_models["donor"] / "tokenizer.json").read_text()), "new")
    problem = InitProblem(torch.zeros(old.size, 4), None, [], {}, old.backend, new.backend,
                          texts=OTHER_TEXT[:4], surface_key=key_of, old_split=old.split,
                          new_split=new.split, old_surfaces=old.surfaces, new_surfaces=new.surfaces)
    only_new = auxiliary.aux_corpus(problem, 0.0, 0)
    assert len(only_new) == 4
    assert only_new[0] == [key_of(new.surfaces[i]) for i in new.backend.encode(OTHER_TEXT[0]).ids]
    both = auxiliary.aux_corpus(problem, 1.0, 0)
    assert both[:4] == only_new
    assert both[4] == [key_of(old.surfaces[i]) for i in old.backend.encode(OTHER_TEXT[0]).ids]


def test_sparsemax_and_omp():
    w = sparsemax(np.array([0.9, 0.8, -0.5, 0.1]))
    assert w.sum() == pytest.approx(1) and w[2] == 0 and w[3] == 0 and w[0] > w[1] > 0
    assert sparsemax(np.array([3.0, 0.0]))[1] == 0
    rng = np.random.default_rng(0)
    atoms = rng.normal(size=(40, 30))
    y = 2 * atoms[:, 4] - 0.5 * atoms[:, 17]
    idx, coef = omp(atoms, y, 5)
    assert sorted(idx.tolist()) == [4, 17]
    assert dict(zip(idx.tolist(), coef.tolist())) == pytest.approx({4: 2.0, 17: -0.5})


# --- a third party's method ------------------------------------------------------------------


class Zeros:
    """Rows of zeros (a third party's method)."""

    name = "zeros"

    class Params(PluginParams):
        value: float = 0.0

    def init_rows(self, problem, params):
        from engine.models.tokenizer.inits import InitRows

        n = len(problem.new_tokens)
        rows = torch.full((n, problem.hidden), params.value)
        return InitRows(rows, None if problem.tied else rows.clone(), {"value": params.value})


class ShadowMean(Zeros):
    name = "mean"


class WrongShape(Zeros):
    name = "wrong-shape"

    def init_rows(self, problem, params):
        from engine.models.tokenizer.inits import InitRows

        return InitRows(torch.zeros(1, 3), torch.zeros(1, 3))


class ThirdParty:
    @hookimpl
    def register_embedding_inits(self, register):
        register(Zeros())
        register(ShadowMean())
        register(WrongShape())


class Broken:
    @hookimpl
    def register_embedding_inits(self, register):
        register(object())


@pytest.fixture
def third_party():
    pm.register(ThirdParty(), name="tp-inits")
    pm.register(Broken(), name="tp-broken-inits")
    try:
        yield
    finally:
        pm.unregister(name="tp-inits")
        pm.unregister(name="tp-broken-inits")


def test_a_third_party_method_runs_and_wins_a_bare_name(vocab_models, tmp_path, third_party, capsys):
    src = vocab_models["model"]
    out = extend_tokenizer(src, OTHER_TEXT, tmp_path / "z", new_tokens=20, init="zeros",
                           init_params={"value": 0.5}).folder
    ids, meta = _new_ids(out)
    assert meta["init_notes"] == {"value": 0.5}
    new_in, new_out = _rows(out)
    assert (new_in[ids] == 0.5).all() and (new_out[ids] == 0.5).all()
    assert "'tp-broken-inits'" in capsys.readouterr().err  # reported, skipped; the rest work
    listed = {r["name"]: r["registers"].get("embedding-init", []) for r in plugins_info()}
    assert [i["name"] for i in listed["tp-inits"]] == ["zeros", "mean", "wrong-shape"]
    assert [i["name"] for i in listed["engine_plugins.init_focus"]] == ["focus"]
    assert listed["engine_plugins.init_focus"][0]["requires"] == ["gensim"]
    assert isinstance(get_init("mean"), ShadowMean)  # a third party wins the bare name
    builtin = get_init("engine_plugins.init_mean:mean")
    assert type(builtin).__name__ == "MeanInit"
    with pytest.raises(ModelLoadError, match=r"init method 'wrong-shape': input rows have shape \(1, 3\), "
                                             r"expected \(\d+, 64\)"):
        extend_tokenizer(src, OTHER_TEXT, tmp_path / "w", new_tokens=20, init="wrong-shape")
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".w.tmp-*"))


def test_a_tied_model_gets_no_head_rows(vocab_models, tmp_path, third_party):
    src = vocab_models["tied"]
    for method in ("mean", "random", "zeros"):
        out = extend_tokenizer(src, OTHER_TEXT, tmp_path / method, new_tokens=20, init=method).folder
        weights = load_file(out / "model.safetensors")
        assert "lm_head.weight" not in weights
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def _reference_omp(a, y, k, tol=1e-6):
    """Textbook matching pursuit: residuals in the data space, a least-squares refit each step."""
    import numpy as np

    norms = np.maximum(np.linalg.norm(a, axis=0), 1e-12)
    residual, chosen, coef = y.copy(), [], np.zeros(0)
    for _ in range(min(k, a.shape[1])):
        scores = np.abs(a.T @ residual) / norms
        scores[chosen] = -1.0
        chosen.append(int(np.argmax(scores)))
        coef, *_ = np.linalg.lstsq(a[:, chosen], y, rcond=None)
        residual = y - a[:, chosen] @ coef
        if np.linalg.norm(residual) <= tol * max(float(np.linalg.norm(y)), 1e-12):
            break
    return np.asarray(chosen), coef


def test_omp_batch_picks_what_omp_picks_token_by_token():
    import numpy as np

    from engine.models.tokenizer.sparse import omp_batch

    def omp(a, y, k):  # the independent reference, not the engine's one-target wrapper
        return _reference_omp(a, y, k)

    rng = np.random.default_rng(0)
    atoms = rng.standard_normal((200, 32))
    near = np.stack([rng.choice(200, 24, replace=False) for _ in range(300)])
    targets = rng.standard_normal((300, 32))
    # every third target is exactly 3 of its candidates: its fit stops after 3 picks
    exact = rng.standard_normal((100, 3))
    targets[::3] = np.einsum("tk,tkd->td", exact, atoms[near[::3, :3]])
    idx, coef = omp_batch(atoms, near, targets, k=6, block=64)
    for t in range(300):
        chosen, want = omp(atoms[near[t]].T, targets[t], 6)
        n = len(chosen)
        assert list(idx[t, :n]) == list(near[t][chosen]) and (idx[t, n:] == -1).all()
        np.testing.assert_allclose(coef[t, :n], want, rtol=1e-9, atol=1e-9)
        assert (coef[t, n:] == 0).all()
        if t % 3 == 0:
            assert n == 3


@pytest.mark.parametrize("name", ["mean", "random", "omp", "focus"])
def test_every_builtin_init_method_passes_the_conformance_check(name, tmp_path):
    from engine.models.tokenizer.inits import get_init
    from engine.testing import check_embedding_init

    # omp has no donor here: its default space is the auxiliary one (gensim), as focus's
    report = check_embedding_init(get_init(name), folder=tmp_path)
    assert report.passed == ["declares its parts", "a row per new token", "leaves its inputs alone",
                             "reproducible", "its rows make a model that runs"]


def test_the_conformance_check_names_a_method_that_breaks_a_property(tmp_path):
    import torch as _torch

    from engine.core.params import PluginParams
    from engine.models.tokenizer.inits import InitRows
    from engine.testing import ConformanceError, check_embedding_init

    class Sloppy:
        name = "sloppy"

        class Params(PluginParams):
            pass

        def init_rows(self, problem, params):  # head rows forgotten, and not reproducible
            return InitRows(_torch.randn(len(problem.new_tokens), problem.hidden), None)

    with pytest.raises(ConformanceError, match="'sloppy' breaks 'a row per new token': untied head: no head rows"):
        check_embedding_init(Sloppy(), folder=tmp_path)

    class Scribbler(Sloppy):
        name = "scribbler"

        def init_rows(self, problem, params):  # writes into the embedding it was handed
            problem.old_input.mul_(0)
            rows = _torch.zeros(len(problem.new_tokens), problem.hidden)
            return InitRows(rows, None if problem.tied else rows.clone())

    with pytest.raises(ConformanceError, match="'scribbler' breaks 'leaves its inputs alone'"):
        check_embedding_init(Scribbler(), folder=tmp_path / "b")
