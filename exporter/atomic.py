"""Atomic file output: write under a temporary name in the target folder, rename when complete.

A crash or Ctrl-C mid-write leaves no half-written file under the final name, and an existing
file is never replaced unless the caller says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from exporter.errors import SrcrError


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail before any expensive work if `path` exists and may not be replaced."""
    if path.exists() and not overwrite:
        raise SrcrError(f"{path} already exists; pass --overwrite to replace it or choose another --out/--name")


@contextlib.contextmanager
def atomic_path(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    check_writable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def dump_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def write_json(final: Path, data: Any, overwrite: bool = False) -> None:
    with atomic_path(final, overwrite) as tmp:
        dump_json(tmp, data)


def remove_partials(folder: Path) -> None:
    """Delete temporary files a killed process could not clean up itself."""
    for leftover in Path(folder).glob(".*.partial"):
        with contextlib.suppress(OSError):
            leftover.unlink()
