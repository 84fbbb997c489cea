"""Pareto fronts, constrained recommendations and the equal-TCr comparison on constructed points."""

from __future__ import annotations

import pytest

from srcr.base.errors import SrcrError
from srcr.exporter.pareto import equal_tcr_comparison, pareto_front, recommend


def record(name, sr, tcr, mb, sparsity=0.0):
    return {"name": name, "sr": sr, "tcr": tcr, "bytes": mb * 1e6, "sparsity": sparsity, "srcr": sr * tcr}


POINTS = [
    record("q8", 0.99, 0.50, 140),
    record("q4", 0.90, 0.75, 80),
    record("q3", 0.80, 0.8125, 65),
    record("s25-q4", 0.85, 0.8125, 80, sparsity=0.25),
    record("q2", 0.40, 0.875, 50),
    record("s50-q4", 0.60, 0.875, 80, sparsity=0.5),
    record("s50-q8", 0.70, 0.75, 140, sparsity=0.5),  # dominated by q4 on both axes
]


def test_front_by_tcr_drops_dominated_points():
    front = pareto_front(POINTS, "tcr")
    assert front == {"q8", "q4", "s25-q4", "s50-q4"}


def test_front_by_bytes_prefers_smaller_files():
    front = pareto_front(POINTS, "bytes", higher_is_better=False)
    # Unstructured sparsity does not shrink the file: s25-q4 is no smaller than q4 and keeps less.
    assert front == {"q8", "q4", "q3", "q2"}


def test_ties_on_both_axes_keep_both():
    assert pareto_front([record("a", 0.5, 0.5, 1), record("b", 0.5, 0.5, 1)], "tcr") == {"a", "b"}


def test_recommend_default_is_max_srcr():
    best = max(POINTS, key=lambda r: r["srcr"])
    assert recommend(POINTS)["name"] == best["name"]


def test_recommend_within_budget_takes_highest_sr_that_fits():
    assert recommend(POINTS, budget_mb=70)["name"] == "q3"
    with pytest.raises(SrcrError, match="raise --budget-mb"):
        recommend(POINTS, budget_mb=10)


def test_recommend_min_retention_takes_most_compression():
    assert recommend(POINTS, min_retention=0.84)["name"] == "s25-q4"
    assert recommend(POINTS, min_retention=0.95)["name"] == "q8"
    with pytest.raises(SrcrError, match="lower --min-retention"):
        recommend(POINTS, min_retention=0.999)


def test_equal_tcr_pairs_quantization_only_with_joint():
    rows = {row["tcr"]: row for row in equal_tcr_comparison(POINTS)}
    assert set(rows) == {0.75, 0.8125, 0.875}
    assert rows[0.8125]["joint"] == "s25-q4" and rows[0.8125]["quant_only"] == "q3"
    assert rows[0.8125]["relative_difference"] == pytest.approx((0.85 - 0.80) / 0.80)
    assert rows[0.875]["relative_difference"] == pytest.approx((0.60 - 0.40) / 0.40)
    assert rows[0.75]["relative_difference"] < 0  # s50-q8 keeps less than q4
