"""The progress callback long-running steps report through, so the CLI can draw it."""

from __future__ import annotations

from collections.abc import Callable

# (description, completed, total); the description's first word names the stage.
ProgressFn = Callable[[str, int, int], None]


def no_progress(description: str, completed: int, total: int) -> None:
    return None
