"""README.md model cards for the model folders stages write.

A card says what produced the model (recipe, stage, kind, plugin, engine version), from
what (each input's name, folder and fingerprint; data files with language, weight and
records), with which params, at what cost (wall time, tokens, trainable and forward
parameters) and the metrics the stage itself recorded (training loss, ...). Evaluation
results live in the evaluate stages' metrics.json and the run's report.md, which the card
names. The YAML front matter is what the Hugging Face hub reads (library, tags). A
README.md a plugin wrote itself is kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CARD_FILE = "README.md"

__all__ = ["CARD_FILE", "card_text", "write_card"]


def _value(v: Any) -> str:
    return json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)


def card_text(*, recipe: str, stage: Any, record: Mapping[str, Any],
              inputs: Mapping[str, tuple[str, str]], version: str) -> str:
    """The card of the model a stage produced. ``stage`` is the PlannedStage; ``inputs``
    maps an input name to ``(folder, fingerprint)``; ``record`` is its report.json entry."""
    spec = stage.spec
    front = {"library_name": "transformers",
             "tags": ["lingoforge", spec.stage, spec.plugin]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {stage.name}", "",
             f"Made by lingoforge {version}: stage `{stage.name}` ({spec.stage}, plugin "
             f"`{spec.plugin}`) of recipe `{recipe}`.", ""]
    refs = spec.references()
    if refs:
        lines += ["## Inputs", "", "| role | name | folder | fingerprint |", "|---|---|---|---|"]
        for role, names in refs.items():
            for n in names:
                folder, fp = inputs.get(n, ("-", "-"))
                lines.append(f"| {role} | {n} | {folder} | {fp} |")
        lines.append("")
    if stage.data:
        lines += ["## Data", "", "| file | format | language | weight | records |",
                  "|---|---|---|---|---|"]
        for d in stage.data:
            lines.append(f"| {d.path} | {d.format} | {d.language or '-'} | {d.weight} | "
                         f"{d.records if d.records is not None else 'all'} |")
        lines.append("")
    params = stage.params.model_dump(mode="json") if hasattr(stage.params, "model_dump") else {}
    if params:
        lines += ["## Params", "", "| param | value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in params.items()]
        lines.append("")
    search = (record.get("notes") or {}).get("search")
    if isinstance(search, Mapping) and isinstance(search.get("chosen"), Mapping):
        chosen, counts = search["chosen"], search.get("counts") or {}
        values = ", ".join(f"`{k}` {v:.4g}" for k, v in (chosen.get("metrics") or {}).items()
                           if isinstance(v, (int, float)))
        lines += ["## Search", "",
                  f"These weights are the candidate a merge search chose: trial {chosen.get('number')} "
                  f"of study `{search.get('study')}` ({len(search.get('trials') or [])} trials: "
                  f"{counts.get('complete', 0)} complete, {counts.get('pruned', 0)} pruned, "
                  f"{counts.get('fail', 0)} failed; {search.get('search_s')} s), method "
                  f"`{chosen.get('method')}`, scored on the search's dev data: {values or '-'}.", "",
                  "| searched param | chosen value |", "|---|---|"]
        lines += [f"| {k} | {_value(v)} |" for k, v in (chosen.get("params") or {}).items()]
        lines += ["", "Its scores on held-out test data are those of the recipe's evaluate stages.", ""]
    lines += ["## Cost", "", "| wall time s | tokens | trainable params | forward params |",
              "|---|---|---|---|",
              f"| {record.get('wall_time_s', '-')} | {record.get('tokens') or 0} | "
              f"{record.get('trainable_params') or '-'} | {record.get('forward_params') or '-'} |", ""]
    metrics = {k: v for k, v in (record.get("metrics") or {}).items()
               if isinstance(v, (int, float, str))}
    if metrics:
        lines += ["## Metrics recorded by the stage", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["Scores from the recipe's evaluate stages are in their `metrics.json` and in the "
              "run's `report.md`. The fingerprint of this output is "
              f"`{record.get('fingerprint', '-')}`.", ""]
    return "\n".join(lines)


def write_card(folder: Path, **kwargs: Any) -> Path | None:
    """Write ``folder``/README.md unless the plugin wrote one; the path, or None when kept."""
    path = Path(folder) / CARD_FILE
    if path.exists():
        return None
    path.write_text(card_text(**kwargs), encoding="utf-8")
    return path
