"""What a run folder says, read from report.json (and each evaluate stage's metrics.json
and each training stage's train log) alone: the tables ``engine run`` prints, the summary
with its intervals, report.md and its SVG charts (``engine report``).

* :mod:`engine.run.report.metrics` -- how metrics are named, ordered and printed;
* :mod:`engine.run.report.intervals` -- 95% intervals of scores and their differences;
* :mod:`engine.run.report.render` -- text and markdown blocks;
* :mod:`engine.run.report.cost` -- what each method cost;
* :mod:`engine.run.report.summary` -- the end-of-run summary;
* :mod:`engine.run.report.tables` -- the terminal tables;
* :mod:`engine.run.report.charts` -- the SVG charts;
* :mod:`engine.run.report.files` -- report.md and the chart folder, replaced whole.

It imports only :mod:`engine.core` (docs/architecture.md), so rebuilding a report needs
neither torch nor the plugins.
"""

from engine.run.report.files import load_run, make_report
from engine.run.report.summary import Summary, compare, gather, summarize
from engine.run.report.tables import metrics_table, stages_table

__all__ = ["Summary", "compare", "gather", "load_run", "make_report", "metrics_table",
           "stages_table", "summarize"]
