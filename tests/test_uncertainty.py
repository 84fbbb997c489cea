"""Intervals and paired differences: checked against the normal approximation and by coverage on data whose
truth is known, and on real evaluator output against the evaluators' own figures."""

from __future__ import annotations

import numpy as np
import pytest

from srcr.evaluators.uncertainty import ItemScores, intervals, items_needed, paired_difference
from srcr.exporter.pareto import break_tie, equal_tcr_comparison


def scores(seed: int = 0, windows: int = 8, prompts: int = 50, words: int = 100, **overrides) -> ItemScores:
    rng = np.random.default_rng(seed)
    base_nll = rng.uniform(500, 700, windows)
    values = {
        "window_kl": rng.uniform(0.05, 0.15, windows),
        "window_agreement": rng.uniform(0.8, 0.9, windows),
        "window_nll": base_nll * rng.uniform(1.02, 1.08, windows),
        "base_window_nll": base_nll,
        "tokens_per_window": 255,
        "similarity": rng.uniform(0.5, 1.0, prompts),
        "last_word": rng.random(words) < 0.5,
        "base_last_word": rng.random(words) < 0.6,
    }
    return ItemScores(**{**values, **overrides})


def test_accuracy_interval_matches_the_normal_approximation():
    rng = np.random.default_rng(1)
    correct = rng.random(400) < 0.7
    items = scores(last_word=correct, base_last_word=np.ones(400, dtype=bool))
    low, high = intervals(items)["last_word_acc"]
    p = correct.mean()
    expected = 1.96 * np.sqrt(p * (1 - p) / len(correct))
    assert low < p < high
    assert (high - low) / 2 == pytest.approx(expected, rel=0.12)


def test_interval_covers_the_truth_about_95_percent_of_the_time():
    """Coverage on Bernoulli items with a known rate: the definition of a 95% interval."""
    rng = np.random.default_rng(2)
    covered = 0
    experiments = 200
    for seed in range(experiments):
        correct = rng.random(100) < 0.6
        items = scores(seed, last_word=correct, base_last_word=np.ones(100, dtype=bool))
        low, high = intervals(items, resamples=400, seed=seed)["last_word_acc"]
        covered += low <= 0.6 <= high
    assert 0.89 <= covered / experiments <= 0.99


def test_intervals_are_reproducible_and_hold_the_point_estimate():
    items = scores()
    first, second = intervals(items), intervals(items)
    assert first == second
    point = items.figures()
    for name, (low, high) in first.items():
        assert low <= point[name] <= high, name


def test_an_identical_artifact_has_a_degenerate_interval_at_full_retention():
    nll = np.full(8, 600.0)
    items = scores(
        window_kl=np.zeros(8), window_agreement=np.ones(8), window_nll=nll, base_window_nll=nll,
        similarity=np.ones(50), last_word=np.ones(100, dtype=bool), base_last_word=np.ones(100, dtype=bool),
    )  # fmt: skip
    assert intervals(items)["sr"] == [1.0, 1.0]


def test_paired_difference_sees_a_small_consistent_gain_that_unpaired_intervals_cannot():
    """Two artifacts differing by 0.01 on every prompt, with prompts varying by ±0.25: the unpaired
    intervals overlap, the paired difference excludes zero."""
    rng = np.random.default_rng(3)
    shared = rng.uniform(0.5, 1.0, 50)
    worse = scores(similarity=shared)
    better = scores(similarity=shared + 0.01)
    sr_worse, sr_better = intervals(worse)["semantic_mean"], intervals(better)["semantic_mean"]
    assert sr_better[0] < sr_worse[1]  # overlapping: unpaired, a tie
    found = paired_difference(better, worse, "semantic_mean")
    assert found.value == pytest.approx(0.01)
    assert found.significant and found.low > 0


def test_paired_difference_of_an_artifact_with_itself_is_zero_and_not_significant():
    items = scores()
    found = paired_difference(items, items, "sr")
    assert (found.value, found.low, found.high, found.significant) == (0.0, 0.0, 0.0, False)


def test_items_from_different_packs_are_not_paired():
    with pytest.raises(ValueError, match="same items"):
        paired_difference(scores(prompts=50), scores(prompts=40))


def test_manifest_items_round_trip_and_refuse_mismatched_lengths():
    items = scores()
    again = ItemScores.from_dict(items.to_dict())
    assert again.figures() == items.figures()
    broken = items.to_dict()
    broken["base_window_nll"] = broken["base_window_nll"][:-1]
    with pytest.raises(ValueError, match="per-window"):
        ItemScores.from_dict(broken)
    broken = items.to_dict()
    broken["base_last_word"] = None
    with pytest.raises(ValueError, match="same items"):
        ItemScores.from_dict(broken)


