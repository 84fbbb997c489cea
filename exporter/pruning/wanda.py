"""Wanda (Sun et al. 2023): score |w_ij| * ||x_j||_2, prune the lowest per output row."""

from __future__ import annotations

from srcr.exporter.pruning.masks import lowest_per_row_mask, n_m_mask
from srcr.exporter.pruning.method import PruningMethod


class Wanda(PruningMethod):
    summary = "|w| × input norm, lowest per output row (no weight update)"

    def prune(self) -> None:
        # sqrt(mean x_j^2) is ||x_j|| up to a constant factor, which no per-row ranking can see.
        input_norm = self.statistics.mean_square.sqrt()
        for linear in self.linears.values():
            weight = linear.weight.data
            scores = weight.abs().float() * input_norm
            if self.spec.pattern is not None:
                mask = n_m_mask(scores, *self.spec.pattern)
            else:
                mask = lowest_per_row_mask(scores, self.spec.sparsity)
            weight.masked_fill_(mask, 0)
