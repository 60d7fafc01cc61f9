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
