"""Small helpers shared by test modules (import as ``from helpers import ...``)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import torch

from engine.testing.conformance import model_state


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, in memory (the reference streamed outputs must equal)."""
    return model_state(folder)


def write_choice_task(root: Path, rows: list[tuple[str, list[str], int]],
                      metrics: tuple[str, ...] = ("acc", "acc_norm")) -> Path:
    """An lm-evaluation-harness multiple-choice task read from a local jsonl (offline):
    ``rows`` are (prompt, choices, label); returns the folder holding ``tiny_mc.yaml``."""
    data = root / "items.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": p, "choices": c, "label": y})
                              for p, c, y in rows) + "\n")
    folder = root / "tasks"
    folder.mkdir()
    metric_list = "\n".join(f"  - {{metric: {m}, aggregation: mean, higher_is_better: true}}"
                            for m in metrics)
    (folder / "tiny_mc.yaml").write_text(textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{prompt}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        target_delimiter: ""
        metric_list:
        """) + metric_list + "\n")
    return folder


# --- small recipes ------------------------------------------------------------------------


def write_recipe(path: Path, name: str, models: dict[str, Path | str], stages: list[dict]) -> Path:
    """A recipe file written from plain data: ``models`` maps names to folders."""
    import yaml

    body = {"name": name, "models": {k: {"path": str(v)} for k, v in models.items()},
            "stages": stages}
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def ct_stage(data: Path | str, *, name: str = "ct", model: str = "base", **params) -> dict:
    """A two-step ``ct`` stage on ``data`` (batch 2, 16 tokens); ``params`` add or override."""
    return {"name": name, "stage": "adapt-language", "plugin": "ct", "model": model,
            "data": {"path": str(data)}, "params": {"steps": 2, "batch_size": 2, "seq_len": 16, **params}}


def line_count_stage(data: Path | str, models: list[str], *, name: str = "scores") -> dict:
    """An evaluate stage of the test plugin's ``line-count`` evaluator (no weights read)."""
    return {"name": name, "stage": "evaluate", "plugin": "line-count", "models": list(models),
            "data": {"path": str(data)}}


def ties_recipe(path: Path, family: dict[str, Path], name: str, **params) -> Path:
    """One ``ties`` merge of the tiny family's model ``a`` onto its ``base``, as stage ``merged``."""
    stage = {"name": "merged", "stage": "merge", "plugin": "ties", "base": "base", "models": ["a"]}
    if params:
        stage["params"] = params
    return write_recipe(path, name, {"base": family["base"], "a": family["a"]}, [stage])


# --- merges --------------------------------------------------------------------------------


def merge_impl(name: str):
    """The registered merge method ``name``."""
    from engine.registry.manager import implementations

    return implementations()["merge"][name].impl


def run_merge_method(tmp_path: Path, name: str, params: dict, base: Path | None,
                     models: dict[str, Path], stage: str = "out"):
    """Run merge method ``name`` as a stage (quiet context): ``(artifact, context)``."""
    from engine.api import ModelArtifact, StageInputs
    from engine.testing.conformance import quiet_context

    impl = merge_impl(name)
    context = quiet_context(tmp_path, stage, "merge", name)
    inputs = StageInputs(base=ModelArtifact("base", base) if base is not None else None,
                         models=[ModelArtifact(n, p) for n, p in models.items()])
    return impl.run(context, inputs, impl.Params.model_validate(params)), context
