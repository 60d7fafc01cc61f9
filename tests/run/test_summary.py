"""The end-of-run summary: intervals, winners only outside the noise, chance, cost per method.

The reports here are built by hand (the shape the runner writes: report.json's
``stages``, ``models`` and ``lineage``), so that each case pins one rule; the real run
folder is exercised in tests/run/test_report.py.
"""

from __future__ import annotations

import json

import pytest

from engine.run.report.intervals import Score, is_accuracy, newcombe, wilson
from engine.run.report.summary import base_model, gather, methods, stage_languages, summarize


def flat(text: str) -> str:
    """The text with its line wrapping undone, to find a phrase."""
    return " ".join(text.split())


def test_wilson_and_newcombe_match_published_values():
    iv = wilson(0.5, 100)
    assert (round(iv.low, 4), round(iv.high, 4)) == (0.4038, 0.5962)
    # Newcombe (1998), Statistics in Medicine 17, table II: 56/70 - 48/80 = 0.2, method 10
    d = newcombe(56 / 70, 70, 48 / 80, 80)
    assert (round(d.center, 4), round(d.low, 4), round(d.high, 4)) == (0.2, 0.0524, 0.3339)
    zero = wilson(0.0, 128)
    assert zero.low == 0.0 and zero.high > 0.02  # no collapse to a point at 0


def test_score_uses_stderr_when_given_and_none_for_perplexity():
    a, b = Score(0.6, 100, stderr=0.01, accuracy=True), Score(0.5, 100, stderr=0.01, accuracy=True)
    iv = a.minus(b)
    assert iv.low == pytest.approx(0.1 - 1.96 * 2 ** 0.5 * 0.01, abs=1e-4) and iv.excludes(0.0)
    assert Score(3.2, 5000).interval() is None and Score(3.2, 5000).minus(Score(3.0, 5000)) is None
    assert is_accuracy("acc_norm/en") and is_accuracy("exact_match_strict-match/gsm8k")
    assert not is_accuracy("delta_acc/en") and not is_accuracy("ppl/en")


def _report(values: dict[str, dict[str, float]], *, n: int = 100, chance=None, stderr=None,
            ct_cache: str = "miss") -> dict:
    """A run: base -> elo (+align) and base -> ct on language xx, one evaluate stage."""
    evaluate = {"name": "score", "stage": "evaluate", "plugin": "task-accuracy", "wall_time_s": 5.0,
                "metrics": values,
                "counts": {m: {k: (n if "acc" in k else 4000) for k in v} for m, v in values.items()}}
    if chance:
        evaluate["chance"] = chance
    if stderr:
        evaluate["stderr"] = stderr
    train = [
        {"name": "elo-xx", "stage": "adapt-language", "plugin": "elo", "wall_time_s": 6.0,
         "tokens": 1000, "trainable_params": 400, "cache": "miss"},
        {"name": "elo-xx-aligned", "stage": "align", "plugin": "elo-align", "wall_time_s": 2.0,
         "tokens": 200, "trainable_params": 2000, "cache": "miss"},
        # a cache hit keeps the wall time of the run that made the reused output
        {"name": "ct-xx", "stage": "adapt-language", "plugin": "ct", "wall_time_s": 32.0,
         "tokens": 1000, "trainable_params": 2000, "cache": ct_cache},
    ]
    lineage = {
        "elo-xx": {"stage": "adapt-language", "inputs": ["base"], "languages": {"xx": 9.0, "en": 1.0}},
        "elo-xx-aligned": {"stage": "align", "inputs": ["elo-xx"], "languages": {}},
        "ct-xx": {"stage": "adapt-language", "inputs": ["base"], "languages": {"xx": 9.0, "en": 1.0}},
        "score": {"stage": "evaluate", "inputs": list(values), "languages": {"xx": 1.0}},
    }
    return {"recipe": "demo", "models": ["base"], "lineage": lineage, "stages": [*train, evaluate]}


def test_a_difference_inside_the_noise_gets_no_star_and_says_so():
    report = _report({"base": {"acc/xx": 0.30}, "elo-xx-aligned": {"acc/xx": 0.36},
                      "ct-xx": {"acc/xx": 0.40}}, n=100)
    s = summarize(report)
    comp = s.comparisons["acc/xx"]
    assert (comp.best, comp.runner_up, comp.winner) == ("ct-xx", "elo-xx-aligned", None)
    text = s.text()
    assert "within noise, no winner" in flat(text)
    assert "*" not in text.replace("starred *", "")


