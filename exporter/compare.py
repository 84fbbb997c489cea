"""`srcr compare`: one row per manifest, the dense base model first, best value per column marked."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from srcr.base.errors import SrcrError
from srcr.exporter.manifest import Manifest, read_manifest


def _get(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data or data[key] is None:
            return None
        data = data[key]
    return data


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    value: Callable[[dict[str, Any]], Any]
    fmt: str = "{}"
    better: str | None = None  # "high" | "low" | None (not ranked)


def _pruning_label(manifest: dict[str, Any]) -> str:
    pruning = manifest.get("pruning") or {}
    if pruning.get("pattern"):
        return pruning["pattern"]
    sparsity = pruning.get("sparsity") or 0
    return f"{sparsity:.0%}" if sparsity else "dense"


def _task_accuracy(manifest: dict[str, Any]) -> Any:
    return _get(manifest, "evaluation", "last_word", "acc")


def _tokens_per_second(manifest: dict[str, Any]) -> Any:
    return _get(manifest, "evaluation", "speed", "generation_tokens_per_s")


COLUMNS: tuple[Column, ...] = (
    Column("name", "name", lambda m: m.get("name")),
    Column("format", "format", lambda m: m.get("format")),
    Column("method", "method", lambda m: _get(m, "pruning", "method") or "-"),
    Column("sparsity", "sparsity", _pruning_label),
    Column("quant", "quant", lambda m: _get(m, "quantization", "type")),
    Column("bpw", "bits/w", lambda m: _get(m, "artifact", "bits_per_weight"), "{:.2f}", "low"),
    Column("mb", "MB", lambda m: (_get(m, "artifact", "bytes") or 0) / 1e6 or None, "{:.1f}", "low"),
    Column("tcr", "TCr", lambda m: _get(m, "compression", "tcr"), "{:.4f}", "high"),
    Column("actual", "actual CR", lambda m: _get(m, "compression", "actual"), "{:.3f}", "high"),
    Column("ppl", "ppl", lambda m: _get(m, "evaluation", "perplexity", "compressed"), "{:.2f}", "low"),
    Column("kld", "KLD", lambda m: _get(m, "evaluation", "kld", "mean"), "{:.4f}", "low"),
    Column("top1", "top-1", lambda m: _get(m, "evaluation", "top1_agreement"), "{:.1%}", "high"),
    Column("semantic", "semantic", lambda m: _get(m, "evaluation", "semantic", "mean"), "{:.3f}", "high"),
    Column("task", "last-word acc", _task_accuracy, "{:.1%}", "high"),
    Column("sr", "Sr", lambda m: m.get("sr"), "{:.4f}", "high"),
    Column("srcr", "SrCr", lambda m: m.get("srcr"), "{:.4f}", "high"),
    Column("tok_s", "gen tok/s", _tokens_per_second, "{:.1f}", "high"),
)
COLUMN_KEYS = tuple(column.key for column in COLUMNS)


def base_row(manifest: dict[str, Any]) -> dict[str, Any]:
    """The dense source model as a pseudo-manifest, from the figures the reference pack recorded."""
    evaluation = manifest.get("evaluation") or {}
    return {
        "name": f"base: {_get(manifest, 'source_model', 'id')}",
        "format": "torch fp32",
        "pruning": {},
        "quantization": {"type": "-"},
        "artifact": {"bytes": _get(manifest, "compression", "baseline_bytes"), "bits_per_weight": 16.0},
        "compression": {"tcr": 0.0, "actual": 0.0},
        "evaluation": {
            "perplexity": {"compressed": _get(evaluation, "perplexity", "base")},
            "kld": {"mean": 0.0},
            "top1_agreement": 1.0,
            "semantic": {"mean": 1.0},
            "last_word": {"acc": _get(evaluation, "last_word", "base_acc")},
        },
        "sr": 1.0,
        "srcr": 0.0,
    }


def rows_for(typed: list[Manifest], sort: str | None) -> list[dict[str, Any]]:
    """Plain rows (column key → value), base first, the rest sorted best-first by `sort`."""
    if sort is not None and sort not in COLUMN_KEYS:
        raise SrcrError(f"unknown --sort column {sort!r}; choose one of: {', '.join(COLUMN_KEYS)}")
    if not typed:
        raise SrcrError("no manifests to compare; pass one or more <name>.manifest.json files")
    manifests = [manifest.as_dict() for manifest in typed]
    rows = [{column.key: column.value(m) for column in COLUMNS} for m in manifests]
    if sort:
        column = next(c for c in COLUMNS if c.key == sort)
        present = [row for row in rows if row[sort] is not None]
        missing = [row for row in rows if row[sort] is None]
        present.sort(key=lambda row: row[sort], reverse=column.better != "low")
        rows = present + missing
    base = {column.key: column.value(base_row(manifests[0])) for column in COLUMNS}
    return [base, *rows]


def _best(rows: list[dict[str, Any]], column: Column) -> Any:
    values = [row[column.key] for row in rows[1:] if isinstance(row[column.key], (int, float))]
    if not values or column.better is None:
        return None
    return max(values) if column.better == "high" else min(values)


def render_table(rows: list[dict[str, Any]], title: str = "srcr compare") -> Table:
    table = Table(title=title, header_style="bold")
    for column in COLUMNS:
        table.add_column(column.header, justify="left" if column.better is None else "right")
    best = {column.key: _best(rows, column) for column in COLUMNS}
    for index, row in enumerate(rows):
        cells = []
        for column in COLUMNS:
            value = row[column.key]
            # Names and types come from the manifest: "[/]" or "[red]" in them is text, not rich markup.
            text = "-" if value is None else escape(column.fmt.format(value))
            if index > 0 and value is not None and value == best[column.key]:
                text = f"[bold green]{text}[/]"
            cells.append(text)
        table.add_row(*cells, style="dim" if index == 0 else None)
    return table


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMN_KEYS))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def read_unique(paths: list[Path]) -> tuple[list[Manifest], list[str]]:
    """The manifests at `paths`, each file once, and a note for every repeat left out."""
    seen: dict[Path, Path] = {}
    manifests, notes = [], []
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            notes.append(f"{path} was given twice (as {seen[key]}); shown once")
            continue
        seen[key] = Path(path)
        manifests.append(read_manifest(path))
    return manifests, notes
