"""Magnitude pruning: drop the smallest |w| of each linear (one selection unit per matrix)."""

from __future__ import annotations

from exporter.pruning.masks import lowest_k_mask, n_m_mask, prune_count
from exporter.pruning.spec import PruneSpec
from exporter.pruning.stats import InputStatistics


class Magnitude(InputStatistics):
    """Ignores the activations for pruning; still accumulates them for the importance matrix."""

    def prune(self, spec: PruneSpec) -> None:
        for linear in self.linears.values():
            weight = linear.weight.data
            scores = weight.abs().float()
            if spec.pattern is not None:
                mask = n_m_mask(scores, *spec.pattern)
            else:
                mask = lowest_k_mask(scores, prune_count(spec.sparsity, scores.numel()))
            weight.masked_fill_(mask, 0)
