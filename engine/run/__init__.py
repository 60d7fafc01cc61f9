"""Running a plan: the context each stage runs in, the runner, and what a run leaves behind.

The package holds three layers (docs/architecture.md), lowest first:

* the **runtime** a stage runs in, which the stage kinds' packages use:
  :mod:`~engine.run.runtime` (the effective ``runtime:``), :mod:`~engine.run.context`
  (:class:`~engine.run.context.StageContext`), :mod:`~engine.run.distributed` (processes
  of one launch), :mod:`~engine.run.threads`, :mod:`~engine.run.resources` (memory sampling);
* the **report readers**, :mod:`engine.run.report` (report.md, charts, the summary), which
  read report.json alone and import only :mod:`engine.core`;
* the **run** itself: :mod:`~engine.run.runner`, :mod:`~engine.run.stage_cache` (kept
  versions by fingerprint), :mod:`~engine.run.status` (what a run would do),
  :mod:`~engine.run.record` (report.json), :mod:`~engine.run.lock` and
  :mod:`~engine.run.workdir` (the workdir's lock and names).

So that importing the lowest of them never loads the highest, this ``__init__`` imports
nothing: its public names are the modules below, imported by name.
"""

__all__ = ["context", "distributed", "lock", "record", "report", "resources", "runner", "runtime",
           "stage_cache", "status", "threads", "workdir"]
