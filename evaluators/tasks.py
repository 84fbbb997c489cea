"""User multiple-choice tasks: a JSONL file of {"context", "choices", "answer"} objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError
from srcr.evaluators.jsonl import read_jsonl_objects


def load_mc_tasks(path: Path) -> list[dict[str, Any]]:
    """Multiple-choice items as [{"context", "choices", "answer": index}] from a JSONL file.

    `answer` may be the index of the right choice or the choice's text.
    """
    items = []
    for number, row in read_jsonl_objects(Path(path), "multiple-choice"):
        where = f"{path}:{number}"
        context, choices, answer = row.get("context"), row.get("choices"), row.get("answer")
        if not isinstance(context, str) or not context.strip():
            raise SrcrError(f'{where} needs a non-empty string "context"; fix that line')
        if (
            not isinstance(choices, list)
            or len(choices) < 2
            or not all(isinstance(choice, str) and choice.strip() for choice in choices)
        ):
            raise SrcrError(f'{where} needs "choices": a list of at least two non-empty strings; fix that line')
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise SrcrError(f'{where} has "answer" {answer!r}: give the index (0-based) or text of a choice')
        items.append({"context": context, "choices": list(choices), "answer": answer})
    return items
