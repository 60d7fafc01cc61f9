"""The engine's console off a terminal (CI, ``| tee``, log files) and the run log."""

from __future__ import annotations

import io
import re

import pytest

from engine.core.console import make_console, make_progress, run_log


def test_off_a_terminal_lines_are_whole_plain_and_carry_no_source_location():
    buf = io.StringIO()
    console = make_console(file=buf)
    assert console.plain
    name = "merge-" + "t" * 200
    console.print(f"[green]✓[/] {name} [dim](ties) 1.0s[/]")
    console.log("a message")
    out = buf.getvalue()
    assert name in out  # not cut to 80 columns
    assert "\x1b[" not in out  # no colour or cursor codes
    assert not re.search(r"\w+\.py:\d+", out)  # no source location
    assert re.search(r"^\d\d:\d\d:\d\d a message$", out, re.M)


def test_off_a_terminal_progress_is_periodic_lines_with_rate_and_eta_and_never_overshoots():
    buf = io.StringIO()
    console = make_console(file=buf)
    clock = [0.0]
    with make_progress(console, get_time=lambda: clock[0]) as progress:
        task = progress.add_task("ct-lum", total=20, unit="steps")
        for _ in range(25):  # five more advances than the total, 3 s apart
            clock[0] += 3.0
            progress.advance(task)
        assert progress.tasks[0].completed == 20
    lines = [line for line in buf.getvalue().splitlines() if line.startswith("ct-lum:")]
    assert 10 <= len(lines) <= 12, lines  # a line per tenth (and one at the end), not per step
    assert re.search(r"ct-lum: 20/20 steps, [\d.,]+ steps/s, done in", lines[-1]), lines[-1]
    assert any("eta" in line for line in lines[:-1])
    assert not any(re.search(r"(\d+)/20", line) and int(re.search(r"(\d+)/20", line)[1]) > 20
                   for line in lines)


def test_quick_work_off_a_terminal_says_one_line():
    buf = io.StringIO()
    with make_progress(make_console(file=buf)) as progress:
        task = progress.add_task("merged: ties", total=39, unit="tensors")
        for _ in range(39):
            progress.advance(task)
    assert [line for line in buf.getvalue().splitlines() if line.startswith("merged")] == [
        line for line in buf.getvalue().splitlines() if "done in" in line]


def test_on_a_terminal_the_rich_bar_is_used():
    console = make_console(file=io.StringIO(), terminal=True)
    assert not console.plain and console.is_terminal
    assert not make_progress(console).disable


def test_run_log_copies_what_the_console_prints_and_says_how_the_run_ended(tmp_path):
    console = make_console(file=io.StringIO())
    with run_log(console, tmp_path, recipe="demo") as path:
        console.print("[green]✓[/] layers (first-last) 0.1s")
        assert "layers (first-last)" in path.read_text()  # readable while the run goes on
    with pytest.raises(KeyboardInterrupt):
        with run_log(console, tmp_path, recipe="demo"):
            raise KeyboardInterrupt
    text = (tmp_path / "run.log").read_text()
    assert text.count("=== ") == 2 and "run demo:" in text
    assert text.rstrip().endswith("interrupted")
    console.print("after the run")
    assert "after the run" not in (tmp_path / "run.log").read_text()