def test_a_difference_outside_the_noise_is_named_and_starred():
    report = _report({"base": {"acc/xx": 0.30}, "elo-xx-aligned": {"acc/xx": 0.35},
                      "ct-xx": {"acc/xx": 0.70}}, n=400)
    s = summarize(report)
    assert s.comparisons["acc/xx"].winner == "ct-xx"
    text = flat(s.text())
    row = next(line for line in s.text().splitlines() if line.strip().startswith("ct-xx ")
               and "0.700" in line)
    assert row.rstrip().endswith("*") and "best is ct-xx 0.700 vs elo-xx-aligned 0.350" in text
    assert "outside the noise" in text and "Against base: better beyond noise: " in text
    assert "| ct-xx |" in s.markdown() and "\\*" in s.markdown()


def test_chance_level_is_shown_and_models_at_chance_are_named():
    report = _report({"base": {"acc/xx": 0.26}, "elo-xx-aligned": {"acc/xx": 0.27},
                      "ct-xx": {"acc/xx": 0.60}}, n=200, chance={"acc/xx": 0.25})
    text = flat(summarize(report).text())
    assert "(chance)" in text and "acc/xx (chance 0.25, n = 200)" in text
    assert "Not above chance beyond noise: base, elo-xx-aligned." in text


def test_perplexity_without_stderr_says_no_interval_and_names_no_winner():
    report = _report({"base": {"ppl/xx": 40.0}, "elo-xx-aligned": {"ppl/xx": 9.0},
                      "ct-xx": {"ppl/xx": 5.0}})
    s = summarize(report)
    assert s.comparisons["ppl/xx"].interval is None and s.comparisons["ppl/xx"].winner is None
    assert "lowest ct-xx 5.00, next elo-xx-aligned 9.00; no interval is available" in flat(s.text())


def test_an_evaluator_stderr_decides_the_interval():
    values = {"base": {"acc/xx": 0.30}, "elo-xx-aligned": {"acc/xx": 0.35}, "ct-xx": {"acc/xx": 0.37}}
    tight = {m: {"acc/xx": 0.002} for m in values}  # much tighter than 100 items allow
    assert summarize(_report(values, n=100)).comparisons["acc/xx"].winner is None
    assert summarize(_report(values, n=100, stderr=tight)).comparisons["acc/xx"].winner == "ct-xx"


def test_cost_adds_align_to_elo_and_keeps_a_cached_stage_cost():
    report = _report({"base": {"acc/xx": 0.3}, "ct-xx": {"acc/xx": 0.3}}, ct_cache="hit")
    assert stage_languages(report) == {"elo-xx": "xx", "elo-xx-aligned": "xx", "ct-xx": "xx"}
    found = {m.name: m for m in methods(report, "xx")}
    assert set(found) == {"elo-xx-aligned", "ct-xx"}
    elo = found["elo-xx-aligned"]
    assert (elo.wall_time_s, elo.tokens, elo.trainable) == (8.0, 1200, [400, 2000])
    assert found["ct-xx"].wall_time_s == 32.0
    text = flat(summarize(report).text())
    assert "took 0.25× the wall time of ct-xx (8.0 s vs 32.0 s), 1.20× the tokens, and trained " \
           "0.20× the parameters" in text


def test_base_is_the_adapt_stages_input_when_no_model_is_named_base():
    report = _report({"llama": {"acc/xx": 0.3}, "ct-xx": {"acc/xx": 0.5}})
    report["models"] = ["llama", "other"]
    for info in report["lineage"].values():
        info["inputs"] = ["llama" if i == "base" else i for i in info["inputs"]]
    assert base_model(report, {"llama", "ct-xx"}) == "llama"
    assert base_model(report, {"ct-xx"}) is None  # not scored: no deltas


def test_summary_lines_fit_100_columns_and_end_with_next_commands(tmp_path):
    values = {m: {"acc/xx": 0.4, "acc_norm/xx": 0.41, "exact_match/xx": 0.2, "ppl/xx": 3.5,
                  "acc/en": 0.5, "ppl/en": 3.0}
              for m in ("base", "elo-xx-aligned", "ct-xx", "merge-ties", "merge-slack-ties")}
    text = summarize(_report(values), tmp_path, recipe="recipes/demo.yaml").text()
    body, tail = text.split("\nNext\n")
    assert max(len(line) for line in body.splitlines()) <= 100  # the paths below may be longer
    assert f"engine report {tmp_path}" in tail and "engine status recipes/demo.yaml" in tail
    assert str(tmp_path / "report.md") in tail
    assert text.index("xx: adapted by") < text.index("en: not adapted")


