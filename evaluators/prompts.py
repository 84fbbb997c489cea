"""The prompt set for semantic similarity: shipped with srcr, optionally extended by the user's file."""

from __future__ import annotations

from pathlib import Path

from srcr.base.errors import SrcrError
from srcr.evaluators.jsonl import read_jsonl_objects

BUILTIN_PROMPTS = Path(__file__).parent / "data" / "prompts.jsonl"


def load_prompts(path: Path | None = None, include_builtin: bool = True) -> list[dict[str, str]]:
    """Prompts as [{"id", "prompt"}]: the shipped set, then the user's file (either may be left out)."""
    files = ([BUILTIN_PROMPTS] if include_builtin else []) + ([Path(path)] if path is not None else [])
    if not files:
        raise SrcrError("no prompts to evaluate; pass a prompts file or keep the built-in prompt set")
    prompts: list[dict[str, str]] = []
    seen: set[str] = set()
    for file in files:
        for number, row in read_jsonl_objects(file, "prompts"):
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise SrcrError(f'{file}:{number} needs a non-empty string "prompt"; fix that line')
            prompt_id = str(row.get("id", f"{file.stem}-{number}"))
            if prompt_id in seen:
                raise SrcrError(f'{file}:{number} repeats prompt id "{prompt_id}"; give every prompt its own id')
            seen.add(prompt_id)
            prompts.append({"id": prompt_id, "prompt": prompt})
    return prompts
