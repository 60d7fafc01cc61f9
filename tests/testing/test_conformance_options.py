"""Every option of the conformance suite that docs/plugins.md documents exists, is the
one the kind's check function takes, and does what the guide says: each is passed to
a recording toy plugin here and seen in the inputs, params or folders the plugin got."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_conformance import ToyAligner, ToyEvaluator, ToyMerge, ToySelector, ToyTrainer

from engine.api import DataSource
from engine.core.stages import STAGE_KINDS
from engine.testing import check_options, check_plugin, write_text_file

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def _documented() -> dict[str, tuple[str, ...]]:
    """The guide's table of options per kind: ``| `kind` | `a`, `b` |``."""
    text = GUIDE.read_text()
    table = text[text.index("| kind | options |"):]
    table = table[:table.index("\n\n")]
    return {m.group(1): tuple(re.findall(r"`([^`]+)`", m.group(2)))
            for m in re.finditer(r"^\| `([a-z-]+)` \| (.*) \|$", table, re.M)}


def test_the_guide_lists_the_options_each_kind_takes():
    assert _documented() == {kind: check_options(kind) for kind in STAGE_KINDS}


def test_an_option_the_kind_does_not_take_is_a_type_error_naming_those_it_takes():
    with pytest.raises(TypeError, match=r"takes the options params, data, model, workdir; not models"):
        check_plugin(ToySelector(), "select-layers", models={"a": Path("x")})
    with pytest.raises(TypeError, match="not data"):
        check_plugin(ToyMerge(), "merge", data=[])


def _recording(cls):
    """``cls`` whose ``run`` records what it got: (inputs, params, output folder)."""

    class Recording(cls):
        __doc__ = cls.__doc__

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = []

        def run(self, context, inputs, params):
            self.calls.append((inputs, params, context.output_dir))
            return super().run(context, inputs, params)

    return Recording


def _paths(sources) -> list[Path]:
    return [Path(s.path) for s in sources]


@pytest.fixture
def text(tmp_path) -> list[DataSource]:
    return [DataSource(write_text_file(tmp_path / "mine.txt"), "text")]


def test_merge_options(tiny_model_family, tmp_path):
    toy = _recording(ToyMerge)()
    fam = tiny_model_family
    check_plugin(toy, "merge", params={"lambda": 0.75}, variations={"lambda": 0.25}, family=fam,
                 models=["b", "c"], workdir=tmp_path / "w")
    inputs, params, out = toy.calls[0]
    assert (Path(inputs.base.path), [(m.name, Path(m.path)) for m in inputs.models]) == \
        (fam["base"], [("b", fam["b"]), ("c", fam["c"])])
    assert params.lambda_ == 0.75 and out.parent == tmp_path / "w"
    assert any(p.lambda_ == 0.25 for _, p, _ in toy.calls)  # the variation, not the suite's 0.375


def test_trainer_options(tiny_model_family, text, tmp_path):
    toy = _recording(ToyTrainer)()
    check_plugin(toy, "adapt-language", params={"seed": 7}, data=text, layers=[2],
                 model=tiny_model_family["a"], workdir=tmp_path / "w")
    inputs, params, out = toy.calls[0]
    assert Path(inputs.model.path) == tiny_model_family["a"] and _paths(inputs.data) == _paths(text)
    assert inputs.layers.indices == [2] and params.seed == 7 and params.steps == 2
    assert out.parent == tmp_path / "w"


def test_aligner_options(tiny_model_family, text, tmp_path):
    toy = _recording(ToyAligner)()
    check_plugin(toy, "align", model=tiny_model_family["a"], base=tiny_model_family["base"],
                 params={}, data=text, workdir=tmp_path / "w")
    inputs, _, out = toy.calls[0]
    assert (Path(inputs.model.path), Path(inputs.base.path)) == (tiny_model_family["a"],
                                                                 tiny_model_family["base"])
    assert _paths(inputs.data) == _paths(text) and out.parent == tmp_path / "w"


def test_selector_options(tiny_model_family, text, tmp_path):
    toy = _recording(ToySelector)()
    check_plugin(toy, "select-layers", params={}, data=text, model=tiny_model_family["b"],
                 workdir=tmp_path / "w")
    inputs, _, out = toy.calls[0]
    assert Path(inputs.model.path) == tiny_model_family["b"] and _paths(inputs.data) == _paths(text)
    assert out.parent == tmp_path / "w"


def test_evaluator_options(tiny_model_family, text, tmp_path):
    toy = _recording(ToyEvaluator)()
    models = {"x": tiny_model_family["b"], "y": tiny_model_family["c"]}
    check_plugin(toy, "evaluate", params={}, data=text, models=models, workdir=tmp_path / "w")
    inputs, _, out = toy.calls[0]
    assert {m.name: Path(m.path) for m in inputs.models} == models
    assert _paths(inputs.data) == _paths(text) and out.parent == tmp_path / "w"


# --- the guide's test-kit tables ---------------------------------------------------------------


def _table(header: str) -> str:
    text = GUIDE.read_text()
    table = text[text.index(header):]
    return table[:table.index("\n\n")]


def test_the_guide_shows_each_builders_signature_as_it_is():
    import engine.testing
    from engine.cli.api_reference import plain_signature

    first = [row.split(" | ")[0] for row in _table("| builder | what it builds |").splitlines()[2:]]
    shown = [m for cell in first for m in re.findall(r"`([a-z_]+)(\(.*?\)(?: -> [^`]+)?)`", cell)]
    assert {name for name, _ in shown} == {
        "build_tokenizer", "build_tiny_llama", "build_family", "family_names", "shared_family",
        "make_stage_context", "write_text_file", "write_instructions_file", "write_choice_file",
        "run_recipe", "saved_activation_bytes"}
    for name, signature in shown:
        assert signature == plain_signature(getattr(engine.testing, name)), name


def test_the_guide_lists_every_fixture_with_what_it_returns():
    import ast

    import engine.testing.pytest_plugin as plugin

    tree = ast.parse(Path(plugin.__file__).read_text())
    fixtures = {n.name: n for n in tree.body
                if isinstance(n, ast.FunctionDef) and n.name.startswith("lingoforge_")}
    rows = _table("| fixture | scope | what it gives |")
    listed = set(re.findall(r"`(lingoforge_[a-z_]+)`", rows))
    assert listed == set(fixtures)
    assert ast.unparse(fixtures["lingoforge_tokenizer"].returns) == "PreTrainedTokenizerFast"
    assert "`lingoforge_tokenizer` | session | a `transformers.PreTrainedTokenizerFast`" in rows
