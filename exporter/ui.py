"""Terminal output: progress for long stages, and the error convention shared by every command."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from srcr.base.errors import SrcrError

PIPED_WIDTH = 240  # columns for tables written to a pipe or file, where rich would assume 80


def stderr_console() -> Console:
    return Console(stderr=True)


def stdout_console() -> Console:
    """Tables go to stdout; piped into a file they get room enough not to truncate any cell."""
    console = Console()
    return console if console.is_terminal else Console(width=PIPED_WIDTH)


class Interrupts:
    """Ctrl-C as KeyboardInterrupt, remembered.

    Python raises KeyboardInterrupt wherever the interpreter is when SIGINT arrives; inside a
    callback from native code (llama.cpp's logger) ctypes prints and discards it, and the run would
    go on. The flag keeps it: the next progress report raises it again.
    """

    def __init__(self) -> None:
        self.pending = False

    def handler(self, signum: int, frame: Any) -> None:
        self.pending = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stage_progress(console: Console, interrupts: Interrupts | None = None, enabled: bool = True) -> Iterator[Any]:
    """A ProgressFn drawing one bar per stage, keyed by the description's first word.

    When the console is not a terminal (output piped or logged) bars would only appear at the end,
    so progress is written as plain timestamped lines instead. Every report first checks for a
    Ctrl-C that native code swallowed.
    """
    check = interrupts.check if interrupts is not None else (lambda: None)
    if not enabled:

        def silent(description: str, completed: int, total: int) -> None:
            check()

        yield silent
        return
    if not console.is_terminal:
        lines = LineProgress(console)

        def logged(description: str, completed: int, total: int) -> None:
            check()
            lines(description, completed, total)

        yield logged
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn(), console=console) as progress:
        tasks: dict[str, Any] = {}

        def report(description: str, completed: int, total: int) -> None:
            check()
            stage = description.split(" ", 1)[0].rstrip(":")
            if stage not in tasks:
                tasks[stage] = progress.add_task(description, total=max(total, 1))
            progress.update(tasks[stage], description=description, completed=completed, total=max(total, 1))

        yield report


class LineProgress:
    """Progress as log lines: a stage's start, its end, and at most one line per `interval_s` between."""

    def __init__(self, console: Console, interval_s: float = 30.0) -> None:
        self.console = console
        self.interval_s = interval_s
        self._last_line: dict[str, float] = {}  # stage → when it last printed
        self._last_text: dict[str, str] = {}

    def __call__(self, description: str, completed: int, total: int) -> None:
        stage = description.split(" ", 1)[0].rstrip(":")
        text = f"{description} {completed}/{max(total, 1)}"
        now = time.monotonic()
        starting = stage not in self._last_line
        finished = completed >= total
        due = starting or finished or now - self._last_line[stage] >= self.interval_s
        if not due or self._last_text.get(stage) == text:
            return
        self._last_line[stage], self._last_text[stage] = now, text
        self.console.print(f"{time.strftime('%H:%M:%S')} {text}", highlight=False, soft_wrap=True)


NOTHING_KEPT = "no partial output was kept"


@contextlib.contextmanager
def user_errors(console: Console, interrupted: str = NOTHING_KEPT) -> Iterator[Interrupts]:
    """SrcrError → one red line and exit 2; Ctrl-C → one line and exit 130. The callers leave nothing partial."""
    interrupts = Interrupts()
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, interrupts.handler)
    try:
        quiet_libraries()
        yield interrupts
    except SrcrError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: {escape(interrupted)}", highlight=False, soft_wrap=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGINT, previous)


def quiet_libraries() -> None:
    """Keep transformers' and the hub's own bars and warnings out of srcr's display."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' own bar while it reads the default GGUF
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)
