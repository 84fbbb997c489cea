"""JSON Lines input files: one object per line, blank lines allowed, errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError


def read_jsonl_objects(path: Path, what: str) -> list[tuple[int, dict[str, Any]]]:
    path = Path(path)
    if path.is_dir():
        raise SrcrError(f"{what} file {path} is a folder; pass a JSONL file")
    if not path.is_file():
        raise SrcrError(f"{what} file {path} does not exist; pass an existing JSONL file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise SrcrError(f"{what} file {path} is not UTF-8 ({error.reason}); convert it to UTF-8") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SrcrError(f"{path}:{number} is not valid JSON ({error.msg}); write one object per line") from None
        except RecursionError:
            raise SrcrError(f"{path}:{number} nests too deeply; write flat JSON objects") from None
        if not isinstance(row, dict):
            raise SrcrError(f"{path}:{number} is not a JSON object; write one object per line")
        rows.append((number, row))
    if not rows:
        raise SrcrError(f"{what} file {path} has no entries; add one JSON object per line")
    return rows
