"""Consoles and progress bars for the engine's output, on a terminal and off it.

:func:`make_console` gives a normal rich console when its stream is a terminal, and a
plain, line-oriented one otherwise (CI, ``| tee``, a log file): no width truncation
(lines are as long as they are), no colour or cursor codes, no source locations.

:func:`make_progress` gives the progress display every long piece of work shares: on a
terminal a rich bar with count, rate (``it/s``, ``tokens/s``, ... as the task's ``unit``
field says), elapsed time and a live ETA; off a terminal no live display, but a plain
line every tenth of the total (at most one per 2 s) or every 30 s (``ct-lum: 80/160 steps,
3.1 steps/s, eta 26 s``) and one when the task ends. A bar never goes past its total.

:func:`run_log` copies, while active, every line a console prints (as plain text, with
progress as periodic lines even on a terminal) into a log file, written as it goes.
:func:`current` is the console of the run in progress (or a fresh one), for code that
has none handed to it (the built-in world's first build).
"""

from __future__ import annotations

import contextvars
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

__all__ = ["EngineConsole", "EngineProgress", "current", "eta_seconds", "format_seconds",
           "make_console", "make_progress", "rate", "run_log", "RUN_LOG"]

#: off a terminal, a progress line at least every this many seconds (and every tenth)
PLAIN_INTERVAL_S = 30.0
#: ... but a tenth is said only this long after the previous line (a 0.1 s merge gets one line)
PLAIN_MIN_GAP_S = 2.0
#: width of a plain console: wide enough that rich never cuts or wraps a line itself
_PLAIN_WIDTH = 100_000

_current: contextvars.ContextVar[Console | None] = contextvars.ContextVar("engine_console",
                                                                          default=None)


class EngineConsole(Console):
    """A rich console that also copies what it prints, as plain text, to its sinks
    (:func:`run_log`)."""

    def __init__(self, *args: Any, plain: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: True off a terminal: progress is printed as lines
        self.plain = plain
        self.sinks: list[Console] = []

    def print(self, *objects: Any, **kwargs: Any) -> None:  # noqa: A003 - rich's name
        super().print(*objects, **kwargs)
        if objects:
            for sink in self.sinks:
                sink.print(*objects, **kwargs)

    def log(self, *objects: Any, sep: str = " ", end: str = "\n", style: Any = None,
            justify: Any = None, emoji: bool | None = None, markup: bool | None = None,
            highlight: bool | None = None, log_locals: bool = False, _stack_offset: int = 1) -> None:
        """``HH:MM:SS message``: a time prefix, never a source location, never padded."""
        self.print(Text(time.strftime("%H:%M:%S"), style="log.time"), *objects, sep=sep, end=end,
                   style=style, justify=justify, emoji=emoji, markup=markup, highlight=highlight,
                   soft_wrap=True)

    def to_sinks(self, text: str) -> None:
        """A line for the sinks only (progress lines while a live bar is on screen)."""
        for sink in self.sinks:
            sink.print(text, markup=False, highlight=False, soft_wrap=True)


def _plain_console(file: IO[str] | None = None, *, stderr: bool = False) -> Console:
    return Console(file=file, stderr=stderr, force_terminal=False, force_jupyter=False,
                   force_interactive=False, no_color=True, color_system=None, width=_PLAIN_WIDTH,
                   soft_wrap=True, highlight=False, emoji=False, log_path=False, legacy_windows=False)


def make_console(stderr: bool = True, *, terminal: bool | None = None, file: IO[str] | None = None,
                 quiet: bool = False) -> EngineConsole:
    """A console on stderr (or stdout, or ``file``): rich's own on a terminal, a plain
    line-oriented one elsewhere. ``terminal`` forces either (None: ask the stream)."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    if terminal is None:
        isatty = getattr(stream, "isatty", None)
        terminal = bool(isatty and isatty())
    if terminal:
        return EngineConsole(file=file, stderr=stderr, force_terminal=True, quiet=quiet, log_path=False)
    return EngineConsole(file=file, stderr=stderr, plain=True, quiet=quiet, force_terminal=False,
                         force_jupyter=False, force_interactive=False, no_color=True, color_system=None,
                         width=_PLAIN_WIDTH, soft_wrap=True, highlight=False, emoji=False,
                         log_path=False, legacy_windows=False)


def current() -> Console:
    """The console of the run in progress (inside :func:`run_log` or :func:`using`),
    else a fresh one on stderr."""
    return _current.get() or make_console()


@contextmanager
def using(console: Console) -> Iterator[Console]:
    """Make ``console`` what :func:`current` returns for the duration."""
    token = _current.set(console)
    try:
        yield console
    finally:
        _current.reset(token)


# --- rate and ETA ----------------------------------------------------------------------------


def rate(task: Task) -> float | None:
    """Units per second: rich's recent-window speed, else the average since the start."""
    if task.speed:
        return task.speed
    elapsed = task.elapsed
    if elapsed and task.completed:
        return task.completed / elapsed
    return None


def eta_seconds(task: Task, now: float | None = None) -> float | None:
    """Seconds left, counting down between updates (not frozen at the last one)."""
    if task.total is None or task.finished:
        return None if task.total is None else 0.0
    r = rate(task)
    if not r:
        return None
    left = max(task.total - task.completed, 0.0) / r
    samples = getattr(task, "_progress", None)
    if samples:
        now = task.get_time() if now is None else now
        left -= max(0.0, now - samples[-1].timestamp)
    return max(left, 0.0)


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}:{s % 60:02d}"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _number(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.1f}"


def _rate_text(r: float | None, unit: str) -> str:
    if r is None:
        return f"- {unit}/s"
    if r >= 100:
        return f"{r:,.0f} {unit}/s"
    return f"{r:.3g} {unit}/s"


