"""The sweep's self-contained HTML report: figures rendered by matplotlib, embedded as PNG data URIs."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from srcr.exporter.pareto import Record, is_joint


def _png_data_uri(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def scatter_groups(records: list[Record]) -> dict[str, list[Record]]:
    """The scatter plots' two series, each holding the records that have an Sr."""
    measured = [r for r in records if r["sr"] is not None]
    return {
        "quantization only": [r for r in measured if not is_joint(r)],
        "pruning + quantization": [r for r in measured if is_joint(r)],
    }


def _scatter(records: list[Record], x_key: str, x_label: str, front: set[str], x_scale: float = 1.0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for (label, points), marker in zip(scatter_groups(records).items(), ("o", "^"), strict=True):
        axes.scatter([r[x_key] * x_scale for r in points], [r["sr"] for r in points], marker=marker, label=label)
        for record in points:
            axes.annotate(record["label"], (record[x_key] * x_scale, record["sr"]), fontsize=7, alpha=0.8)
    on_front = sorted((r for r in records if r["name"] in front), key=lambda r: r[x_key])
    axes.plot([r[x_key] * x_scale for r in on_front], [r["sr"] for r in on_front], "k--", lw=1, label="Pareto front")
    axes.set_xlabel(x_label)
    axes.set_ylabel("Sr (semantic retention)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    uri = _png_data_uri(figure)
    plt.close(figure)
    return uri


def _retention_bars(recommended: Record, quant_only: Record | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = [recommended] + ([quant_only] if quant_only and quant_only["name"] != recommended["name"] else [])
    names = sorted({key for row in rows for key in row["retention"]})
    figure, axes = plt.subplots(figsize=(6.4, 3.6))
    width = 0.8 / len(rows)
    for offset, row in enumerate(rows):
        positions = [i + offset * width for i in range(len(names))]
        axes.bar(positions, [row["retention"].get(name, 0.0) for name in names], width, label=row["label"])
    axes.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(names))], names)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("retention")
    axes.legend(fontsize=8)
    uri = _png_data_uri(figure)
    plt.close(figure)
    return uri


ALL_HEADERS = ["name", "sparsity", "quant", "MB", "TCr", "actual CR", "KLD", "Sr", "Sr 95%", "SrCr", "Pareto"]


def interval_text(interval: list[float] | None) -> str:
    return "-" if not interval else f"{interval[0]:.3f}–{interval[1]:.3f}"


def difference_text(found: Record | None) -> str:
    """A paired difference as '+0.0123 [+0.0040, +0.0210]', marked 'tie' when its interval holds zero."""
    if found is None:
        return "-"
    text = f"{found['value']:+.4f} [{found['low']:+.4f}, {found['high']:+.4f}]"
    return text if found["significant"] else f"{text} tie"


def _table(headers: list[str], rows: list[list[str]], highlight: set[int] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for index, row in enumerate(rows):
        style = ' class="front"' if highlight and index in highlight else ""
        body.append(f"<tr{style}>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_report(
    records: list[Record],
    front_tcr: set[str],
    front_bytes: set[str],
    recommended: Record,
    sentence: str,
    equal_tcr: list[Record],
    title: str,
) -> str:
    ordered = sorted(records, key=lambda r: -(r["srcr"] or 0))
    quant_only = scatter_groups(records)["quantization only"]
    best_quant_only = max(quant_only, key=lambda r: r["sr"]) if quant_only else None
    table_rows = [
        [
            r["name"],
            r["pattern"] or f"{r['sparsity']:.0%}",
            r["quant"],
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['tcr']:.4f}",
            f"{r['actual']:.3f}",
            "-" if r["kld"] is None else f"{r['kld']:.3g}",
            f"{r['sr']:.4f}",
            interval_text(r.get("sr_interval")),
            f"{r['srcr']:.4f}",
            ("TCr " if r["name"] in front_tcr else "") + ("bytes" if r["name"] in front_bytes else ""),
        ]
        for r in ordered
    ]
    front_rows = {i for i, r in enumerate(ordered) if r["name"] in front_tcr or r["name"] in front_bytes}
    equal_rows = [
        [
            f"{row['tcr']:.4f}",
            row["quant_only"],
            f"{row['quant_only_sr']:.4f}",
            row["joint"],
            f"{row['joint_sr']:.4f}",
            "-" if row["relative_difference"] is None else f"{row['relative_difference']:+.2%}",
            difference_text(row.get("difference")),
        ]
        for row in equal_tcr
    ]
    figures = [
        ("Sr vs TCr", _scatter(records, "tcr", "TCr (theoretical compression rate)", front_tcr)),
        ("Sr vs bytes on disk", _scatter(records, "bytes", "artifact size (MB)", front_bytes, x_scale=1e-6)),
        ("Retention per evaluator", _retention_bars(recommended, best_quant_only)),
    ]
    images = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="{uri}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for caption, uri in figures
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child {{ text-align: left; }}
tr.front td {{ background: #eaf6ea; }}
figure {{ display: inline-block; margin: 0.5em; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p><strong>{html.escape(sentence)}</strong></p>
<h2>Figures</h2>{images}
<h2>Joint vs quantization-only at equal TCr</h2>
{
        _table(
            ["TCr", "quantization only", "Sr", "pruning + quantization", "Sr", "joint vs quant-only", "ΔSr (95%)"],
            equal_rows,
        )
        if equal_rows
        else "<p>No TCr level was reached by both kinds of configuration.</p>"
    }
<h2>All configurations (sorted by SrCr; Pareto-front rows shaded)</h2>
{
        _table(
            ["name", "sparsity", "quant", "MB", "TCr", "actual CR", "KLD", "Sr", "Sr 95%", "SrCr", "Pareto"],
            table_rows,
            front_rows,
        )
    }
</body></html>
"""
