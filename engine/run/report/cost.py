"""What each way of adapting a language cost, for the end-of-run summary (:mod:`engine.run.report.summary`).

A *method* is the last training stage of a chain that adapted a language (an
``adapt-language`` stage whose data is mostly that language, with the ``align``
stages built on it: ELO's two stages are one method); its cost is the sum over the
chain. A *merge built on a method* costs every training stage it is built from (of
any language: the English SFT model of a CT+SFT merge counts) plus the merge itself,
which is what producing that model took from the base. A cached stage's
``wall_time_s`` is the time the reused work took when it ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.run.report.metrics import format_number, format_params
from engine.run.report.render import Block, Bullets, Note, Table

__all__ = ["TRAINING_KINDS", "Method", "ancestry", "cost_blocks", "lineage_of", "merges_built_on",
           "methods", "stage_languages"]
TRAINING_KINDS = ("adapt-language", "align")


def lineage_of(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """report.json's ``lineage``: stage -> its kind, plugin, inputs and data languages."""
    return report.get("lineage") or {}


def stage_languages(report: dict[str, Any]) -> dict[str, str]:
    """Training stage -> the language it adapts: an adapt stage's data language with the
    most weight, else (and for align stages) the language of the stage it starts from."""
    lineage, out = lineage_of(report), {}
    for name, info in lineage.items():
        if info.get("stage") not in TRAINING_KINDS:
            continue
        weights = info.get("languages") or {}
        lang = max(weights, key=weights.get) if weights and info["stage"] == "adapt-language" else None
        inputs = info.get("inputs") or []
        lang = lang or (out.get(inputs[0]) if inputs else None)
        if lang:
            out[name] = lang
    return out


def ancestry(report: dict[str, Any], stage: str) -> list[str]:
    """``stage`` and every stage it was built from, in run order."""
    lineage, seen, todo = lineage_of(report), set(), [stage]
    while todo:
        s = todo.pop()
        if s in lineage and s not in seen:
            seen.add(s)
            todo.extend(lineage[s].get("inputs") or [])
    return [s for s in lineage if s in seen]


@dataclass
class Method:
    """One way the run adapted a language: its last stage and what it cost."""

    name: str
    stages: list[str]
    plugins: list[str]
    wall_time_s: float
    tokens: int
    trainable: list[int]


def methods(report: dict[str, Any], language: str) -> list[Method]:
    """The methods that adapted ``language``: the last training stage of each chain."""
    langs = stage_languages(report)
    lineage = lineage_of(report)
    records = {r["name"]: r for r in report.get("stages", [])}
    mine = [s for s, lang in langs.items() if lang == language]
    used = {i for s in mine for i in lineage[s].get("inputs", [])}
    found = []
    for last in (s for s in mine if s not in used and s in records):
        chain = [s for s in ancestry(report, last) if s in records
                 and lineage[s].get("stage") in TRAINING_KINDS + ("select-layers",)]
        trained = [s for s in chain if lineage[s].get("stage") in TRAINING_KINDS]
        found.append(Method(
            last, chain, [records[s]["plugin"] for s in trained],
            sum(float(records[s].get("wall_time_s") or 0) for s in chain),
            sum(int(records[s].get("tokens") or 0) for s in chain),
            [int(records[s].get("trainable_params") or 0) for s in trained]))
    return found

def merges_built_on(report: dict[str, Any], found: list[Method]) -> list[Method]:
    """The merge stages built (directly or not) on one of ``found``, each with what it
    cost from the base: its training ancestry of every language, plus the merge."""
    lineage = lineage_of(report)
    records = {r["name"]: r for r in report.get("stages", [])}
    ends = {m.name for m in found}
    out = []
    for name, info in lineage.items():
        if info.get("stage") != "merge" or name not in records:
            continue
        chain = ancestry(report, name)
        if not ends & set(chain):
            continue
        costed = [s for s in chain if s in records and (s == name or lineage[s].get("stage")
                                                         in TRAINING_KINDS + ("select-layers",))]
        trained = [s for s in costed if lineage[s].get("stage") in TRAINING_KINDS]
        merge = records[name]["plugin"]
        search = (records[name].get("notes") or {}).get("search")
        if isinstance(search, dict) and isinstance(search.get("trials"), list):
            merge += f" (search: {len(search['trials'])} trials, {float(search.get('search_s') or 0):.1f} s)"
        out.append(Method(
            name, costed, [records[s]["plugin"] for s in trained] + [merge],
            sum(float(records[s].get("wall_time_s") or 0) for s in costed),
            sum(int(records[s].get("tokens") or 0) for s in costed),
            [int(records[s].get("trainable_params") or 0) for s in trained]))
    return out


def cost_blocks(found: list[Method], merges: list[Method] | None = None) -> list[Block]:
    top = max(found, key=lambda m: m.wall_time_s)

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}×" if b else "-"

    rows = [[m.name, " + ".join(m.plugins), f"{m.wall_time_s:.1f}", ratio(m.wall_time_s, top.wall_time_s),
             format_number(m.tokens), ratio(m.tokens, top.tokens),
             "→".join(format_params(t) for t in m.trainable),
             ratio(m.trainable[0], top.trainable[0]) if m.trainable and top.trainable else "-"]
            for m in found + (merges or [])]
    blocks: list[Block] = [
        Table(["method", "plugins", "time s", "×", "tokens", "×", "trainable", "×"], rows,
              "llrrrrrr"),
        Note(f"× is relative to the most expensive method, {top.name}; trainable lists each "
             "training stage's count (× compares the first)."
             + (" A merge's cost is every training stage it is built from (any language) plus "
                "the merge." if merges else "")
             + (" A searched merge's time includes its search (every trial)."
                if any("(search:" in p for m in merges or [] for p in m.plugins) else "")),
    ]
    words = [f"{m.name} ({' + '.join(m.plugins)}) took {ratio(m.wall_time_s, top.wall_time_s)} the "
             f"wall time of {top.name} ({m.wall_time_s:.1f} s vs {top.wall_time_s:.1f} s), "
             f"{ratio(m.tokens, top.tokens)} the tokens, and trained "
             f"{ratio(m.trainable[0], top.trainable[0]) if m.trainable and top.trainable else '-'} "
             "the parameters." for m in found if m is not top]
    return blocks + ([Bullets(words)] if words else [])
