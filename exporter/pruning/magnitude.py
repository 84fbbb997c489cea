"""Magnitude pruning: drop the smallest |w| of each linear (one selection unit per matrix)."""

from __future__ import annotations

from srcr.exporter.pruning.masks import lowest_k_mask, n_m_mask, prune_count
from srcr.exporter.pruning.method import PruningMethod


class Magnitude(PruningMethod):
    summary = "the smallest |w| of each matrix (no calibration needed)"
    uses_calibration = False

    def prune(self) -> None:
        for linear in self.linears.values():
            weight = linear.weight.data
            scores = weight.abs().float()
            if self.spec.pattern is not None:
                mask = n_m_mask(scores, *self.spec.pattern)
            else:
                mask = lowest_k_mask(scores, prune_count(self.spec.sparsity, scores.numel()))
            weight.masked_fill_(mask, 0)
