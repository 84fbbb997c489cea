"""Which weights to zero, given a score per weight (lower score = pruned first).

Counts are exact: a selection unit of `numel` weights at sparsity s loses exactly
`prune_count(s, numel)` = round-half-up(s * numel) weights, whatever the ties in the scores.
"""

from __future__ import annotations

import math

import torch


def prune_count(sparsity: float, numel: int) -> int:
    return min(numel, math.floor(sparsity * numel + 0.5))


def lowest_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k lowest scores of the whole tensor (one selection unit)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, largest=False, sorted=False).indices] = True
    return mask.view_as(scores)


def lowest_per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True at the prune_count(sparsity, columns) lowest scores of every row."""
    k = prune_count(sparsity, scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False, sorted=False).indices, True)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True at the n lowest scores of every group of m consecutive columns (columns % m == 0)."""
    rows, columns = scores.shape
    groups = scores.reshape(rows, columns // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False, sorted=False).indices, True)
    return mask.view(rows, columns)


def segment_lowest_k_mask(scores: torch.Tensor, sparsity: float, row_splits: list[int]) -> torch.Tensor:
    """lowest_k_mask on each horizontal slab of `row_splits` rows: one selection unit per stacked matrix."""
    masks = [
        lowest_k_mask(slab, prune_count(sparsity, slab.numel())) for slab in torch.split(scores, row_splits, dim=0)
    ]
    return torch.cat(masks, dim=0)
