import contextlib
import io

import pytest
from rich.console import Console
from rich.table import Table

from srcr.exporter.ui import Interrupts, LineProgress, stage_progress, stdout_console


def _console() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=False, width=200), buffer


def test_piped_progress_prints_stage_start_and_end_only():
    console, buffer = _console()
    with stage_progress(console) as progress:
        for layer in range(1, 31):
            progress(f"calibrate+prune layer {layer}/30", layer, 30)
        progress("convert to GGUF", 0, 3)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("calibrate+prune layer 1/30 1/30")
    assert lines[1].endswith("calibrate+prune layer 30/30 30/30")
    assert lines[2].endswith("convert to GGUF 0/3")


def test_piped_progress_reports_long_stages_at_the_interval():
    console, buffer = _console()
    progress = LineProgress(console, interval_s=0.0)
    for window in range(5):
        progress("perplexity windows", window, 8)
    assert len(buffer.getvalue().splitlines()) == 5


def test_disabled_progress_prints_nothing():
    console, buffer = _console()
    with stage_progress(console, enabled=False) as progress:
        progress("load model", 0, 1)
    assert buffer.getvalue() == ""


def test_tables_written_to_a_pipe_are_not_truncated(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())
    console = stdout_console()
    assert not console.is_terminal
    table = Table()
    table.add_column("configuration")
    name = "smollm2-135m-instruct-sparsegpt-s25-q4-k-m"
    for _ in range(8):
        table.add_column("figure")
    table.add_row(name, *["0.123456"] * 8)
    console.print(table)
    assert name in console.file.getvalue()


def test_piped_progress_does_not_repeat_a_line():
    console, buffer = _console()
    progress = LineProgress(console)
    progress("quantize", 211, 211)
    progress("quantize", 211, 211)
    assert len(buffer.getvalue().splitlines()) == 1


def test_a_swallowed_ctrl_c_is_raised_at_the_next_progress_report():
    """ctypes discards a KeyboardInterrupt raised inside a native callback; the flag keeps it."""
    console, _ = _console()
    interrupts = Interrupts()
    with stage_progress(console, interrupts) as progress:
        progress("calibrate+prune layer 1/30", 1, 30)
        with contextlib.suppress(KeyboardInterrupt):  # what a native callback does with it
            interrupts.handler(2, None)  # what SIGINT runs
        with pytest.raises(KeyboardInterrupt):
            progress("calibrate+prune layer 2/30", 2, 30)