class RateColumn(ProgressColumn):
    """``3.1 steps/s``: the unit is the task's ``unit`` field (default ``it``)."""

    def render(self, task: Task) -> Text:
        return Text(_rate_text(rate(task), task.fields.get("unit") or "it"), style="progress.data.speed")


class EtaColumn(ProgressColumn):
    """``eta 26 s``, re-estimated at every refresh."""

    max_refresh = 0.5

    def render(self, task: Task) -> Text:
        return Text(f"eta {format_seconds(eta_seconds(task))}", style="progress.remaining")


def progress_line(task: Task, *, done: bool = False) -> str:
    """One plain line for a task: ``name: 80/160 steps, 3.1 steps/s, eta 26 s  info``."""
    unit = task.fields.get("unit") or "it"
    count = (f"{_number(task.completed)}/{_number(task.total)} {unit}" if task.total is not None
             else f"{_number(task.completed)} {unit}")
    parts = [count, _rate_text(rate(task), unit)]
    if done:
        parts.append(f"done in {format_seconds(task.finished_time or task.elapsed or 0.0)}")
    elif task.total is not None:
        parts.append(f"eta {format_seconds(eta_seconds(task))}")
    info = task.fields.get("info") or ""
    line = f"{task.description}: " + ", ".join(parts)
    return f"{line}  {info}" if info else line


class EngineProgress(Progress):
    """rich's Progress that never passes a task's total and, for a plain console (or a
    console with log sinks), prints a line every tenth of the total or every
    :data:`PLAIN_INTERVAL_S` seconds, and one when a task finishes or is hidden."""

    def __init__(self, *columns: Any, console: Console, plain: bool, **kwargs: Any) -> None:
        super().__init__(*columns, console=console, disable=plain, **kwargs)
        self.plain = plain
        self._marks: dict[TaskID, tuple[int, float]] = {}  # task -> (tenths said, time said)
        self._ended: set[TaskID] = set()

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0,
                 completed: int = 0, visible: bool = True, **fields: Any) -> TaskID:
        fields.setdefault("info", "")
        fields.setdefault("unit", "it")
        task_id = super().add_task(description, start=start, total=total, completed=completed,
                                   visible=visible, **fields)
        self._marks[task_id] = (0, self.get_time())
        return task_id

    def update(self, task_id: TaskID, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None,
               visible: bool | None = None, refresh: bool = False, **fields: Any) -> None:
        with self._lock:
            task = self._tasks[task_id]
            new_total = total if total is not None else task.total
            if new_total is not None:
                done = task.completed if completed is None else completed
                if advance is not None:
                    done += advance
                    advance = None
                completed = min(done, new_total)
        super().update(task_id, total=total, completed=completed, advance=advance,
                       description=description, visible=visible, refresh=refresh, **fields)
        self._say(task_id, ending=visible is False)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _say(self, task_id: TaskID, *, ending: bool = False) -> None:
        sinks = getattr(self.console, "sinks", None)
        if not self.plain and not sinks:
            return
        task = self._tasks[task_id]
        if task_id in self._ended:
            return
        tenths, said_at = self._marks.get(task_id, (0, 0.0))
        now = self.get_time()
        if ending or task.finished:
            self._ended.add(task_id)
            line = progress_line(task, done=task.finished)
        else:
            t = int(10 * task.completed / task.total) if task.total else 0
            if (t > tenths and now - said_at >= PLAIN_MIN_GAP_S) or now - said_at >= PLAIN_INTERVAL_S:
                self._marks[task_id] = (max(t, tenths), now)
                line = progress_line(task)
            else:
                return
        if self.plain:
            self.console.print(escape(line), highlight=False, soft_wrap=True)
        else:
            self.console.to_sinks(line)  # type: ignore[attr-defined]


def make_progress(console: Console, *, transient: bool = True, **kwargs: Any) -> EngineProgress:
    """The progress display for ``console`` (see the module docstring). Give each task a
    ``unit`` field (``steps``, ``tokens``, ``items``...) and an ``info`` one for live values."""
    plain = bool(getattr(console, "plain", False)) or not console.is_terminal
    return EngineProgress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), EtaColumn(), TextColumn("{task.fields[info]}"),
        console=console, plain=plain, transient=transient, **kwargs,
    )


# --- the run log -----------------------------------------------------------------------------

#: ``<workdir>/run.log``: what the run printed, as plain lines, ending with its summary
RUN_LOG = "run.log"


@contextmanager
def run_log(console: Console, workdir: Path, *, recipe: str, enabled: bool = True,
            name: str = RUN_LOG) -> Iterator[Path | None]:
    """Append every line ``console`` prints to ``<workdir>/<name>`` (after a header line:
    time, recipe, command), flushed line by line; a failure is its last line. ``console``
    is also :func:`current` meanwhile. Disabled (a non-main process): only the latter."""
    if not enabled or not isinstance(console, EngineConsole):
        with using(console):
            yield None
        return
    path = Path(workdir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8", buffering=1) as fh:
        sink = _plain_console(fh)
        command = shlex.join([Path(sys.argv[0]).name or "python", *sys.argv[1:]]) if sys.argv else "-"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S %z")
        fh.write(f"=== {stamp} run {recipe}: {command}\n")
        console.sinks.append(sink)
        try:
            with using(console):
                yield path
        except KeyboardInterrupt:
            fh.write(f"{time.strftime('%H:%M:%S')} interrupted\n")
            raise
        except BaseException as exc:
            fh.write(f"{time.strftime('%H:%M:%S')} failed: {type(exc).__name__}: {exc}\n")
            raise
        finally:
            console.sinks.remove(sink)
