"""The stage kinds table is the one place a stage kind is defined: the recipe schema,
validation, the hookspecs, the runner and the docs read it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from engine.core.artifacts import ARTIFACT_TYPES
from engine.core.stages import INPUT_KEYS, STAGE_KINDS, model_kinds, training_kinds
from engine.recipe.schema import stage_kinds_table
from engine.recipe.spec import INPUT_RULES, StageSpec
from engine.registry import hookspecs


def test_every_consumer_reads_the_table():
    assert set(INPUT_RULES) == set(STAGE_KINDS)
    assert StageSpec.model_fields["stage"].annotation.__args__ == tuple(STAGE_KINDS)
    for kind in STAGE_KINDS.values():
        assert INPUT_RULES[kind.name] == (set(kind.required), set(kind.optional))
        assert kind.accepted <= set(INPUT_KEYS)
        assert kind.artifact in ARTIFACT_TYPES
        spec = getattr(hookspecs, kind.hook)
        assert spec.__doc__.startswith(f"Register *{kind.name}* implementations")
        assert any(f"`{kind.name}`" in row and f"`{kind.hook}(register)`" in row
                   for row in stage_kinds_table())
    assert model_kinds() == {"adapt-language", "merge", "align"}
    assert training_kinds() == {"adapt-language", "align"}
    assert {k.name for k in STAGE_KINDS.values() if not k.loads_models} == {"merge"}


ONE_ENTRY = textwrap.dedent('''
    import json, sys
    from pathlib import Path
    from engine.core import stages
    # the one entry (before anything else of the engine is imported)
    kind = stages._kind("translate", "register_translators", {"model", "data"}, set(), "model",
                        False, "translate a model's vocabulary", "A test kind.")
    stages.STAGE_KINDS[kind.name] = kind

    import shutil
    from engine.api import ModelArtifact, PluginParams, hookimpl
    from engine.registry.manager import pm
    from engine.recipe import load_recipe
    from engine.run.runner import Runner
    from engine.recipe.validate import plan_recipe

    class Copy:
        name = "copy"
        Params = PluginParams
        def run(self, context, inputs, params):
            for item in inputs.model.path.iterdir():
                if item.is_file():
                    shutil.copy2(item, context.output_dir / item.name)
            return ModelArtifact(context.stage_name, context.output_dir)

    class Plugin:
        @hookimpl
        def register_translators(self, register):
            register(Copy())

    pm.register(Plugin(), name="translator-plugin")
    work = Path(sys.argv[1])
    (work / "data.txt").write_text("a line\\n")
    (work / "recipe.yaml").write_text(\"\"\"name: new-kind
    models:
      base: {builtin: tiny-base}
    stages:
      - {name: translated, stage: translate, plugin: copy, model: base, data: {path: data.txt}}
      - {name: scores, stage: evaluate, plugin: perplexity, models: [translated], data: {path: data.txt}}
    \"\"\")
    plan = plan_recipe(load_recipe(work / "recipe.yaml", []), work, "recipe.yaml")
    report = Runner(plan, work / "run").run()
    print(json.dumps([s["stage"] for s in report["stages"]]))
''')


def test_a_new_stage_kind_is_one_table_entry(tmp_path):
    """A kind added to the table alone (no other engine change) gets its hook, is
    accepted by the recipe schema and validation, runs, and its model feeds a later
    stage."""
    script = tmp_path / "new_kind.py"
    script.write_text(ONE_ENTRY)
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1] == '["translate", "evaluate"]'
    assert (tmp_path / "run" / "translated" / "config.json").is_file()