def test_items_needed_follows_one_over_root_n():
    assert items_needed(100, 0.04, 0.02) == 400
    assert items_needed(52, 0.01, 0.01) == 52


def record(name: str, sr: float, tcr: float, size: float, pack: str = "p", sparsity: float = 0.0) -> dict:
    return {"name": name, "sr": sr, "tcr": tcr, "srcr": sr * tcr, "bytes": size, "pack": pack, "sparsity": sparsity}


def test_equal_tcr_rows_say_whether_the_difference_is_real():
    rng = np.random.default_rng(4)
    shared = rng.uniform(0.4, 1.0, 50)
    items = {"q": scores(similarity=shared), "j": scores(similarity=shared + 0.002), "j2": scores(similarity=shared)}
    for name in items:
        items[name] = ItemScores(**{**items[name].__dict__, "last_word": None, "base_last_word": None})
    tie = [
        record("q", items["q"].figures()["sr"], 0.75, 10),
        record("j2", items["j2"].figures()["sr"], 0.75, 10, sparsity=0.5),
    ]
    (row,) = equal_tcr_comparison(tie, items=items)
    assert row["difference"] is not None and not row["difference"]["significant"]
    no_items = equal_tcr_comparison(tie)
    assert no_items[0]["difference"] is None


def test_a_tie_at_the_top_recommends_the_smaller_file():
    rng = np.random.default_rng(5)
    shared = rng.uniform(0.4, 1.0, 50)
    noise = rng.normal(0, 0.05, 50)
    noisy = shared + (noise - noise.mean()) + 0.003  # higher by 0.003, well within the prompts' noise
    items = {"big": scores(similarity=noisy), "small": scores(similarity=shared)}
    big = record("big", items["big"].figures()["sr"], 0.75, 20)
    small = record("small", items["small"].figures()["sr"], 0.75, 10)
    assert big["sr"] > small["sr"]
    chosen, tie = break_tie(big, [big, small], items, "sr")
    assert chosen["name"] == "small" and tie["name"] == "big"
    assert tie["tie"]["value"] == pytest.approx(small["sr"] - big["sr"])
    # From another reference pack the two cannot be paired: the higher Sr stays the pick.
    chosen, tie = break_tie(big, [big, {**small, "pack": "other"}], items, "sr")
    assert chosen["name"] == "big" and tie is None


def test_a_tie_between_equal_files_recommends_the_higher_sr():
    """Dense and pruned files of one llama.cpp type are equally large: a SrCr tie goes to the higher Sr."""
    from srcr.exporter.pareto import recommendation_sentence

    rng = np.random.default_rng(6)
    shared = rng.uniform(0.4, 0.8, 50)
    noise = rng.normal(0, 0.15, 50)
    items = {"dense": scores(similarity=shared), "pruned": scores(similarity=shared - 0.01 + (noise - noise.mean()))}
    dense = record("dense", items["dense"].figures()["sr"], 0.75, 10)
    pruned = record("pruned", items["pruned"].figures()["sr"], 0.76, 10, sparsity=0.25)
    assert pruned["srcr"] > dense["srcr"] and pruned["sr"] < dense["sr"]
    chosen, tie = break_tie(pruned, [dense, pruned], items, "srcr")
    assert chosen["name"] == "dense" and tie["name"] == "pruned"
    assert "higher Sr" in recommendation_sentence(chosen, None, None, [dense, pruned], tie)


def test_interval_mode_accepts_inside_the_widened_interval_and_finds_task_intervals():
    from srcr.evaluators.tolerances import Tolerance, compare_figures

    expected = {"sr": 0.90, "harness": {"t": {"acc": 0.50}}}
    intervals_ = {"sr": [0.85, 0.92], "lm_eval.t": [0.40, 0.60]}
    tolerances = {"sr": Tolerance(absolute=0.02), "harness.t.acc": Tolerance(absolute=0.03)}
    inside = compare_figures(expected, {"sr": 0.84, "harness": {"t": {"acc": 0.62}}}, tolerances, intervals_)
    assert [check.ok for check in inside] == [True, True]
    assert inside[1].accepted == pytest.approx((0.37, 0.63))
    outside = compare_figures(expected, {"sr": 0.82, "harness": {"t": {"acc": 0.64}}}, tolerances, intervals_)
    assert [check.ok for check in outside] == [False, False]
    drift = compare_figures(expected, {"sr": 0.84, "harness": {"t": {"acc": 0.62}}}, tolerances)
    assert [check.ok for check in drift] == [False, False]
