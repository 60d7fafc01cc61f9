"""The plugin guide's example (docs/examples/lingoforge_median.py) works as documented."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.recipe.spec import load_recipe
from engine.recipe.validate import plan_recipe
from engine.registry.manager import pm
from engine.run.runner import Runner

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


@pytest.fixture
def median_plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import lingoforge_median

    pm.register(lingoforge_median, name="median-plugin")
    yield lingoforge_median
    pm.unregister(name="median-plugin")
    sys.modules.pop("lingoforge_median", None)


def _tensor(folder: Path, name: str) -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), "pt") as fh:
        return fh.get_tensor(name)


def test_median_plugin_runs_in_a_recipe(median_plugin, tiny_model_family, tmp_path):
    fam = tiny_model_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: median-demo
        models:
          base: {{path: {fam['base']}}}
          a: {{path: {fam['a']}}}
          b: {{path: {fam['b']}}}
          c: {{path: {fam['c']}}}
        stages:
          - name: merged
            stage: merge
            plugin: median
            base: base
            models: [a, b, c]
            params: {{lambda: 0.5}}
        """))
    plan = plan_recipe(load_recipe(recipe), tmp_path, str(recipe))
    Runner(plan, tmp_path / "work").run()
    name = "model.layers.1.mlp.up_proj.weight"
    base = _tensor(fam["base"], name)
    deltas = torch.stack([_tensor(fam[m], name) - base for m in "abc"])
    expected = base + 0.5 * deltas.median(dim=0).values
    torch.testing.assert_close(_tensor(tmp_path / "work" / "merged", name), expected)