def test_gather_reads_metrics_json_for_what_a_cached_record_lacks(tmp_path):
    (tmp_path / "score").mkdir()
    (tmp_path / "score" / "metrics.json").write_text(json.dumps({
        "a": {"acc/xx": 0.5}, "_counts": {"a": {"acc/xx": 64}}, "_chance": {"acc/xx": 0.25},
        "_stderr": {"a": {"acc/xx": 0.06}}}))
    report = {"stages": [{"name": "score", "stage": "evaluate", "metrics": {"a": {"acc/xx": 0.5}},
                          "output": str(tmp_path / "gone")}]}
    ev = gather(report, tmp_path)
    assert ev.counts == {"a": {"acc/xx": 64}} and ev.chance == {"acc/xx": 0.25}
    assert ev.score("a", "acc/xx").stderr == 0.06


def test_a_next_command_too_long_for_a_line_puts_its_description_below(tmp_path):
    folder = tmp_path / ("w" * 90)
    text = summarize(_report({"base": {"acc/xx": 0.4}, "ct-xx": {"acc/xx": 0.5}}), folder).text()
    tail = [line.strip() for line in text.split("\nNext\n")[1].splitlines()]
    at = tail.index(f"engine report {folder}")  # the command alone, whole, copyable
    assert tail[at + 1] == "rebuild report.md and the charts"


def test_the_cost_table_lists_merges_with_every_training_stage_they_are_built_from():
    report = _report({"base": {"acc/xx": 0.4}, "ct-xx": {"acc/xx": 0.5}, "merge-ties": {"acc/xx": 0.6}})
    report["stages"][2:2] = [
        {"name": "sft-en", "stage": "adapt-language", "plugin": "sft", "wall_time_s": 10.0,
         "tokens": 500, "trainable_params": 2000, "cache": "miss"},
        {"name": "merge-ties", "stage": "merge", "plugin": "ties", "wall_time_s": 1.5, "cache": "miss"}]
    report["lineage"]["sft-en"] = {"stage": "adapt-language", "inputs": ["base"], "languages": {"en": 1.0}}
    report["lineage"]["merge-ties"] = {"stage": "merge", "inputs": ["base", "ct-xx", "sft-en"],
                                       "languages": {}}
    text = summarize(report).text()
    row = next(line for line in text.splitlines() if line.strip().startswith("merge-ties  "))
    # ct-xx 32 s + sft-en 10 s + the merge 1.5 s, against the most expensive method (ct-xx)
    assert "ct + sft + ties" in row and "43.5" in row and "1.36×" in row and "1,500" in row, row
    assert "A merge's cost is every training stage it is built from" in flat(text)
    assert not any(m.name == "merge-ties" for m in methods(report, "xx"))  # a merge is no method


def test_two_evaluate_stages_scoring_different_models_and_metrics_of_one_language():
    # one stage scores accuracy on every model, another perplexity only on two of them:
    # each metric's words name only the models that have it (no model is looked up twice)
    report = _report({"base": {"acc/xx": 0.26}, "elo-xx-aligned": {"acc/xx": 0.27},
                      "ct-xx": {"acc/xx": 0.60}}, n=200, chance={"acc/xx": 0.25})
    report["stages"].append({"name": "ppl", "stage": "evaluate", "plugin": "perplexity", "wall_time_s": 1.0,
                             "metrics": {"ct-xx": {"ppl/xx": 3.1}, "merged": {"ppl/xx": 3.4}},
                             "counts": {"ct-xx": {"ppl/xx": 50}, "merged": {"ppl/xx": 50}}})
    s = summarize(report)
    text = flat(s.text())
    assert "Not above chance beyond noise: base, elo-xx-aligned." in text
    assert "lowest ct-xx 3.10, next merged 3.40" in text
    table = next(line for line in s.text().splitlines() if line.strip().startswith("merged "))
    assert table.split()[1] == "-"  # merged has no accuracy: a dash, not an error
