"""Retentions, Sr and SrCr: how much of the base model survives compression (docs/metrics.md).

Every evaluator's result becomes a retention in [0, 1] (1 = as good as the base model); Sr is
their mean and SrCr weighs it by the theoretical compression rate.
"""

from __future__ import annotations

from collections.abc import Mapping

from srcr.base.compression import tcr

SRCR_DEFINITION = "Sr*TCr/v1"


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def perplexity_retention(base_perplexity: float, compressed_perplexity: float) -> float:
    return _clip(base_perplexity / compressed_perplexity)


def semantic_retention(mean_similarity: float) -> float:
    """Mean cosine similarity, floored at 0 (an unrelated generation retains nothing)."""
    return _clip(mean_similarity)


def accuracy_retention(accuracy: float, base_accuracy: float, chance: float = 0.0) -> float | None:
    """Chance-corrected accuracy ratio; None when the base model is no better than chance (no signal)."""
    if base_accuracy <= chance:
        return None
    return _clip((accuracy - chance) / (base_accuracy - chance))


def semantic_retention_score(retentions: Mapping[str, float | None]) -> float:
    """Sr: the mean of the retentions of the evaluators that ran (None = did not run)."""
    ran = [value for value in retentions.values() if value is not None]
    if not ran:
        raise ValueError("Sr needs at least one retention")
    return sum(ran) / len(ran)


def srcr(sr: float, sparsity: float, bits: float, removed: float = 0.0) -> float:
    """SrCr = Sr * TCr, definition SRCR_DEFINITION (TCr in its product form with structured pruning)."""
    return sr * tcr(sparsity, bits, removed)
