"""Merge search: the params of a merge found on dev data, proven on held-out test data.

A merge stage with a ``search:`` block (:mod:`engine.recipe.search`) runs an Optuna
study over the params its merge method declares, scoring each candidate with the
recipe's evaluate plugins on dev data, and writes the chosen candidate as the stage's
ordinary merge output. docs/search.md is the guide.

* :mod:`engine.merging.search.space` -- the space, read from the methods' declared params;
* :mod:`engine.merging.search.candidate` -- candidates merged in memory, no model written per trial;
* :mod:`engine.merging.search.scoring` -- candidates scored by evaluate plugins on dev data;
* :mod:`engine.merging.search.study` -- the study: storage, workers, budget, pruning, resume;
* :mod:`engine.merging.search.front` -- trials as records, the Pareto front, the choice, warm starts;
* :mod:`engine.merging.search.stage` -- the stage: search, choose, write, report;
* :mod:`engine.merging.search.checks` -- what ``engine validate`` refuses;
* :mod:`engine.merging.search.plan` -- a search as validation resolves it.

This ``__init__`` imports nothing, so that the plan (which reads :mod:`~engine.merging.search.plan`)
never loads Optuna: its public names are the modules, imported by name.
"""

__all__ = ["candidate", "checks", "front", "plan", "scoring", "space", "stage", "study"]
