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
from srcr.evaluators.uncertainty import paired_difference
from srcr.exporter.manifest import Manifest, item_scores, read_manifest


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
    interval: str | None = None  # the figure's name in `evaluation.intervals`, when it has one


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
    Column("ppl", "ppl", lambda m: _get(m, "evaluation", "perplexity", "compressed"), "{:.2f}", "low", "perplexity"),
    Column("kld", "KLD", lambda m: _get(m, "evaluation", "kld", "mean"), "{:.4f}", "low", "kld_mean"),
    Column("top1", "top-1", lambda m: _get(m, "evaluation", "top1_agreement"), "{:.1%}", "high", "top1_agreement"),
    Column(
        "semantic", "semantic", lambda m: _get(m, "evaluation", "semantic", "mean"), "{:.3f}", "high", "semantic_mean"
    ),
    Column("task", "last-word acc", _task_accuracy, "{:.1%}", "high", "last_word_acc"),
    Column("sr", "Sr", lambda m: m.get("sr"), "{:.4f}", "high", "sr"),
    Column("srcr", "SrCr", lambda m: m.get("srcr"), "{:.4f}", "high"),
    Column("tok_s", "gen tok/s", _tokens_per_second, "{:.1f}", "high"),
)
COLUMN_KEYS = tuple(column.key for column in COLUMNS)
# Per row besides the columns: each interval as [low, high] (and Sr's paired difference to the best row).
INTERVAL_KEYS = tuple(f"{column.key}_interval" for column in COLUMNS if column.interval) + ("srcr_interval",)


def _intervals(manifest: dict[str, Any]) -> dict[str, Any]:
    found = _get(manifest, "evaluation", "intervals") or {}
    row = {f"{column.key}_interval": found.get(column.interval) for column in COLUMNS if column.interval}
    row["srcr_interval"] = manifest.get("srcr_interval")
    return row


def sr_against_best(typed: list[Manifest]) -> list[dict[str, Any] | None]:
    """Per manifest: its Sr minus the best Sr among them, with the paired 95% interval, when both were
    scored on the same items (one reference pack); None where that cannot be told."""
    scored = [(manifest, item_scores(manifest)) for manifest in typed]
    candidates = [(m, items) for m, items in scored if items is not None and m.sr is not None]
    if not candidates:
        return [None] * len(typed)
    best, best_items = max(candidates, key=lambda pair: pair[0].sr)
    pack = best.evaluation.reference_pack.sha256
    results: list[dict[str, Any] | None] = []
    for manifest, items in scored:
        if items is None or manifest.sr is None or manifest.evaluation.reference_pack.sha256 != pack:
            results.append(None)
            continue
        if manifest is best:
            results.append({"best": True, "value": 0.0, "low": 0.0, "high": 0.0, "significant": False})
            continue
        if items.sizes() != best_items.sizes():
            raise SrcrError(
                f"{manifest.name} and {best.name} name the same reference pack but hold different numbers of "
                "per-item scores; one of them was edited: re-export it"
            )
        results.append({"best": False, **paired_difference(items, best_items, "sr").as_dict()})
    return results


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
    versus = sr_against_best(typed)
    rows = [
        {**{column.key: column.value(m) for column in COLUMNS}, **_intervals(m), "sr_vs_best": against}
        for m, against in zip(manifests, versus, strict=True)
    ]
    if sort:
        column = next(c for c in COLUMNS if c.key == sort)
        present = [row for row in rows if row[sort] is not None]
        missing = [row for row in rows if row[sort] is None]
        present.sort(key=lambda row: row[sort], reverse=column.better != "low")
        rows = present + missing
    base = {column.key: column.value(base_row(manifests[0])) for column in COLUMNS}
    base.update({key: None for key in INTERVAL_KEYS}, sr_vs_best=None)
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
    table.add_column("Sr vs best (95%)", justify="right")
    best = {column.key: _best(rows, column) for column in COLUMNS}
    for index, row in enumerate(rows):
        cells = []
        for column in COLUMNS:
            value = row[column.key]
            # Names and types come from the manifest: "[/]" or "[red]" in them is text, not rich markup.
            text = "-" if value is None else escape(column.fmt.format(value))
            if index > 0 and value is not None and value == best[column.key]:
                text = f"[bold green]{text}[/]"
            interval = row.get(f"{column.key}_interval")
            if interval is not None:
                text += f"\n[dim]{escape(column.fmt.format(interval[0]))}–{escape(column.fmt.format(interval[1]))}[/]"
            cells.append(text)
        cells.append(_versus_cell(row.get("sr_vs_best")))
        table.add_row(*cells, style="dim" if index == 0 else None)
    return table


def _versus_cell(versus: dict[str, Any] | None) -> str:
    if versus is None:
        return "-"
    if versus["best"]:
        return "best"
    text = f"{versus['value']:+.4f}\n[dim]{versus['low']:+.4f}…{versus['high']:+.4f}[/]"
    return text if versus["significant"] else f"{text}\n[yellow]tie[/]"


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*COLUMN_KEYS, "sr_low", "sr_high", "sr_vs_best", "sr_vs_best_tie"])
    writer.writeheader()
    for row in rows:
        sr_interval, versus = row.get("sr_interval") or [None, None], row.get("sr_vs_best")
        writer.writerow(
            {
                **{key: row[key] for key in COLUMN_KEYS},
                "sr_low": sr_interval[0],
                "sr_high": sr_interval[1],
                "sr_vs_best": None if versus is None else versus["value"],
                "sr_vs_best_tie": None if versus is None or versus["best"] else not versus["significant"],
            }
        )
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
