"""The sweep's HTML report: valid, self-contained HTML with the embedded figures."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from srcr.exporter.pareto import equal_tcr_comparison, pareto_front, recommend, recommendation_sentence
from srcr.exporter.sweep_report import render_report, scatter_groups


def records():
    rows = []
    for sparsity, bits, sr, mb in [(0, 4, 0.9, 80), (0, 3, 0.8, 65), (0.25, 4, 0.85, 80), (0, 8, 0.99, 140)]:
        tcr = 1 - bits / 16 * (1 - sparsity)
        rows.append(
            {
                "name": f"s{sparsity}-q{bits}",
                "label": f"{sparsity:.0%} Q{bits}",
                "sparsity": sparsity,
                "pattern": None,
                "quant": f"Q{bits}",
                "bits": bits,
                "bytes": mb * 1e6,
                "bits_per_weight": bits + 0.5,
                "tcr": tcr,
                "actual": 1 - mb / 270,
                "sr": sr,
                "srcr": sr * tcr,
                "kld": 1 - sr,
                "ppl": 30 / sr,
                "retention": {"perplexity": sr, "semantic": sr - 0.05, "last_word": sr - 0.1},
            }
        )
    return rows


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.stack, self.images, self.tables, self.errors = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        if tag not in ("img", "meta", "br"):
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        self.tables += tag == "table"

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


@pytest.fixture()
def page():
    rows = records()
    chosen = recommend(rows)
    return render_report(
        rows,
        pareto_front(rows, "tcr"),
        pareto_front(rows, "bytes", higher_is_better=False),
        chosen,
        recommendation_sentence(chosen, None, None),
        equal_tcr_comparison(rows),
        "test sweep",
    )


def test_report_is_valid_html_with_embedded_png_figures(page):
    parser = Collector()
    parser.feed(page)
    assert page.startswith("<!DOCTYPE html>")
    assert parser.errors == [] and parser.stack == []
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert parser.tables == 2
    assert "http://" not in page and "https://" not in page  # viewable offline


def test_report_renders_in_headless_chromium(page, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    html_file = tmp_path / "report.html"
    html_file.write_text(page)
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
    subprocess.run(
        [
            browser,
            *flags,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            html_file.as_uri(),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_scatter_draws_quantization_only_and_joint_points():
    # A dense record has pattern None: it must land in the quantization-only series, not vanish.
    groups = scatter_groups(records())
    assert [r["name"] for r in groups["quantization only"]] == ["s0-q4", "s0-q3", "s0-q8"]
    assert [r["name"] for r in groups["pruning + quantization"]] == ["s0.25-q4"]
    pattern_only = {**records()[0], "name": "2:4-q4", "sparsity": 0.0, "pattern": "2:4"}
    assert scatter_groups([pattern_only])["pruning + quantization"] == [pattern_only]


def test_a_pruned_pick_names_the_unpruned_file_that_is_no_larger():
    rows = records()  # s0.25-q4 is 80 MB, as large as the unpruned s0-q4 (Sr 0.9)
    pruned = next(r for r in rows if r["name"] == "s0.25-q4")
    sentence = recommendation_sentence(pruned, None, None, rows)
    assert sentence.endswith("though the unpruned s0-q4 is no larger on disk (80.0 MB, Sr 0.9000).")
    unpruned = next(r for r in rows if r["name"] == "s0-q8")
    assert "though" not in recommendation_sentence(unpruned, None, None, rows)
    smaller_pruned = {**pruned, "bytes": 50e6}
    assert "though" not in recommendation_sentence(smaller_pruned, None, None, rows)


def test_sweep_table_shortens_names_to_what_differs_and_shows_each_retention():
    import io

    from rich.console import Console

    from srcr.exporter.cli import common_name_prefix, sweep_tables
    from srcr.exporter.sweep import SweepSummary

    rows = [{**r, "name": f"tiny-llama-{r['name']}"} for r in records()]
    rows[0]["retention"] = {"perplexity": 0.9, "semantic": 0.85}  # no last-word figure for this one
    assert common_name_prefix([r["name"] for r in rows]) == "tiny-llama-"
    assert common_name_prefix(["only-one"]) == ""
    summary = SweepSummary(rows, {"tiny-llama-s0-q8"}, set(), rows[3], "sentence", equal_tcr_comparison(rows))
    console = Console(file=io.StringIO(), width=120)
    for table in sweep_tables(summary):
        console.print(table)
    text = console.file.getvalue()
    assert "tiny-llama-* srcr sweep" in text
    line = next(row for row in text.splitlines() if row.lstrip().startswith("s0-q4 "))
    assert line.split()[6:9] == ["0.900", "0.850", "-"]
    assert "s0.25-q4" in text and "tiny-llama-s0.25-q4" not in text
